"""Per-head sink + local-window attention that loads only the key blocks inside each pattern.

Why: with a window of `span` keys plus `sink` global keys, a query block needs
O(span + sink) keys instead of O(S); key blocks outside the pattern are never loaded.
Pattern semantics are those of moh_compile.ops.attention.window_mask (merged with a causal
mask when `causal`); blocks fully inside the pattern skip the mask arithmetic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from moh_compile.kernels.triton import interpreter_mode
from moh_compile.kernels.triton._flash import attn_configs, attn_inner, attn_start, check_kv, dot_precision
from moh_compile.kernels.triton.traceable import is_tracing, launcher
from moh_compile.ops.attention import window_spans


@triton.jit
def _sparse_attn_fwd(Q, K, V, O, SPAN, SINK, KPM, sm_scale,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_om, stride_pb,
                     H, GROUP, S_Q, S_K,
                     CAUSAL: tl.constexpr, TWO_SIDED: tl.constexpr, HAS_KPM: tl.constexpr,
                     HEAD_D: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    span = tl.load(SPAN + h)
    sink = tl.load(SINK + h)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < S_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    kvh = h // GROUP
    k_base, v_base, kpm_base, qk_scale, m_i, l_i, acc = attn_start(
        K, V, KPM, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_pb, sm_scale, BLOCK_M, HEAD_D)
    if (not CAUSAL) and (m0 < sink):
        # Non-causal sink queries are global: every key, masked.
        acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                   0, S_K, S_K, qk_scale, span, sink,
                                   True, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
    else:
        if TWO_SIDED:
            win_lo = tl.maximum(m0 - span // 2, 0)
            win_hi = tl.minimum(m0 + BLOCK_M + span // 2, S_K)
        else:
            win_lo = tl.maximum(m0 - span + 1, 0)
            win_hi = tl.minimum(m0 + BLOCK_M, S_K)
        win_lo = win_lo // BLOCK_N * BLOCK_N
        sink_end = tl.minimum(tl.cdiv(sink, BLOCK_N) * BLOCK_N, win_lo)
        acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                   0, sink_end, S_K, qk_scale, span, sink,
                                   True, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
        if TWO_SIDED:
            acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                       win_lo, win_hi, S_K, qk_scale, span, sink,
                                       True, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
        else:
            # Blocks in [full_lo, full_hi) are inside every row's window and causal range.
            full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - span, 0), BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(tl.maximum(full_lo, win_lo), win_hi)
            full_hi = tl.minimum(tl.maximum((m0 + 1) // BLOCK_N * BLOCK_N, full_lo), win_hi)
            acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                       win_lo, full_lo, S_K, qk_scale, span, sink,
                                       True, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
            acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                       full_lo, full_hi, S_K, qk_scale, span, sink,
                                       False, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
            acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                       full_hi, win_hi, S_K, qk_scale, span, sink,
                                       True, CAUSAL, True, TWO_SIDED, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


_sparse_attn_tuned = triton.autotune(configs=attn_configs(),
                                     key=["HEAD_D", "CAUSAL", "TWO_SIDED", "HAS_KPM", "DOT_PREC", "S_K"])(_sparse_attn_fwd)


def kernel_pattern(sink, alpha, beta, two_sided: bool, causal: bool, s_k: int):
    """Per-head (span, sink, two_sided) the kernel uses; dense heads get a span covering every key.

    A causal two-sided window |i - j| <= span // 2 equals the one-sided window of span // 2 + 1;
    a non-causal dense head is expressed as "every key is a sink".
    """
    spans = window_spans(alpha, beta, s_k)
    big = 2 * s_k + 2
    sinks = [big if (sp < 0 and not causal) else sk for sp, sk in zip(spans, sink)]
    if causal and two_sided:
        spans = [big if sp < 0 else sp // 2 + 1 for sp in spans]
        two_sided = False
    else:
        spans = [big if sp < 0 else sp for sp in spans]
    return spans, sinks, two_sided


@functools.lru_cache(maxsize=256)
def _device_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=torch.int32)


def pattern_table(values: list[int], probe: torch.Tensor) -> torch.Tensor:
    """The per-head int32 table the kernel reads, made once per (pattern, device) and reused.

    Why: torch.tensor(list) copies host -> device on every call, which a CUDA graph cannot
    capture; with the table cached, a graph captured after one warm-up call replays the kernel
    alone. While tracing, a fresh tensor is made (a fake one must never enter the cache).
    """
    if is_tracing(probe):
        return torch.tensor(values, device=probe.device, dtype=torch.int32)
    return _device_table(tuple(int(v) for v in values), probe.device)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: list[int], alpha: list[int],
                     beta: list[float], two_sided: bool = False, causal: bool = True,
                     key_padding: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Sink + local-window attention core. q (B, H, S, D), k/v (B, Hkv, S_k, D) -> (B, H, S, D).

    Causal requires S == S_k (positions align at 0, as in the op's reference masks).
    key_padding (B, S_k) bool, True = key may be attended. Rows seeing no key get 0.
    """
    b, h, s, d = q.shape
    hkv, s_k = check_kv(k, v, b, h, d)
    if not (len(sink) == len(alpha) == len(beta) == h):
        raise ValueError(f"window_sink/alpha/beta need one entry per head ({h}), got {len(sink)}/{len(alpha)}/{len(beta)}")
    if causal and s != s_k:
        raise ValueError(f"causal sparse attention needs S == S_k, got {s} and {s_k}")
    spans, sinks, two = kernel_pattern(sink, alpha, beta, two_sided, causal, s_k)
    span_t, sink_t = pattern_table(spans, q), pattern_table(sinks, q)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out = torch.empty(b, h, s, d, device=q.device, dtype=q.dtype)
    if key_padding is not None:
        if key_padding.shape != (b, s_k):
            raise ValueError(f"key_padding must be (B, S_k)={(b, s_k)}, got {tuple(key_padding.shape)}")
        kpm = key_padding.to(torch.int8).contiguous()
    else:
        kpm = span_t
    scale = d ** -0.5 if scale is None else float(scale)
    interp = interpreter_mode()
    kernel = _sparse_attn_fwd if interp else _sparse_attn_tuned
    extra = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4) if interp else {}
    grid = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)  # noqa: E731
    launcher(kernel, q)[grid](
        q, k, v, out, span_t, sink_t, kpm, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), kpm.stride(0) if key_padding is not None else 0,
        h, h // hkv, s, s_k,
        CAUSAL=bool(causal), TWO_SIDED=bool(two), HAS_KPM=key_padding is not None, HEAD_D=d,
        DOT_PREC=dot_precision(q.dtype), **extra)
    return out


def pattern_density(sink: list[int], alpha: list[int], beta: list[float], s: int, causal: bool = True) -> float:
    """Visible (query, key) pairs over the dense causal (or full) count, averaged over heads."""
    i = torch.arange(s, dtype=torch.float64)
    total = 0.0
    for sp, sk in zip(window_spans(alpha, beta, s), sink):
        if sp < 0:
            total += float((i + 1).sum()) if causal else float(s * s)
            continue
        if not causal:
            raise ValueError("pattern_density supports causal one-sided patterns only")
        local = torch.minimum(i + 1, torch.full_like(i, sp))
        extra = torch.clamp(torch.minimum(torch.full_like(i, sk), i - sp + 1), min=0)
        total += float((local + extra).sum())
    dense = float((i + 1).sum()) if causal else float(s * s)
    return total / (dense * len(sink))


@triton_op("moh_compile::sparse_attention_triton", mutates_args=())
def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: list[int], alpha: list[int],
                        beta: list[float], two_sided: bool, causal: bool, key_padding: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """sparse_attention as a torch custom op that compilers trace into."""
    return sparse_attention(q, k, v, sink, alpha, beta, two_sided, causal, key_padding, scale)
