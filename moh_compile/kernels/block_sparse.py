"""Per-head sink + local-window attention that never touches key blocks outside a head's pattern.

Why blocks of queries: for a block of rows [q0, q1) the visible keys are the sink keys plus
one contiguous band around the block, so each block is one small SDPA call on a slice of K/V
(a view when no sink keys must be prepended). Compute and memory then scale with
rows x (sink + span + block), not rows x S_k. Heads sharing a (sink, span) pattern are
batched into one call per block; dense heads (alpha < 0) go to one SDPA call. The exact
pattern at the band edges is a small (block x band) bool mask, ANDed with the model's mask.

Semantics are those of `moh_compile.ops.attention.window_mask` (the definition).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moh_compile.ops.attention import register_fast_kernel, rotate_half, window_spans

DEFAULT_BLOCK = 128


def _mask4(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """View the model mask as 4-D (broadcast dims kept at size 1) so it can be sliced per block."""
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def _mask_slice(m: torch.Tensor | None, heads: torch.Tensor, rows: slice, keys) -> torch.Tensor | None:
    """Rows/keys/heads of a 4-D broadcastable mask; `keys` is a slice or an index tensor."""
    if m is None:
        return None
    if m.shape[1] != 1:
        m = m.index_select(1, heads)
    if m.shape[2] != 1:
        m = m[:, :, rows]
    if m.shape[3] != 1:
        m = m[..., keys] if isinstance(keys, slice) else m.index_select(3, keys)
    return m


def _merge(model: torch.Tensor | None, pattern: torch.Tensor | None) -> torch.Tensor | None:
    """AND a bool pattern into the model mask (bool or additive), as `merge_masks` does."""
    if pattern is None:
        return model
    if model is None:
        return pattern
    if model.dtype == torch.bool:
        return model & pattern
    return model.masked_fill(~pattern, float("-inf"))


def _group_heads(spans: list[int], sinks: list[int]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (span, sink) in enumerate(zip(spans, sinks)):
        key = (-1, 0) if span < 0 else (span, sink)
        groups.setdefault(key, []).append(h)
    return groups


def _band(q0: int, q1: int, span: int, two_sided: bool, s_k: int) -> tuple[int, int]:
    """Keys [lo, hi) of the local windows of rows [q0, q1)."""
    if two_sided:
        r = span // 2
        lo, hi = q0 - r, q1 + r
    else:
        lo, hi = q0 - span + 1, q1
    return max(0, lo), min(s_k, hi)


def _flash(q, k, v, mask, scale):
    """Attention over one key set plus its log-sum-exp; rows with no visible key get lse -inf.

    The lse lets the sink keys and the local band be attended separately (no K/V copies) and
    merged exactly afterwards.
    """
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"))
    valid = None
    if mask is not None:
        if mask.dtype == torch.bool:
            valid = mask.any(-1)
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        else:
            mask = mask.to(q.dtype)
            valid = (mask > float("-inf")).any(-1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                           scale=scale)
    if valid is not None:
        lse = lse.masked_fill(~valid.expand(lse.shape), float("-inf"))
    return out, lse


def _merge_parts(o1, l1, o2, l2):
    """Combine two softmax-normalised partial attentions by their log-sum-exps (exact)."""
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).nan_to_num_(0.0).unsqueeze(-1)
    w2 = torch.exp(l2 - lse).nan_to_num_(0.0).unsqueeze(-1)
    return o1 * w1 + o2 * w2


def _band_pattern(q0, q1, lo, hi, span, two_sided, device):
    i = torch.arange(q0, q1, device=device).unsqueeze(1)
    j = torch.arange(lo, hi, device=device)
    if two_sided:
        return (i - j).abs() <= span // 2
    return (j <= i) & (j > i - span)


def sparse_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    window_sink: list[int],
    window_alpha: list[int],
    window_beta: list[float],
    two_sided: bool,
    scale: float,
    block: int = DEFAULT_BLOCK,
    stats: dict | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T + mask) v over each head's visible keys only; q (B,H,S,D), k/v (B,Hkv,S_k,D).

    `stats`, if given, gets `stats["pairs"][h]` += (query, key) pairs scored for head h, so tests
    can check that work follows the pattern.
    """
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if not (len(window_sink) == len(window_alpha) == len(window_beta) == h):
        raise ValueError(f"window attributes need one entry per head ({h}), got "
                         f"{len(window_sink)}/{len(window_alpha)}/{len(window_beta)}")
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({h_kv})")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    rep = h // h_kv
    spans = window_spans(window_alpha, window_beta, s_k)
    mask = _mask4(attn_mask)
    out = q.new_empty(b, h, s_q, d)
    pairs = stats.setdefault("pairs", [0] * h) if stats is not None else None

    def count(heads, n):
        if pairs is not None:
            for x in heads:
                pairs[x] += n

    for (span, sink), heads in _group_heads(spans, list(window_sink)).items():
        hidx = torch.tensor(heads, device=q.device)
        qg = q.index_select(1, hidx)
        # one K/V head per query head of the group (a copy of S_k x D per head, never S x S)
        kv_of_head = [x // rep for x in heads]
        if kv_of_head == list(range(h_kv)):
            kg, vg = k, v
        else:
            kvi = torch.tensor(kv_of_head, device=q.device)
            kg, vg = k.index_select(1, kvi), v.index_select(1, kvi)
        if span < 0:  # dense heads: one SDPA call, the model mask only
            m = _mask_slice(mask, hidx, slice(None), slice(None))
            out[:, hidx] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=m, scale=scale)
            count(heads, s_q * s_k)
            continue
        og = q.new_empty(b, len(heads), s_q, d)
        n_global = min(sink, s_q)
        if n_global > 0:  # sink queries are global: they see every key
            rows = slice(0, n_global)
            m = _mask_slice(mask, hidx, rows, slice(None))
            og[:, :, rows] = F.scaled_dot_product_attention(qg[:, :, rows], kg, vg, attn_mask=m, scale=scale)
            count(heads, n_global * s_k)
        if n_global < s_q:
            n_sink = min(sink, s_k)
            rows = slice(n_global, s_q)
            # the sink keys, visible to every remaining row: one call for all rows
            m = _mask_slice(mask, hidx, rows, slice(0, n_sink))
            o_sink, l_sink = _flash(qg[:, :, rows], kg[:, :, :n_sink], vg[:, :, :n_sink], m, scale)
            count(heads, (s_q - n_global) * n_sink)
            o_band = q.new_empty(b, len(heads), s_q - n_global, d)
            l_band = q.new_empty(b, len(heads), s_q - n_global)
            cache: dict = {}
            for q0 in range(n_global, s_q, block):
                q1 = min(s_q, q0 + block)
                lo, hi = _band(q0, q1, span, two_sided, s_k)
                lo = max(lo, n_sink)
                hi = max(hi, lo)
                key = (q1 - q0, lo - q0, hi - q0)
                if key not in cache:  # the band pattern only depends on i - j
                    pat = _band_pattern(q0, q1, lo, hi, span, two_sided, q.device)
                    add = torch.zeros(pat.shape, dtype=q.dtype, device=q.device).masked_fill_(~pat, float("-inf"))
                    cache[key] = (pat, add)
                pat, add = cache[key]
                model = _mask_slice(mask, hidx, slice(q0, q1), slice(lo, hi))
                m = add if model is None else _merge(model, pat)
                r = slice(q0 - n_global, q1 - n_global)
                if model is None and hi > lo:  # every row has a visible key (i itself)
                    o_band[:, :, r], l_band[:, :, r] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        qg[:, :, q0:q1], kg[:, :, lo:hi], vg[:, :, lo:hi], 0.0, False, attn_mask=m, scale=scale)[:2]
                    if not pat.any(-1).all():
                        l_band[:, :, r] = l_band[:, :, r].masked_fill(~pat.any(-1), float("-inf"))
                else:
                    o_band[:, :, r], l_band[:, :, r] = _flash(qg[:, :, q0:q1], kg[:, :, lo:hi], vg[:, :, lo:hi],
                                                              m, scale)
                count(heads, (q1 - q0) * (hi - lo))
            og[:, :, rows] = o_band if n_sink == 0 else _merge_parts(o_sink, l_sink, o_band, l_band)
        out[:, hidx] = og
    return out


def sparse_attention_kernel(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                            head_gates, scale, window_sink=None, window_alpha=None, window_beta=None,
                            window_two_sided=False):
    """Fast path of `moh_compile::attention` for window attributes without head gates; else None."""
    if window_sink is None or head_gates is not None:
        return None
    b, s, _ = x.shape
    d = k.shape[-1]
    h = q_weight.shape[0] // d
    q = F.linear(x, q_weight, q_bias).view(b, s, h, d).transpose(1, 2)
    if rope_cos is not None:
        q = q * rope_cos + rotate_half(q) * rope_sin
    ctx = sparse_attention_core(q, k, v, attn_mask, window_sink, window_alpha, window_beta,
                                window_two_sided, scale)
    return F.linear(ctx.transpose(1, 2).reshape(b, s, h * d), o_weight, o_bias)


register_fast_kernel(sparse_attention_kernel)
