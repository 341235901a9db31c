"""MoE++ FFN on GPU: tokens sorted by expert, two grouped GEMMs, and an O(d) combine.

Why: each FFN expert only multiplies the rows routed to it, so FFN FLOPs scale with the
fraction of (token, slot) pairs that chose an FFN expert; zero/copy/constant experts cost
O(d) per token in the combine. The grouped GEMM reads its A rows through an index (no
gathered copy of x), fuses bias + activation (+ gate*up) into the first GEMM's epilogue and
the routing weight into the second's. Group -> tile mapping is computed inside the kernel
from the per-group counts, so no host sync is needed.

GEMM backends (`moepp_ffn_triton(..., gemm=...)`): "triton" runs both GEMMs here; "grouped_mm"
runs them through torch._grouped_mm (CUTLASS grouped GEMM on sm90+), with x gathered into
expert order first and bias + activation applied by a small Triton kernel; "mixed" keeps the
first GEMM here (indexed A rows, fused epilogue) and runs the second through torch._grouped_mm
(its A is already contiguous in expert order). "auto" picks per device (see default_gemm).
benchmarks/bench_gpu.py times all three side by side.

The whole op is registered as the triton_op `moh_compile::moepp_ffn_triton` (launches through
traceable.launcher): torch.compile / AOTInductor trace into it and compile the kernels into
their own output instead of calling an opaque Python op.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from moh_compile.kernels.triton import interpreter_mode
from moh_compile.kernels.triton._flash import dot_precision
from moh_compile.kernels.triton.traceable import launcher

ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "quick_gelu": 5, "sigmoid": 6,
             "tanh": 7, "relu2": 8}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * _sigmoid(2.0 * y) - 1.0))
    elif ACT == 4:
        x = x * _sigmoid(x)
    elif ACT == 5:
        x = x * _sigmoid(1.702 * x)
    elif ACT == 6:
        x = _sigmoid(x)
    elif ACT == 7:
        x = 2.0 * _sigmoid(2.0 * x) - 1.0
    elif ACT == 8:
        x = tl.maximum(x, 0.0)
        x = x * x
    return x


@triton.jit
def _grouped_gemm_kernel(A, ROWS, W, WG, BIAS, BIASG, OUT, SCALE, STARTS, COUNTS, GW,
                         N, K, G, M_BOUND, M_BUCKET, stride_am, stride_wg, stride_wn, stride_bg, stride_om,
                         HAS_ROWS: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SCALE: tl.constexpr, ACT: tl.constexpr, G_POW2: tl.constexpr,
                         EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M_BOUND, BLOCK_M) + G
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % gsz
    tile_n = (pid % per_group) // gsz
    # Which group owns m-tile `tile_m`: groups' tiles are laid out back to back.
    gidx = tl.arange(0, G_POW2)
    cnt = tl.load(COUNTS + gidx, mask=gidx < G, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    g = tl.sum((cum <= tile_m).to(tl.int32), 0)
    if g < G:
        before = tl.sum(tl.where(gidx == g, cum - tiles, 0), 0)
        count_g = tl.sum(tl.where(gidx == g, cnt, 0), 0)
        start_g = tl.load(STARTS + g)
        wi = tl.load(GW + g).to(tl.int64)
        offs_m = (tile_m - before) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < count_g
        out_rows = start_g + tl.where(row_ok, offs_m, 0)  # invalid rows re-read a valid row, never stored
        if HAS_ROWS:
            a_rows = tl.load(ROWS + out_rows).to(tl.int64)
        else:
            a_rows = out_rows.to(tl.int64)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_nl = tl.where(n_ok, offs_n, 0)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
        w_ptrs = W + wi * stride_wg + offs_nl[None, :] * stride_wn + offs_k[:, None]
        wg_ptrs = WG + wi * stride_wg + offs_nl[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        accg = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - kk
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
            if GATED:
                if EVEN_K:
                    wg = tl.load(wg_ptrs)
                else:
                    wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
                accg = tl.dot(a, wg, accg, input_precision=DOT_PREC)
                wg_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(BIAS + wi * stride_bg + offs_nl).to(tl.float32)[None, :]
            if GATED:
                accg += tl.load(BIASG + wi * stride_bg + offs_nl).to(tl.float32)[None, :]
        if GATED:
            acc = _act(accg, ACT) * acc
        else:
            acc = _act(acc, ACT)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + out_rows).to(tl.float32)[:, None]
        o_ptrs = OUT + out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gemm_configs():
    if os.environ.get("MOH_TRITON_AUTOTUNE", "1") == "0" and not interpreter_mode():
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)]
    if interpreter_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = ((128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 8),
              (64, 128, 64, 4, 4, 8), (256, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 32), (128, 128, 128, 8, 3, 8))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": gm}, num_warps=w, num_stages=s)
            for m, n, k, w, s, gm in shapes]


_grouped_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "HAS_ROWS", "GATED", "HAS_SCALE", "ACT", "DOT_PREC"])(_grouped_gemm_kernel)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor,
                 counts: torch.Tensor, rows: torch.Tensor | None = None, group_weight: torch.Tensor | None = None,
                 total_rows: int | None = None, w_gate: torch.Tensor | None = None,
                 b_gate: torch.Tensor | None = None, activation: str = "identity",
                 row_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = epilogue(a[rows[r]] @ w[gw[g]].T) for r in [starts[g], starts[g] + counts[g]).

    a (R, K); w, w_gate (G_w, N, K) (nn.Linear layout per group); bias, b_gate (G_w, N);
    rows (total_rows,) or None (= identity); group_weight (G,) maps group -> weight slot
    (default g). Epilogue: bias, then act(gate) * up when gated else act(up), then * row_scale.
    Rows outside every group are left untouched in `out` (allocated empty when not given).
    """
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACT_CODES)}")
    if a.dim() != 2 or w.dim() != 3 or w.shape[2] != a.shape[1]:
        raise ValueError(f"need a (R, K) and w (G, N, K) with matching K, got {tuple(a.shape)}, {tuple(w.shape)}")
    g = counts.numel()
    n, k = w.shape[1], w.shape[2]
    if total_rows is None:
        total_rows = rows.numel() if rows is not None else a.shape[0]
    a = a if a.stride(-1) == 1 else a.contiguous()
    w = w.contiguous()
    if w_gate is not None:
        w_gate = w_gate.contiguous()
        if w_gate.shape != w.shape:
            raise ValueError(f"w_gate shape {tuple(w_gate.shape)} != w shape {tuple(w.shape)}")
    if out is None:
        out = torch.empty(total_rows, n, device=a.device, dtype=a.dtype)
    dev = a.device
    starts = starts.to(device=dev, dtype=torch.int32).contiguous()
    counts = counts.to(device=dev, dtype=torch.int32).contiguous().view(-1)
    gw = (torch.arange(g, device=dev, dtype=torch.int32) if group_weight is None
          else group_weight.to(device=dev, dtype=torch.int32).contiguous())
    rows_t = rows.to(device=dev, dtype=torch.int32).contiguous() if rows is not None else counts
    bias_t = bias.contiguous() if bias is not None else counts
    bgate_t = b_gate.contiguous() if b_gate is not None else bias_t
    if (bias is None) != (b_gate is None) and w_gate is not None:
        raise ValueError("gated grouped_gemm needs both biases or neither")
    scale_t = row_scale.contiguous() if row_scale is not None else counts
    interp = interpreter_mode()
    kernel = _grouped_gemm_kernel if interp else _grouped_gemm_tuned
    extra = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4) if interp else {}
    bk_min = 16 if interp else 64
    grid = lambda meta: ((triton.cdiv(total_rows, meta["BLOCK_M"]) + g) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    launcher(kernel, a)[grid](
        a, rows_t, w, w_gate if w_gate is not None else w, bias_t, bgate_t, out, scale_t, starts, counts, gw,
        n, k, g, total_rows, triton.next_power_of_2(max(total_rows, 1)), a.stride(0), w.stride(0), w.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        HAS_ROWS=rows is not None, GATED=w_gate is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=row_scale is not None, ACT=ACT_CODES[activation],
        G_POW2=max(triton.next_power_of_2(g), 2), EVEN_K=k % bk_min == 0,
        DOT_PREC=dot_precision(a.dtype), **extra)
    return out


GEMM_BACKENDS = ("triton", "grouped_mm", "mixed")


def grouped_mm_supported(a: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """torch._grouped_mm runs here: CUDA sm90+ in bfloat16 with 16-byte aligned rows, or the CPU
    fallback (interpreter checks). Older torch builds have no _grouped_mm at all."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.is_cuda:
        aligned = all(v % 8 == 0 for v in (*w_in.shape[1:], *w_out.shape[1:]))
        return a.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(a.device) >= (9, 0)
    return interpreter_mode()


def default_gemm(a: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> str:
    """MOH_MOE_GEMM overrides; otherwise "mixed" where torch._grouped_mm runs (fastest of the
    three on H100, benchmarks/results/gpu_*.md) and "triton" elsewhere."""
    forced = os.environ.get("MOH_MOE_GEMM")
    if forced:
        if forced not in GEMM_BACKENDS:
            raise ValueError(f"MOH_MOE_GEMM={forced!r}; use one of {', '.join(GEMM_BACKENDS)}")
        return forced
    return "mixed" if a.is_cuda and grouped_mm_supported(a, w_in, w_out) else "triton"


@triton.jit
def _bias_act_kernel(H, HG, BIAS, BIASG, EXPERT, N, N_FFN, stride_h, stride_b,
                     GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    """In place on rows of FFN pairs: h = act(g + bg) * (h + b) when gated, else act(h + b)."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.load(EXPERT + r).to(tl.int64)
    if e < N_FFN:
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < N
        h = tl.load(H + r * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += tl.load(BIAS + e * stride_b + offs, mask=ok, other=0.0).to(tl.float32)
        if GATED:
            g = tl.load(HG + r * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                g += tl.load(BIASG + e * stride_b + offs, mask=ok, other=0.0).to(tl.float32)
            h = _act(g, ACT) * h
        else:
            h = _act(h, ACT)
        tl.store(H + r * stride_h + offs, h.to(H.dtype.element_ty), mask=ok)


def _hidden_grouped_mm(xf, rows, sorted_expert, offs, w_in, b_in, w_gate, b_gate, activation, n):
    """First GEMM through torch._grouped_mm on x gathered into expert order, then bias + act."""
    xs = xf.index_select(0, rows)
    hidden = torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offs)
    gate = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs) if w_gate is not None else hidden
    f_e = hidden.shape[1]
    block = min(triton.next_power_of_2(f_e), 1024 if not interpreter_mode() else 64)
    launcher(_bias_act_kernel, hidden)[(hidden.shape[0], triton.cdiv(f_e, block))](
        hidden, gate, b_in if b_in is not None else hidden, b_gate if b_gate is not None else hidden,
        sorted_expert, f_e, n, hidden.stride(0), b_in.stride(0) if b_in is not None else 0,
        GATED=w_gate is not None, HAS_BIAS=b_in is not None, ACT=ACT_CODES[activation], BLOCK_N=block)
    return hidden


@triton.jit
def _combine_kernel(OUT, X, Y, IDX, WGT, INV, CONST_A, CONST_V, BOUT,
                    D_OUT, KSLOTS, N_FFN, N_ZERO, N_COPY, N_CONST,
                    stride_x, stride_y, stride_o, stride_ca,
                    HAS_BOUT: tl.constexpr, FFN_WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs < D_OUT
    acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BOUT:
        acc += tl.load(BOUT + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.zeros([BLOCK_D], tl.float32)
    if N_COPY + N_CONST > 0:
        x = tl.load(X + t * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    for j in range(0, KSLOTS):
        e = tl.load(IDX + t * KSLOTS + j)
        w = tl.load(WGT + t * KSLOTS + j).to(tl.float32)
        if e < N_FFN:
            r = tl.load(INV + t * KSLOTS + j).to(tl.int64)
            y = tl.load(Y + r * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
            if FFN_WEIGHTED:  # weighted in the second GEMM's epilogue
                acc += y
            else:
                acc += w * y
        elif e >= N_FFN + N_ZERO:
            if e < N_FFN + N_ZERO + N_COPY:
                acc += w * x
            else:
                c = e - (N_FFN + N_ZERO + N_COPY)
                a1 = tl.load(CONST_A + t * stride_ca + 2 * c).to(tl.float32)
                a2 = tl.load(CONST_A + t * stride_ca + 2 * c + 1).to(tl.float32)
                vc = tl.load(CONST_V + c * D_OUT + offs, mask=ok, other=0.0).to(tl.float32)
                acc += w * (a1 * x + a2 * vc)
    tl.store(OUT + t * stride_o + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def moepp_ffn_triton(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                     const_vectors, const_gate_weight, n_zero: int, n_copy: int, activation: str,
                     gemm: str = "auto") -> torch.Tensor:
    """moh_compile::moepp_ffn on GPU (same arguments and result as the op's reference).

    `gemm` picks the GEMM backend (module docstring); "auto" = default_gemm(...)."""
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACT_CODES)}")
    if gemm == "auto":
        gemm = default_gemm(x, w_in, w_out)
    if gemm not in GEMM_BACKENDS:
        raise ValueError(f"unknown gemm backend {gemm!r}; use one of auto, {', '.join(GEMM_BACKENDS)}")
    if gemm != "triton" and not grouped_mm_supported(x, w_in, w_out):
        raise ValueError(f"gemm={gemm!r} needs torch._grouped_mm on CUDA sm90+ in bfloat16 with dims divisible by 8")
    n, f_e, d = w_in.shape
    d_out = w_out.shape[1]
    k = expert_idx.shape[-1]
    xf = x.reshape(-1, d).contiguous()
    t = xf.shape[0]
    idx = expert_idx.reshape(t, k).contiguous()
    wgt = expert_weight.reshape(t, k).to(torch.float32).contiguous()
    flat = idx.view(-1)
    n_const = 0 if const_vectors is None else const_vectors.shape[0]
    # Sort (token, slot) pairs by expert; non-FFN experts (>= N) land after every FFN group.
    # No host syncs here (bincount would sync): the GPU never idles waiting for the CPU.
    total = n + n_zero + n_copy + n_const
    # 16-bit keys: the radix sort makes 2 passes instead of 8 (0.05 -> ~0.01 ms at 82k pairs on H100)
    order = torch.argsort(flat.to(torch.int16) if total < 2 ** 15 else flat, stable=True)
    counts = torch.zeros(total, device=x.device, dtype=torch.int32)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    counts = counts[:n].contiguous()
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # group ends: torch._grouped_mm's offsets
    starts = (ends - counts).contiguous()
    rows = (order // k).to(torch.int32)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    if gemm == "grouped_mm":
        hidden = _hidden_grouped_mm(xf, rows, flat[order], ends, w_in, b_in, w_gate, b_gate, activation, n)
    else:
        hidden = grouped_gemm(xf, w_in, b_in, starts, counts, rows=rows, total_rows=t * k, w_gate=w_gate,
                              b_gate=b_gate, activation=activation)
    if gemm == "triton":
        y = grouped_gemm(hidden, w_out, None, starts, counts, total_rows=t * k, row_scale=wgt.view(-1)[order])
    else:  # rows past the last FFN group are left unwritten; the combine never reads them
        y = torch._grouped_mm(hidden, w_out.transpose(1, 2), offs=ends)
    if n_const:
        logits = (xf @ const_gate_weight.reshape(n_const * 2, d).to(xf.dtype).t()).float().view(t, n_const, 2)
        const_a = torch.softmax(logits, -1).view(t, n_const * 2).contiguous()
        const_v = const_vectors.contiguous()
    else:
        const_a = wgt
        const_v = wgt
    out = torch.empty(t, d_out, device=x.device, dtype=x.dtype)
    block_d = min(triton.next_power_of_2(d_out), 1024 if not interpreter_mode() else 64)
    launcher(_combine_kernel, out)[(t, triton.cdiv(d_out, block_d))](
        out, xf, y, idx, wgt, inv, const_a, const_v, b_out if b_out is not None else wgt,
        d_out, k, n, n_zero, n_copy, n_const, xf.stride(0), y.stride(0), out.stride(0), const_a.stride(0),
        HAS_BOUT=b_out is not None, FFN_WEIGHTED=gemm == "triton", BLOCK_D=block_d)
    return out.view(*x.shape[:-1], d_out)


@triton_op("moh_compile::moepp_ffn_triton", mutates_args=())
def moepp_ffn_triton_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_gate: torch.Tensor | None,
                        b_gate: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                        expert_idx: torch.Tensor, expert_weight: torch.Tensor, const_vectors: torch.Tensor | None,
                        const_gate_weight: torch.Tensor | None, n_zero: int, n_copy: int, activation: str,
                        gemm: str = "auto") -> torch.Tensor:
    """moepp_ffn_triton as a torch custom op that compilers can see through (module docstring)."""
    return moepp_ffn_triton(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                            const_gate_weight, n_zero, n_copy, activation, gemm)
