"""Per-token head router for MoH (mixture-of-head attention) plus cheap compensation.

Why a module of its own: the graph pass inserts one router per attention block and calls it
on the block input x (B, S, E); it returns the `head_gates` for `moh_compile::attention` and an
additive `compensation` that stands in for what the dropped heads would have contributed.

Routing (arXiv 2410.11842): `shared` heads are always active; of the other (routed) heads each
token takes the top-k by score.

- kind "learned":    scores = x @ W_r^T + b_r (ridge-fitted or distilled).
- kind "query_norm": the paper's parameter-free router for converted LLMs: score of routed head h
  = ||q_h|| / std over routed heads of ||q||, q = x @ W_q^T + b_q. It needs the routed heads' rows
  of W_q (pass `q_weight`, `q_bias`); the query projection is then paid twice for those rows.
- kind "random":     uniform random scores (a baseline; not deterministic).

Gates:
- "binary":   1 for active, 0 for dropped in the forward pass; backward is a straight-through
  estimator: d gate_h / d score_h = sigmoid'(score_h - tau) with tau midway between the k-th and
  (k+1)-th score of the token (detached), scaled by `ste_temperature`.
- "weighted": released-code scaling of the paper's two-stage gates:
  [a1, a2] = 2 softmax(W_h x); shared g = a1 * n_shared * softmax(W_s x);
  routed g = a2 * k * softmax(t * W_r x) renormalised over the top-k. All-zero router -> gates 1.
  t (`gate_temperature`, a parameter, 1 by default) sets how unevenly the chosen heads are
  weighted without changing which are chosen; the training-free fit picks it
  (calibrate.moh_fit.fit_gate_scale).

Compensation (added to the op output, O(H*E_out*(1+2r)) per token):
    comp = sum_h (1 - active_h) * (c_h + U_h^T (A_h^T x))      c_h (E_out,), A_h (E, r), U_h (r, E_out)
i.e. the mean contribution of each dropped head plus a rank-r linear correction. Zero-initialised
parameters give compensation 0, so a zero router with all heads active is the identity.

Load balance (paper): L_b = sum_i P_i f_i over routed heads, P_i = mean softmax(scores)_i,
f_i = fraction of tokens choosing head i. Stored in `last_load_balance_loss` on every training
forward (or when `track_load_balance` is True) so a distiller can collect it from all routers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moh_compile.passes.routing import Router, find_routers  # noqa: F401  (find_routers re-exported)

GATE_STYLES = ("binary", "weighted")
KINDS = ("learned", "query_norm", "random")


class HeadRouter(Router):
    def __init__(
        self,
        num_heads: int,
        embed_dim: int,
        shared: list[int] | tuple[int, ...] = (),
        k: int | None = None,
        gate_style: str = "binary",
        kind: str = "learned",
        out_dim: int | None = None,
        comp_rank: int = 0,
        q_weight: torch.Tensor | None = None,
        q_bias: torch.Tensor | None = None,
        ste_temperature: float = 1.0,
    ):
        super().__init__()
        shared = sorted(int(h) for h in shared)
        if gate_style not in GATE_STYLES:
            raise ValueError(f"gate_style must be one of {GATE_STYLES}, got {gate_style!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if len(set(shared)) != len(shared) or any(h < 0 or h >= num_heads for h in shared):
            raise ValueError(f"shared heads must be distinct indices in [0, {num_heads}), got {shared}")
        routed = [h for h in range(num_heads) if h not in shared]
        k = len(routed) if k is None else int(k)
        if not 0 <= k <= len(routed):
            raise ValueError(f"k must be in [0, {len(routed)}] (routed heads), got {k}")
        if comp_rank < 0:
            raise ValueError(f"comp_rank must be >= 0, got {comp_rank}")
        out_dim = embed_dim if out_dim is None else out_dim
        self.num_heads, self.embed_dim, self.out_dim = num_heads, embed_dim, out_dim
        self.shared, self.routed, self.k = shared, routed, k
        self.gate_style, self.kind, self.comp_rank = gate_style, kind, comp_rank
        self.ste_temperature = ste_temperature
        nr, ns = len(routed), len(shared)
        self.register_buffer("routed_index", torch.tensor(routed, dtype=torch.long), persistent=False)
        self.register_buffer("shared_index", torch.tensor(shared, dtype=torch.long), persistent=False)
        # routed-head scores of kind "learned" (unused by the other kinds)
        self.weight = nn.Parameter(torch.zeros(nr, embed_dim))
        self.bias = nn.Parameter(torch.zeros(nr))
        if gate_style == "weighted":
            self.shared_weight = nn.Parameter(torch.zeros(ns, embed_dim))
            self.mix_weight = nn.Parameter(torch.zeros(2, embed_dim))
            self.gate_temperature = nn.Parameter(torch.ones(()))
        if kind == "query_norm":
            if q_weight is None:
                raise ValueError("kind 'query_norm' needs q_weight (the block's W_q, all heads)")
            head_dim = q_weight.shape[0] // num_heads
            rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in routed]) if nr else \
                torch.zeros(0, dtype=torch.long)
            self.head_dim = head_dim
            self.register_buffer("q_weight", q_weight.detach()[rows].clone())
            qb = torch.zeros(len(rows)) if q_bias is None else q_bias.detach()[rows].clone()
            self.register_buffer("q_bias", qb)
        self.comp_mean = nn.Parameter(torch.zeros(num_heads, out_dim))
        if comp_rank > 0:
            self.comp_in = nn.Parameter(torch.zeros(num_heads, embed_dim, comp_rank))
            self.comp_out = nn.Parameter(torch.zeros(num_heads, comp_rank, out_dim))

    @property
    def num_active(self) -> int:
        return len(self.shared) + self.k

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, shared={self.shared}, k={self.k}, gate_style={self.gate_style}, "
                f"kind={self.kind}, comp_rank={self.comp_rank}")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Routed-head scores (..., n_routed); higher = more worth computing."""
        if self.kind == "learned":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "random":
            return torch.rand(*x.shape[:-1], len(self.routed), device=x.device, dtype=x.dtype)
        q = F.linear(x, self.q_weight, self.q_bias)
        norms = q.unflatten(-1, (len(self.routed), self.head_dim)).norm(dim=-1)
        std = norms.std(dim=-1, keepdim=True) if len(self.routed) > 1 else torch.ones_like(norms[..., :1])
        return norms / (std + 1e-6)

    def _routed_gates(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates, hard 0/1 mask) over routed heads from scores s (..., n_routed)."""
        nr = s.shape[-1]
        if self.k == nr:
            hard = torch.ones_like(s)
        elif self.k == 0:
            hard = torch.zeros_like(s)
        else:
            idx = s.topk(self.k, dim=-1).indices
            hard = torch.zeros_like(s).scatter(-1, idx, 1.0)
        if self.gate_style == "binary":
            if self.k in (0, nr) or not s.requires_grad:
                return hard, hard
            top2 = s.detach().topk(self.k + 1, dim=-1).values
            tau = 0.5 * (top2[..., -2:-1] + top2[..., -1:])
            soft = torch.sigmoid((s - tau) / self.ste_temperature)
            return hard + (soft - soft.detach()), hard
        probs = torch.softmax(s * self.gate_temperature, dim=-1) * hard
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return probs * self.k, hard

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lead = x.shape[:-1]
        gates = x.new_ones(*lead, self.num_heads)
        active = x.new_ones(*lead, self.num_heads)
        mix = 2.0 * torch.softmax(F.linear(x, self.mix_weight), dim=-1) if self.gate_style == "weighted" else None
        if self.routed:
            s = self.scores(x)
            g_r, hard = self._routed_gates(s)
            if mix is not None:
                g_r = g_r * mix[..., 1:2]
            idx = self.routed_index.expand(*lead, -1)
            gates = gates.scatter(-1, idx, g_r)
            active = active.scatter(-1, idx, hard)
            if self.wants_load_balance:
                p = torch.softmax(s, dim=-1).reshape(-1, s.shape[-1]).mean(0)
                f = hard.detach().reshape(-1, s.shape[-1]).mean(0)
                self.last_load_balance_loss = (p * f).sum()
        if mix is not None and self.shared:
            g_s = mix[..., :1] * len(self.shared) * torch.softmax(F.linear(x, self.shared_weight), dim=-1)
            gates = gates.scatter(-1, self.shared_index.expand(*lead, -1), g_s)
        # binary: carry the STE gradient into the compensation too (out = g c_h + (1-g) comp_h)
        dropped = 1.0 - (gates if self.gate_style == "binary" else active)
        return gates, self.compensation(x, dropped)

    def compensation(self, x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """sum_h dropped_h * (c_h + U_h^T A_h^T x); dropped (..., H) in [0, 1]."""
        comp = dropped @ self.comp_mean
        if self.comp_rank > 0:
            z = torch.einsum("...e,her->...hr", x, self.comp_in) * dropped.unsqueeze(-1)
            comp = comp + torch.einsum("...hr,hro->...o", z, self.comp_out)
        return comp
