"""Per-head sink + local-window attention that never touches key blocks outside a head's pattern.

Why blocks of queries: for a block of rows [q0, q1) the visible keys are the sink keys plus
one contiguous band around the block, so each block is one small SDPA call on a slice of K/V
(a view when no sink keys must be prepended). Compute and memory then scale with
rows x (sink + span + block), not rows x S_k. Heads sharing a (sink, span) pattern are
batched into one call per block; dense heads (alpha < 0) go to one SDPA call. The exact
pattern at the band edges is a small (block x band) bool mask, ANDed with the model's mask.

Float32 inputs whose mask is at most padding keys or causality (after `simplify_mask`; an exact
causal mask becomes causal=True) run the sparse heads through the C kernel instead
(window_native.py: 1.1-1.7x faster at 2k-16k tokens); this file stays the path for everything else.

Semantics are those of `moh_compile.ops.attention.window_mask` (the definition).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moh_compile.kernels import window_native
from moh_compile.ops.attention import (and_pattern, is_causal_mask, project_queries, register_fast_kernel,
                                      simplify_mask, window_spans)

DEFAULT_BLOCK = 64  # measured on 2 CPU threads: 5-15% faster than 128 at 10-25% density, N 8k-16k


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


def flash_with_lse(q, k, v, mask, scale, every_row_sees_a_key: bool = False):
    """Attention over one key set plus its log-sum-exp; rows with no visible key get lse -inf
    (unless the caller vouches there are none: `every_row_sees_a_key` skips that check).

    The lse lets the sink keys and the local band be attended separately (no K/V copies) and
    merged exactly afterwards.
    """
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"))
    valid = None
    if mask is not None:
        if mask.dtype == torch.bool:
            valid = None if every_row_sees_a_key else mask.any(-1)
            mask = torch.where(mask, q.new_zeros(()), q.new_full((), float("-inf")))
        else:
            mask = mask.to(q.dtype)
            valid = None if every_row_sees_a_key else (mask > float("-inf")).any(-1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                           scale=scale)
    if valid is not None:
        lse = lse.masked_fill(~valid.expand(lse.shape), float("-inf"))
    return out, lse


def merge_partial_attention(out, o1, l1, o2, l2):
    """out = the exact combination of two softmax-normalised partial attentions, by their
    log-sum-exps, in one fused lerp written straight into `out` (a view of the result): the
    second part's weight is exp(l2) / (exp(l1) + exp(l2)) = sigmoid(l2 - l1)."""
    w2 = torch.sigmoid(l2 - l1)
    torch.lerp(o1, o2, w2.unsqueeze(-1), out=out)
    empty = torch.isneginf(l1) & torch.isneginf(l2)  # rows that see no key in either part: 0, as SDPA's
    if empty.any():
        out.masked_fill_(empty.unsqueeze(-1), 0.0)


def _band_pattern(q0, q1, lo, hi, span, two_sided, causal, device):
    i = torch.arange(q0, q1, device=device).unsqueeze(1)
    j = torch.arange(lo, hi, device=device)
    if two_sided:
        pat = (i - j).abs() <= span // 2
        return pat & (j <= i) if causal else pat
    return (j <= i) & (j > i - span)


