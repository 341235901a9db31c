"""`moh_compile::attention`: one attention block, from the Q projection to the output projection.

Why one op for the whole block: routed heads only save time if the op owns the Q projection
(to skip rows of W_q), the attention core (to skip query rows per head) and the output
projection (to skip the matching columns of W_o). K and V are computed outside the op, by
the model's own graph, because every head's keys stay needed.

Semantics (the reference below is the definition; fast kernels must match it):

    q    = rope(x @ q_weight.T + q_bias)            viewed as (B, H, S, D)
    ctx  = softmax(scale * q k^T + mask) v          per head, GQA by repeating K/V heads
    out  = sum_h gate[b, s, h] * ctx_h @ W_o[:, h].T + o_bias

- `attn_mask`: bool (True = may attend) or additive float, broadcastable to (B, H, S, S_k).
- `rope_cos`/`rope_sin`: rotate-half rotary embedding for q, broadcastable to (B, 1, S, D).
- `head_gates` (B, S, H): 0 means the (token, head) pair is not computed at all; None means
  every head with gate 1 (the identity setting).
- window attributes (per head): a key j is visible to query i when j < sink, or i < sink
  (sink tokens are global), or j lies in the head's local window of `span = alpha + beta*S_k`
  keys (causal: i - span < j <= i; two-sided: |i - j| <= span // 2). alpha < 0 = dense head.
- `query` (B, H, S, D): the queries as the model's own graph computed them, for query paths the
  op cannot absorb (a norm over all heads, a LayerNorm, a norm after RoPE, ...). Then q_weight,
  q_bias, RoPE and the query norm are None, x is only the block's token input (the router's),
  and the op skips the core rows and W_o columns of unchosen heads but not their Q projection.
- `out_gate` (B, H, S, Dv): an elementwise gate the model applies to each head's context before
  the output projection (Qwen3-Next: `ctx * sigmoid(gate)`), computed by the graph.
"""
from __future__ import annotations

import torch

from moh_compile.ops.dispatch import FastKernels
import torch.nn.functional as F

from moh_compile.ops.recompute import register_recompute_autograd


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def window_spans(alpha: list[int], beta: list[float], s_k: int) -> list[int]:
    """Per-head local span for a key length; -1 marks a dense head."""
    spans = []
    for a, b in zip(alpha, beta):
        spans.append(-1 if a < 0 else max(1, min(s_k, int(a + b * s_k))))
    return spans


def window_mask(
    s_q: int,
    s_k: int,
    sink: list[int],
    alpha: list[int],
    beta: list[float],
    two_sided: bool,
    device: torch.device | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bool (H, S_q, S_k) mask of each head's sink + local-window pattern (True = visible).

    rows=(r0, r1): only query rows [r0, r1) (memory of one chunk, not S_q x S_k)."""
    r0, r1 = rows if rows is not None else (0, s_q)
    i = torch.arange(r0, r1, device=device).view(1, -1, 1)
    j = torch.arange(s_k, device=device).view(1, 1, -1)
    spans = torch.tensor(window_spans(alpha, beta, s_k), device=device).view(-1, 1, 1)
    sinks = torch.tensor(sink, device=device).view(-1, 1, 1)
    if two_sided:
        local = (i - j).abs() <= spans // 2
    else:
        local = (j <= i) & (j > i - spans)
    visible = local | (j < sinks) | (i < sinks) | (spans < 0)
    return visible


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """View a broadcastable mask or RoPE table as 4-D (B, H, S, S_k / D), leading dims of size 1
    added, so it can be indexed per batch row, head and query row."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def and_pattern(mask: torch.Tensor | None, pattern: torch.Tensor | None) -> torch.Tensor | None:
    """AND a bool pattern (True = visible) into a mask, bool or additive, broadcasting; None is
    no mask / no pattern. Used by the reference, the kernels and the portable ONNX form alike."""
    if pattern is None:
        return mask
    if mask is None:
        return pattern
    if mask.dtype == torch.bool:
        return mask & pattern
    return mask.masked_fill(~pattern, float("-inf"))


def merge_masks(attn_mask: torch.Tensor | None, pattern: torch.Tensor | None) -> torch.Tensor | None:
    """Combine a model mask with a per-head bool pattern (H, S, S_k); returns an SDPA mask."""
    return and_pattern(attn_mask, None if pattern is None else pattern.unsqueeze(0))


def finish_queries(q, rope_cos, rope_sin, q_norm_weight=None, q_norm_eps: float = 0.0) -> torch.Tensor:
    """Projected queries (head dim last) -> what the core sees: the per-head RMS norm of QK-norm
    models (Qwen3, Gemma 3), then RoPE. Every implementation of the op goes through here, so
    they all round the same way as the model: the norm in float32, cast back, then the scale
    (Qwen3's and LLaMA's RMSNorm order; no-op casts in float32)."""
    if q_norm_weight is not None:
        qf = q.float()
        q = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + q_norm_eps)).to(q.dtype) * q_norm_weight
    if rope_cos is not None:
        q = q * rope_cos + rotate_half(q) * rope_sin
    return q


