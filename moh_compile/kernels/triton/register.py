"""Plug the Triton kernels into the project's ops (GPU only; every hook returns None otherwise).

Why hooks and not new ops: the op contracts (and their references, ONNX lowering and
backward-by-recompute) stay single-sourced in moh_compile/ops; a hook only computes the
same result faster when it applies. Each hook calls a torch.library.triton_op
(moh_compile::routed_attention_triton, ::sparse_attention_triton, ::moepp_ffn_triton), which
torch.compile / AOTInductor can trace into. `register()` is idempotent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moh_compile.kernels.triton import interpreter_mode, triton_available
from moh_compile.ops.attention import as_4d

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_REGISTERED = False


def _usable(t: torch.Tensor) -> bool:
    return (t.is_cuda or interpreter_mode()) and t.dtype in _SUPPORTED and triton_available()


def decompose_mask(attn_mask: torch.Tensor | None, b: int, s: int, s_k: int):
    """Split an op mask into (causal, key_padding (B, S_k) bool or None), or None if it is neither.

    Accepts bool masks and additive masks whose entries are 0 or <= -1e4. One host sync.
    """
    if attn_mask is None:
        return False, None
    m = attn_mask
    if m.dtype != torch.bool:
        if not m.is_floating_point():
            return None
        vis = m == 0
        if not bool((vis | (m <= -1e4)).all()):
            return None
        m = vis
    m = as_4d(m)
    if m.dim() != 4 or m.shape[1] != 1:
        return None
    try:
        m = m.expand(b, 1, s, s_k)[:, 0]
    except RuntimeError:
        return None
    kpm = m.any(dim=1)  # (B, S_k): a key some row may see
    if s == s_k:
        tril = torch.ones(s, s_k, dtype=torch.bool, device=m.device).tril()
        if bool((m == (tril & kpm[:, None, :])).all()):
            return True, (None if bool(kpm.all()) else kpm)
    if bool((m == kpm[:, None, :].expand_as(m)).all()):
        return False, (None if bool(kpm.all()) else kpm)
    return None


def attention_fast_kernel(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                          scale, window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
                          q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None, query=None, out_gate=None):
    """moh_compile::attention via Triton: routed heads when gated, sparse core when windowed
    (not for soft-capped scores or attention sinks: the flash kernels have neither step; routed
    heads not for queries computed by the graph: the routed kernel projects its own; neither for
    an output gate)."""
    if (not (_usable(x) and k.device == x.device and x.dim() == 3 and k.dim() == 4) or softcap or sinks is not None
            or out_gate is not None):
        return None
    if head_gates is None and window_sink is None:
        return None  # dense: the reference already uses SDPA's flash kernels
    d = k.shape[-1]
    if (d < 16 or d > 256 or d & (d - 1) or v.shape[-1] != d or k.dtype != x.dtype
            or (q_weight if query is None else query).dtype != x.dtype):
        return None  # the flash kernels take one power-of-two head size for queries, keys and values
    b, s, _ = x.shape
    s_k = k.shape[2]
    parts = decompose_mask(attn_mask, b, s, s_k)
    if parts is None:
        return None
    causal, key_padding = parts
    import moh_compile.kernels.triton.routed_attention  # noqa: F401  (registers the triton_ops)
    import moh_compile.kernels.triton.sparse_attention  # noqa: F401
    from moh_compile.ops.attention import project_queries

    if window_sink is not None:
        if causal and s != s_k:
            return None
        q = project_queries(x, q_weight, q_bias, rope_cos, rope_sin, d, q_norm_weight, q_norm_eps, query)
        h = q.shape[1]
        ctx = torch.ops.moh_compile.sparse_attention_triton(
            q, k, v, [int(a) for a in window_sink], [int(a) for a in window_alpha], [float(a) for a in window_beta],
            bool(window_two_sided), bool(causal), key_padding, float(scale))
        if head_gates is not None:
            ctx = ctx * head_gates.transpose(1, 2).unsqueeze(-1).to(ctx.dtype)
        return F.linear(ctx.transpose(1, 2).reshape(b, s, h * d), o_weight, o_bias)
    if (causal and s != s_k) or query is not None:
        return None
    return torch.ops.moh_compile.routed_attention_triton(x, q_weight, q_bias, k, v, o_weight, o_bias, head_gates,
                                                         float(scale), bool(causal), key_padding, rope_cos, rope_sin,
                                                         q_norm_weight, float(q_norm_eps))


def moepp_fast_kernel(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                      const_vectors, const_gate_weight, n_zero, n_copy, activation):
    """moh_compile::moepp_ffn via Triton, or None off-GPU (for the op's dispatch to try first)."""
    if not (_usable(x) and w_in.dtype == x.dtype and w_out.dtype == x.dtype):
        return None
    from moh_compile.kernels.triton.moe_grouped import ACT_CODES

    if activation not in ACT_CODES:
        return None
    return torch.ops.moh_compile.moepp_ffn_triton(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx,
                                                  expert_weight, const_vectors, const_gate_weight, n_zero, n_copy,
                                                  activation)


def register() -> bool:
    """Register the attention and MoE++ hooks once; returns True when triton is installed."""
    global _REGISTERED
    if not triton_available():
        return False
    if not _REGISTERED:
        from moh_compile.ops import moepp
        from moh_compile.ops.attention import register_fast_kernel

        register_fast_kernel(attention_fast_kernel)
        moepp.register_fast_kernel(moepp_fast_kernel)
        _REGISTERED = True
    return True
