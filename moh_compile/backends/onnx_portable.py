"""Portable-form lowering: the project's ops rewritten as plain torch that exports to standard ONNX.

Why torch functions instead of hand-written ONNX: they are used as decompositions of the
custom ops (ExportedProgram.run_decompositions), so the stock exporter emits standard ops,
dynamic batch/sequence dims survive (every size comes from a symbolic shape), and the same
functions run eagerly for tests.

Routed heads (head_gates given) are dispatched by the call site's plan (dispatch_plan.py): heavy
heads take the dense path, the others run in groups; per (batch row, head of a group), TopK over
tokens keeps the C tokens with the largest gates, only their rows are projected, attend and are
projected back, weighted by the gate (a slot whose gate is 0 contributes exactly 0), and
scatter-added into the output. C per group is run-time ("dynamic", exact), a capacity factor
(static, may drop tokens) or S ("exact").

Windowed heads: the window pattern is computed from (gathered) query positions as a mask
over all keys (dense masked attention), not a gathered key band: exact, but no key-side saving.
"""
from __future__ import annotations


import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moh_compile.backends.dispatch_plan import group_capacity, iter_groups
from moh_compile.ops.attention import and_pattern, as_4d, attention_core, finish_queries, num_query_heads
from moh_compile.ops.ffn import ffn_reference




def _const(values, dtype, device) -> torch.Tensor:
    """1-D constant from Python values via factory ops: torch.tensor() inside a decomposition
    leaves a non-functional lift_fresh_copy/detach_ that run_decompositions rejects."""
    return torch.cat([torch.full((1,), v, dtype=dtype, device=device) for v in values])


def _window_visible(q_pos: torch.Tensor, s_k: int, heads: list[int], sink, alpha, beta, two_sided: bool,
                    device) -> torch.Tensor:
    """Bool visibility of keys 0..s_k-1 for queries at q_pos (shape (..., Hsel, N)); tensor math so s_k may be symbolic."""
    j = torch.arange(s_k, device=device)
    sk = torch.full((), s_k, dtype=torch.float64, device=device)
    a = _const([float(alpha[h]) for h in heads], torch.float64, device)
    b = _const([float(beta[h]) for h in heads], torch.float64, device)
    span = torch.clamp(torch.minimum(torch.floor(a + b * sk), sk), min=1.0).to(torch.int64).view(-1, 1, 1)
    dense = _const([alpha[h] < 0 for h in heads], torch.bool, device).view(-1, 1, 1)
    sinks = _const([int(sink[h]) for h in heads], torch.int64, device).view(-1, 1, 1)
    i = q_pos.unsqueeze(-1)
    if two_sided:
        local = (i - j).abs() <= torch.div(span, 2, rounding_mode="floor")
    else:
        local = (j <= i) & (j > i - span)
    return local | (j < sinks) | (i < sinks) | dense


def _full_rows(mask: torch.Tensor | None, s_q) -> torch.Tensor | None:
    """ORT's Attention op wants the mask's query dim spelled out (it does not broadcast a 1 there)."""
    if mask is None or not statically_known_true(mask.shape[-2] == 1):  # a gathered row count is never a broadcast 1
        return mask
    # broadcasting against a (.., s_q, 1) tensor instead of expand: s_q may be a run-time
    # (data-dependent) capacity, and expand would need to know whether it is 1
    rows = mask.new_ones((*mask.shape[:-2], s_q, 1)) if mask.dtype == torch.bool else \
        mask.new_zeros((*mask.shape[:-2], s_q, 1))
    return mask & rows if mask.dtype == torch.bool else mask + rows


