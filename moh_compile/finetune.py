"""Short distillation fine-tune of a compiled model against the original (for users who can afford it).

Why: training-free calibration fits each block in isolation; a few minutes of end-to-end
gradient steps on the routers (or everything) repair the errors that compound across blocks.
"""
from __future__ import annotations

import time

import torch

from moh_compile.calibrate.data import as_calibration
from moh_compile.calibrate.distill import TRAIN_MODES, distill
from moh_compile.calibrate.metrics import embeddings, fidelity
from moh_compile.errors import MohCompileError

DEFAULT_LR = {"router": 1e-3, "all": 2e-5}


def finetune(compiled, original: torch.nn.Module, calibration, *, train: str = "router", minutes: float | None = 5.0,
             steps: int = 100_000, lr: float | None = None, load_balance_beta: float = 0.01, tokenizer=None,
             progress: bool = True) -> dict:
    """Distil `compiled` (a CompiledModel) towards `original` on calibration batches, in place.

    train: "router" (router and compensation parameters only) or "all" (every parameter).
    lr: Adam learning rate; default 1e-3 for the routers, 2e-5 for everything (1e-3 on every weight
    of MiniLM dropped its fidelity from 0.986 to 0.885, see docs/moh.md).
    Stops after `minutes` of wall time or `steps`, whichever comes first. Adds the routers'
    load-balance losses with weight `load_balance_beta`. Binary gates train through their
    straight-through estimators. The result (cost, losses, fidelity on the held-out set when
    there is one) is returned and recorded in the compiled model's report.
    """
    if train not in TRAIN_MODES:
        raise MohCompileError(f"train must be one of {', '.join(TRAIN_MODES)}, not {train!r}")
    if minutes is not None and minutes <= 0:
        raise MohCompileError("minutes must be positive")
    lr = DEFAULT_LR[train] if lr is None else lr
    args, kwargs, _ = compiled._example
    calib = as_calibration(calibration, tokenizer).match_inputs(kwargs if kwargs else args)
    if not calib.batches:
        raise MohCompileError("fine-tuning needs calibration batches (a forward loop cannot be replayed)")
    student = compiled.graph_module
    t0 = time.perf_counter()
    try:
        history = distill(student, original, calib.batches, steps=steps, lr=lr, train=train,
                          load_balance_beta=load_balance_beta,
                          time_budget_s=None if minutes is None else 60.0 * minutes, progress=progress)
    except ValueError as err:
        raise MohCompileError(str(err)) from err
    result = {"train": train, "lr": lr, "load_balance_beta": load_balance_beta, "threads": torch.get_num_threads(),
              **history, "wall_s": time.perf_counter() - t0}
    if calib.eval_batches:
        result["fidelity"] = fidelity(embeddings(original, calib.eval_batches),
                                      embeddings(student, calib.eval_batches))
    compiled.report.sections["finetune"] = result
    return result


__all__ = ["finetune"]
