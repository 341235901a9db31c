"""MoE++ router, training-free fitting and embedding metrics (real-model fidelity: test_moepp_pass.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moh_compile.calibrate.ridge import ridge
from moh_compile.calibrate.moepp_fit import (GroupOutputs, calibrate_zero_bias, contribution_targets, fit_router,
                                              group_neurons, group_outputs, reduced_rank, select_mask, skip_means)
from moh_compile.ops.moepp import moepp_ffn, moepp_ffn_reference, split_ffn_into_experts
from moh_compile.calibrate.metrics import mean_cosine, mean_pooled_embeddings, topk_neighbour_overlap
from moh_compile.ops.ffn import ffn_reference
from moh_compile.passes.moepp_router import ExpertRouter, MoEPPConfig, config_for_keep, mean_ffn_count


def _dense(d=16, f=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(f, d, generator=g) / d ** 0.5, torch.randn(f, generator=g) * 0.1,
            torch.randn(d, f, generator=g) / f ** 0.5, torch.randn(d, generator=g) * 0.1)


def _chosen(idx, n):
    """(tokens, n) bool: which FFN experts a token's slots picked (zero-computation slots dropped)."""
    hit = F.one_hot(idx.clamp(max=n), n + 1).sum(-2) > 0
    return hit[..., :n]


