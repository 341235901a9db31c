"""Shared Triton pieces: the online-softmax inner loop over key blocks and launch configs.

Why shared: the routed-head kernel and the sparse-pattern kernel differ only in which query
rows a program owns and which key blocks it visits; the block update is the same.
Only imported when triton is installed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moh_compile.kernels.triton import interpreter_mode

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact ("ieee") dots so fp32 tests can hold 1e-4; halves use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_head_dim(d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")


def check_kv(k: torch.Tensor, v: torch.Tensor, b: int, h: int, d: int) -> tuple[int, int]:
    """Validate K/V against B query batches of H heads of dim D; returns (Hkv, S_k)."""
    check_head_dim(d)
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != b or k.shape[-1] != d:
        raise ValueError(f"k/v must be (B={b}, Hkv, S_k, D={d}), got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv, s_k = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    return hkv, s_k


@triton.jit
def attn_start(K, V, KPM, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_pb, sm_scale,
               BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    """Per-program set-up shared by the kernels: K/V/padding bases of (batch, kv head), the
    base-2 softmax scale (cast: inductor passes Python floats as fp64) and the running state."""
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kpm_base = KPM + b * stride_pb
    qk_scale = tl.cast(sm_scale * 1.4426950408889634, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    return k_base, v_base, kpm_base, qk_scale, m_i, l_i, acc


@triton.jit
def attn_inner(acc, l_i, m_i, q, pos, k_base, v_base, stride_kn, stride_vn, kpm_base,
               lo, hi, S_K, qk_scale, span, sink,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               TWO_SIDED: tl.constexpr, HAS_KPM: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi); `pos` are the query rows' positions.

    MASKED blocks get bounds, causal and window/sink masks; unmasked ones (fully visible by
    construction of the caller's ranges) skip that arithmetic. The key-padding mask applies
    to every block when HAS_KPM.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            in_k = offs_n < S_K
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_k[None, :], other=0.0)
            vb = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
            vb = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            i = pos[:, None]
            j = offs_n[None, :]
            vis = j < S_K
            if CAUSAL:
                vis = vis & (j <= i)
            if WINDOW:
                if TWO_SIDED:
                    d = i - j
                    local = (d <= span // 2) & (d >= -(span // 2))
                else:
                    local = (j <= i) & (j > i - span)
                vis = vis & (local | (j < sink) | (i < sink))
            s = tl.where(vis, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n, mask=offs_n < S_K, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


def attn_configs() -> list:
    """A few flash-attention launch shapes for Hopper; the interpreter uses a single small one."""
    if interpreter_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if os.environ.get("MOH_TRITON_AUTOTUNE", "1") == "0":  # fast compile for tests: one config
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)]
    out = []
    for bm, bn, w, st in ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st))
    return out