def project_queries(x, q_weight, q_bias, rope_cos, rope_sin, head_dim: int, q_norm_weight=None,
                    q_norm_eps: float = 0.0, query=None) -> torch.Tensor:
    """q = rope(norm(x @ W_q.T + b_q)) as (B, H, S, D): every head, every token (`query` itself
    when the model's graph computed the queries)."""
    if query is not None:
        return query
    b, s, _ = x.shape
    q = F.linear(x, q_weight, q_bias).view(b, s, q_weight.shape[0] // head_dim, head_dim).transpose(1, 2)
    return finish_queries(q, rope_cos, rope_sin, q_norm_weight, q_norm_eps)


def num_query_heads(q_weight: torch.Tensor | None, query: torch.Tensor | None, head_dim: int) -> int:
    """H, from W_q's rows or, for queries computed by the graph, their head dim."""
    return query.shape[1] if q_weight is None else q_weight.shape[0] // head_dim


def simplify_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask in its cheapest equivalent form, 4-D (exact: same attention, less work).

    One query row (…, 1, S_k) when every row is the same (padding masks expanded over the
    queries, as HF builds them): kernels then gather no rows, and SDPA broadcasts. None when it
    masks nothing (a batch without padding): SDPA is faster without a mask, as HF's own dense
    path runs it. Eager only (the checks read the values); compiled code keeps the mask, and so
    does a mask that needs gradients (e.g. a learned position bias: rows that are equal now must
    still get their own gradients).
    """
    if mask is None or mask.requires_grad or torch.compiler.is_compiling():
        return mask
    mask = as_4d(mask)
    if mask.shape[2] > 1:
        first = mask[:, :, :1]
        if not (mask.stride(2) == 0 or torch.equal(mask, first.expand_as(mask))):
            return mask
        mask = first
    if bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any()):
        return None
    return mask


def is_causal_mask(mask: torch.Tensor | None, s_q: int, s_k: int) -> bool:
    """True when a bool mask is exactly the causal pattern (key j visible to query i iff j <= i,
    every batch row and head): SDPA's is_causal then skips the masked half of the scores, where an
    explicit mask is read and computed in full. HF decoders pass is_causal themselves when a batch
    has no padding; captured graphs carry the materialised mask instead. Eager only, like
    `simplify_mask`."""
    if (mask is None or mask.dtype != torch.bool or s_q != s_k or mask.shape[-2:] != (s_q, s_k)
            or torch.compiler.is_compiling()):
        return False
    tril = torch.ones(s_q, s_k, dtype=torch.bool, device=mask.device).tril()
    return torch.equal(mask, tril.expand_as(mask))


def head_contexts(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    scale: float,
    window_sink: list[int] | None = None,
    window_alpha: list[int] | None = None,
    window_beta: list[float] | None = None,
    window_two_sided: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_eps: float = 0.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
    out_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every head's context vectors (B, H, S, D), the model's output gate applied, before the head
    gates and the output projection.

    Shared by the reference and by calibration (per-head contributions = ctx_h @ W_o[:, h].T).
    """
    s = x.shape[1]
    q = project_queries(x, q_weight, q_bias, rope_cos, rope_sin, k.shape[-1], q_norm_weight, q_norm_eps, query)
    h = q.shape[1]
    pattern = None
    if window_sink is not None:
        pattern = window_mask(s, k.shape[2], window_sink, window_alpha, window_beta, window_two_sided, x.device)
    mask = simplify_mask(merge_masks(attn_mask, pattern))
    if not softcap and sinks is None and is_causal_mask(mask, s, k.shape[2]):
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != h)
    else:
        ctx = attention_core(q, k, v, mask, scale, softcap, sinks)
    return ctx if out_gate is None else ctx * out_gate


