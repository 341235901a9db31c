"""Least-squares refit of a routed block's output projection under its fixed routing decisions.

Why: once a router has decided, per token, which parts of a block run (FFN expert groups for
MoE++, heads for MoH), the block output is *linear* in the output projection of the parts that
ran and in the compensation vectors of the parts that did not:
    y(t) ~ sum_{i ran} W_i g_i(t) p_i(t) + sum_{i skipped} m_i
with p_i(t) the part's input to the output projection (activated neurons, head context) and
g_i its gate. The weights that best reproduce the dense block output for the tokens *as they
are actually routed* are therefore one weighted ridge solve: the refit-after-pruning step of
the compression literature, here with a token-dependent mask. Each part absorbs some of what
its usually-skipped neighbours would have added. The penalty pulls towards the current weights
(relative to each feature's energy, so rarely used parts stay close to the dense model) and is
picked from a grid by the error on held-out calibration tokens.
"""
from __future__ import annotations

import torch

PENALTIES = (0.01, 0.03, 0.1, 0.3, 1.0)


def refit_routed_output(parts: torch.Tensor, gates: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        comp: torch.Tensor, token_weight: torch.Tensor | None = None,
                        penalties: tuple[float, ...] = PENALTIES, holdout: float = 0.2) -> dict:
    """Refit `weight` (d_out, n * f) and `comp` (n, d_out) so that, per token,
    weight @ (parts * gates).flatten() + (gates == 0) @ comp ~ target.

    parts (T, n, f): each part's input to the output projection; gates (T, n): the gate each part
    got (0 = skipped); target (T, d_out): the dense output without bias (minus any fixed extra
    term); token_weight (T,): per-token error weights. The penalty is chosen from `penalties` on
    the last `holdout` fraction of the tokens, then the fit is redone on all of them.
    Returns {"weight", "comp", "penalty", "holdout_errors": {penalty: relative error}, "error_before",
    "error_after"}: relative (token-weighted) errors on all the tokens with the old and new weights.
    """
    t, n, f = parts.shape
    d_out = target.shape[-1]
    if weight.shape != (d_out, n * f) or comp.shape != (n, d_out) or gates.shape != (t, n):
        raise ValueError(f"shape mismatch: parts {tuple(parts.shape)}, gates {tuple(gates.shape)}, weight "
                         f"{tuple(weight.shape)}, comp {tuple(comp.shape)}, target {tuple(target.shape)}")
    gates = gates.to(parts.dtype)
    feats = torch.cat([(parts * gates.unsqueeze(-1)).reshape(t, n * f), (gates == 0).to(parts.dtype)], -1).double()
    y = target.double()
    if token_weight is not None:
        feats, y = feats * token_weight.double().unsqueeze(-1), y * token_weight.double().unsqueeze(-1)
    prior = torch.cat([weight.T, comp], 0).double()

    def solve(rows: slice, penalty: float) -> torch.Tensor:
        x = feats[rows]
        gram = x.T @ x
        diag = gram.diagonal()
        reg = penalty * diag.clamp_min(1e-12 * float(diag.mean().clamp_min(1e-30)))
        return torch.linalg.solve(gram + torch.diag(reg), x.T @ y[rows] + reg.unsqueeze(-1) * prior)

    n_val = int(holdout * t) if len(penalties) > 1 else 0
    errors = {}
    if n_val >= 1 and t - n_val >= 1:
        fit_rows, val_rows = slice(0, t - n_val), slice(t - n_val, t)
        ref = y[val_rows].norm().clamp_min(1e-30)
        for p in penalties:
            errors[p] = float((feats[val_rows] @ solve(fit_rows, p) - y[val_rows]).norm() / ref)
    best = min(errors, key=errors.get) if errors else penalties[0]
    sol = solve(slice(0, t), best)
    ref = y.norm().clamp_min(1e-30)
    return {"weight": sol[: n * f].T.contiguous().to(weight.dtype), "comp": sol[n * f:].to(comp.dtype),
            "penalty": best, "holdout_errors": errors,
            "error_before": float((feats @ prior - y).norm() / ref),
            "error_after": float((feats @ sol - y).norm() / ref)}


__all__ = ["refit_routed_output", "PENALTIES"]
