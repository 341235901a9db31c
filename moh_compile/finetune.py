"""Short distillation fine-tune of a compiled model against the original (for users who can afford it),
and the MoE++ budget re-set that follows it.

Why: training-free calibration fits each block in isolation; a few minutes of end-to-end
gradient steps on the routers (or everything) repair the errors that compound across blocks.
Training also moves the router logits, and with them the FFN work the zero experts leave, so
the budget is re-set on the calibration data afterwards.
"""
from __future__ import annotations

import functools
import math
import time

import torch

from moh_compile.api import DISPATCH_PLAN_BATCHES
from moh_compile.calibrate.budget import set_ffn_budget as _set_router_budgets
from moh_compile.calibrate.data import as_calibration
from moh_compile.calibrate.distill import DEFAULT_POOLED_WEIGHT, TRAIN_MODES, default_loss, distill
from moh_compile.calibrate.metrics import embeddings, fidelity
from moh_compile.errors import MohCompileError
from moh_compile.passes.moepp import router_budgets

DEFAULT_LR = {"router": 1e-3, "all": 1e-5}


def finetune(compiled, original: torch.nn.Module, calibration, *, train: str = "router", minutes: float | None = 5.0,
             steps: int = 100_000, lr: float | None = None, load_balance_beta: float = 0.01, tokenizer=None,
             progress: bool = True, reset_budget: bool = True,
             pooled_weight: float = DEFAULT_POOLED_WEIGHT, validation: float = 0.1) -> dict:
    """Distil `compiled` (a CompiledModel) towards `original` on calibration batches, in place.

    train: "router" (router and compensation parameters only) or "all" (every parameter).
    lr: Adam learning rate; default 1e-3 for the routers, 1e-5 for everything (1e-3 on every weight
    of MiniLM dropped its fidelity from 0.986 to 0.885; 1e-5 edged 2e-5 at 9/12 heads, 0.9954-0.9955
    vs 0.9949-0.9951, and tied it at 6/12; see docs/moh.md).
    Stops after `minutes` of wall time or `steps`, whichever comes first. Adds the routers'
    load-balance losses with weight `load_balance_beta`. Binary gates train through their
    straight-through estimators. The loss matches the last hidden state per token plus, with
    weight `pooled_weight`, the mean-pooled output per sequence (0 for token outputs only, e.g.
    language models). reset_budget: afterwards, re-set the MoE++ zero-expert
    thresholds so each block's FFN work on the calibration data is its ffn_keep again
    (`set_ffn_budget`). validation: the fraction of calibration batches held out of training
    to pick the best weights seen (checked every 50 steps; see `distill`); used when there are
    at least MIN_BATCHES_FOR_VALIDATION batches, 0 turns it off. The result (cost, losses,
    fidelity on the held-out set when there is one) is returned and recorded in the compiled
    model's report.
    """
    if train not in TRAIN_MODES:
        raise MohCompileError(f"train must be one of {', '.join(TRAIN_MODES)}, not {train!r}")
    if minutes is not None and minutes <= 0:
        raise MohCompileError("minutes must be positive")
    if pooled_weight < 0:
        raise MohCompileError(f"pooled_weight must be >= 0, got {pooled_weight}")
    if not 0 <= validation < 1:
        raise MohCompileError(f"validation must be a fraction in [0, 1), got {validation}")
    lr = DEFAULT_LR[train] if lr is None else lr
    calib = compiled.match_inputs(as_calibration(calibration, tokenizer))
    if not calib.batches:
        raise MohCompileError("fine-tuning needs calibration batches (a forward loop cannot be replayed)")
    student = compiled.graph_module
    train_batches, val_batches = split_validation(calib.batches, validation)
    t0 = time.perf_counter()
    try:
        history = distill(student, original, train_batches, steps=steps, lr=lr, train=train,
                          load_balance_beta=load_balance_beta,
                          time_budget_s=None if minutes is None else 60.0 * minutes, progress=progress,
                          loss_fn=functools.partial(default_loss, pooled_weight=pooled_weight),
                          val_batches=val_batches)
    except ValueError as err:
        raise MohCompileError(str(err)) from err
    result = {"train": train, "lr": lr, "load_balance_beta": load_balance_beta, "pooled_weight": pooled_weight,
              "threads": torch.get_num_threads(), "train_batches": len(train_batches),
              "validation_batches": len(val_batches),
              **history, "wall_s": time.perf_counter() - t0}
    if reset_budget and router_budgets(compiled.plan, student):
        result["ffn_budget"] = set_ffn_budget(compiled, calib, progress=progress)
    if calib.eval_batches:
        result["fidelity"] = fidelity(embeddings(original, calib.eval_batches),
                                      embeddings(student, calib.eval_batches))
    compiled.report.sections["finetune"] = result
    return result


MIN_BATCHES_FOR_VALIDATION = 10


def split_validation(batches: list, fraction: float) -> tuple[list, list]:
    """(training batches, validation batches): the last ceil(fraction * n) batches are held out,
    when fraction > 0 and there are at least MIN_BATCHES_FOR_VALIDATION batches."""
    if fraction <= 0 or len(batches) < MIN_BATCHES_FOR_VALIDATION:
        return list(batches), []
    n_val = math.ceil(fraction * len(batches))
    return list(batches[:-n_val]), list(batches[-n_val:])


def set_ffn_budget(compiled, data, ffn_keep: float | None = None, tokenizer=None, progress: bool = True) -> dict:
    """Shift each MoE++ block's zero-expert threshold so that its FFN work on `data` (calibration
    data in any form `as_calibration` takes) is `ffn_keep` (default: the block's planned
    ffn_keep), in place. Use it after fine-tuning, or with text like your deployment text, since
    the compile-time threshold meets the budget on the calibration text only. The portable ONNX
    export then plans its expert dispatch on `data` too (`compiled.plan_batches`): which experts
    run densely and how the rest are grouped follows the usage on that text.
    Returns {router: {"before", "after", "shift"}}, also recorded in the report.
    """
    budgets = router_budgets(compiled.plan, compiled.graph_module)
    if not budgets:
        raise MohCompileError("the model has no MoE++ blocks: there is no FFN budget to set")
    if ffn_keep is not None:
        if not 0.0 < ffn_keep <= 1.0:
            raise MohCompileError(f"ffn_keep must be in (0, 1], got {ffn_keep}")
        budgets = dict.fromkeys(budgets, float(ffn_keep))
    calib = compiled.match_inputs(as_calibration(data, tokenizer))
    if not calib.batches:
        raise MohCompileError("setting the FFN budget needs calibration batches, not a forward loop")
    try:
        result = _set_router_budgets(compiled.graph_module, calib.batches, budgets, calib.token_mask, progress)
    except ValueError as err:
        raise MohCompileError(str(err)) from err
    compiled.plan_batches = calib.batches[:DISPATCH_PLAN_BATCHES]
    rows = [f"| {name} | {r['before']:.3f} | {r['after']:.3f} |" for name, r in result.items()]
    compiled.report.sections["ffn_budget"] = {
        "routers": result, "source": calib.source,
        "markdown": "\n".join([f"Zero-expert thresholds re-set on {calib.source or 'the given data'} "
                               "(FFN work fraction per router, before and after):", "",
                               "| router | before | after |", "|---|---|---|", *rows])}
    return result


__all__ = ["finetune", "set_ffn_budget"]
