"""Training-free fitting of MoH routers + compensation from recorded tensors of ONE attention block.

Why this recipe: dropping head h for token t changes the block output by exactly
r_h(t) = contrib_h(t) - comp_h(x_t), so the best cheap router ranks heads by the predicted size
of that residual, and the best cheap compensation is a regression of the dropped heads'
contributions on x. Both are closed-form ridge fits on recorded activations (seconds on CPU).

Inputs for a block with T tokens, H heads, input dim E, output dim E_out:
    x        (T, E)          the block input (input of the Q projection)
    contrib  (T, H, E_out)   per-head contributions ctx_h @ W_o[:, h*D:(h+1)*D]^T (no bias)
Optional metric: `out_weight` (E_out,) and `token_weight` (T,) scale the error norm, e.g. the
following LayerNorm's gamma and 1/std of each token's residual stream for post-LN models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moh_compile.calibrate.refit import refit_routed_output
from moh_compile.calibrate.ridge import ridge
from moh_compile.ops.attention import head_contexts
from moh_compile.passes.moh_router import HeadRouter

TARGETS = ("norm", "sq", "log")


@dataclass
class BlockFit:
    """Fitted router + compensation for one block (float32 tensors)."""
    shared: list[int]
    k: int
    weight: torch.Tensor            # (n_routed, E)
    bias: torch.Tensor              # (n_routed,)
    comp_mean: torch.Tensor         # (H, E_out)
    comp_in: torch.Tensor | None    # (H, E, r)
    comp_out: torch.Tensor | None   # (H, r, E_out)

    @property
    def comp_rank(self) -> int:
        return 0 if self.comp_in is None else self.comp_in.shape[-1]

    def router(self, gate_style: str = "binary") -> HeadRouter:
        h, e_out = self.comp_mean.shape
        r = HeadRouter(h, self.weight.shape[1], self.shared, self.k, gate_style=gate_style, kind="learned",
                       out_dim=e_out, comp_rank=self.comp_rank)
        self.load_into(r)
        return r

    @torch.no_grad()
    def load_into(self, router: HeadRouter) -> None:
        if router.shared != self.shared or router.k != self.k or router.comp_rank != self.comp_rank:
            raise ValueError("router config (shared, k, comp_rank) does not match the fit")
        router.weight.copy_(self.weight)
        router.bias.copy_(self.bias)
        router.comp_mean.copy_(self.comp_mean)
        if self.comp_rank:
            router.comp_in.copy_(self.comp_in)
            router.comp_out.copy_(self.comp_out)


def compensation_values(x: torch.Tensor, comp_mean: torch.Tensor, comp_in: torch.Tensor | None,
                        comp_out: torch.Tensor | None) -> torch.Tensor:
    """(T, H, E_out) what each head's compensation would add if that head were dropped."""
    vals = comp_mean.expand(x.shape[0], -1, -1)
    if comp_in is not None:
        vals = vals + torch.einsum("te,her,hro->tho", x, comp_in, comp_out)
    return vals


