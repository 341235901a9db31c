"""The per-call-site dispatch plan of the lowered forms: dense path, usage groups, capacities."""
import itertools
import math
import random

import pytest
import torch

from moh_compile.backends import dispatch_plan as dp


def _padded_work(usage, groups):
    return sum(len(g) * max(usage[u] for u in g) for g in groups)


def _brute_force_best(usage, units, max_groups):
    """Least padded work over every split of the usage-sorted units into <= max_groups runs."""
    order = sorted(units, key=lambda u: usage[u])
    best = math.inf
    for k in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, len(order)), k - 1):
            bounds = (0, *cuts, len(order))
            groups = [order[a:b] for a, b in zip(bounds, bounds[1:])]
            best = min(best, _padded_work(usage, groups))
    return best


def test_split_groups_is_optimal_and_a_partition():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 9)
        usage = [rng.random() for _ in range(n)]
        for max_groups in (1, 2, 3):
            groups = dp.split_groups(usage, list(range(n)), max_groups)
            assert sorted(u for g in groups for u in g) == list(range(n))
            assert len(groups) <= max_groups
            assert _padded_work(usage, groups) == pytest.approx(_brute_force_best(usage, range(n), max_groups))


def test_plan_dense_path_groups_and_capacities():
    usage = [0.95, 0.05, 0.10, 0.40, 0.45, 0.72, 0.30]
    dense, routed, sizes, caps = dp.plan_dispatch(usage, "dynamic")
    assert dense == [0, 5]  # >= DENSE_PATH_FRACTION
    assert sorted(routed) == [1, 2, 3, 4, 6] and sum(sizes) == 5 and len(sizes) <= dp.MAX_GROUPS
    assert caps == [dp.DYNAMIC] * len(sizes)
    groups = [g for g, _ in dp.iter_groups(routed, sizes, caps)]
    assert [1, 2] in groups  # the two idle heads share a group, away from the busy ones

    _, routed_f, sizes_f, caps_f = dp.plan_dispatch(usage, 1.5)
    for group, cap in dp.iter_groups(routed_f, sizes_f, caps_f):
        mean = sum(usage[u] for u in group) / len(group)
        assert cap == math.ceil(1.5 * mean * dp.CAPACITY_DENOMINATOR)

    dense_e, routed_e, sizes_e, caps_e = dp.plan_dispatch(usage, "exact")
    assert dense_e == [0, 5] and sizes_e == [5] and caps_e == [dp.CAPACITY_DENOMINATOR]
    assert dp.plan_dispatch([1.0, 0.99], "dynamic") == ([0, 1], [], [], [])


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "lots", True, None])
def test_bad_capacity(bad):
    with pytest.raises(ValueError, match="capacity must be"):
        dp.plan_dispatch([0.5], bad)


def test_group_capacity_dynamic_and_static():
    active = torch.zeros(3, 10, dtype=torch.bool)
    active[0, :4] = True
    active[2, :7] = True
    assert dp.group_capacity(active, 10, dp.DYNAMIC) == 7  # the busiest row
    assert dp.group_capacity(torch.zeros(2, 10, dtype=torch.bool), 10, dp.DYNAMIC) == 1  # never 0
    assert dp.group_capacity(active, 10, 512) == 5
    assert dp.group_capacity(active, 10, 1) == 2  # static capacities never go below 2 (see group_capacity)
    assert dp.group_capacity(active, 10, dp.CAPACITY_DENOMINATOR) == 10
