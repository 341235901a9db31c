"""Training-free conversion of a dense FFN into MoE++ experts, fitted on recorded tensors.

A dense FFN is a sum over neurons, so partitioning neurons into groups gives FFN experts whose
sum is exactly the dense FFN (MoEfication). What we fit, per layer, from the FFN's recorded
inputs x (tokens, d):
- groups: balanced k-means on each neuron's activation pattern over calibration tokens
  (neurons that fire together share an expert, so a skipped expert is mostly silent);
- router: ridge regression from x to each group's *contribution* ||y_g(x) - m_g|| / scale(x),
  i.e. the error made by skipping g with compensation m_g, relative to the token's residual
  scale (the FFN output feeds a LayerNorm, so the same error matters less on a large stream);
- zero-expert bias: a global threshold on that prediction so that the mean number of groups
  per token is ffn_keep * n_ffn (variable k per token under an average budget);
- compensation m_g: the mean of y_g over the tokens that skip g (conditional on being skipped,
  which is better than the global mean since skipped tokens are the quiet ones).
"""
from __future__ import annotations

import torch

from moh_compile.calibrate.ridge import ridge
from moh_compile.calibrate.grouping import balanced_kmeans, neuron_features
from moh_compile.ops.activations import apply_activation
from moh_compile.passes.moepp_router import ExpertRouter


# --------------------------------------------------------------------------- grouping
def group_neurons(w_in: torch.Tensor, n_groups: int, activations: torch.Tensor | None = None,
                  seed: int = 0, w_gate: torch.Tensor | None = None, act_weight: float = 1.0) -> torch.Tensor:
    """Neuron index table (n_groups, F/n_groups): balanced k-means on the rows of W_in (and the
    gate), plus co-activation on calibration activations (T, F) when given."""
    feats = neuron_features(w_in, w_gate, activations, act_weight=act_weight, seed=seed)
    return balanced_kmeans(feats, n_groups, seed=seed)


def group_hidden(x: torch.Tensor, experts: dict, activation: str) -> torch.Tensor:
    """Each group's activated hidden neurons: (T, d) -> (T, n_groups, F/n_groups)."""
    h = torch.einsum("td,nfd->tnf", x, experts["w_in"])
    if experts["b_in"] is not None:
        h = h + experts["b_in"]
    if experts.get("w_gate") is not None:
        g = torch.einsum("td,nfd->tnf", x, experts["w_gate"])
        if experts.get("b_gate") is not None:
            g = g + experts["b_gate"]
        h = apply_activation(activation, g) * h
    else:
        h = apply_activation(activation, h)
    return h


def group_outputs(x: torch.Tensor, experts: dict, activation: str) -> torch.Tensor:
    """Each group's output y_g(x) without b_out: (T, d) -> (T, n_groups, d_out)."""
    return torch.einsum("tnf,nof->tno", group_hidden(x, experts, activation), experts["w_out"])


