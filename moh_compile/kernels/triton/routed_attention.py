"""Routed-head (MoH) attention on GPU: each head computes only the query rows that chose it.

Why this layout: a head's chosen tokens are listed per (batch, head) in ascending position
order, padded to C = max count (`token_idx` (B, H, C), `counts` (B, H)). A program owns
BLOCK_M consecutive chosen rows of one head; since positions are sorted, causal attention
only needs key blocks up to the block's last position, so skipped rows save both Q-rows and
key blocks. Pad rows are never read or written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from moh_compile.kernels.triton._flash import attn_configs, attn_inner, attn_start, check_kv, dot_precision
from moh_compile.kernels.triton.traceable import is_tracing, launcher
from moh_compile.ops.attention import finish_queries


@triton.jit
def _routed_attn_fwd(Q, K, V, O, TOK, CNT, KPM, GATES, sm_scale,
                     stride_qb, stride_qh, stride_qr,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_or,
                     stride_tb, stride_th, stride_pb,
                     stride_gb, stride_gs, stride_gh,
                     H, GROUP, S_K, C,
                     CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, Q_BY_POS: tl.constexpr,
                     OUT_BY_POS: tl.constexpr, HAS_GATES: tl.constexpr, HEAD_D: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Row blocks of one head run side by side (its K/V stay in L2), heaviest (latest) first.
    pid_m = tl.cdiv(C, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    count = tl.load(CNT + pid_bh)
    m0 = pid_m * BLOCK_M
    if m0 < count:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_D)
        row_ok = offs_m < count
        pos = tl.load(TOK + b * stride_tb + h * stride_th + offs_m, mask=row_ok, other=0)
        if Q_BY_POS:
            q_rows = pos
        else:
            q_rows = offs_m
        q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows.to(tl.int64)[:, None] * stride_qr + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        kvh = h // GROUP
        k_base, v_base, kpm_base, qk_scale, m_i, l_i, acc = attn_start(
            K, V, KPM, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_pb, sm_scale, BLOCK_M, HEAD_D)
        if CAUSAL:
            max_pos = tl.max(tl.where(row_ok, pos, 0), 0)
            min_pos = tl.min(tl.where(row_ok, pos, S_K), 0)
            hi = tl.minimum(max_pos + 1, S_K)
            full_hi = tl.minimum((min_pos + 1) // BLOCK_N * BLOCK_N, hi)
        else:
            hi = S_K
            full_hi = S_K // BLOCK_N * BLOCK_N
        acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, pos, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                   0, full_hi, S_K, qk_scale, 0, 0,
                                   False, CAUSAL, False, False, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
        acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, pos, k_base, v_base, stride_kn, stride_vn, kpm_base,
                                   full_hi, hi, S_K, qk_scale, 0, 0,
                                   True, CAUSAL, False, False, HAS_KPM, BLOCK_N, HEAD_D, DOT_PREC)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if HAS_GATES:
            gate = tl.load(GATES + b * stride_gb + pos * stride_gs + h * stride_gh, mask=row_ok, other=0.0)
            out = out * gate.to(tl.float32)[:, None]
        if OUT_BY_POS:
            o_rows = pos
        else:
            o_rows = offs_m
        tl.store(O + b * stride_ob + h * stride_oh + o_rows.to(tl.int64)[:, None] * stride_or + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


_routed_attn_tuned = triton.autotune(configs=attn_configs(), key=["HEAD_D", "CAUSAL", "HAS_KPM", "DOT_PREC", "S_K"])(
    _routed_attn_fwd)


def routing_from_gates(head_gates: torch.Tensor):
    """(B, S, H) gates -> token_idx (B, H, C) int32 sorted ascending per head, counts (B, H) int32.

    Eagerly one host sync (C = max count) sizes the padded buffers; while traced (torch.compile,
    export) C = S instead, so the shapes stay static and nothing syncs.
    """
    chosen = (head_gates != 0).transpose(1, 2)  # (B, H, S)
    counts = chosen.sum(-1, dtype=torch.int32)
    c = chosen.shape[-1] if is_tracing(head_gates) else max(int(counts.max()), 1)
    # Stable sort puts chosen positions first, in ascending order.
    order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[..., :c]
    return order.to(torch.int32).contiguous(), counts.contiguous()


def routed_attention_core(q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_idx: torch.Tensor,
                          counts: torch.Tensor, causal: bool, key_padding: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """Attention for chosen rows only.

    q_sel (B, H, C, D): query rows per head in `token_idx` order; k, v (B, Hkv, S_k, D);
    token_idx (B, H, C) int32 positions (ascending in the first counts[b, h] entries);
    key_padding (B, S_k) bool, True = key may be attended. Returns ctx (B, H, C, D); pad rows
    are 0. A row that sees no key at all gets 0 (the dense reference would give NaN).
    """
    b, h, c, d = q_sel.shape
    out = torch.zeros_like(q_sel)
    _launch(q_sel, False, k, v, token_idx, counts, causal, key_padding, scale, out, False, None)
    return out


def routed_attention_scatter(q: torch.Tensor, q_by_pos: bool, k: torch.Tensor, v: torch.Tensor,
                             token_idx: torch.Tensor, counts: torch.Tensor, causal: bool,
                             key_padding: torch.Tensor | None, scale: float, head_gates: torch.Tensor | None,
                             seq_len: int) -> torch.Tensor:
    """Core that writes gate * ctx straight into a zeroed (B, S, H, D) buffer at each row's position.

    q is either q_sel (B, H, C, D) (q_by_pos=False) or the dense queries (B, S, H, D) read at
    the chosen positions (q_by_pos=True). The result feeds one dense output projection.
    """
    b, h = token_idx.shape[:2]
    d = k.shape[-1]
    out = torch.zeros(b, seq_len, h, d, device=k.device, dtype=k.dtype)
    _launch(q, q_by_pos, k, v, token_idx, counts, causal, key_padding, scale, out, True, head_gates)
    return out


def _launch(q, q_by_pos, k, v, token_idx, counts, causal, key_padding, scale, out, out_by_pos, gates):
    b, h, c = token_idx.shape
    d = q.shape[-1]
    hkv, s_k = check_kv(k, v, b, h, d)
    if counts.shape != (b, h):
        raise ValueError(f"counts must be (B, H)={(b, h)}, got {tuple(counts.shape)}")
    if not q_by_pos and q.shape[:3] != (b, h, c):
        raise ValueError(f"q_sel must be (B, H, C, D)={(b, h, c, d)}, got {tuple(q.shape)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    token_idx = token_idx.to(torch.int32).contiguous()
    counts = counts.to(torch.int32).contiguous()
    if key_padding is not None:
        if key_padding.shape != (b, s_k):
            raise ValueError(f"key_padding must be (B, S_k)={(b, s_k)}, got {tuple(key_padding.shape)}")
        kpm = key_padding.to(torch.int8).contiguous()
    else:
        kpm = counts  # never read
    # (b, h, row) strides: q_sel/ctx are (B, H, C, D); by-position tensors are (B, S, H, D).
    qs = (q.stride(0), q.stride(2), q.stride(1)) if q_by_pos else (q.stride(0), q.stride(1), q.stride(2))
    os_ = (out.stride(0), out.stride(2), out.stride(1)) if out_by_pos else (out.stride(0), out.stride(1), out.stride(2))
    gs = (gates.stride(0), gates.stride(1), gates.stride(2)) if gates is not None else (0, 0, 0)
    interp = _interp()
    kernel = _routed_attn_fwd if interp else _routed_attn_tuned
    extra = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4) if interp else {}
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), b * h)  # noqa: E731
    launcher(kernel, q)[grid](
        q, k, v, out, token_idx, counts, kpm, gates if gates is not None else counts, float(scale),
        *qs, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *os_,
        token_idx.stride(0), token_idx.stride(1), kpm.stride(0) if key_padding is not None else 0, *gs,
        h, h // hkv, s_k, c,
        CAUSAL=bool(causal), HAS_KPM=key_padding is not None, Q_BY_POS=bool(q_by_pos),
        OUT_BY_POS=bool(out_by_pos), HAS_GATES=gates is not None, HEAD_D=d,
        DOT_PREC=dot_precision(q.dtype), **extra)


def _interp() -> bool:
    from moh_compile.kernels.triton import interpreter_mode

    return interpreter_mode()


def _gather_rows(t: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """t (B or 1, 1, S, D) broadcast rope table -> (B, H, C, D) rows at token_idx."""
    b, h, c = token_idx.shape
    t = t.reshape(-1, t.shape[-2], t.shape[-1]).expand(b, -1, -1)
    idx = token_idx.long().reshape(b, h * c, 1).expand(-1, -1, t.shape[-1])
    return torch.gather(t, 1, idx).view(b, h, c, -1)


def routed_q_projection(x, q_weight, q_bias, token_idx, counts, head_dim: int, rope_cos=None, rope_sin=None,
                        mode: str = "gather_gemm", q_norm_weight=None, q_norm_eps: float = 0.0):
    """Queries of chosen rows only: q_sel (B, H, C, D), QK-normed and rotated as the model does.

    mode "gather_gemm": a Triton grouped GEMM that reads x rows by index (skips unchosen
    (token, head) pairs, so half the FLOPs at 50% routing); "dense": one full projection then
    a gather (fewer moving parts; same FLOPs as dense).
    """
    b, s, dm = x.shape
    h, c = token_idx.shape[1], token_idx.shape[2]
    if mode == "dense":
        q = F.linear(x, q_weight, q_bias).view(b, s, h, head_dim).transpose(1, 2)  # (B, H, S, D)
        idx = token_idx.long().unsqueeze(-1).expand(-1, -1, -1, head_dim)
        q_sel = torch.gather(q, 2, idx)
    elif mode == "gather_gemm":
        from moh_compile.kernels.triton.moe_grouped import grouped_gemm

        rows = (token_idx.long() + torch.arange(b, device=x.device).view(b, 1, 1) * s).view(-1)
        starts = torch.arange(b * h, device=x.device, dtype=torch.int32) * c
        w = q_weight.view(h, head_dim, dm)
        bias = q_bias.view(h, head_dim) if q_bias is not None else None
        group_w = torch.arange(h, device=x.device, dtype=torch.int32).repeat(b)
        q_sel = grouped_gemm(x.reshape(b * s, dm), w, bias, starts, counts.reshape(-1), rows=rows,
                             group_weight=group_w, total_rows=b * h * c).view(b, h, c, head_dim)
    else:
        raise ValueError(f"unknown q projection mode {mode!r}; use 'gather_gemm' or 'dense'")
    cos = sin = None
    if rope_cos is not None:
        cos = _gather_rows(rope_cos.to(q_sel.dtype), token_idx)
        sin = _gather_rows(rope_sin.to(q_sel.dtype), token_idx)
    return finish_queries(q_sel, cos, sin, _as(q_norm_weight, q_sel), q_norm_eps)


def _as(t, like):
    return None if t is None else t.to(like.dtype)


def routed_o_projection(ctx_sel, token_idx, counts, head_gates, o_weight, o_bias, seq_len: int,
                        mode: str = "scatter_dense"):
    """Output projection of gated per-head ctx rows: (B, S, d_out).

    "per_head": per-head bmm on chosen rows only, scatter-added with index_add_ (fewest FLOPs
    but writes an (H, B*C, d_out) intermediate); "scatter_dense": scatter gate*ctx into a
    zero (B, S, H*D) buffer and run one dense GEMM (more FLOPs, far fewer bytes).
    """
    b, h, c, d = ctx_sel.shape
    d_out = o_weight.shape[0]
    valid = torch.arange(c, device=ctx_sel.device).view(1, 1, c) < counts.unsqueeze(-1)  # (B, H, C)
    tok = token_idx.long()
    gates = torch.gather(head_gates.transpose(1, 2), 2, tok).to(ctx_sel.dtype) * valid  # (B, H, C)
    weighted = ctx_sel * gates.unsqueeze(-1)
    if mode == "scatter_dense":
        buf = ctx_sel.new_zeros(b, seq_len, h, d)
        bi = torch.arange(b, device=ctx_sel.device).view(b, 1, 1).expand(b, h, c)
        hi = torch.arange(h, device=ctx_sel.device).view(1, h, 1).expand(b, h, c)
        # Positions within one (b, h) are distinct; pad rows point at unchosen positions with weight 0.
        buf.index_put_((bi, tok, hi), weighted)
        return F.linear(buf.view(b, seq_len, h * d), o_weight, o_bias)
    if mode == "per_head":
        w = o_weight.view(d_out, h, d).permute(1, 2, 0)  # (H, D, d_out)
        part = torch.bmm(weighted.permute(1, 0, 2, 3).reshape(h, b * c, d), w)  # (H, B*C, d_out)
        flat_idx = (tok + torch.arange(b, device=tok.device).view(b, 1, 1) * seq_len).permute(1, 0, 2).reshape(-1)
        out = torch.zeros(b * seq_len, d_out, device=ctx_sel.device, dtype=torch.float32)
        out.index_add_(0, flat_idx, part.reshape(-1, d_out).float())
        out = out.to(ctx_sel.dtype).view(b, seq_len, d_out)
        return out + o_bias if o_bias is not None else out
    raise ValueError(f"unknown o projection mode {mode!r}; use 'scatter_dense' or 'per_head'")


def routed_attention_block(x, q_weight, q_bias, k, v, o_weight, o_bias, head_gates, scale: float,
                           causal: bool = True, key_padding=None, rope_cos=None, rope_sin=None,
                           q_mode: str = "gather_gemm", o_mode: str = "fused", routing=None, q_norm_weight=None,
                           q_norm_eps: float = 0.0):
    """The whole routed block: Q projection, Triton core on chosen rows, gated output projection.

    q_mode "gather_gemm" projects chosen rows only; "dense" projects all rows and the core
    reads the chosen ones. o_mode "fused" has the core write gate * ctx into a zeroed
    (B, S, H*D) buffer for one dense GEMM; "scatter_dense"/"per_head" go through ctx rows
    (see routed_o_projection). `routing` = (token_idx, counts) reuses a routing across calls.
    q_norm_weight / q_norm_eps: QK-norm of each query head before RoPE (ops.attention.finish_queries).
    """
    b, s, _ = x.shape
    d = k.shape[-1]
    h = q_weight.shape[0] // d
    token_idx, counts = routing if routing is not None else routing_from_gates(head_gates)
    if o_mode == "fused":
        if q_mode == "dense":
            q = F.linear(x, q_weight, q_bias).view(b, s, h, d)
            cos = sin = None
            if rope_cos is not None:
                cos = rope_cos.to(q.dtype).reshape(-1, s, 1, d)  # (B|1, S, 1, D)
                sin = rope_sin.to(q.dtype).reshape(-1, s, 1, d)
            q = finish_queries(q, cos, sin, _as(q_norm_weight, q), q_norm_eps)
            buf = routed_attention_scatter(q, True, k, v, token_idx, counts, causal, key_padding, scale,
                                           head_gates, s)
        else:
            q_sel = routed_q_projection(x, q_weight, q_bias, token_idx, counts, d, rope_cos, rope_sin, q_mode,
                                        q_norm_weight, q_norm_eps)
            buf = routed_attention_scatter(q_sel, False, k, v, token_idx, counts, causal, key_padding, scale,
                                           head_gates, s)
        return F.linear(buf.view(b, s, h * d), o_weight, o_bias)
    q_sel = routed_q_projection(x, q_weight, q_bias, token_idx, counts, d, rope_cos, rope_sin, q_mode, q_norm_weight,
                                q_norm_eps)
    ctx = routed_attention_core(q_sel, k, v, token_idx, counts, causal, key_padding, scale)
    return routed_o_projection(ctx, token_idx, counts, head_gates, o_weight, o_bias, s, mode=o_mode)


@triton_op("moh_compile::routed_attention_triton", mutates_args=())
def routed_attention_op(x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor | None, k: torch.Tensor,
                        v: torch.Tensor, o_weight: torch.Tensor, o_bias: torch.Tensor | None,
                        head_gates: torch.Tensor, scale: float, causal: bool, key_padding: torch.Tensor | None,
                        rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None,
                        q_norm_weight: torch.Tensor | None = None, q_norm_eps: float = 0.0) -> torch.Tensor:
    """routed_attention_block (default modes) as a torch custom op that compilers trace into."""
    return routed_attention_block(x, q_weight, q_bias, k, v, o_weight, o_bias, head_gates, scale, causal,
                                  key_padding, rope_cos, rope_sin, q_norm_weight=q_norm_weight,
                                  q_norm_eps=q_norm_eps)
