"""Spread a model-wide MoH head budget over the blocks by measured sensitivity (training-free).

Why: blocks are not equally sensitive to losing heads. On all-MiniLM-L6-v2 at 9 of 12 heads, one
head fewer in any of the first five blocks cost 0.0002-0.0007 of mean cosine on held-out text, in
the last block 0.005; moving heads to where they matter, at the same attention FLOPs, raised the
training-free cosine from 0.988 to 0.995 (docs/moh.md, "Head allocation").

How: each block alone is converted at each candidate k (every other block as in the original),
fitted exactly as the final fit will fit it (the caller's `block_losses`), and scored by how far
the model's main output moves on a few calibration batches. Losses of different blocks are taken
to add, so picking one k per block that minimises their sum with attention FLOPs no more than the
uniform setting's is a multiple-choice knapsack, solved exactly by `milp.choose_patterns` (the
same solver as the sparse pass's pattern choice). The final fit then runs block by block with
the chosen k, on inputs of the already converted blocks, as it does for uniform k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moh_compile.calibrate.milp import choose_patterns
from moh_compile.progress import progress_bar

ALLOCATIONS = ("calibrated", "uniform")
PROBE_BATCHES = 8  # calibration batches the candidate settings are scored on
PROBE_TOKENS = 4096  # calibration tokens each candidate is fitted on (the final fit uses them all)


@dataclass
class BlockChoices:
    """One block's candidate routed-head counts and their attention FLOPs (same order)."""
    name: str
    ks: list[int]
    flops: list[float]
    k_uniform: int


def candidate_ks(k_uniform: int, n_routed: int) -> list[int]:
    """k from about half the uniform k up to every routed head (the block left dense)."""
    return list(range(max(1, k_uniform - max(2, k_uniform // 2)), n_routed + 1))


def allocate(blocks: list[BlockChoices], block_losses: Callable[[int, list[int]], list[float]],
             progress: bool = True) -> dict:
    """{"k": chosen k per block, "losses": per block {k: loss}, "flops_uniform", "flops_chosen",
    "markdown"}. block_losses(i, ks) scores block i alone at each k in ks (the block's routed
    head count, the last of its candidates, needs no probe: that block is the original, loss 0)."""
    if not blocks:
        raise ValueError("no blocks to allocate heads to")
    losses = []
    with progress_bar(len(blocks), "MoH: scoring head budgets per block", progress) as advance:
        for i, b in enumerate(blocks):
            if b.k_uniform not in b.ks:
                raise ValueError(f"{b.name}: the uniform k={b.k_uniform} is not among the candidates {b.ks}")
            probed = block_losses(i, b.ks[:-1]) if len(b.ks) > 1 else []
            losses.append([float(v) for v in probed] + [0.0])
            advance()
    width = max(len(b.ks) for b in blocks)
    scale = max(max(b.flops) for b in blocks)

    def padded(rows):  # rectangular for the solver: short rows repeat their last (dense) candidate
        return np.array([r + [r[-1]] * (width - len(r)) for r in rows], dtype=float)

    loss = padded(losses)
    cost = padded([[f / scale for f in b.flops] for b in blocks])
    uniform = sum(b.flops[b.ks.index(b.k_uniform)] for b in blocks)
    pick = choose_patterns(loss, cost, uniform / scale / len(blocks))
    ks = [b.ks[min(p, len(b.ks) - 1)] for b, p in zip(blocks, pick)]
    chosen = sum(b.flops[b.ks.index(k)] for b, k in zip(blocks, ks))
    table = {b.name: dict(zip(b.ks, row)) for b, row in zip(blocks, losses)}
    return {"k": ks, "losses": table, "flops_uniform": uniform, "flops_chosen": chosen,
            "markdown": _markdown(blocks, losses, ks, uniform, chosen)}


def _markdown(blocks: list[BlockChoices], losses: list[list[float]], ks: list[int], uniform: float,
              chosen: float) -> str:
    all_k = sorted({k for b in blocks for k in b.ks})
    rows = ["Head allocation (calibrated): each block alone at each k, scored by the mean 1 - cosine of the "
            "model's output per real token on calibration batches; k chosen to minimise the sum at no more "
            f"attention FLOPs than uniform k ({chosen / 1e6:.2f} vs {uniform / 1e6:.2f} MFLOPs).", "",
            "| block | uniform k | chosen k | " + " | ".join(f"loss @ k={k}" for k in all_k) + " |",
            "|---|---|---|" + "---|" * len(all_k)]
    for b, row, k in zip(blocks, losses, ks):
        by_k = dict(zip(b.ks, row))
        rows.append(f"| {b.name} | {b.k_uniform} | **{k}** | "
                    + " | ".join(f"{by_k[x]:.2e}" if x in by_k else "" for x in all_k) + " |")
    return "\n".join(rows)


__all__ = ["ALLOCATIONS", "BlockChoices", "PROBE_BATCHES", "PROBE_TOKENS", "allocate", "candidate_ks"]