def head_errors(residual: torch.Tensor, out_weight: torch.Tensor | None = None,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(T, H) weighted norm of each head's residual: the error of dropping that head alone."""
    if out_weight is not None:
        residual = residual * out_weight
    err = residual.norm(dim=-1)
    return err if token_weight is None else err * token_weight.unsqueeze(-1)


def choose_shared(err: torch.Tensor, num_shared: int) -> list[int]:
    """Heads with the largest mean squared drop error become always-on."""
    return sorted(err.pow(2).mean(0).topk(num_shared).indices.tolist()) if num_shared else []


def fit_compensation(x: torch.Tensor, contrib: torch.Tensor, dropped: torch.Tensor, rank: int = 0,
                     lam: float = 1e-2, out_weight: torch.Tensor | None = None, min_tokens: int = 8):
    """Per head: mean (rank 0) or reduced-rank ridge (rank r) of contrib_h on x over tokens where
    the head is dropped (all tokens when fewer than min_tokens). Returns comp_mean, comp_in, comp_out."""
    t, h, e_out = contrib.shape
    e = x.shape[1]
    comp_mean = torch.zeros(h, e_out)
    comp_in = torch.zeros(h, e, rank) if rank else None
    comp_out = torch.zeros(h, rank, e_out) if rank else None
    w = torch.ones(e_out) if out_weight is None else out_weight.float()
    for i in range(h):
        sel = dropped[:, i]
        if int(sel.sum()) < min_tokens:
            sel = torch.ones(t, dtype=torch.bool)
        xs, ys = x[sel], contrib[sel, i]
        if not rank:
            comp_mean[i] = ys.mean(0)
            continue
        b_full, _ = ridge(xs, ys, lam)
        xc = xs - xs.mean(0)
        fitted = (xc @ b_full) * w
        evals, evecs = torch.linalg.eigh((fitted.T @ fitted).double())        # top right singular vectors
        v = evecs[:, -rank:].flip(-1).float()                                    # (E_out, r) weighted space
        a = b_full @ (w.unsqueeze(-1) * v)                                         # (E, r)
        u = v.T / w                                                                # (r, E_out)
        comp_in[i], comp_out[i] = a, u
        comp_mean[i] = ys.mean(0) - xs.mean(0) @ a @ u
    return comp_mean, comp_in, comp_out


def _target(err: torch.Tensor, target: str) -> torch.Tensor:
    if target == "norm":
        return err
    if target == "sq":
        return err.pow(2)
    return torch.log(err + 1e-3 * err.mean())


def fit_block(
    x: torch.Tensor,
    contrib: torch.Tensor,
    num_active: int,
    num_shared: int | None = None,
    shared: list[int] | None = None,
    comp_rank: int = 0,
    compensate: bool = True,
    target: str = "norm",
    iters: int = 2,
    lam: float = 1e-2,
    out_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> BlockFit:
    """Fit shared-head choice, a linear router and compensation for one block.

    Loop: residuals with the current compensation -> shared heads by mean error -> ridge router
    from x to each routed head's drop error -> top-k decisions -> compensation refitted on the
    tokens where each head is actually dropped.
    """
    t, h, e_out = contrib.shape
    if x.shape[0] != t:
        raise ValueError(f"x has {x.shape[0]} tokens but contrib has {t}")
    if not 0 < num_active <= h:
        raise ValueError(f"num_active must be in [1, {h}], got {num_active}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if shared is None:
        num_shared = max(0, num_active - (h - num_active)) if num_shared is None else num_shared
        if not 0 <= num_shared <= num_active:
            raise ValueError(f"num_shared must be in [0, num_active={num_active}], got {num_shared}")
    x, contrib = x.float(), contrib.float()
    fixed_shared = shared is not None
    dropped = torch.ones(t, h, dtype=torch.bool)
    zero = (torch.zeros(h, e_out), None, None)
    comp = fit_compensation(x, contrib, dropped, comp_rank, lam, out_weight) if compensate else zero
    for it in range(max(1, iters)):
        err = head_errors(contrib - compensation_values(x, *comp), out_weight, token_weight)
        if not fixed_shared and it == 0:
            shared = choose_shared(err, num_shared)
        routed = [i for i in range(h) if i not in shared]
        k = num_active - len(shared)
        if k > len(routed) or k < 0:
            raise ValueError(f"num_active={num_active} incompatible with {len(shared)} shared of {h} heads")
        weight, bias = ridge(x, _target(err[:, routed], target), lam) if routed else \
            (torch.zeros(e_out, 0), torch.zeros(0))
        fit = BlockFit(shared, k, weight.T.contiguous(), bias, *comp)
        if not compensate or it == iters - 1:
            break
        dropped = ~fit.router().eval()(x)[0].detach().bool()
        comp = fit_compensation(x, contrib, dropped, comp_rank, lam, out_weight)
    return fit


# Weighted gates' softmax temperature, tried as multiples of 1 / std of the fitted routed scores
# (1e-3: nearly uniform weights, i.e. the binary gates' output; 3: peaked).
GATE_SCALES = (1e-3, 0.1, 0.3, 1.0, 3.0)


@torch.no_grad()
def fit_gate_scale(router: HeadRouter, x: torch.Tensor, contrib: torch.Tensor,
                   out_weight: torch.Tensor | None = None, token_weight: torch.Tensor | None = None) -> dict:
    """Weighted gates (`k softmax(t * scores)` over the chosen top-k): fit the temperature t from
    GATE_SCALES / std(scores) by the block error on the calibration tokens, in the fit's metric.

    Why: the ridge router predicts each head's drop error, on no particular scale; its top-k is
    what the fit is for, and t does not change the top-k, only how unevenly the chosen heads are
    weighted (untuned, t = 1: MiniLM at 9/12 heads read 0.971 mean cosine against 0.988 with binary
    gates). The smallest t reproduces the binary output, so the fitted t is at least as good on these
    tokens. Returns {"scale", "rel_errors"} (scale in units of 1 / std(scores)); {} for other routers."""
    if router.gate_style != "weighted" or router.kind != "learned" or router.k in (0, len(router.routed)):
        return {}
    unit = 1.0 / router.scores(x).std().clamp_min(1e-12).item()
    full = contrib.sum(1)
    errors = {}
    for c in GATE_SCALES:
        router.gate_temperature.fill_(c * unit)
        residual = routed_output(router, x, contrib) - full
        errors[c] = head_errors(residual.unsqueeze(1), out_weight, token_weight).pow(2).sum().item()
    best = min(errors, key=errors.get)
    router.gate_temperature.fill_(best * unit)
    total = max(head_errors(full.unsqueeze(1), out_weight, token_weight).pow(2).sum().item(), 1e-30)
    return {"scale": best, "rel_errors": {str(c): round((e / total) ** 0.5, 4) for c, e in errors.items()}}


@torch.no_grad()
def op_head_contexts(*op_args) -> torch.Tensor:
    """(B, S, H, D) every head's context from the attention op's own arguments, in the op's order
    (its output projection and head_gates, positions 8-10, are left out: the fit decides the gates;
    `head_contexts` takes the rest in the same order, so new op arguments need no change here)."""
    return head_contexts(*op_args[:8], *op_args[11:]).transpose(1, 2)


def contributions(ctx: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """(..., H, E_out) what each head adds to the block output (no o_bias) from contexts (..., H, D)."""
    h, d = ctx.shape[-2], ctx.shape[-1]
    return torch.einsum("...hd,ohd->...ho", ctx, o_weight.view(-1, h, d))


@torch.no_grad()
def head_contributions(*op_args) -> torch.Tensor:
    """(B, S, H, E_out) what each head adds to the block output, from the attention op's own
    arguments (head_gates and o_bias are ignored: the fit decides the gates; the bias stays)."""
    return contributions(op_head_contexts(*op_args), op_args[8])


@torch.no_grad()
def refit_output_projection(router: HeadRouter, x: torch.Tensor, ctx: torch.Tensor, o_weight: torch.Tensor,
                            token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """W_O and the router's per-head compensation means refitted under the router's decisions on
    x (refit.refit_routed_output); the router's rank-r compensation stays as fitted.
    Returns (new W_O (E_out, H*D), {"penalty", "rel_error_before", "rel_error_after"}: token-weighted
    errors on the fit tokens); updates router.comp_mean."""
    router.eval()
    gates, comp = router(x)
    target = contributions(ctx, o_weight).sum(1)
    if comp is not None:  # keep the rank-r part fixed: refit what it leaves
        target = target - (comp - (gates == 0).to(comp.dtype) @ router.comp_mean)
    res = refit_routed_output(ctx, gates, target, o_weight, router.comp_mean, token_weight)
    router.comp_mean.copy_(res["comp"])
    return res["weight"], {"penalty": res["penalty"], "rel_error_before": round(res["error_before"], 4),
                           "rel_error_after": round(res["error_after"], 4)}


def oracle_active(contrib: torch.Tensor, num_active: int, shared: list[int] = ()) -> torch.Tensor:
    """(T, H) bool: shared heads + the routed heads with the largest true contribution norm."""
    t, h, _ = contrib.shape
    norms = contrib.norm(dim=-1)
    norms[:, list(shared)] = float("inf")
    idx = norms.topk(num_active, dim=-1).indices
    return torch.zeros(t, h, dtype=torch.bool).scatter(1, idx, True)


@torch.no_grad()
def block_error(x: torch.Tensor, contrib: torch.Tensor, router: HeadRouter, full: torch.Tensor | None = None) -> float:
    """Relative error || MoH block output - dense block output || / || dense output || (no o_bias);
    `full` is the dense output when `contrib` comes from a refitted W_O (default: contrib.sum(1))."""
    full = contrib.sum(1) if full is None else full
    return ((routed_output(router, x, contrib) - full).norm() / full.norm()).item()


def routed_output(router: HeadRouter, x: torch.Tensor, contrib: torch.Tensor) -> torch.Tensor:
    """(T, E_out) the block output (no o_bias) under the router's gates and compensation."""
    gates, comp = router.eval()(x)
    approx = (gates.unsqueeze(-1) * contrib).sum(1)
    return approx if comp is None else approx + comp