class GroupOutputs:
    """Each group's output y_g(x) for T tokens, made one token chunk at a time.

    Why: the whole (T, n, d_out) tensor is n times the FFN's output; at 512 experts and 8192
    tokens it is 6.4 GB. The fit only needs per-token norms, per-group sums and the dense output,
    so it recomputes the groups chunk by chunk (a few FFN passes, cheap next to the fit) and keeps
    at most `max_elements` floats of them at once; when they fit in one chunk they are computed
    once and kept. A (T, n, d_out) tensor is accepted as is.
    """

    def __init__(self, x: torch.Tensor | None = None, experts: dict | None = None, activation: str = "",
                 tensor: torch.Tensor | None = None, max_elements: int = 1 << 26):
        if tensor is not None:
            self.tokens, self.n_groups, self.d_out = tensor.shape
        else:
            self.tokens, self.n_groups, self.d_out = x.shape[0], experts["w_out"].shape[0], experts["w_out"].shape[1]
        self.x, self.experts, self.activation = x, experts, activation
        self.dtype = tensor.dtype if tensor is not None else x.dtype
        self.chunk = max(1, max_elements // max(1, self.n_groups * self.d_out))
        if tensor is None and self.chunk >= self.tokens:  # fits in one chunk: compute it once, not per pass
            tensor = group_outputs(x, experts, activation)
        self.tensor = tensor

    @classmethod
    def of(cls, gout) -> "GroupOutputs":
        return gout if isinstance(gout, GroupOutputs) else cls(tensor=gout)

    def chunks(self):
        """(token slice, its group outputs (t, n, d_out)) over all tokens, in order."""
        for start in range(0, self.tokens, self.chunk):
            rows = slice(start, min(self.tokens, start + self.chunk))
            yield rows, (self.tensor[rows] if self.tensor is not None else
                         group_outputs(self.x[rows], self.experts, self.activation))

    def dense(self) -> torch.Tensor:
        """sum_g y_g(x): the dense FFN output without b_out, (T, d_out)."""
        return torch.cat([g.sum(1) for _, g in self.chunks()])

    def mean(self) -> torch.Tensor:
        """Each group's mean output over the tokens, (n, d_out)."""
        total = torch.zeros(self.n_groups, self.d_out, dtype=self.dtype)
        for _, g in self.chunks():
            total += g.sum(0)
        return total / max(1, self.tokens)


# --------------------------------------------------------------------------- router fitting
def contribution_targets(gout, comp: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per token and group: ||y_g - m_g|| (/ scale): the error skipping g would make.
    gout: (T, n, d_out) tensor or GroupOutputs."""
    t = torch.cat([(g - comp).norm(dim=-1) for _, g in GroupOutputs.of(gout).chunks()])
    return t if scale is None else t / scale.unsqueeze(-1)


def select_mask(scores: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """Groups a token computes: its top_k scores that are above the threshold."""
    val, idx = scores.topk(top_k, dim=-1, sorted=False)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(1, idx, val > threshold)


def calibrate_zero_bias(scores: torch.Tensor, top_k: int, target_count: float, iters: int = 60) -> float:
    """Threshold so that the mean of min(#{scores > t}, top_k) over tokens equals target_count."""
    if not 0 < target_count <= top_k:
        raise ValueError(f"target_count must be in (0, top_k={top_k}], got {target_count}")
    topv = scores.topk(top_k, dim=-1, sorted=False).values
    lo, hi = float(topv.min()) - 1.0, float(topv.max()) + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((topv > mid).sum(-1).float().mean()) > target_count:
            lo = mid
        else:
            hi = mid
    return hi


def skip_means(gout, selected: torch.Tensor) -> torch.Tensor:
    """Mean of y_g over tokens that skip g (global mean where no token skips g): (n, d_out).
    gout: (T, n, d_out) tensor or GroupOutputs."""
    source = GroupOutputs.of(gout)
    skip = (~selected).to(source.dtype)
    cond = torch.zeros(source.n_groups, source.d_out, dtype=source.dtype)
    total = torch.zeros(source.n_groups, source.d_out, dtype=source.dtype)
    for rows, g in source.chunks():
        cond += torch.einsum("tn,tnd->nd", skip[rows], g)
        total += g.sum(0)
    cnt = skip.sum(0)
    cond = cond / cnt.clamp_min(1).unsqueeze(-1)
    return torch.where((cnt > 0).unsqueeze(-1), cond, total / source.tokens)


def chosen_groups(router: ExpertRouter, x: torch.Tensor, prev_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(T, n_ffn) bool: the FFN groups the router computes for each token."""
    n = router.config.n_ffn
    with torch.no_grad():
        _, idx, empty = router.select(router.logits(x, prev_logits))
    idx = torch.where(empty | (idx >= n), n, idx)  # zero/copy/const slots -> a spare column
    return torch.zeros(x.shape[0], n + 1, dtype=torch.bool).scatter(1, idx, True)[:, :n]


def reduced_rank(weight: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: the rank-`rank` map closest to `weight` (n, d) in what it predicts
    on x (T, d), i.e. weight projected on the top right singular vectors of its centred
    predictions. Returns (basis @ basis.T @ weight, basis (n, rank), orthonormal columns)."""
    pred = (x - x.mean(0)).double() @ weight.double().T
    basis = torch.linalg.svd(pred, full_matrices=False).Vh[:rank].T
    return (basis @ (basis.T @ weight.double())).to(weight.dtype), basis.to(weight.dtype)


def fit_router(router: ExpertRouter, x: torch.Tensor, gout, ffn_keep: float,
               scale: torch.Tensor | None = None, prev_logits: torch.Tensor | None = None,
               lam: float = 1e-3, rounds: int = 2, relative: float = 0.0) -> dict:
    """Fit a converted router in place on recorded FFN inputs x (T, d) and group outputs (T, n, d_out).

    relative: the zero expert's logit is threshold + relative * mean(FFN logits), so a group is
    computed when its score beats the token's own mean score by the threshold; relative > 0 makes
    the spent budget less sensitive to a shift of the whole score scale between calibration and
    deployment text (still a linear router: the zero expert's row is the mean of the FFN rows).
    gout: the group outputs, (T, n, d_out) tensor or GroupOutputs.
    Returns fit statistics (ridge R^2 and the mean group count on the calibration tokens).
    """
    cfg = router.config
    if cfg.n_zero < 1 and ffn_keep < cfg.top_k / cfg.n_ffn:
        raise ValueError("a budget below top_k/n_ffn needs at least one zero expert")
    feats = x if prev_logits is None or router.residual is None else torch.cat([x, prev_logits], -1)
    gout = GroupOutputs.of(gout)
    comp = gout.mean()
    target_count = ffn_keep * cfg.n_ffn
    for _ in range(rounds):
        tgt = contribution_targets(gout, comp if cfg.compensation else torch.zeros_like(comp), scale)
        W, b = ridge(feats, tgt, lam)
        W = W.T
        if cfg.rank:  # keep the mean prediction: the intercept absorbs what the dropped directions gave it
            full = W[:, :x.shape[-1]].clone()
            W[:, :x.shape[-1]], basis = reduced_rank(full, x, cfg.rank)
            b = b + x.mean(0) @ (full - W[:, :x.shape[-1]]).T
        scores = feats @ W.T + b
        rel_scores = scores - relative * scores.mean(-1, keepdim=True)
        if cfg.n_zero:
            thr = calibrate_zero_bias(rel_scores, cfg.top_k, min(target_count, cfg.top_k))
        else:
            thr = float("-inf")
        sel = select_mask(rel_scores, thr, cfg.top_k)
        if cfg.compensation:
            comp = skip_means(gout, sel)
    resid = tgt - scores
    r2 = 1 - float(resid.pow(2).sum() / (tgt - tgt.mean(0)).pow(2).sum())
    d = x.shape[-1]
    with torch.no_grad():
        # logits = proj(down(x)): full rank, down is absent and proj holds W; factored, W = basis @ A
        if cfg.rank:
            router.down.weight.copy_(basis.T @ W[:, :d])
        rows = basis if cfg.rank else W[:, :d]
        router.proj.weight[:cfg.n_ffn] = rows
        router.proj.bias[:cfg.n_ffn] = b
        if router.residual is not None and W.shape[1] > d:
            router.residual.weight[:cfg.n_ffn] = W[:, d:]
        if cfg.n_zero:
            router.proj.weight[cfg.n_ffn:cfg.n_ffn + cfg.n_zero] = relative * rows.mean(0)
            router.proj.bias[cfg.n_ffn:cfg.n_ffn + cfg.n_zero] = thr + relative * float(b.mean())
            if router.residual is not None and W.shape[1] > d:
                router.residual.weight[cfg.n_ffn:cfg.n_ffn + cfg.n_zero] = relative * W[:, d:].mean(0)
        if cfg.compensation:
            router.comp_table.copy_(comp)
    return {"r2": r2, "mean_groups": float(sel.sum(-1).float().mean()), "threshold": thr}


__all__ = ["group_neurons", "group_hidden", "group_outputs", "GroupOutputs", "chosen_groups",
           "contribution_targets", "select_mask", "calibrate_zero_bias", "skip_means",
           "reduced_rank", "fit_router"]
