"""Re-set the MoE++ zero-expert thresholds so the FFN work spent on given data meets a budget.

Why: the threshold fitted at compile time meets `ffn_keep` on the calibration tokens, but
anything that moves the router logits moves the spent work with them: fine-tuning (MiniLM,
keep 0.5 -> 55.6% after 5 minutes), or deployment text unlike the calibration text (53.8% on
the held-out sentences). Shifting only the zero experts' bias restores the budget without
touching what the routers learned about which experts matter.

Routers are processed in graph order, each on inputs produced by the already re-set routers
before it, because every threshold changes the inputs of the layers after it.
"""
from __future__ import annotations

import torch
from torch import nn

from moh_compile.calibrate.data import split_batch, progress_bar, real_tokens
from moh_compile.passes.moepp_router import ExpertRouter


class _Captured(Exception):
    """Raised by the capture hook to stop a forward once the router's inputs are recorded."""


def routers_in_graph_order(module: nn.Module) -> list[tuple[str, ExpertRouter]]:
    """(name, router) for every ExpertRouter, in the order the graph calls them."""
    named = {n: m for n, m in module.named_modules() if isinstance(m, ExpertRouter)}
    graph = getattr(module, "graph", None)
    if graph is None:
        return list(named.items())
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in named]
    return [(t, named[t]) for t in dict.fromkeys(order)]


def ffn_count(router: ExpertRouter, logits: torch.Tensor) -> torch.Tensor:
    """FFN experts each token computes (a slot is an FFN expert and not emptied by a zero expert)."""
    _, idx, empty = router.select(logits)
    return ((idx < router.config.n_ffn) & ~empty).sum(-1)


def zero_bias_shift(router: ExpertRouter, logits: torch.Tensor, target: float, iters: int = 50) -> float:
    """Shift of the zero-expert logits so that the mean FFN count over rows of `logits` is as close
    to `target` (experts per token) as the discrete counts allow, without exceeding it."""
    cfg = router.config
    zero = slice(cfg.n_ffn, cfg.n_ffn + cfg.n_zero)

    def mean_count(shift: float) -> float:
        shifted = logits.clone()
        shifted[:, zero] += shift
        return float(ffn_count(router, shifted).float().mean())

    span = float(logits.abs().max()) * 2 + 1.0
    lo, hi = -span, span  # count(lo) = as many as top_k allows, count(hi) = 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean_count(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def set_ffn_budget(module: nn.Module, batches: list, keep: dict[str, float], token_mask=None,
                   progress: bool = True) -> dict[str, dict]:
    """Shift each router's zero-expert bias in place so its FFN work fraction on `batches` (real
    tokens only, per `token_mask(batch)`) meets keep[router name]. Returns, per router, the
    fraction before and after."""
    routers = [(n, r) for n, r in routers_in_graph_order(module) if n in keep]
    out = {}
    with progress_bar(len(routers), "ffn budget", progress) as advance:
        for name, router in routers:
            if not router.config.n_zero:
                raise ValueError(f"router {name} has no zero expert: its FFN work is fixed at top_k")
            logits = torch.cat(_router_logits(module, router, batches, token_mask))
            before = float(ffn_count(router, logits).float().mean()) / router.config.n_ffn
            shift = zero_bias_shift(router, logits, keep[name] * router.config.n_ffn)
            zero = slice(router.config.n_ffn, router.config.n_ffn + router.config.n_zero)
            router.proj.bias[zero] += shift
            logits[:, zero] += shift
            after = float(ffn_count(router, logits).float().mean()) / router.config.n_ffn
            out[name] = {"before": before, "after": after, "shift": shift}
            advance()
    return out


def _router_logits(module: nn.Module, router: ExpertRouter, batches: list, token_mask) -> list[torch.Tensor]:
    """The router's logits at the real tokens of each batch (each forward stops at the router)."""
    rows = []

    def hook(mod, args, kwargs):
        rows.append(mod.logits(*args, **kwargs))
        raise _Captured

    handle = router.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            args, kwargs = split_batch(batch)
            try:
                module(*args, **kwargs)
            except _Captured:
                pass
            rows[-1] = real_tokens(rows[-1:], [token_mask(batch) if token_mask else None])
    finally:
        handle.remove()
    return rows


__all__ = ["set_ffn_budget", "routers_in_graph_order", "zero_bias_shift", "ffn_count"]