def _head_weights(q_weight, q_bias, o_weight, heads: list[int], num_heads: int, d: int):
    """Per-head slices: W_q (Hs, D, E) or None (queries from the graph), b_q (Hs, 1, D) or None,
    W_o (Hs, Dv, E_out) (Dv: the values' head dim)."""
    idx = _const(heads, torch.int64, o_weight.device)
    wq = None if q_weight is None else q_weight.view(num_heads, d, -1)
    wo = o_weight.view(o_weight.shape[0], num_heads, -1).permute(1, 2, 0)
    bq = None if q_bias is None else q_bias.view(num_heads, 1, d)
    if len(heads) != num_heads:
        wq, wo, bq = (None if t is None else t.index_select(0, idx) for t in (wq, wo, bq))
    return wq, bq, wo


def _kv_for_heads(k, v, heads: list[int], num_heads: int):
    hkv = k.shape[1]
    kv_idx = [h // (num_heads // hkv) for h in heads]
    if kv_idx == list(range(hkv)):
        return k, v
    idx = _const(kv_idx, torch.int64, k.device)
    return k.index_select(1, idx), v.index_select(1, idx)


def _select_heads(t: torch.Tensor, heads: list[int], num_heads: int) -> torch.Tensor:
    """The given heads of a (B, H, S, F) per-head tensor (queries or output gates from the graph)."""
    return t if len(heads) == num_heads else t.index_select(1, _const(heads, torch.int64, t.device))


def _head_rows(t: torch.Tensor, heads: list[int], num_heads: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx (B, Hr, C) of the given heads of a (B, H, S, F) per-head tensor -> (B, Hr, C, F)."""
    b, hr, s = idx.shape[0], idx.shape[1], t.shape[2]
    base = ((torch.arange(b, device=t.device) * hr).view(b, 1, 1)
            + torch.arange(hr, device=t.device).view(1, hr, 1)) * s
    return _gather_rows(_select_heads(t, heads, num_heads).reshape(b * hr * s, t.shape[-1]), idx + base)


def _dense_heads(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, gates, scale, window, q_norm,
                 softcap, sinks, query, out_gate, heads: list[int], num_heads: int):
    """Every token through the selected heads (all heads for the identity setting); gates may be None."""
    b, s, _ = x.shape
    d = k.shape[-1]
    wq, bq, wo = _head_weights(q_weight, q_bias, o_weight, heads, num_heads, d)
    if query is not None:  # computed by the graph, every head
        q = _select_heads(query, heads, num_heads)
    else:
        q = torch.matmul(x.unsqueeze(1), wq.transpose(1, 2))  # (B, Hs, S, D)
        if bq is not None:
            q = q + bq
        q = finish_queries(q, rope_cos, rope_sin, *q_norm)
    kh, vh = _kv_for_heads(k, v, heads, num_heads)
    mask = None if attn_mask is None else as_4d(attn_mask)
    if mask is not None and mask.shape[1] != 1 and len(heads) != num_heads:
        mask = mask.index_select(1, _const(heads, torch.int64, x.device))
    if window is not None:
        visible = _window_visible(torch.arange(s, device=x.device), k.shape[2], heads, *window, x.device)
        mask = and_pattern(mask, visible.unsqueeze(0))
    ctx = attention_core(q, kh, vh, _full_rows(mask, q.shape[2]), scale, softcap, _of_heads(sinks, heads, num_heads))
    if out_gate is not None:
        ctx = ctx * _select_heads(out_gate, heads, num_heads)
    if gates is not None:
        g = gates.index_select(-1, _const(heads, torch.int64, x.device)) if len(heads) != num_heads else gates
        ctx = ctx * g.transpose(1, 2).unsqueeze(-1).to(ctx.dtype)
    return torch.matmul(ctx, wo).sum(dim=1)  # (B, S, E_out)


def _gather_rows(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t (N, F) rows at flat_idx (any shape) -> (*flat_idx.shape, F): one ONNX Gather on axis 0
    (index_select of the flattened index; advanced indexing exports as the slower GatherND)."""
    return t.index_select(0, flat_idx.reshape(-1)).view(*flat_idx.shape, t.shape[-1])


def scatter_add_units(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out (N, F) plus `rows` (U, ..., F) added at row `index` (U, ...), one unit (head, expert) at a
    time; each unit's indices are distinct.

    Why not one index_add: it exports to ScatterND(reduction="add"), which ONNX Runtime (1.32, CPU)
    applies on several threads without atomics, so a row repeated across units (a token that chose
    two heads or experts) races and loses updates: the portable form's output then changed from run
    to run with intra-op threads > 1 (max error 0.4 on MiniLM). One ScatterND per unit repeats no row."""
    for unit_index, unit_rows in zip(index.unbind(0), rows.unbind(0)):  # one Split each, not U Gathers
        out = out.index_add(0, unit_index.reshape(-1), unit_rows.reshape(-1, rows.shape[-1]))
    return out


def weight_slots(t: torch.Tensor, weights: torch.Tensor, guard_nan: bool) -> torch.Tensor:
    """t * weights on the narrowest tensor of a dispatch; slots with weight 0 then add exactly 0.
    `guard_nan`: a slot may hold NaN (a query row with every key masked), so zero it by Where."""
    w = weights.unsqueeze(-1).to(t.dtype)
    return torch.where(w != 0, t * w, 0.0) if guard_nan else t * w


def _of_heads(t: torch.Tensor | None, heads: list[int], num_heads: int) -> torch.Tensor | None:
    """A per-head vector (attention sinks) for the given heads."""
    if t is None or len(heads) == num_heads:
        return t
    return t.index_select(0, _const(heads, torch.int64, t.device))


def _gathered_core(q, idx, kh, vh, attn_mask, window, heads: list[int], scale, softcap, sinks):
    """Attention of gathered queries q (B, Hr, C, D) at token positions idx (B, Hr, C) over all keys,
    with the mask rows and window pattern of exactly those queries; -> (ctx, whether masked)."""
    b, hr = idx.shape[0], idx.shape[1]
    s_k = kh.shape[2]
    mask = None
    if attn_mask is not None:
        mask = as_4d(attn_mask)
        if mask.shape[1] != 1:
            mask = mask.index_select(1, _const(heads, torch.int64, q.device))
        if mask.shape[2] != 1:  # per-query rows: gather the chosen queries' rows
            mh, s = mask.shape[1], mask.shape[2]  # mh is 1 or Hr
            mask = torch.broadcast_to(mask, (b, mh, s, s_k)).reshape(b * mh * s, s_k)
            base = ((torch.arange(b, device=q.device) * mh).view(b, 1, 1)
                    + torch.arange(mh, device=q.device).view(1, mh, 1)) * s
            mask = _gather_rows(mask, idx + base)
    if window is not None:
        mask = and_pattern(mask, _window_visible(idx, s_k, heads, *window, q.device))
    ctx = attention_core(q, kh, vh, _full_rows(mask, q.shape[2]), scale, softcap, sinks)
    return ctx, mask is not None


def _routed_heads(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, gates, scale, window, q_norm,
                  softcap, sinks, query, out_gate, heads: list[int], num_heads: int, cap: int,
                  out: torch.Tensor | None):
    """One group of routed heads: top-C tokens per (batch row, head), gathered compute, scatter-added
    into `out` (B, S, E_out) or zeros."""
    b, s, e = x.shape
    d = k.shape[-1]
    hr = len(heads)
    g = gates if hr == num_heads else gates.index_select(-1, _const(heads, torch.int64, x.device))
    g = g.transpose(1, 2)  # (B, Hr, S)
    vals, idx = torch.topk(g, group_capacity(g != 0, s, cap), dim=-1)  # (B, Hr, C)
    flat = idx + (torch.arange(b, device=x.device) * s).view(b, 1, 1)
    wq, bq, wo = _head_weights(q_weight, q_bias, o_weight, heads, num_heads, d)
    if query is not None:  # computed by the graph: gather the chosen (token, head) rows
        q = _head_rows(query, heads, num_heads, idx)  # (B, Hr, C, D)
    else:
        q = torch.matmul(_gather_rows(x.reshape(b * s, e), flat), wq.transpose(1, 2))  # (B, Hr, C, D)
        if bq is not None:
            q = q + bq
        cos = sin = None
        if rope_cos is not None:
            cos = _gather_rows(torch.broadcast_to(rope_cos, (b, 1, s, d)).reshape(b * s, d), flat)
            sin = _gather_rows(torch.broadcast_to(rope_sin, (b, 1, s, d)).reshape(b * s, d), flat)
        q = finish_queries(q, cos, sin, *q_norm)
    kh, vh = _kv_for_heads(k, v, heads, num_heads)
    ctx, masked = _gathered_core(q, idx, kh, vh, attn_mask, window, heads, scale, softcap,
                                 _of_heads(sinks, heads, num_heads))
    if out_gate is not None:
        ctx = ctx * _head_rows(out_gate, heads, num_heads, idx)
    y = torch.matmul(weight_slots(ctx, vals, guard_nan=masked), wo)  # (B, Hr, C, E_out)
    e_out = y.shape[-1]
    out = torch.zeros(b * s, e_out, dtype=y.dtype, device=y.device) if out is None else out.reshape(b * s, e_out)
    return scatter_add_units(out, flat.transpose(0, 1), y.transpose(0, 1)).view(b, s, e_out)


def portable_attention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                       scale, window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
                       q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None, query=None, out_gate=None,
                       dense_heads=None, routed_heads=None, group_sizes=None, group_caps=None):
    """moh_compile::attention in export-friendly torch. Without a plan every head is dense."""
    d = k.shape[-1]
    num_heads = num_query_heads(q_weight, query, d)
    window = None if window_sink is None else (window_sink, window_alpha, window_beta, window_two_sided)
    args = (q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, head_gates, scale, window,
            (q_norm_weight, q_norm_eps), softcap, sinks, query, out_gate)
    if routed_heads is None or head_gates is None:
        dense_heads, routed_heads, group_sizes, group_caps = list(range(num_heads)), [], [], []
    out = _dense_heads(x, *args, list(dense_heads), num_heads) if dense_heads else None
    for heads, cap in iter_groups(routed_heads, group_sizes, group_caps):
        out = _routed_heads(x, *args, heads, num_heads, cap, out)
    if o_bias is not None:
        out = out + o_bias
    return out


@torch.library.custom_op("moh_compile_onnx::attention_capacity", mutates_args=())
def attention_capacity(
    x: torch.Tensor, q_weight: torch.Tensor | None, q_bias: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
    o_weight: torch.Tensor, o_bias: torch.Tensor | None, head_gates: torch.Tensor, scale: float,
    window_sink: list[int] | None, window_alpha: list[int] | None, window_beta: list[float] | None,
    window_two_sided: bool, q_norm_weight: torch.Tensor | None, q_norm_eps: float, softcap: float,
    sinks: torch.Tensor | None, query: torch.Tensor | None, out_gate: torch.Tensor | None, dense_heads: list[int],
    routed_heads: list[int], group_sizes: list[int], group_caps: list[int],
) -> torch.Tensor:
    """A call site of moh_compile::attention with its capacity plan attached (export-time only)."""
    return portable_attention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                              head_gates, scale, window_sink, window_alpha, window_beta, window_two_sided,
                              q_norm_weight, q_norm_eps, softcap, sinks, query, out_gate, dense_heads,
                              routed_heads, group_sizes, group_caps)


@attention_capacity.register_fake
def _attention_capacity_fake(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, *rest):
    return x.new_empty((x.shape[0], x.shape[1], o_weight.shape[0]))


def head_usage(head_gates: torch.Tensor) -> torch.Tensor:
    """(H,) fraction of the (batch, position) slots that use each head."""
    return (head_gates != 0).float().mean(dim=tuple(range(head_gates.dim() - 1)))


def portable_ffn(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation):
    """The FFN op is already plain matmul + activation: its reference is its portable form."""
    return ffn_reference(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation)
