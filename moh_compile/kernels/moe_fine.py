"""MoE++ FFN experts through the C row kernels (csrc/moe_rows.c): the layout for fine-grained experts.

Why a second CPU layout: the "sorted" layout (moe_dispatch.py) runs two library GEMMs per expert
over its gathered tokens, which is fast while experts are wide (16 experts of a 4d FFN: 96
neurons at d 384) but not with many narrow ones: 256 experts of 6 neurons give GEMMs with 6
output columns and a d-wide gather and scatter per (token, expert) pair, and the op ran 0.5x as
fast as the dense FFN (benchmarks/bench_moepp.py --experts 256). Finer experts are worth having:
MiniLM keeps 0.982 cosine at 50% FFN work with 256 experts against 0.967 with 16
(docs/moepp.md, "Expert granularity").

Here the pairs are grouped by (token tile, expert) with one radix sort; the C kernel gives each
thread whole tiles, reads x rows and accumulates output rows in place (L2-resident per tile),
and keeps each expert's few weight rows in L1 across the tile's tokens that chose it. The
activation and the routing weight are applied in PyTorch between the two halves, on one
(pairs, F_e) buffer, so every activation the op supports is computed by the same code as in the
other layouts.
"""
from __future__ import annotations

import ctypes

import torch

from moh_compile.kernels import native
from moh_compile.kernels.workspace import WORKSPACE
from moh_compile.ops.activations import apply_activation_

L2_TILE_BYTES = 1 << 20  # x rows + output rows of one tile: half of this machine's 2 MiB L2 per core


def _library():
    lib = native.load("moe_rows")
    if lib is not None and not getattr(lib, "_typed", False):
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.moe_rows_plan.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
        lib.moe_rows_plan.restype = i64
        lib.moe_rows_in.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, c_int]
        lib.moe_rows_out.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, c_int]
        lib.moe_rows_in.restype = lib.moe_rows_out.restype = None
        lib._typed = True
    return lib


def available() -> bool:
    """Whether the C row kernels could be built and loaded here."""
    return _library() is not None


def tile_rows(d: int, d_out: int, tokens: int, threads: int) -> int:
    """Tokens per tile: the tile's x and output rows fit in L2_TILE_BYTES, and there are at
    least two tiles per thread so threads share the work evenly."""
    fit = max(16, L2_TILE_BYTES // (4 * (d + d_out)))
    spread = -(-tokens // (2 * max(1, threads)))
    return max(16, min(fit, spread))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def ffn_rows(xf, out, idx, wts, n, w_in, b_in, w_gate, b_gate, w_out, activation) -> None:
    """Adds every FFN expert's weighted output into `out` (T, d_out), computing only the chosen
    (token, expert) pairs. xf (T, d), idx / wts (T, k) as in moepp_dispatch; float32 CPU tensors."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C row kernels unavailable: {native.why_unavailable('moe_rows')}")
    t, d = xf.shape
    k = idx.shape[1]
    d_out, f_e = w_out.shape[1], w_in.shape[1]
    threads = torch.get_num_threads()
    tile = tile_rows(d, d_out, t, threads)
    n_tiles = -(-t // tile)
    # contiguous copies are bound to names: a temporary's memory would be freed before the C call
    idx = idx.to(torch.int64).contiguous()
    wts = wts.to(torch.float32).contiguous()
    w_in, b_in, w_gate, b_gate = (None if w is None else w.contiguous() for w in (w_in, b_in, w_gate, b_gate))
    segs = n_tiles * n  # at most one segment per (tile, expert)
    sizes = [segs, segs, segs + 1, n_tiles + 1, n_tiles + 1, t * k]
    counts, seg_expert, seg_start, tile_pairs, tile_seg, token = torch.empty(sum(sizes), dtype=torch.int64).split(sizes)
    weight = torch.empty(t * k, dtype=torch.float32)
    n_pairs = lib.moe_rows_plan(idx.data_ptr(), wts.data_ptr(), t, k, n, tile, n_tiles, counts.data_ptr(),
                                tile_pairs.data_ptr(), token.data_ptr(), weight.data_ptr(), seg_start.data_ptr(),
                                seg_expert.data_ptr(), tile_seg.data_ptr(), threads)
    if n_pairs == 0:
        return
    n_hidden = 2 if w_gate is not None else 1
    ws = WORKSPACE.take(n_pairs * f_e * n_hidden, xf.dtype, xf.device)
    h = ws[: n_pairs * f_e].view(n_pairs, f_e)
    routing = (token.data_ptr(), seg_start.data_ptr(), seg_expert.data_ptr(), tile_seg.data_ptr(), n_tiles)
    lib.moe_rows_in(xf.data_ptr(), d, *routing, w_in.data_ptr(), _ptr(b_in), f_e, h.data_ptr(), threads)
    if w_gate is not None:
        g = ws[n_pairs * f_e:].view(n_pairs, f_e)
        lib.moe_rows_in(xf.data_ptr(), d, *routing, w_gate.data_ptr(), _ptr(b_gate), f_e, g.data_ptr(), threads)
        act = apply_activation_(activation, g).mul_(h)
    else:
        act = apply_activation_(activation, h)
    w_t = w_out.transpose(1, 2).contiguous()  # (n, F_e, d_out): an expert's rows are contiguous
    lib.moe_rows_out(act.data_ptr(), weight.data_ptr(), f_e, *routing, w_t.data_ptr(), d_out, out.data_ptr(),
                     threads)


__all__ = ["available", "ffn_rows", "tile_rows"]
