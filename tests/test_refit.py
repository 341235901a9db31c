"""Least-squares refit of a routed block's output projection (calibrate/refit.py)."""
import torch

from moh_compile.calibrate.refit import refit_routed_output


def _data(t=600, n=4, f=5, d_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = torch.randn(t, n, f, generator=g)
    gates = (torch.rand(t, n, generator=g) < 0.6).float()
    gates[:, 0] = 1.0
    return parts, gates


def test_recovers_the_weights_that_generated_the_routed_output():
    parts, gates = _data()
    t, n, f = parts.shape
    g = torch.Generator().manual_seed(1)
    w_true, comp_true = torch.randn(6, n * f, generator=g), torch.randn(n, 6, generator=g)
    target = (parts * gates.unsqueeze(-1)).reshape(t, -1) @ w_true.T + (gates == 0).float() @ comp_true
    res = refit_routed_output(parts, gates, target, torch.zeros_like(w_true), torch.zeros_like(comp_true),
                              penalties=(1e-9,))
    assert torch.allclose(res["weight"], w_true, atol=1e-4)
    assert torch.allclose(res["comp"][1:], comp_true[1:], atol=1e-4)
    assert res["comp"][0].abs().max() < 1e-6  # part 0 always runs: its compensation keeps the prior (0)


def test_all_parts_on_keeps_the_dense_weights_exactly():
    """Identity setting: every gate 1 and the target is the dense output -> the refit is a no-op."""
    parts, _ = _data()
    t, n, f = parts.shape
    w = torch.randn(6, n * f)
    target = parts.reshape(t, -1) @ w.T
    res = refit_routed_output(parts, torch.ones(t, n), target, w, torch.zeros(n, 6))
    assert torch.allclose(res["weight"], w, atol=1e-5)
    assert res["comp"].abs().max() < 1e-5


def test_refit_beats_the_dense_weights_under_routing_and_picks_a_penalty_on_held_out_tokens():
    """Dense weights + mean compensation vs the refit, measured on tokens the fit never saw."""
    g = torch.Generator().manual_seed(2)
    t, n, f, d_out = 3000, 6, 8, 10
    x = torch.randn(t, 12, generator=g)
    parts = torch.relu(torch.einsum("td,nfd->tnf", x, torch.randn(n, f, 12, generator=g)))
    w = torch.randn(d_out, n * f, generator=g)
    dense = parts.reshape(t, -1) @ w.T
    norms = torch.einsum("tnf,onf->tno", parts, w.view(d_out, n, f)).norm(dim=-1)
    gates = torch.zeros(t, n).scatter(1, norms.topk(3, dim=-1).indices, 1.0)
    contrib = torch.einsum("tnf,onf->tno", parts, w.view(d_out, n, f))
    comp = ((gates == 0).unsqueeze(-1) * contrib).sum(0) / (gates == 0).sum(0).clamp_min(1).unsqueeze(-1)
    fit, test = slice(0, 2000), slice(2000, t)
    res = refit_routed_output(parts[fit], gates[fit], dense[fit], w, comp)

    def err(weight, c):
        approx = (parts[test] * gates[test].unsqueeze(-1)).reshape(1000, -1) @ weight.T + (gates[test] == 0).float() @ c
        return float((approx - dense[test]).norm() / dense[test].norm())

    assert err(res["weight"], res["comp"]) < 0.8 * err(w, comp)
    assert res["penalty"] in res["holdout_errors"] and len(res["holdout_errors"]) == 5
    assert res["holdout_errors"][res["penalty"]] == min(res["holdout_errors"].values())


def test_shape_mismatch_is_a_clear_error():
    parts, gates = _data()
    import pytest
    with pytest.raises(ValueError, match="shape mismatch"):
        refit_routed_output(parts, gates, torch.zeros(len(parts), 6), torch.zeros(6, 3), torch.zeros(4, 6))
