"""How a routed call site (MoH heads, MoE++ experts) is dispatched in the lowered forms.

One plan per call site, made at export from the routing observed on the sample inputs:
- units (heads or experts) used by at least DENSE_PATH_FRACTION of the tokens take the dense
  path: every token, weighted, no gather/scatter. Measured on CPU (ORT, MiniLM widths), a
  gathered row costs about 1.4x a dense one, so heavy units are cheaper dense;
- the others are split, by observed usage, into at most MAX_GROUPS groups of similar usage.
  Each group is one batched dispatch (TopK over tokens, Gather, batched MatMul, scatter-add)
  with one capacity C for all its units. Learned routers use units very unevenly (MiniLM at 50%
  heads: per-head usage 0.04-0.95), so one C for all units either drops tokens of the busy ones
  or wastes work on the idle ones; groups keep both small with few ops.

Capacity of a group (`capacity`):
- "dynamic" (default): C = the most tokens any unit of the group has (per batch row for heads),
  computed at run time. Exact routing, nothing dropped.
- a factor: C = min(S, max(2, ceil(factor * u * S))) with u the group's mean observed usage (or
  `active_fraction`). Static shapes, but a unit chosen by more than C tokens drops the
  lowest-weight ones (those tokens lose that unit: the output differs from exact routing).
- "exact": C = S (exact routing, no work saved).
The plan is (dense units, routed units in group order, group sizes, group capacities); a group
capacity is k / CAPACITY_DENOMINATOR of the token count (an integer expression of the symbolic
size), or DYNAMIC (0).
"""
from __future__ import annotations

import math

import torch

CAPACITY_MODES = ("dynamic", "exact")
DEFAULT_CAPACITY = "dynamic"
CAPACITY_DENOMINATOR = 1024
DYNAMIC = 0
DENSE_PATH_FRACTION = 0.7
MIN_STATIC_CAPACITY = 2
MAX_GROUPS = 3


def check_capacity(capacity) -> None:
    if capacity not in CAPACITY_MODES and (isinstance(capacity, bool) or not isinstance(capacity, (int, float))
                                           or not 0 < capacity < float("inf")):
        raise ValueError(f"capacity must be 'dynamic', 'exact' or a positive capacity factor, got {capacity!r}")


def split_groups(usage: list[float], units: list[int], max_groups: int = MAX_GROUPS) -> list[list[int]]:
    """Partition `units` into <= max_groups groups of consecutive usage, minimising the padded
    work sum(len(group) * max usage in group) (exact, by dynamic programming over the sorted units)."""
    order = sorted(units, key=lambda u: usage[u])
    n = len(order)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][i]: least padded work putting order[:i] into g groups; cut[g][i]: start of the last group
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            for j in range(i):
                cost = best[g - 1][j] + (i - j) * usage[order[i - 1]]
                if cost < best[g][i] - 1e-12:
                    best[g][i], cut[g][i] = cost, j
    g = min(range(1, max_groups + 1), key=lambda k: (best[k][n], k))
    groups, i = [], n
    while g > 0:
        j = cut[g][i]
        groups.append(order[j:i])
        i, g = j, g - 1
    return [grp for grp in reversed(groups) if grp]


def plan_dispatch(usage: list[float], capacity, active_fraction: float | None = None):
    """(dense, routed, group_sizes, group_caps) for units with observed usage fractions `usage`."""
    check_capacity(capacity)
    dense = [u for u, f in enumerate(usage) if f >= DENSE_PATH_FRACTION]
    if capacity == "exact":
        routed = [u for u in range(len(usage)) if u not in dense]
        return dense, routed, ([len(routed)] if routed else []), ([CAPACITY_DENOMINATOR] if routed else [])
    groups = split_groups(usage, [u for u in range(len(usage)) if u not in dense])
    caps = []
    for grp in groups:
        if capacity == "dynamic":
            caps.append(DYNAMIC)
        else:
            frac = active_fraction if active_fraction is not None else sum(usage[u] for u in grp) / len(grp)
            caps.append(min(CAPACITY_DENOMINATOR, max(1, math.ceil(capacity * frac * CAPACITY_DENOMINATOR))))
    return dense, [u for grp in groups for u in grp], [len(g) for g in groups], caps


def iter_groups(routed: list[int], group_sizes: list[int], group_caps: list[int]):
    """(units, capacity numerator) per group of a plan."""
    start = 0
    for size, cap in zip(group_sizes, group_caps):
        yield list(routed[start:start + size]), cap
        start += size


def group_capacity(active: torch.Tensor, tokens, cap: int):
    """C of one group: run-time (DYNAMIC: most active slots of any row of `active`, at least 1;
    a data-dependent size under export, bounded so shapes stay provably valid) or a fixed
    fraction of `tokens`."""
    if cap != DYNAMIC:
        # at least 2: a C that is 1 on the export's sample would be specialised to the constant 1
        # by the exporter's single-query attention path, breaking every other shape
        wanted = torch.sym_max(MIN_STATIC_CAPACITY, (tokens * cap + CAPACITY_DENOMINATOR - 1) // CAPACITY_DENOMINATOR)
        return torch.sym_min(tokens, wanted)
    capacity = active.sum(-1).max().clamp(min=1).item()
    torch._check(capacity >= 1)
    torch._check(capacity <= tokens)
    return capacity
