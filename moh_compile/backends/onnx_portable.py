"""Portable-form lowering: the project's ops rewritten as plain torch that exports to standard ONNX.

Why torch functions instead of hand-written ONNX: they are used as decompositions of the
custom ops (ExportedProgram.run_decompositions), so the stock exporter emits standard ops,
dynamic batch/sequence dims survive (every size comes from a symbolic shape), and the same
functions run eagerly for tests.

Routed heads (head_gates given) use capacity-based dispatch, the static-shape way to skip
work: per routed head, TopK over tokens keeps the C tokens with the largest gates, only
their rows are projected/attended/projected back, weighted by the gate (a slot whose gate
is 0 contributes exactly 0) and scatter-added into the output.
    C = min(S, ceil(capacity_factor * f * S)),  f = mean active fraction of the routed heads,
measured per call site on the export's example inputs (or given). A head chosen by more than
C tokens drops the lowest-gate ones: those tokens lose that head and the output differs from
exact routing. capacity="exact" sets C = S (exact routing, no work saved). Heads active for
(almost) every token (shared heads) are never capacity-limited: they take a dense path.

Windowed heads: the window pattern is computed from (gathered) query positions as a mask
over all keys (dense masked attention), not a gathered key band: exact, but no key-side saving.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moh_compile.ops.attention import rotate_half
from moh_compile.ops.ffn import ffn_reference

CAPACITY_DENOMINATOR = 1024  # capacity fraction is rounded up to k / 1024 so C stays an integer SymInt expression
SHARED_HEAD_FRACTION = 0.999  # heads active for at least this fraction of tokens take the dense path


def _const(values, dtype, device) -> torch.Tensor:
    """1-D constant from Python values via factory ops: torch.tensor() inside a decomposition
    leaves a non-functional lift_fresh_copy/detach_ that run_decompositions rejects."""
    return torch.cat([torch.full((1,), v, dtype=dtype, device=device) for v in values])


def _mask4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


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
    if mask is None or mask.shape[-2] != 1:
        return mask
    return mask.expand(*mask.shape[:-2], s_q, mask.shape[-1])


def _combine(mask: torch.Tensor | None, visible: torch.Tensor | None) -> torch.Tensor | None:
    if visible is None:
        return mask
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _head_weights(q_weight, q_bias, o_weight, heads: list[int], num_heads: int, d: int):
    """Per-head slices: W_q (Hs, D, E), b_q (Hs, 1, D) or None, W_o (Hs, D, E_out)."""
    idx = _const(heads, torch.int64, q_weight.device)
    wq = q_weight.view(num_heads, d, -1)
    wo = o_weight.view(o_weight.shape[0], num_heads, d).permute(1, 2, 0)
    bq = None if q_bias is None else q_bias.view(num_heads, 1, d)
    if len(heads) != num_heads:
        wq, wo = wq.index_select(0, idx), wo.index_select(0, idx)
        bq = None if bq is None else bq.index_select(0, idx)
    return wq, bq, wo


def _kv_for_heads(k, v, heads: list[int], num_heads: int):
    hkv = k.shape[1]
    kv_idx = [h // (num_heads // hkv) for h in heads]
    if kv_idx == list(range(hkv)):
        return k, v
    idx = _const(kv_idx, torch.int64, k.device)
    return k.index_select(1, idx), v.index_select(1, idx)


def _dense_heads(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, gates, scale, window,
                 heads: list[int], num_heads: int):
    """Every token through the selected heads (all heads for the identity setting); gates may be None."""
    b, s, _ = x.shape
    d = k.shape[-1]
    wq, bq, wo = _head_weights(q_weight, q_bias, o_weight, heads, num_heads, d)
    q = torch.matmul(x.unsqueeze(1), wq.transpose(1, 2))  # (B, Hs, S, D)
    if bq is not None:
        q = q + bq
    if rope_cos is not None:
        q = q * rope_cos + rotate_half(q) * rope_sin
    kh, vh = _kv_for_heads(k, v, heads, num_heads)
    mask = None if attn_mask is None else _mask4d(attn_mask)
    if mask is not None and mask.shape[1] != 1 and len(heads) != num_heads:
        mask = mask.index_select(1, _const(heads, torch.int64, x.device))
    if window is not None:
        visible = _window_visible(torch.arange(s, device=x.device), k.shape[2], heads, *window, x.device)
        mask = _combine(mask, visible.unsqueeze(0))
    ctx = F.scaled_dot_product_attention(q, kh, vh, attn_mask=_full_rows(mask, q.shape[2]), scale=scale)
    if gates is not None:
        g = gates.index_select(-1, _const(heads, torch.int64, x.device)) if len(heads) != num_heads else gates
        ctx = ctx * g.transpose(1, 2).unsqueeze(-1).to(ctx.dtype)
    return torch.matmul(ctx, wo).sum(dim=1)  # (B, S, E_out)


def _gather_rows(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t (N, F) rows at flat_idx (any shape) -> (*flat_idx.shape, F): one ONNX Gather."""
    return t[flat_idx]