def test_identity_all_ffn_experts_equals_dense_ffn():
    d, f, n = 16, 32, 4
    w_in, b_in, w_out, b_out = _dense(d, f)
    groups = torch.randperm(f, generator=torch.Generator().manual_seed(1)).reshape(n, f // n)
    ex = split_ffn_into_experts(w_in, b_in, w_out, groups=groups)
    router = ExpertRouter(d, d, MoEPPConfig(n_ffn=n, n_zero=1, n_copy=1, n_const=1, top_k=n, compensation=False))
    x = torch.randn(3, 5, d)
    idx, w, logits, comp = router(x)
    assert comp is None and logits.shape == (3, 5, n + 3)
    assert torch.equal(idx.sort(-1).values, torch.arange(n).expand(3, 5, n))
    assert torch.equal(w, torch.ones_like(w))
    out = moepp_ffn(x, ex["w_in"], ex["b_in"], None, None, ex["w_out"], b_out, idx, w,
                            torch.randn(1, d), torch.randn(1, 2, d), 1, 1, "gelu")
    ref = ffn_reference(x, w_in, b_in, w_out, b_out, None, None, "gelu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_every_token_gets_exactly_k_slots_and_zero_expert_is_a_threshold():
    d, n, k = 8, 6, 4
    router = ExpertRouter(d, d, MoEPPConfig(n_ffn=n, n_zero=1, top_k=k))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.proj.weight[:n] = torch.randn(n, d, generator=g)
        router.proj.bias[n] = 0.3  # zero expert logit: the per-token threshold
    x = torch.randn(200, d, generator=g)
    idx, w, logits, comp = router(x)
    assert idx.shape == (200, k) and w.shape == (200, k)
    ffn_scores = logits[:, :n]
    expect_count = (ffn_scores > 0.3).sum(-1).clamp(max=k)
    is_ffn = idx < n
    assert torch.equal(is_ffn.sum(-1), expect_count)
    assert torch.all(idx[~is_ffn] == n) and torch.all(w[~is_ffn] == 0) and torch.all(w[is_ffn] == 1)
    for row, m in zip(idx, is_ffn):  # chosen FFN experts are distinct and the best-scoring ones
        assert len(set(row[m].tolist())) == int(m.sum())
    chosen = _chosen(idx, n)
    torch.testing.assert_close(chosen, select_mask(ffn_scores, 0.3, k))
    assert 0 < mean_ffn_count(idx, n) < k


def test_zero_copy_constant_experts_as_defined():
    d, n = 8, 2
    w_in, b_in, w_out, _ = _dense(d, 8)
    ex = split_ffn_into_experts(w_in, b_in, w_out, groups=torch.arange(8).reshape(n, 4))
    x = torch.randn(10, d)
    v = torch.randn(2, d)
    gate = torch.randn(2, 2, d)
    # expert numbering: 0,1 FFN; 2 zero; 3 copy; 4,5 constant
    def run(idx, w):
        idx = torch.tensor(idx).expand(10, -1)
        w = torch.tensor(w).expand(10, -1)
        return moepp_ffn_reference(x, ex["w_in"], ex["b_in"], None, None, ex["w_out"], None, idx, w, v, gate,
                                1, 1, "gelu")
    assert torch.equal(run([2], [0.7]), torch.zeros(10, d))
    torch.testing.assert_close(run([3], [0.5]), 0.5 * x)
    a = torch.softmax(torch.einsum("td,jd->tj", x, gate[1]), -1)
    torch.testing.assert_close(run([5], [2.0]), 2.0 * (a[:, :1] * x + a[:, 1:] * v[1]))
    # duplicate zero slots add nothing; an FFN expert plus zero equals the expert alone
    torch.testing.assert_close(run([0, 2, 2], [1.0, 0.0, 0.0]), run([0], [1.0]))
    torch.testing.assert_close(run([0, 1], [1.0, 1.0]), group_outputs(x, ex, "gelu").sum(1))


def test_compensation_covers_exactly_the_skipped_groups():
    d, n = 8, 5
    router = ExpertRouter(d, d, MoEPPConfig(n_ffn=n, n_zero=1, top_k=3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.proj.weight[:n] = torch.randn(n, d, generator=g)
        router.proj.bias[n] = 0.0
        router.comp_table.copy_(torch.randn(n, d, generator=g))
    x = torch.randn(50, d, generator=g)
    idx, w, _, comp = router(x)
    chosen = _chosen(idx, n)
    expect = (~chosen).float() @ router.comp_table.detach()
    torch.testing.assert_close(comp, expect, atol=1e-5, rtol=1e-5)


def test_binary_weights_pass_gradient_to_logits_and_load_balance_is_recorded():
    router = ExpertRouter(8, 8, MoEPPConfig(n_ffn=4, n_zero=1, top_k=2))
    with torch.no_grad():
        router.proj.weight.normal_()
        router.proj.bias[4] = -1e3
    router.train()
    idx, w, _, _ = router(torch.randn(30, 8))
    assert torch.equal(w, torch.ones_like(w))
    w.sum().backward()
    assert router.proj.weight.grad[:4].abs().sum() > 0
    assert router.last_load_balance_loss is not None and float(router.last_load_balance_loss.detach()) > 0


def test_config_for_keep_and_invalid_settings():
    assert config_for_keep(0.5).top_k == 12 and config_for_keep(0.25).top_k == 6
    assert config_for_keep(0.5, kmax_factor=1.0).top_k == 8 and config_for_keep(1.0).top_k == 16
    with pytest.raises(ValueError, match="ffn_keep"):
        config_for_keep(0.0)
    with pytest.raises(ValueError, match="top_k"):
        MoEPPConfig(n_ffn=4, n_zero=0, top_k=5)
    with pytest.raises(ValueError, match="weighting"):
        MoEPPConfig(weighting="hard")


def test_group_neurons_recovers_planted_coactivation_groups():
    g = torch.Generator().manual_seed(0)
    n_groups, per, t = 4, 8, 600
    latent = (torch.rand(t, n_groups, generator=g) < 0.3).float() * torch.rand(t, n_groups, generator=g)
    truth = torch.arange(n_groups).repeat_interleave(per)
    acts = latent[:, truth] * (1 + 0.1 * torch.rand(t, n_groups * per, generator=g))
    perm = torch.randperm(n_groups * per, generator=g)
    groups = group_neurons(torch.randn(n_groups * per, 5), n_groups, activations=acts[:, perm], act_weight=4.0)
    assert groups.shape == (n_groups, per)
    for row in groups:  # every found group is exactly one planted group
        assert len(set(truth[perm][row].tolist())) == 1


def test_ridge_threshold_and_skip_means_on_planted_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 6, generator=g)
    W = torch.randn(3, 6, generator=g)
    Wf, bf = ridge(X, X @ W.T + 2.0, lam=1e-8)
    Wf = Wf.T
    torch.testing.assert_close(Wf, W, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bf, torch.full((3,), 2.0), atol=1e-4, rtol=1e-4)
    scores = torch.randn(5000, 8, generator=g)
    thr = calibrate_zero_bias(scores, top_k=6, target_count=3.0)
    assert abs(float(select_mask(scores, thr, 6).sum(-1).float().mean()) - 3.0) < 0.01
    gout = torch.randn(4, 2, 3)
    sel = torch.tensor([[True, False], [False, False], [True, True], [False, True]])
    m = skip_means(gout, sel)
    torch.testing.assert_close(m[0], gout[[1, 3], 0].mean(0))
    torch.testing.assert_close(m[1], gout[[0, 1], 1].mean(0))


def test_fit_router_routes_planted_groups_and_meets_budget():
    """Group j only fires when x points along direction j; the fitted router must find it."""
    d, n, per, t = 16, 8, 4, 4000
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:n]
    w_in = dirs.repeat_interleave(per, 0) * 3.0
    b_in = torch.full((n * per,), -1.5)
    w_out = torch.randn(d, n * per, generator=g) / per ** 0.5
    ex = split_ffn_into_experts(w_in, b_in, w_out, groups=torch.arange(n * per).reshape(n, per))
    active = torch.rand(t, n, generator=g) < 0.25
    x = active.float() @ dirs + 0.05 * torch.randn(t, d, generator=g)
    gout = group_outputs(x, ex, "relu")
    router = ExpertRouter(d, d, config_for_keep(0.25, n_ffn=n, kmax_factor=2.0))
    info = fit_router(router, x, gout, 0.25)
    assert info["r2"] > 0.9
    idx, w, _, comp = router(x)
    chosen = _chosen(idx, n)
    assert abs(mean_ffn_count(idx, n) - 0.25 * n) < 0.1
    assert float((chosen == active).float().mean()) > 0.95  # measured 0.968; chance is 0.625
    out = moepp_ffn(x, ex["w_in"], ex["b_in"], None, None, ex["w_out"], None, idx, w, None, None,
                           1, 0, "relu") + comp
    dense = gout.sum(1)
    rel = float((out - dense).norm() / dense.norm())
    assert rel < 0.1


def test_text_metrics():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 8, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    e = mean_pooled_embeddings(h, mask)
    torch.testing.assert_close(e[1], F.normalize(h[1, :3].mean(0), dim=0))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    a = torch.randn(40, 8, generator=g)
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(a, -a) == pytest.approx(-1.0)
    assert topk_neighbour_overlap(a, a * 3, k=10) == 1.0
    assert topk_neighbour_overlap(a, torch.randn(40, 8, generator=g), k=10) < 0.6
    with pytest.raises(ValueError, match="k must be"):
        topk_neighbour_overlap(a, a, k=40)


def test_group_outputs_in_chunks_equal_the_whole_tensor():
    """The fit recomputes group outputs chunk by chunk (memory: n x the FFN output); every
    statistic it takes from them must equal the one taken from the whole (T, n, d) tensor."""
    g = torch.Generator().manual_seed(0)
    d, n, per, t = 8, 4, 3, 50
    ex = split_ffn_into_experts(torch.randn(n * per, d, generator=g), torch.randn(n * per, generator=g),
                                torch.randn(d, n * per, generator=g), groups=torch.arange(n * per).reshape(n, per))
    x = torch.randn(t, d, generator=g)
    whole = group_outputs(x, ex, "gelu")
    chunked = GroupOutputs(x, ex, "gelu", max_elements=7 * n * d)  # 7 tokens per chunk: 8 chunks, last short
    assert chunked.chunk == 7 and len(list(chunked.chunks())) == 8
    at_once = GroupOutputs(x, ex, "gelu")  # fits in one chunk: computed once, kept
    assert at_once.tensor is not None and len(list(at_once.chunks())) == 1
    torch.testing.assert_close(at_once.dense(), whole.sum(1))
    sel = torch.rand(t, n, generator=g) < 0.5
    sel[:, 0] = True  # no token skips group 0: its mean falls back to the global one
    comp, scale = torch.randn(n, d, generator=g), torch.rand(t, generator=g) + 0.5
    torch.testing.assert_close(chunked.dense(), whole.sum(1))
    torch.testing.assert_close(chunked.mean(), whole.mean(0))
    torch.testing.assert_close(skip_means(chunked, sel), skip_means(whole, sel))
    torch.testing.assert_close(skip_means(chunked, sel)[0], whole[:, 0].mean(0))
    torch.testing.assert_close(contribution_targets(chunked, comp, scale), contribution_targets(whole, comp, scale))
    torch.testing.assert_close(contribution_targets(whole, comp, scale),
                               (whole - comp).norm(dim=-1) / scale.unsqueeze(-1))


def test_reduced_rank_keeps_the_best_predictions_of_that_rank():
    """Reduced-rank regression: exact when the map already has that rank; below it, the error
    in what it predicts on x is the tail of the predictions' singular values, no more than
    truncating the map's own SVD (which ignores where x lies)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 10, generator=g) * torch.linspace(3.0, 0.1, 10)  # anisotropic inputs
    low = torch.randn(6, 3, generator=g) @ torch.randn(3, 10, generator=g)
    same, basis = reduced_rank(low, x, 3)
    torch.testing.assert_close(same @ x.T, low @ x.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=1e-5)
    full = torch.randn(6, 10, generator=g)
    xc = x - x.mean(0)
    r2, _ = reduced_rank(full, x, 2)
    err = (xc @ (full - r2).T).pow(2).sum()
    s = torch.linalg.svdvals(xc.double() @ full.double().T)
    assert float(err) == pytest.approx(float(s[2:].pow(2).sum()), rel=1e-3)
    u, sv, vh = torch.linalg.svd(full)
    plain = u[:, :2] @ torch.diag(sv[:2]) @ vh[:2]
    assert float(err) < float((xc @ (full - plain).T).pow(2).sum())
