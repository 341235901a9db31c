"""Correctness checks of the Triton kernels against the torch references, shared by tests.

Run as a script under TRITON_INTERPRET=1 (CPU, fp32, small shapes) it prints one JSON dict
{check name: max abs error}; the GPU tests call the same functions on CUDA tensors.
Why a separate process for the interpreter: TRITON_INTERPRET must be set before triton is
imported, and must not leak into other tests of the same pytest process.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F


def _err(out, ref, valid=None) -> float:
    out, ref = out.float(), ref.float()
    if valid is not None:
        out, ref = out[valid], ref[valid]
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max())


def _rel(out, ref) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def check_routed_core(device, dtype, b=2, h=4, hkv=2, s=40, d=16, frac=0.5, seed=0, rel=False):
    from moh_compile.kernels.triton.routed_attention import routed_attention_core, routing_from_gates

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    gates = (torch.rand(b, s, h, generator=g) < frac).float()
    lengths = torch.tensor([s, s - 7][:b] + [s] * max(0, b - 2))
    kpm = torch.arange(s).view(1, s) < lengths.view(b, 1)  # right padding: every row sees key 0
    mask = torch.ones(s, s, dtype=torch.bool).tril() & kpm[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3,
                                         enable_gqa=True)
    tok, cnt = routing_from_gates(gates.to(device))
    idx = tok.long().cpu().unsqueeze(-1).expand(-1, -1, -1, d)
    q_sel = torch.gather(q, 2, idx).to(device, dtype)
    out = routed_attention_core(q_sel, k.to(device, dtype), v.to(device, dtype), tok, cnt, True, kpm.to(device), 0.3)
    valid = torch.arange(tok.shape[2]).view(1, 1, -1) < cnt.cpu().unsqueeze(-1)
    ref_sel = torch.gather(ref, 2, idx)
    pad_zero = float(out.cpu()[~valid].abs().max()) if (~valid).any() else 0.0
    if rel:
        return max(_rel(out.cpu()[valid], ref_sel[valid]), pad_zero)
    return max(_err(out.cpu(), ref_sel, valid), pad_zero)


def _attention_args(device, dtype, b, h, hkv, s, d, seed, gates_frac=None, window=False, rope=True, q_norm=False,
                    query=False):
    """The op's arguments; q_norm appends a QK-norm scale and eps (Qwen3-style models); query
    gives the queries computed (as the graph does for OLMo 2) instead of W_q, b_q and RoPE."""
    g = torch.Generator().manual_seed(seed)
    dm = h * d
    x = torch.randn(b, s, dm, generator=g)
    wq = torch.randn(h * d, dm, generator=g) / dm ** 0.5
    bq = torch.randn(h * d, generator=g) * 0.1
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    wo = torch.randn(dm, h * d, generator=g) / dm ** 0.5
    bo = torch.randn(dm, generator=g) * 0.1
    pos = torch.arange(s).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([pos[:, None] * inv[None], pos[:, None] * inv[None]], -1)
    cos, sin = (ang.cos().view(1, 1, s, d), ang.sin().view(1, 1, s, d)) if rope else (None, None)
    lengths = torch.tensor([s - 5 * i for i in range(b)])
    kpm = torch.arange(s).view(1, s) < lengths.view(b, 1)
    mask = (torch.ones(s, s, dtype=torch.bool).tril() & kpm[:, None, None, :])
    gates = None
    if gates_frac is not None:
        gates = torch.rand(b, s, h, generator=g) * (torch.rand(b, s, h, generator=g) < gates_frac)
    win = (None, None, None, False)
    if window:
        win = ([2] + [0] * (h - 1), [3] + [-1] + [5] * (h - 2), [0.1] + [0.0] + [0.2] * (h - 2), False)
    t = lambda z: None if z is None else z.to(device, dtype)  # noqa: E731
    norm = (t(torch.rand(d, generator=g) + 0.5), 1e-6) if q_norm else ()
    if query:
        from moh_compile.ops.attention import project_queries

        q = project_queries(x, wq, bq, cos, sin, d)
        return (t(x), None, None, t(k), t(v), mask.to(device), None, None, t(wo), t(bo), t(gates), d ** -0.5,
                *win, None, 0.0, 0.0, None, t(q))
    return (t(x), t(wq), t(bq), t(k), t(v), mask.to(device), t(cos), t(sin), t(wo), t(bo), t(gates), d ** -0.5,
            *win, *norm)


def check_attention_op(device, dtype, mode, b=2, h=4, hkv=2, s=32, d=16, seed=1, rel=False, q_norm=False,
                       query=False):
    """The registered hook through the op vs attention_reference in float64 on CPU. With `query`
    (queries computed by the graph) the routed mode must decline (its kernel projects its own)."""
    from moh_compile.kernels.triton.register import attention_fast_kernel
    from moh_compile.ops.attention import attention_reference

    args = _attention_args(device, dtype, b, h, hkv, s, d, seed, gates_frac=0.5 if mode != "window" else 0.7,
                           window=mode != "routed", q_norm=q_norm, query=query)
    out = attention_fast_kernel(*args)
    if query and mode == "routed":
        return 0.0 if out is None else float("inf")
    if out is None:
        return float("inf")
    ref_args = [a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
                (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args]
    ref = attention_reference(*ref_args)
    return _rel(out.cpu(), ref) if rel else _err(out.cpu(), ref)


def check_routed_block(device, dtype, q_mode, o_mode, b=2, h=4, hkv=2, s=32, d=16, seed=5, rel=False,
                       q_norm=False):
    """routed_attention_block in each projection mode vs attention_reference (gates, rope, padding)."""
    from moh_compile.kernels.triton.register import decompose_mask
    from moh_compile.kernels.triton.routed_attention import routed_attention_block
    from moh_compile.ops.attention import attention_reference

    args = _attention_args(device, dtype, b, h, hkv, s, d, seed, gates_frac=0.6, q_norm=q_norm)
    x, wq, bq, k, v, mask, cos, sin, wo, bo, gates, scale = args[:12]
    causal, kpm = decompose_mask(mask, b, s, s)
    norm = dict(q_norm_weight=args[16], q_norm_eps=args[17]) if q_norm else {}
    out = routed_attention_block(x, wq, bq, k, v, wo, bo, gates, scale, causal, kpm, cos, sin,
                                 q_mode=q_mode, o_mode=o_mode, **norm)
    ref_args = [a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
                (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args]
    ref = attention_reference(*ref_args)
    return _rel(out.cpu(), ref) if rel else _err(out.cpu(), ref)


def check_sparse(device, dtype, causal, two_sided, b=1, h=4, hkv=2, s=48, d=16, seed=2, rel=False):
    from moh_compile.kernels.triton.sparse_attention import sparse_attention
    from moh_compile.ops.attention import window_mask

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    sink = [2, 0, 5, 1] * (h // 4)
    alpha = [3, -1, 7, 0] * (h // 4)
    beta = [0.1, 0.0, 0.05, 0.3] * (h // 4)
    pat = window_mask(s, s, sink, alpha, beta, two_sided)
    if causal:
        pat = pat & torch.ones(s, s, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=pat.unsqueeze(0), scale=0.25,
                                         enable_gqa=True)
    out = sparse_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), sink, alpha, beta,
                           two_sided, causal, None, 0.25)
    return _rel(out.cpu(), ref) if rel else _err(out.cpu(), ref)


def moepp_loop_reference(x, w_in, b_in, w_gate, b_gate, w_out, b_out, idx, wgt, cv, cg, n_zero, n_copy, act):
    """Token-by-token statement of the moepp_ffn contract (independent of the op module)."""
    from moh_compile.ops.activations import apply_activation

    n = w_in.shape[0]
    out = torch.zeros(x.shape[0], w_out.shape[1], dtype=x.dtype)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < n:
                up = w_in[e] @ x[t] + (b_in[e] if b_in is not None else 0)
                if w_gate is not None:
                    hid = apply_activation(act, w_gate[e] @ x[t] + (b_gate[e] if b_gate is not None else 0)) * up
                else:
                    hid = apply_activation(act, up)
                y = w_out[e] @ hid
            elif e < n + n_zero:
                y = torch.zeros_like(x[t])
            elif e < n + n_zero + n_copy:
                y = x[t]
            else:
                c = e - n - n_zero - n_copy
                a = torch.softmax(cg[c] @ x[t], -1)
                y = a[0] * x[t] + a[1] * cv[c]
            out[t] += wgt[t, j] * y
    return out + (b_out if b_out is not None else 0)


def moepp_args(t, d, n, f_e, k, n_zero, n_copy, n_const, gated, seed):
    g = torch.Generator().manual_seed(seed)
    total = n + n_zero + n_copy + n_const
    x = torch.randn(t, d, generator=g)
    w_in = torch.randn(n, f_e, d, generator=g) / d ** 0.5
    b_in = torch.randn(n, f_e, generator=g) * 0.1
    w_gate = torch.randn(n, f_e, d, generator=g) / d ** 0.5 if gated else None
    b_gate = torch.randn(n, f_e, generator=g) * 0.1 if gated else None
    w_out = torch.randn(n, d, f_e, generator=g) / f_e ** 0.5
    b_out = torch.randn(d, generator=g) * 0.1
    idx = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(t)])
    wgt = torch.rand(t, k, generator=g)
    cv = torch.randn(n_const, d, generator=g) if n_const else None
    cg = torch.randn(n_const, 2, d, generator=g) / d ** 0.5 if n_const else None
    return [x, w_in, b_in, w_gate, b_gate, w_out, b_out, idx, wgt, cv, cg, n_zero, n_copy]


def check_moepp(device, dtype, gated, act, t=24, d=32, n=4, f_e=16, k=3, seed=3, rel=False, reference="loop",
                gemm="triton"):
    from moh_compile.kernels.triton.moe_grouped import moepp_ffn_triton

    args = moepp_args(t, d, n, f_e, k, 1, 1, 2, gated, seed)
    if reference == "loop":
        ref = moepp_loop_reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                     for a in args], act)
    else:
        ref = reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                          for a in args], act)
    dev = [a.to(device, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
           (a.to(device) if isinstance(a, torch.Tensor) else a) for a in args]
    out = moepp_ffn_triton(*dev, act, gemm=gemm).cpu()
    return _rel(out, ref) if rel else _err(out, ref)


def check_moepp_op_dispatch(device, dtype, gated=True, act="silu"):
    """torch.ops.moh_compile.moepp_ffn takes the Triton path (registered fast kernel) and matches
    the loop reference; inf when the op did not call the Triton kernel."""
    import moh_compile  # noqa: F401  (registers the fast kernels)
    from moh_compile.kernels.triton import moe_grouped

    calls = []
    original = moe_grouped.moepp_ffn_triton

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    moe_grouped.moepp_ffn_triton = counting
    try:
        args = moepp_args(24, 32, 4, 16, 3, 1, 1, 2, gated, 7)
        ref = moepp_loop_reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                     for a in args], act)
        dev = [a.to(device, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
               (a.to(device) if isinstance(a, torch.Tensor) else a) for a in args]
        out = torch.ops.moh_compile.moepp_ffn(*dev, act).cpu()
    finally:
        moe_grouped.moepp_ffn_triton = original
    return _err(out, ref) if calls else float("inf")


def check_grouped_gemm(device, dtype, seed=4):
    """Uneven groups, a group of 0 rows, an index-gathered A, K not a multiple of the block."""
    from moh_compile.kernels.triton.moe_grouped import grouped_gemm

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(30, 40, generator=g)
    w = torch.randn(3, 24, 40, generator=g)
    bias = torch.randn(3, 24, generator=g)
    counts = torch.tensor([7, 0, 19])
    starts = torch.tensor([0, 7, 7])
    rows = torch.randint(0, 30, (26,), generator=g)
    out = grouped_gemm(a.to(device, dtype), w.to(device, dtype), bias.to(device, dtype), starts, counts,
                       rows=rows.to(device), activation="relu").cpu()
    ref = torch.cat([F.relu(a[rows[:7]] @ w[0].T + bias[0]), F.relu(a[rows[7:]] @ w[2].T + bias[2])])
    return _err(out, ref.to(out.dtype))


INTERPRETER_CHECKS = {
    "routed_core": lambda: check_routed_core("cpu", torch.float32),
    "attention_op_routed": lambda: check_attention_op("cpu", torch.float32, "routed"),
    "attention_op_window": lambda: check_attention_op("cpu", torch.float32, "window"),
    "block_dense_q_fused": lambda: check_routed_block("cpu", torch.float32, "dense", "fused"),
    "block_gather_per_head": lambda: check_routed_block("cpu", torch.float32, "gather_gemm", "per_head"),
    "block_dense_scatter": lambda: check_routed_block("cpu", torch.float32, "dense", "scatter_dense"),
    # QK-norm (Qwen3): each chosen query row normalised before RoPE, in both projection modes
    "block_gather_fused_qk_norm": lambda: check_routed_block("cpu", torch.float32, "gather_gemm", "fused",
                                                             q_norm=True),
    "block_dense_fused_qk_norm": lambda: check_routed_block("cpu", torch.float32, "dense", "fused", q_norm=True),
    "attention_op_window_qk_norm": lambda: check_attention_op("cpu", torch.float32, "window", q_norm=True),
    # queries computed by the graph (OLMo 2): the sparse core takes them; routed heads decline
    "attention_op_window_query": lambda: check_attention_op("cpu", torch.float32, "window", query=True),
    "attention_op_routed_query_declines": lambda: check_attention_op("cpu", torch.float32, "routed", query=True),
    "sparse_causal": lambda: check_sparse("cpu", torch.float32, True, False),
    "sparse_causal_two_sided": lambda: check_sparse("cpu", torch.float32, True, True),
    "sparse_bidir_one_sided": lambda: check_sparse("cpu", torch.float32, False, False),
    "sparse_bidir_two_sided": lambda: check_sparse("cpu", torch.float32, False, True),
    "moepp_gated_silu": lambda: check_moepp("cpu", torch.float32, True, "silu"),
    "moepp_plain_gelu": lambda: check_moepp("cpu", torch.float32, False, "gelu"),
    "moepp_plain_relu2": lambda: check_moepp("cpu", torch.float32, False, "relu2"),  # Persimmon's squared ReLU
    # torch._grouped_mm's CPU fallback stands in for CUTLASS; the bias/act and combine kernels are real
    "moepp_grouped_mm_gated_silu": lambda: check_moepp("cpu", torch.float32, True, "silu", gemm="grouped_mm"),
    "moepp_grouped_mm_plain_gelu": lambda: check_moepp("cpu", torch.float32, False, "gelu", gemm="grouped_mm"),
    "moepp_mixed_gated_gelu": lambda: check_moepp("cpu", torch.float32, True, "gelu", gemm="mixed"),
    "grouped_gemm": lambda: check_grouped_gemm("cpu", torch.float32),
    "moepp_op_uses_triton": lambda: check_moepp_op_dispatch("cpu", torch.float32),
}


if __name__ == "__main__":
    names = sys.argv[1:] or list(INTERPRETER_CHECKS)
    print(json.dumps({name: INTERPRETER_CHECKS[name]() for name in names}))
