"""Auxiliary load-balance losses for routed heads (MoH) and MoE++ experts.

Both are sum_i P_i f_i: P_i is the mean router probability of expert/head i (differentiable)
and f_i the fraction of tokens that chose it (a count, no gradient). Minimising the product
pushes probability mass away from over-used choices.

MoE++ (arXiv 2410.07348) weighs each term by eta_i: 1 for FFN experts, tau for
zero-computation experts, so that tau < 1 lets tokens use cheap experts more freely:
    L_b = beta * sum_i eta_i f_i P_i
"""
from __future__ import annotations

import torch


def _choice_fraction(chosen_mask: torch.Tensor) -> torch.Tensor:
    return chosen_mask.detach().to(torch.float32).mean(0)


def load_balance_loss(router_probs: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """MoH: sum_i P_i f_i over the routed heads (the caller scales by beta, 0.01 in the paper).

    router_probs (T, H): per-token routing probabilities; chosen_mask (T, H) bool/0-1: which
    heads each token used. Returns a scalar.
    """
    if router_probs.dim() != 2 or chosen_mask.shape != router_probs.shape:
        raise ValueError(f"router_probs and chosen_mask must both be (T, H), got {tuple(router_probs.shape)} and {tuple(chosen_mask.shape)}")
    p = router_probs.mean(0)
    return (p * _choice_fraction(chosen_mask).to(p.dtype)).sum()


def heterogeneous_load_balance_loss(router_probs: torch.Tensor, expert_idx: torch.Tensor, n_ffn: int,
                                    tau: float = 0.75, beta: float = 0.01) -> torch.Tensor:
    """MoE++: beta * sum_i eta_i f_i P_i with eta_i = 1 (i < n_ffn) else tau.

    router_probs (T, E_total); expert_idx (T, k) the chosen experts. f_i is the fraction of
    tokens that chose expert i (a token listing i twice counts once).
    """
    if router_probs.dim() != 2 or expert_idx.dim() != 2 or expert_idx.shape[0] != router_probs.shape[0]:
        raise ValueError(f"router_probs must be (T, E) and expert_idx (T, k), got {tuple(router_probs.shape)} and {tuple(expert_idx.shape)}")
    t, e = router_probs.shape
    if not 0 <= n_ffn <= e:
        raise ValueError(f"n_ffn={n_ffn} must lie in [0, {e}]")
    if expert_idx.numel() and (int(expert_idx.min()) < 0 or int(expert_idx.max()) >= e):
        raise ValueError(f"expert_idx values must lie in [0, {e})")
    chosen = torch.zeros(t, e, dtype=torch.bool, device=router_probs.device)
    chosen.scatter_(1, expert_idx, True)
    eta = torch.full((e,), tau, dtype=router_probs.dtype, device=router_probs.device)
    eta[:n_ffn] = 1.0
    p = router_probs.mean(0)
    return beta * (eta * _choice_fraction(chosen).to(p.dtype) * p).sum()


__all__ = ["heterogeneous_load_balance_loss", "load_balance_loss"]
