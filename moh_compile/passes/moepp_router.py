"""Router for MoE++ FFNs: picks, per token, k expert slots among FFN groups and
zero-computation experts (zero, copy, constant), in the order the op `moepp_ffn` numbers them:
[0, n_ffn) FFN groups, then n_zero zero, n_copy copy, n_const constant experts.

Why a zero expert doubles as a per-token threshold: a slot ranked below the best zero expert
is turned into that zero expert (weight 0, no compute). So with a static k (exportable top-k
+ gather) a token still spends a variable number of FFN groups, and the zero expert's logit
(its row of the router, or just its bias) sets the average budget. This is MoE++'s "a token
routed to the zero expert spends nothing", generalised from top-2 to top-k.

Budget knob: `ffn_keep` = average fraction of FFN groups computed per token. `config_for_keep`
maps it to top_k = min(n_ffn, ceil(kmax_factor * ffn_keep * n_ffn)) slots; the zero-expert
bias is calibrated on data (moepp_fit.calibrate_zero_bias) so the mean count is ffn_keep*n_ffn.

Weights: "binary" (converted dense models: each chosen FFN group gets weight 1, so keeping all
groups reproduces the dense FFN exactly; gradients reach the logits through a straight-through
term) or "softmax" (MoE++ style: softmax over the chosen slots' logits).

Compensation: skipping group g loses its output y_g(x); the router adds back a per-group vector
m_g (the mean of y_g over tokens that skip g on calibration data) for every skipped group, as a
gather from a (n_ffn, d_out) table: compensation = sum(m) - sum_{chosen g} m_g.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moh_compile.calibrate.load_balance import heterogeneous_load_balance_loss
from moh_compile.passes.routing import Router


@dataclass
class MoEPPConfig:
    n_ffn: int = 16
    n_zero: int = 1
    n_copy: int = 0
    n_const: int = 0
    top_k: int = 2
    gating_residual: bool = False
    weighting: str = "binary"  # "binary" or "softmax"
    tau: float = 0.75  # load-balance weight eta for zero-computation experts
    compensation: bool = True
    rank: int | None = None  # low-rank router x -> (rank) -> logits; None: one full d x n_total map

    def __post_init__(self):
        if self.n_ffn < 1:
            raise ValueError(f"n_ffn must be >= 1, got {self.n_ffn}")
        if min(self.n_zero, self.n_copy, self.n_const) < 0:
            raise ValueError("n_zero, n_copy and n_const must be >= 0")
        if not 1 <= self.top_k <= self.n_total:
            raise ValueError(f"top_k must be in [1, {self.n_total}], got {self.top_k}")
        if self.weighting not in ("binary", "softmax"):
            raise ValueError(f"weighting must be 'binary' or 'softmax', got {self.weighting!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 (or None for a full-rank router), got {self.rank}")

    @property
    def n_total(self) -> int:
        return self.n_ffn + self.n_zero + self.n_copy + self.n_const

    @property
    def zero_range(self) -> range:
        return range(self.n_ffn, self.n_ffn + self.n_zero)


KMAX_FACTOR = 1.5  # with a zero expert, a token may use up to 1.5x the mean budget


def top_k_for_keep(ffn_keep: float, n_ffn: int, kmax_factor: float = KMAX_FACTOR) -> int:
    """Routing slots for an average budget: min(n_ffn, ceil(kmax_factor * ffn_keep * n_ffn)), >= 1."""
    if not 0.0 < ffn_keep <= 1.0:
        raise ValueError(f"ffn_keep must be in (0, 1], got {ffn_keep}")
    if kmax_factor < 1.0:
        raise ValueError(f"kmax_factor must be >= 1, got {kmax_factor}")
    return max(1, min(n_ffn, math.ceil(kmax_factor * ffn_keep * n_ffn - 1e-9)))


def config_for_keep(ffn_keep: float, n_ffn: int = 16, kmax_factor: float = KMAX_FACTOR, **kw) -> MoEPPConfig:
    """MoE++ config for an average FFN budget: k slots with room above the mean (variable k)."""
    kw.setdefault("n_zero", 1)
    return MoEPPConfig(n_ffn=n_ffn, top_k=top_k_for_keep(ffn_keep, n_ffn, kmax_factor), **kw)


class ExpertRouter(Router):
    """logits = W x + b (+ W_g prev_logits); top-k; slots below the best zero expert -> zero.

    With config.rank, W = B A is factored (A: rank x d, B: n_total x rank): full-rank logits over
    many small experts cost 2 d n_total FLOPs per token (17% of MiniLM's FFN at 512 experts), the
    factored ones 2 rank (d + n_total)."""

    def __init__(self, d_in: int, d_out: int, config: MoEPPConfig):
        super().__init__()
        self.config = config
        self.down = nn.Linear(d_in, config.rank, bias=False) if config.rank else None
        if self.down is not None:
            nn.init.zeros_(self.down.weight)
        self.proj = nn.Linear(config.rank or d_in, config.n_total)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.residual = nn.Linear(config.n_total, config.n_total, bias=False) if config.gating_residual else None
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)
        # zero / copy / const experts start off unused (-inf would break the softmax; -1e4 is enough)
        with torch.no_grad():
            self.proj.bias[config.n_ffn:] = -1e4
            if config.n_zero:
                self.proj.bias[config.n_ffn] = -1e3  # below any FFN score: keep all k slots
        self.comp_table = nn.Parameter(torch.zeros(config.n_ffn, d_out), requires_grad=config.compensation)

    def logits(self, x: torch.Tensor, prev_logits: torch.Tensor | None = None) -> torch.Tensor:
        """G_j = W_j x (+ W_g G_{j-1} when gating_residual and the previous logits are given)."""
        out = self.proj(self.down(x) if self.down is not None else x)
        if self.residual is not None and prev_logits is not None:
            out = out + self.residual(prev_logits)
        return out

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top values, expert index per slot, empty slots): slots ranked below the best zero
        expert become that zero expert."""
        cfg = self.config
        # unsorted: nothing downstream reads the slot order, and sorting k of n is most of the
        # router's time with many experts (2048 tokens, k = 354 of 513: 18 ms sorted, 6 ms not)
        top_val, top_idx = logits.topk(cfg.top_k, dim=-1, sorted=False)
        if cfg.n_zero:
            zero_logits = logits[..., cfg.n_ffn:cfg.n_ffn + cfg.n_zero]
            best_zero_val, best_zero = zero_logits.max(dim=-1, keepdim=True)
            empty = top_val < best_zero_val
            # the best zero expert itself is in top-k when it outranks a slot; mark that slot too
            empty = empty | ((top_idx >= cfg.n_ffn) & (top_idx < cfg.n_ffn + cfg.n_zero))
            top_idx = torch.where(empty, best_zero + cfg.n_ffn, top_idx)
        else:
            empty = torch.zeros_like(top_idx, dtype=torch.bool)
        return top_val, top_idx, empty

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor | None = None):
        cfg = self.config
        logits = self.logits(x, prev_logits)
        top_val, top_idx, empty = self.select(logits)
        if cfg.weighting == "binary":
            weight = 1.0 + (top_val - top_val.detach())  # forward: exactly 1; backward: d/dlogit
        else:
            weight = torch.softmax(top_val.masked_fill(empty, float("-inf")), dim=-1)
            weight = torch.nan_to_num(weight, nan=0.0)
        weight = weight.masked_fill(empty, 0.0)
        comp = self._compensation(top_idx, weight) if cfg.compensation else None
        if self.wants_load_balance:
            self.last_load_balance_loss = self._load_balance(logits, top_idx, empty)
        return top_idx, weight, logits, comp

    def _compensation(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n = self.config.n_ffn
        # a chosen group with weight w leaves (1 - w) of its mean uncovered; binary w == 1 forward.
        # Per-token weights over the n groups, then one (.., n) @ (n, d) matmul: gathering the
        # table rows per slot would build a (.., top_k, d) tensor (slow in every runtime).
        w = torch.where(idx < n, weight.detach(), 0.0).to(self.comp_table.dtype)
        per_group = w.new_zeros((*idx.shape[:-1], n)).scatter_add(-1, idx.clamp(max=n - 1), w)
        # sum(m) - per_group @ m as one addmm: no (tokens, d_out) temporary for the product
        flat = torch.addmm(self.comp_table.sum(dim=0), per_group.reshape(-1, n), self.comp_table, alpha=-1)
        return flat.reshape(*idx.shape[:-1], flat.shape[-1])

    def _load_balance(self, logits, idx, empty) -> torch.Tensor:
        """Heterogeneous MoE++ loss sum_i eta_i f_i P_i (eta = tau for zero-computation experts);
        the distiller scales it by beta (0.01)."""
        cfg = self.config
        probs = torch.softmax(logits.float(), dim=-1).reshape(-1, cfg.n_total)
        return heterogeneous_load_balance_loss(probs, idx.reshape(probs.shape[0], -1), cfg.n_ffn, cfg.tau,
                                               beta=1.0) * cfg.n_total


def router_flops(config: MoEPPConfig, d_in: int, d_out: int) -> int:
    """FLOPs per token of the router module as it runs: logits (with the gating residual's
    n_total^2 map) and the compensation, a (n_ffn,) x (n_ffn, d_out) product per token, as
    costly as full-rank logits when n_ffn is large (17% of MiniLM's FFN at 512 experts)."""
    logits = 2 * config.rank * (d_in + config.n_total) if config.rank else 2 * d_in * config.n_total
    return logits + (2 * config.n_total ** 2 if config.gating_residual else 0) + \
        (2 * config.n_ffn * d_out if config.compensation else 0)


def mean_ffn_count(idx: torch.Tensor, n_ffn: int, mask: torch.Tensor | None = None) -> float:
    """Average number of FFN groups a token computes (the budget actually spent)."""
    count = (idx < n_ffn).sum(-1).float()
    if mask is not None:
        return float((count * mask).sum() / mask.sum())
    return float(count.mean())


__all__ = ["KMAX_FACTOR", "MoEPPConfig", "config_for_keep", "top_k_for_keep", "ExpertRouter", "router_flops",
           "mean_ffn_count"]