def _routed_heads(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, gates, scale, window,
                  heads: list[int], num_heads: int, cap_num: int, cap_den: int):
    """Capacity dispatch for the routed heads: top-C tokens per head, gathered compute, scatter-add."""
    b, s, e = x.shape
    d = k.shape[-1]
    hr = len(heads)
    capacity = torch.sym_min(s, (s * cap_num + cap_den - 1) // cap_den)
    g = gates if hr == num_heads else gates.index_select(-1, _const(heads, torch.int64, x.device))
    g = g.transpose(1, 2)  # (B, Hr, S)
    vals, idx = torch.topk(g, capacity, dim=-1)  # (B, Hr, C)
    base = (torch.arange(b, device=x.device) * s).view(b, 1, 1)
    flat = idx + base
    wq, bq, wo = _head_weights(q_weight, q_bias, o_weight, heads, num_heads, d)
    q = torch.matmul(_gather_rows(x.reshape(b * s, e), flat), wq.transpose(1, 2))  # (B, Hr, C, D)
    if bq is not None:
        q = q + bq
    if rope_cos is not None:
        cos = torch.broadcast_to(rope_cos, (b, 1, s, d)).reshape(b * s, d)
        sin = torch.broadcast_to(rope_sin, (b, 1, s, d)).reshape(b * s, d)
        q = q * _gather_rows(cos, flat) + rotate_half(q) * _gather_rows(sin, flat)
    kh, vh = _kv_for_heads(k, v, heads, num_heads)
    s_k = k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = _mask4d(attn_mask)
        if mask.shape[1] != 1:
            mask = mask.index_select(1, _const(heads, torch.int64, x.device))
        if mask.shape[2] != 1:  # per-query rows: gather the chosen queries' rows
            mh = mask.shape[1]
            mask = torch.broadcast_to(mask, (b, mh, s, s_k))
            if mh == 1:
                mask = _gather_rows(mask.reshape(b * s, s_k), flat)
            else:
                head_base = ((torch.arange(b, device=x.device) * hr).view(b, 1, 1)
                             + torch.arange(hr, device=x.device).view(1, hr, 1)) * s
                mask = _gather_rows(mask.reshape(b * hr * s, s_k), idx + head_base)
    if window is not None:
        mask = _combine(mask, _window_visible(idx, s_k, heads, *window, x.device))
    ctx = F.scaled_dot_product_attention(q, kh, vh, attn_mask=_full_rows(mask, q.shape[2]), scale=scale)
    y = torch.matmul(ctx, wo)  # (B, Hr, C, E_out)
    w = vals.unsqueeze(-1).to(y.dtype)
    y = torch.where(w != 0, y * w, torch.zeros_like(y))  # padding slots (gate 0) add exactly 0, even if NaN
    e_out = y.shape[-1]
    out = torch.zeros(b * s, e_out, dtype=y.dtype, device=y.device)
    out = out.index_add(0, flat.reshape(-1), y.reshape(-1, e_out))
    return out.view(b, s, e_out)


def portable_attention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                       scale, window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
                       dense_heads=None, routed_heads=None, cap_num=1, cap_den=1):
    """moh_compile::attention in export-friendly torch. Without dense/routed lists every head is dense."""
    d = k.shape[-1]
    num_heads = q_weight.shape[0] // d
    window = None if window_sink is None else (window_sink, window_alpha, window_beta, window_two_sided)
    args = (q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, head_gates, scale, window)
    if routed_heads is None or head_gates is None:
        dense_heads, routed_heads = list(range(num_heads)), []
    out = None
    if dense_heads:
        out = _dense_heads(x, *args, list(dense_heads), num_heads)
    if routed_heads:
        routed = _routed_heads(x, *args, list(routed_heads), num_heads, cap_num, cap_den)
        out = routed if out is None else out + routed
    if o_bias is not None:
        out = out + o_bias
    return out


@torch.library.custom_op("moh_compile_onnx::attention_capacity", mutates_args=())
def attention_capacity(
    x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
    o_weight: torch.Tensor, o_bias: torch.Tensor | None, head_gates: torch.Tensor, scale: float,
    window_sink: list[int] | None, window_alpha: list[int] | None, window_beta: list[float] | None,
    window_two_sided: bool, dense_heads: list[int], routed_heads: list[int], cap_num: int, cap_den: int,
) -> torch.Tensor:
    """A call site of moh_compile::attention with its capacity plan attached (export-time only)."""
    return portable_attention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                              head_gates, scale, window_sink, window_alpha, window_beta, window_two_sided,
                              dense_heads, routed_heads, cap_num, cap_den)


@attention_capacity.register_fake
def _attention_capacity_fake(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, *rest):
    return x.new_empty((x.shape[0], x.shape[1], o_weight.shape[0]))


def capacity_plan(head_gates: torch.Tensor, capacity: str | float, active_fraction: float | None):
    """(dense_heads, routed_heads, cap_num, cap_den) for one call site from its observed gates."""
    if capacity != "exact" and (not isinstance(capacity, (int, float)) or capacity <= 0):
        raise ValueError(f"capacity must be 'exact' or a positive capacity factor, got {capacity!r}")
    per_head = (head_gates != 0).float().mean(dim=tuple(range(head_gates.dim() - 1)))  # (H,)
    dense = [h for h, f in enumerate(per_head.tolist()) if f >= SHARED_HEAD_FRACTION]
    routed = [h for h in range(per_head.numel()) if h not in dense]
    if capacity == "exact" or not routed:
        return dense, routed, 1, 1
    frac = active_fraction if active_fraction is not None else float(per_head[routed].mean())
    num = max(1, math.ceil(capacity * frac * CAPACITY_DENOMINATOR))
    return dense, routed, min(num, CAPACITY_DENOMINATOR), CAPACITY_DENOMINATOR


def portable_ffn(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation):
    """The FFN op is already plain matmul + activation: its reference is its portable form."""
    return ffn_reference(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation)
