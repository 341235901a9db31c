"""Pick one sparse pattern per head (or per group of heads) under a mean-density budget.

Why an integer program: each head's loss/density trade-off is measured independently at
calibration time, and the best assignment under a global budget is a multiple-choice
knapsack; scipy's HiGHS MILP solves it exactly at these sizes (heads x ~30 candidates).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def _check_groups(groups: list[list[int]] | None, n_heads: int) -> list[list[int]]:
    if groups is None:
        return [[h] for h in range(n_heads)]
    seen: set[int] = set()
    out = []
    for g in groups:
        g = [int(h) for h in g]
        if not g:
            raise ValueError("groups must not contain an empty group")
        for h in g:
            if not 0 <= h < n_heads:
                raise ValueError(f"group head index {h} out of range [0, {n_heads})")
            if h in seen:
                raise ValueError(f"head {h} appears in more than one group")
            seen.add(h)
        out.append(g)
    out += [[h] for h in range(n_heads) if h not in seen]  # uncovered heads choose alone
    return out


def choose_patterns(loss, density, budget: float, groups: list[list[int]] | None = None) -> list[int]:
    """Candidate index per head minimising summed loss subject to mean density <= budget.

    loss: (n_heads, n_candidates); density: same shape or (n_candidates,); heads in one group
    (e.g. sharing a KV head) receive the same candidate.
    """
    loss = np.asarray(loss, dtype=float)
    if loss.ndim != 2 or loss.shape[0] == 0 or loss.shape[1] == 0:
        raise ValueError(f"loss must be a non-empty (n_heads, n_candidates) array, got shape {loss.shape}")
    n_heads, n_cand = loss.shape
    density = np.asarray(density, dtype=float)
    if density.ndim == 1:
        density = np.broadcast_to(density, loss.shape)
    if density.shape != loss.shape:
        raise ValueError(f"density shape {density.shape} does not match loss shape {loss.shape}")
    if not (np.isfinite(loss).all() and np.isfinite(density).all()):
        raise ValueError("loss and density must be finite")
    if (density < 0).any():
        raise ValueError("density must be non-negative")
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    grp = _check_groups(groups, n_heads)

    g_loss = np.stack([loss[g].sum(0) for g in grp])        # (n_groups, n_cand)
    g_dens = np.stack([density[g].sum(0) for g in grp])
    cap = budget * n_heads
    floor = g_dens.min(1).sum()
    if floor > cap + 1e-9 * max(1.0, cap):
        raise ValueError(f"budget {budget:.4g} is infeasible: the sparsest choice has mean density "
                         f"{floor / n_heads:.4g}")

    n_g = len(grp)
    c = g_loss.ravel()
    onehot = np.zeros((n_g, n_g * n_cand))
    for i in range(n_g):
        onehot[i, i * n_cand:(i + 1) * n_cand] = 1.0
    constraints = [LinearConstraint(onehot, 1.0, 1.0),
                   LinearConstraint(g_dens.ravel()[None, :], -np.inf, cap + 1e-9 * max(1.0, cap))]
    res = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0.0, 1.0))
    if res.x is None:
        raise ValueError(f"MILP found no solution: {res.message}")
    pick = np.round(res.x).reshape(n_g, n_cand).argmax(1)
    choice = [0] * n_heads
    for g, cand in zip(grp, pick):
        for h in g:
            choice[h] = int(cand)
    return choice
