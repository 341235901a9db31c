"""Neuron grouping (balanced k-means) and the load-balance losses."""
from __future__ import annotations

import pytest
import torch

from moh_compile.calibrate.grouping import balanced_assign, balanced_kmeans, neuron_features
from moh_compile.calibrate.load_balance import heterogeneous_load_balance_loss, load_balance_loss


def blobs(n_blobs, per_blob, dim, gen, spread=0.05):
    centers = torch.randn(n_blobs, dim, generator=gen) * 3
    labels = torch.arange(n_blobs).repeat_interleave(per_blob)
    perm = torch.randperm(labels.numel(), generator=gen)
    labels = labels[perm]
    return centers[labels] + spread * torch.randn(labels.numel(), dim, generator=gen), labels


def assert_partition(groups, f, n):
    assert groups.dtype == torch.long and groups.shape == (n, f // n)
    assert torch.equal(groups.flatten().sort().values, torch.arange(f))


def test_partition_equal_sizes_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(960, 12, generator=gen)
    g1 = balanced_kmeans(pts, 16, iters=8, seed=3)
    assert_partition(g1, 960, 16)
    assert torch.equal(g1, balanced_kmeans(pts, 16, iters=8, seed=3))
    assert not torch.equal(g1, balanced_kmeans(pts, 16, iters=8, seed=4))


@pytest.mark.parametrize("n_groups", [4, 16])
def test_recovers_planted_blobs(n_groups):
    gen = torch.Generator().manual_seed(1)
    pts, labels = blobs(4, 128, 10, gen)
    groups = balanced_kmeans(pts, n_groups, seed=0)
    assert_partition(groups, 512, n_groups)
    for row in groups:
        assert labels[row].unique().numel() == 1  # every group is pure
    if n_groups == 4:
        assert sorted(labels[groups[:, 0]].tolist()) == [0, 1, 2, 3]


def test_balanced_assign_respects_capacity_and_prefers_near():
    # 3 points all nearest to cluster 0, capacity 2: the farthest of them goes elsewhere
    dists = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 3.0], [9.0, 0.0]])
    assert balanced_assign(dists, 2).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assign(dists, 1)


def test_rejects_unequal_split():
    with pytest.raises(ValueError, match="equal groups"):
        balanced_kmeans(torch.randn(10, 3), 4)


def test_neuron_features_weights_and_coactivation():
    gen = torch.Generator().manual_seed(2)
    f, d, t = 64, 16, 300
    w_in = torch.randn(f, d, generator=gen) * torch.rand(f, 1, generator=gen) * 10
    feats = neuron_features(w_in)
    assert feats.shape == (f, d)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(f))
    w_gate = torch.randn(f, d, generator=gen)
    both = neuron_features(w_in, w_gate)
    assert both.shape == (f, 2 * d)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(f))
    # co-activation: two planted sets of neurons fire on disjoint halves of the tokens
    on = torch.zeros(t, f)
    on[: t // 2, : f // 2] = 1
    on[t // 2 :, f // 2 :] = 1
    acts = on * (1 + torch.rand(t, f, generator=gen)) + 0.01 * torch.randn(t, f, generator=gen)
    feats = neuron_features(w_in, activations=acts, act_weight=3.0, max_act_dim=64)
    assert feats.shape == (f, d + 64)
    groups = balanced_kmeans(feats[:, d:], 2)  # the co-activation part alone splits them
    assert sorted(g[0] < f // 2 for g in groups.tolist()) == [False, True]
    for g in groups.tolist():
        assert all(i < f // 2 for i in g) or all(i >= f // 2 for i in g)


def test_grouping_handles_llm_size():
    # F=11008 neurons of d=512 features into 64 groups (llama-7b hidden size)
    gen = torch.Generator().manual_seed(3)
    feats = neuron_features(torch.randn(11008, 512, generator=gen))
    groups = balanced_kmeans(feats, 64, iters=5, n_init=1)
    assert_partition(groups, 11008, 64)


def test_load_balance_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], requires_grad=True)
    chosen = torch.tensor([[True, True, False], [False, True, True]])
    # P = [0.3, 0.45, 0.25], f = [0.5, 1.0, 0.5] -> 0.15 + 0.45 + 0.125
    loss = load_balance_loss(probs, chosen)
    assert abs(loss.item() - 0.725) < 1e-6
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]]))


def test_heterogeneous_load_balance_hand_computed():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    idx = torch.tensor([[0, 2], [3, 3]])  # token 1 lists expert 3 twice: counts once
    # P = [0.25, 0.25, 0.25, 0.25]; f = [0.5, 0, 0.5, 0.5]; eta = [1, 1, 0.5, 0.5] (n_ffn=2)
    # sum = 0.125 + 0 + 0.0625 + 0.0625 = 0.25 ; beta = 0.1 -> 0.025
    loss = heterogeneous_load_balance_loss(probs, idx, n_ffn=2, tau=0.5, beta=0.1)
    assert abs(float(loss) - 0.025) < 1e-7
    # tau = 1 reduces to beta * load_balance_loss
    chosen = torch.tensor([[True, False, True, False], [False, False, False, True]])
    ref = 0.1 * load_balance_loss(probs, chosen)
    assert abs(float(heterogeneous_load_balance_loss(probs, idx, 2, tau=1.0, beta=0.1)) - float(ref)) < 1e-7
    with pytest.raises(ValueError, match="must lie in"):
        heterogeneous_load_balance_loss(probs, torch.tensor([[0, 4], [1, 1]]), n_ffn=2)