def attention_core(q, k, v, mask, scale: float, softcap: float = 0.0, sinks=None) -> torch.Tensor:
    """softmax(scores + mask) v with scores = scale q k^T, q (.., H, S, D), k/v with H or a divisor
    of H heads (GQA). softcap > 0: scores soft-capped to softcap * tanh(scores / softcap) before
    the mask (Gemma 2). sinks (H,): one extra logit per head in every softmax row, whose
    probability is dropped (GPT-OSS's attention sinks: rows may attend to "nothing").

    SDPA can do neither, so those scores are computed explicitly, in the models' own order of
    operations (so a compiled model rounds as the original does)."""
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[-3] != q.shape[-3])
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.matmul(torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype), v)


def attention_reference(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    head_gates: torch.Tensor | None,
    scale: float,
    window_sink: list[int] | None = None,
    window_alpha: list[int] | None = None,
    window_beta: list[float] | None = None,
    window_two_sided: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_eps: float = 0.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
    out_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense, masked computation of the op: every head is computed, then gated."""
    ctx = head_contexts(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, scale, window_sink, window_alpha,
                        window_beta, window_two_sided, q_norm_weight, q_norm_eps, softcap, sinks, query, out_gate)
    b, h, s, d = ctx.shape
    if head_gates is not None:
        ctx = ctx * head_gates.transpose(1, 2).unsqueeze(-1).to(ctx.dtype)
    return F.linear(ctx.transpose(1, 2).reshape(b, s, h * d), o_weight, o_bias)


_FAST_KERNELS = FastKernels()
register_fast_kernel = _FAST_KERNELS.register  # kernels take the op's arguments, return a tensor or None


@torch.library.custom_op("moh_compile::attention", mutates_args=())
def attention(
    x: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    head_gates: torch.Tensor | None,
    scale: float,
    window_sink: list[int] | None = None,
    window_alpha: list[int] | None = None,
    window_beta: list[float] | None = None,
    window_two_sided: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_eps: float = 0.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
    out_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """q_norm_weight / q_norm_eps: the per-head RMS norm of QK-norm models, applied to each query
    head before RoPE (None: no norm); the keys arrive normalised. softcap > 0: scores soft-capped
    to softcap * tanh(scores / softcap) before the mask (Gemma 2). sinks (H,): a per-head logit
    added to every softmax row and dropped after it (GPT-OSS). query (B, H, S, D): queries the
    model's graph computed (q_weight None; module docstring). out_gate (B, H, S, Dv): the model's
    gate on each head's context before the output projection (Qwen3-Next)."""
    args = (x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates, scale,
            window_sink, window_alpha, window_beta, window_two_sided, q_norm_weight, q_norm_eps, softcap, sinks, query,
            out_gate)
    out = _FAST_KERNELS.run(*args)
    if out is not None:
        return out
    return attention_reference(*args)


@attention.register_fake
def _attention_fake(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                    scale, window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
                    q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None, query=None, out_gate=None):
    return x.new_empty((x.shape[0], x.shape[1], o_weight.shape[0]))


register_recompute_autograd(attention, attention_reference)