def _additive(pat: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(pat.shape, dtype=dtype, device=pat.device).masked_fill_(~pat, float("-inf"))


def _diagonal_blocks(t: torch.Tensor, first_row: int, first_col: int, n: int, rows: int, cols: int, step: int):
    """View (..., n, rows, cols) of the blocks t[..., r0 + b*step : +rows, c0 + b*step : +cols] of a
    4-D tensor (size-1 dims broadcast), without copying: the band of every query block at once."""
    s0, s1, s2, s3 = t.stride()
    s2 = 0 if t.shape[2] == 1 else s2
    s3 = 0 if t.shape[3] == 1 else s3
    return t.as_strided((t.shape[0], t.shape[1], n, rows, cols), (s0, s1, step * (s2 + s3), s2, s3),
                        t.storage_offset() + first_row * s2 + first_col * s3)


_MASK_CHUNK_ELEMS = 1 << 24  # bound on the float mask materialised per call (64 MB in float32)


def _band_part(qg, kg, vg, mask_g, n_global, n_sink, span, two_sided, causal, scale, block, count):
    """Attention of rows [n_global, S) over their local band (sink keys excluded), with lse, as
    a list of (rows, out, lse) pieces that together cover the rows (the caller writes each into
    the result, so no band-sized intermediate is copied).

    Interior blocks (full block, band inside [n_sink, S_k)) share one relative pattern, so they
    run as ONE flash call on an overlapping strided view of K/V (blocks folded into the head
    dim): few large parallel calls instead of a Python loop of small ones. The rest loop.
    """
    b, hg, s_q, d = qg.shape
    s_k = kg.shape[2]
    pieces = []
    starts = list(range(n_global, s_q, block))
    off_lo, off_hi = (-(span // 2), block + span // 2) if two_sided else (1 - span, block)
    interior = [q0 for q0 in starts if q0 + off_lo >= n_sink and q0 + off_hi <= s_k and q0 + block <= s_q]
    edge = [q0 for q0 in starts if q0 not in set(interior)]
    if len(interior) >= 2:
        first, nb, width = interior[0], len(interior), off_hi - off_lo
        pat = _band_pattern(first, first + block, first + off_lo, first + off_hi, span, two_sided, causal,
                            qg.device)
        kc, vc = kg.contiguous(), vg.contiguous()
        shape = (b * hg, nb, width, d)
        strides = (s_k * d, block * d, d, 1)
        kb = kc.as_strided(shape, strides, kc.storage_offset() + (first + off_lo) * d)
        vb = vc.as_strided(shape, strides, vc.storage_offset() + (first + off_lo) * d)
        qb = qg[:, :, first:first + nb * block].reshape(b * hg, nb, block, d)
        if mask_g is None:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb, kb, vb, 0.0, False, attn_mask=_additive(pat, qg.dtype), scale=scale)[:2]
            if not pat.any(-1).all():
                lse = lse.masked_fill(~pat.any(-1), float("-inf"))
            pieces.append((slice(first, first + nb * block), o.reshape(b, hg, nb * block, d),
                           lse.reshape(b, hg, nb * block)))
        else:
            mview = _diagonal_blocks(mask_g, first, first + off_lo, nb, block, width, block)
            per = max(1, _MASK_CHUNK_ELEMS // (b * hg * block * width))
            for c0 in range(0, nb, per):
                c1 = min(nb, c0 + per)
                m = and_pattern(mview[:, :, c0:c1], pat).expand(b, hg, c1 - c0, block, width)
                o, lse = flash_with_lse(qb.unflatten(0, (b, hg))[:, :, c0:c1].flatten(0, 1),
                                kb.unflatten(0, (b, hg))[:, :, c0:c1].flatten(0, 1),
                                vb.unflatten(0, (b, hg))[:, :, c0:c1].flatten(0, 1),
                                m.reshape(b * hg, c1 - c0, block, width), scale)
                pieces.append((slice(first + c0 * block, first + c1 * block), o.reshape(b, hg, -1, d),
                               lse.reshape(b, hg, -1)))
        count(nb * block * width)
    else:
        edge = starts
    for q0 in edge:
        q1 = min(s_q, q0 + block)
        lo, hi = _band(q0, q1, span, two_sided, s_k)
        lo = max(lo, n_sink)
        hi = max(hi, lo)
        pat = _band_pattern(q0, q1, lo, hi, span, two_sided, causal, qg.device)
        model = None
        if mask_g is not None:
            model = mask_g[:, :, q0:q1] if mask_g.shape[2] > 1 else mask_g
            model = model[..., lo:hi] if model.shape[3] > 1 else model
        o, lse = flash_with_lse(qg[:, :, q0:q1], kg[:, :, lo:hi], vg[:, :, lo:hi], and_pattern(model, pat), scale)
        pieces.append((slice(q0, q1), o, lse))
        count((q1 - q0) * (hi - lo))
    return pieces


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
    causal: bool = False,
    native: bool = True,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T + mask) v over each head's visible keys only; q (B,H,S,D), k/v (B,Hkv,S_k,D).

    causal=True ANDs j <= i into the pattern without a mask tensor (same as passing a tril mask).
    `stats`, if given, gets `stats["pairs"][h]` += (query, key) pairs scored for head h, so tests
    can check that work follows the pattern. native=False keeps the sparse heads off the C kernel
    (window_native.py), e.g. to time the two side by side. rows (B, H, S) bool: the rows the caller
    will read (routed heads); where the C kernel runs, the sparse heads' other rows are skipped and
    left 0, elsewhere every row is computed.
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
    if v.shape[-1] != d:  # MLA: flash calls need one head size; zero dims change no score and no output
        width = max(d, v.shape[-1])
        padded = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        return sparse_attention_core(*padded, attn_mask, window_sink, window_alpha, window_beta, two_sided, scale,
                                     block, stats, causal, native, rows)[..., :v.shape[-1]]
    rep = h // h_kv
    spans = window_spans(window_alpha, window_beta, s_k)
    mask = simplify_mask(attn_mask)  # 4-D, broadcast dims kept at size 1, so it can be sliced per block
    if not causal and is_causal_mask(mask, s_q, s_k):  # a decoder's captured graph carries the causal mask
        mask, causal = None, True
    pairs = stats.setdefault("pairs", [0] * h) if stats is not None else None
    groups = _group_heads(spans, list(window_sink))
    if native and any(span >= 0 for span in spans) and window_native.applies(q, k, v, mask, scale):
        out = q.new_zeros(b, h, s_q, d) if rows is not None else q.new_empty(b, h, s_q, d)
        computed = window_native.window_attention(q, k, v, out, spans, list(window_sink), two_sided, causal, scale,
                                                  rows, mask)
        if pairs is not None:
            for x, n in enumerate(computed):
                pairs[x] += n
        groups = {key: heads for key, heads in groups.items() if key[0] < 0}  # dense heads: below
    else:
        out = q.new_empty(b, h, s_q, d)

    for (span, sink), heads in groups.items():
        def count(n, heads=heads):
            if pairs is not None:
                for x in heads:
                    pairs[x] += n

        hidx = torch.tensor(heads, device=q.device)
        contiguous = heads == list(range(heads[0], heads[-1] + 1))
        hs = slice(heads[0], heads[-1] + 1)
        qg = q[:, hs] if contiguous else q.index_select(1, hidx)  # a view when the heads are adjacent
        # one K/V head per query head of the group (a copy of S_k x D per head, never S x S)
        kv_of_head = [x // rep for x in heads]
        if kv_of_head == list(range(kv_of_head[0], kv_of_head[0] + len(heads))):
            kg, vg = k[:, kv_of_head[0]:kv_of_head[0] + len(heads)], v[:, kv_of_head[0]:kv_of_head[0] + len(heads)]
        else:
            kvi = torch.tensor(kv_of_head, device=q.device)
            kg, vg = k.index_select(1, kvi), v.index_select(1, kvi)
        mask_g = _mask_slice(mask, hidx, slice(None), slice(None))
        if span < 0:  # dense heads: one SDPA call, the model mask only
            if causal and mask_g is None:
                mask_g = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
            elif causal:
                mask_g = and_pattern(mask_g, torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril())
            out[:, hidx] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask_g, scale=scale)
            count(s_q * s_k)
            continue
        og = out[:, hs] if contiguous else q.new_empty(b, len(heads), s_q, d)
        n_global = min(sink, s_q)
        if n_global > 0:  # sink queries are global: they see every (causally allowed) key
            rows = slice(0, n_global)
            n_keys = min(s_k, n_global) if causal else s_k
            m = _mask_slice(mask, hidx, rows, slice(0, n_keys))
            if causal:
                m = and_pattern(m, torch.ones(n_global, n_keys, dtype=torch.bool, device=q.device).tril())
            og[:, :, rows] = F.scaled_dot_product_attention(qg[:, :, rows], kg[:, :, :n_keys], vg[:, :, :n_keys],
                                                            attn_mask=m, scale=scale)
            count(n_global * n_keys)
        if n_global < s_q:
            n_sink = min(sink, s_k)
            rows = slice(n_global, s_q)
            # the sink keys, visible to every remaining row (i >= sink > j): one call for all rows
            m = _mask_slice(mask, hidx, rows, slice(0, n_sink))
            o_sink, l_sink = flash_with_lse(qg[:, :, rows], kg[:, :, :n_sink], vg[:, :, :n_sink], m, scale)
            count((s_q - n_global) * n_sink)
            for rs, o_band, l_band in _band_part(qg, kg, vg, mask_g, n_global, n_sink, span, two_sided, causal,
                                                 scale, block, count):
                if n_sink == 0:
                    og[:, :, rs] = o_band
                else:
                    sink_rows = slice(rs.start - n_global, rs.stop - n_global)
                    merge_partial_attention(og[:, :, rs], o_sink[:, :, sink_rows], l_sink[:, :, sink_rows], o_band, l_band)
        if not contiguous:
            out[:, hidx] = og
    return out


def sparse_attention_block(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                           head_gates, scale, window_sink, window_alpha, window_beta, window_two_sided,
                           q_norm_weight=None, q_norm_eps=0.0, query=None, out_gate=None):
    """The op with window attributes: every head's windowed attention, then the head gates if any.
    Key blocks outside the patterns are skipped; gate-0 (token, head) rows are skipped too where
    the C window kernel runs (the core's `rows`), else computed and zeroed by the gates (the
    routed-head kernel skips rows instead, and `kernels.routed_attention` picks between them)."""
    b, s, _ = x.shape
    d = k.shape[-1]
    q = project_queries(x, q_weight, q_bias, rope_cos, rope_sin, d, q_norm_weight, q_norm_eps, query)
    rows = None if head_gates is None else head_gates.transpose(1, 2) != 0  # (B, H, S): rows gates keep
    ctx = sparse_attention_core(q, k, v, attn_mask, window_sink, window_alpha, window_beta,
                                window_two_sided, scale, rows=rows)
    if out_gate is not None:
        ctx = ctx * out_gate
    if head_gates is not None:
        ctx = ctx * head_gates.transpose(1, 2).unsqueeze(-1).to(ctx.dtype)
    return F.linear(ctx.transpose(1, 2).reshape(b, s, -1), o_weight, o_bias)


def sparse_attention_kernel(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                            head_gates, scale, window_sink=None, window_alpha=None, window_beta=None,
                            window_two_sided=False, q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None,
                            query=None, out_gate=None):
    """Fast path of `moh_compile::attention` for window attributes without head gates; else None:
    also when the cost model predicts the dense masked reference faster (short sequences, where
    the bands cover most keys and the block kernel's per-call overheads dominate), and for
    soft-capped scores or attention sinks (its flash calls can do neither)."""
    if window_sink is None or head_gates is not None or softcap or sinks is not None:
        return None
    d_in, d_out, head_dim, s_k = x.shape[-1], o_weight.shape[0], k.shape[-1], k.shape[2]
    if window_masks_fit(x.shape[0], len(window_alpha), x.shape[1], s_k) and sparse_row_cost(
            d_in, d_out, head_dim, s_k, window_sink, window_alpha, window_beta, window_two_sided,
            native=native_runs(x, k, v, attn_mask, scale)) > dense_windowed_row_cost(d_in, d_out, s_k):
        STATS["dense_calls"] += 1
        return None
    STATS["calls"] += 1
    return sparse_attention_block(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                                  None, scale, window_sink, window_alpha, window_beta, window_two_sided,
                                  q_norm_weight, q_norm_eps, query, out_gate)


# Cost of one (query, key) pair the block kernel computes (band padding included) relative to one
# pair of dense SDPA: 1 + PAIR_COST_D / head_dim. Measured side by side on 2 threads (one-off,
# docs/sparse.md): 2.8-3.5 at D=32 (512-2048 tokens), 1.9-2.4 at D=64 (2048-8192): small
# per-block flash calls, the sink/band merge, band-edge masks.
PAIR_COST_D = 80.0
# Cost per key of the dense masked path with window masks (the op's reference: SDPA with an
# (H, S, S_k) mask), in the same units; fitted side by side with the block-sparse and routed paths
# (`python benchmarks/bench_moh_sparse_dispatch.py --fit`).
DENSE_CORE_WINDOWED = 2.1
# The C window kernel (window_native.py) per (token, head) row of a sparse head: a fixed cost plus
# each key it scores (sinks, span and 7 keys of tile padding) at 1 + NATIVE_PAIR_COST_D / head_dim.
# Fitted by hand to ten side-by-side timings against the dense masked path (2026-11-24, 2 threads,
# 32/64-dim heads, 128-2048 tokens, spans 10-25% of them): within +-25% (docs/sparse.md).
NATIVE_PAIR_COST_D = 24.0
NATIVE_ROW_FIXED = 300.0
STATS = {"calls": 0, "dense_calls": 0}  # op calls run by the block kernel / left to the reference


def window_masks_fit(batch: int, heads: int, s_q: int, s_k: int) -> bool:
    """Whether the paths that materialise the window patterns as a (B, H, S, S_k) mask may run:
    at most _MASK_CHUNK_ELEMS elements, so memory keeps scaling with the pattern, not with S^2."""
    return batch * heads * s_q * s_k <= _MASK_CHUNK_ELEMS


def dense_windowed_row_cost(d_in: int, d_out: int, s_k: int) -> float:
    """Predicted cost of one (token, head) row of the dense masked path with window masks."""
    return d_in + d_out + DENSE_CORE_WINDOWED * 2.0 * s_k


def sparse_row_cost(d_in: int, d_out: int, head_dim: int, s_k: int, window_sink: list[int],
                    window_alpha: list[int], window_beta: list[float], two_sided: bool,
                    block: int = DEFAULT_BLOCK, native: bool = False, row_fraction: float = 1.0) -> float:
    """Predicted cost of one (token, head) row of `sparse_attention_block`, in the units of
    `kernels.routed_attention.routing_speedup` (a dense row costs d_in + d_out + 2 S_k): full
    projections, and per key 2 x the pair cost for a sparse head's sink + band (span plus a
    block of padding), 2 for each of a dense head's S_k keys; averaged over heads. native: the
    sparse heads run the C window kernel (`native_runs`), with its pair cost, tile and fixed cost,
    on `row_fraction` of the rows (the rows routed heads keep; the block kernel computes them all)."""
    pair_cost = 1.0 + (NATIVE_PAIR_COST_D if native else PAIR_COST_D) / head_dim
    tile, fixed = (window_native.TILE_ROWS, NATIVE_ROW_FIXED) if native else (block, 0.0)
    keys = []
    for span, sink in zip(window_spans(window_alpha, window_beta, s_k), window_sink):
        if span < 0:
            keys.append(float(s_k))
        else:
            band = (span // 2) * 2 + tile if two_sided else span + tile - 1
            keys.append((min(float(s_k), sink + band) * pair_cost + fixed / 2) * (row_fraction if native else 1.0))
    return d_in + d_out + 2.0 * sum(keys) / max(1, len(keys))


def native_runs(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, scale: float) -> bool:
    """Whether `sparse_attention_core` will run these operands' sparse heads through the C window
    kernel: its sizes and dtypes, and a model mask that masks nothing, only padding keys, or is
    exactly causal (reads the mask: the callers ask only where it is small, `window_masks_fit`)."""
    if not window_native.supports(x.shape[1], k.shape[2], k.shape[-1], v.shape[-1], scale, x, k, v):
        return False
    mask = simplify_mask(attn_mask)
    heads = 1 if mask is None else mask.shape[1]  # the op's mask broadcasts over heads or has one per head
    return window_native.is_key_mask(mask, x.shape[0], heads, k.shape[2]) or is_causal_mask(mask, x.shape[1],
                                                                                            k.shape[2])


register_fast_kernel(sparse_attention_kernel)
