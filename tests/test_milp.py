"""MILP pattern selection against brute-force enumeration, plus the profiling helpers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moh_compile.calibrate.milp import choose_patterns
from moh_compile.calibrate.sparse_profile import (DENSE, attention_mass_outside, candidate_grid,
                                                  pattern_density)
from moh_compile.ops.attention import window_mask


def _brute(loss, density, budget, groups):
    n_heads, n_cand = loss.shape
    best, best_choice = np.inf, None
    for pick in itertools.product(range(n_cand), repeat=len(groups)):
        choice = [0] * n_heads
        for g, c in zip(groups, pick):
            for h in g:
                choice[h] = c
        dens = np.mean([density[h, c] for h, c in enumerate(choice)])
        total = sum(loss[h, c] for h, c in enumerate(choice))
        if dens <= budget + 1e-12 and total < best:
            best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_heads, n_cand = 5, 4
    density = np.sort(rng.uniform(0.05, 1.0, (n_heads, n_cand)), axis=1)
    loss = np.sort(rng.uniform(0, 1, (n_heads, n_cand)), axis=1)[:, ::-1].copy()  # denser = lower loss
    budget = 0.45
    best, _ = _brute(loss, density, budget, [[h] for h in range(n_heads)])
    choice = choose_patterns(loss, density, budget)
    assert np.mean([density[h, c] for h, c in enumerate(choice)]) <= budget + 1e-9
    assert np.isclose(sum(loss[h, c] for h, c in enumerate(choice)), best)


def test_known_optimum_shared_density():
    # candidate densities shared by all heads; head 0 loses much when sparse, head 2 does not
    density = np.array([0.1, 0.5, 1.0])
    loss = np.array([[9.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.1, 0.05, 0.0]])
    assert choose_patterns(loss, density, budget=0.4) == [1, 1, 0]
    assert choose_patterns(loss, density, budget=1.0) == [2, 2, 2]
    assert choose_patterns(loss, density, budget=0.1) == [0, 0, 0]


def test_group_constraint_honoured():
    rng = np.random.default_rng(3)
    loss = rng.uniform(0, 1, (6, 3))
    density = np.tile([0.1, 0.4, 1.0], (6, 1))
    groups = [[0, 1], [2, 3], [4, 5]]
    choice = choose_patterns(loss, density, 0.5, groups)
    assert all(choice[a] == choice[b] for a, b in groups)
    best, _ = _brute(loss, density, 0.5, groups)
    assert np.isclose(sum(loss[h, c] for h, c in enumerate(choice)), best)
    # the ungrouped optimum is at least as good, and here strictly better
    free = choose_patterns(loss, density, 0.5)
    assert sum(loss[h, c] for h, c in enumerate(free)) < best


def test_invalid_inputs():
    loss = np.ones((3, 2))
    with pytest.raises(ValueError, match="infeasible"):
        choose_patterns(loss, [0.2, 1.0], budget=0.1)
    with pytest.raises(ValueError, match="does not match"):
        choose_patterns(loss, np.ones((2, 2)), budget=0.5)
    with pytest.raises(ValueError, match="more than one group"):
        choose_patterns(loss, [0.2, 1.0], 0.5, groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        choose_patterns(loss, [0.2, 1.0], 0.5, groups=[[0, 5]])
    with pytest.raises(ValueError, match="finite"):
        choose_patterns(np.array([[np.nan, 1.0]]), [0.2, 1.0], 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        choose_patterns(np.ones(3), [0.2, 1.0], 0.5)


# --- profiling helpers ------------------------------------------------------------------

def test_pattern_density_hand_cases():
    # S=4, causal, span 1, no sink: only the diagonal -> 4 of 10 pairs
    assert pattern_density(4, 0, 1, 0.0, False, True) == pytest.approx(4 / 10)
    # S=4, causal, sink 1, span 2: rows 0..3 see 1, 2, 2+... row2 {0,1,2}, row3 {0,2,3} -> 1+2+3+3
    assert pattern_density(4, 1, 2, 0.0, False, True) == pytest.approx(9 / 10)
    # S=4, bidirectional two-sided span 2 (radius 1): rows see 2,3,3,2 -> 10 of 16
    assert pattern_density(4, 0, 2, 0.0, True, False) == pytest.approx(10 / 16)
    # beta: span = 0 + 0.5 * 8 = 4, causal, no sink: 1+2+3+4*5 = 26 of 36
    assert pattern_density(8, 0, 0, 0.5, False, True) == pytest.approx(26 / 36)
    assert pattern_density(8, 2, -1, 0.0, False, True) == 1.0


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_density_matches_mask(two_sided, causal):
    s = 37
    for sink, alpha, beta in [(0, 3, 0.0), (2, 5, 0.1), (4, 0, 0.25), (1, 40, 0.0)]:
        pat = window_mask(s, s, [sink], [alpha], [beta], two_sided)[0]
        if causal:
            pat = pat & torch.ones(s, s, dtype=torch.bool).tril()
        dense = s * (s + 1) / 2 if causal else s * s
        assert pattern_density(s, sink, alpha, beta, two_sided, causal) == pytest.approx(pat.sum().item() / dense)


def test_candidate_grid():
    grid = candidate_grid([512, 1024])
    assert grid[-1] == DENSE and grid.count(DENSE) == 1
    assert (64, 0.0) in grid and (0, 0.125) in grid and (256, 0.25) in grid
    assert (0, 0.0) not in grid
    assert all(a % 64 == 0 for a, _ in grid[:-1])
    # (512, b) spans >= 512 at N=512 but not at 1024 -> kept; (1024, .) is dense everywhere -> dropped
    assert (512, 0.0) in grid and all(a < 1024 for a, _ in grid[:-1])
    short = candidate_grid([64], betas=(0.0,))
    assert short == [(8, 0.0), (16, 0.0), DENSE]
    with pytest.raises(ValueError, match="positive"):
        candidate_grid([])


def test_attention_mass_outside_hand_case():
    # q = 0 -> uniform softmax over the visible keys; a causal span-1 pattern keeps 1/(i+1) of row i
    s = 4
    q = torch.zeros(1, 2, s, 8)
    k = torch.randn(1, 1, s, 8)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    out = attention_mass_outside(q, k, causal, 1.0, [0, 0], [1, -1], [0.0, 0.0], False, chunk=3)
    expected = np.mean([1 - 1 / (i + 1) for i in range(s)])
    assert out[0].item() == pytest.approx(expected)
    assert out[1].item() == pytest.approx(0.0)  # dense head drops nothing
    # additive mask: same thing expressed as 0 / -inf
    add = torch.zeros(s, s).masked_fill(~causal, float("-inf"))
    out2 = attention_mass_outside(q, k, add, 1.0, 0, 1, 0.0, False)
    assert torch.allclose(out2, torch.full((2,), expected))
