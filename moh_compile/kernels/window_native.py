"""Per-head sink + local-window attention through the C kernel (csrc/window_attention.c).

Why a second CPU path next to the PyTorch block kernel (block_sparse.py): that one runs ATen's
flash kernel on small blocks of rows plus a separate sink pass and a merge, at 1.9-2.4x the cost
per (query, key) pair of dense SDPA (docs/sparse.md). The C kernel scores a tile of 8 rows
against the union of their visible keys only (sinks + one band), takes an exact softmax per row
over that row's own keys, and accumulates P V, all in a per-thread scratch buffer.

It covers the case the block kernel spends most of its time on: float32 on the CPU, self-attention
(S_q == S_k), no mask tensor beyond the pattern, causality and padding keys (`simplify_mask` drops
padding-free masks and makes padding masks one row; `is_causal_mask` turns an exact causal mask
into causal=True), head size a multiple of 16.
Everything else stays on the block kernel. Dense heads (span < 0) are left to the caller.
"""
from __future__ import annotations

import ctypes

import torch

from moh_compile.kernels import native

TILE_ROWS = 8  # query rows per tile in the C kernel (R there): a tile scores its rows' union of keys
_PAD = 32  # zero keys after K^T's rows: a 32-key step that starts at a valid key never leaves its row


def _library():
    lib = native.load("window_attention")
    if lib is not None and not getattr(lib, "_typed", False):
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.window_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, c_int, c_int,
                                         ctypes.c_float, ptr, c_int, ptr, ptr, ptr, ptr, i64, ptr, i64, i64]
        lib.window_attention.restype = c_int
        lib._typed = True
    return lib


def available() -> bool:
    """Whether the C window kernel could be built and loaded here."""
    return _library() is not None


def supports(s_q: int, s_k: int, head_dim: int, v_dim: int, scale: float, *tensors: torch.Tensor) -> bool:
    """Whether the C kernel takes a call of these sizes on these tensors (float32, CPU, no
    gradients), apart from the mask: see `applies`."""
    return (s_q == s_k and head_dim == v_dim and head_dim % 16 == 0 and scale > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)
            and available())


def is_key_mask(mask, b: int, h: int, s_k: int) -> bool:
    """Whether a (simplified) mask is None or a bool key-padding mask the kernel takes: one query
    row, shape (B or 1, H or 1, 1, S_k)."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[2] == 1
                            and mask.shape[0] in (1, b) and mask.shape[1] in (1, h) and mask.shape[3] == s_k)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> bool:
    """Whether `window_attention` can run these inputs (else the caller uses the block kernel);
    mask: None or a key-padding mask (`is_key_mask`) as `simplify_mask` leaves it."""
    return (is_key_mask(mask, q.shape[0], q.shape[1], k.shape[2]) and q.shape[1] % k.shape[1] == 0 and q.shape[-1] == k.shape[-1]
            and supports(q.shape[2], k.shape[2], q.shape[-1], v.shape[-1], scale, q, k, v))


def row_tiles(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The C kernel's task list for computing only some rows: rows (B, H, S) bool -> (row_idx,
    tile_bh, tile_start, tile_rows): the chosen query positions of each (b, h) in order, cut into
    tiles of up to TILE_ROWS of one (b, h)."""
    b, h, s = rows.shape
    hit = rows.reshape(b * h, s).nonzero()  # row-major: (b, h) ascending, then position ascending
    row_idx = hit[:, 1].contiguous()
    counts = torch.bincount(hit[:, 0], minlength=b * h)
    first = torch.cumsum(counts, 0) - counts
    n_tiles = (counts + TILE_ROWS - 1) // TILE_ROWS
    tile_bh = torch.repeat_interleave(torch.arange(b * h), n_tiles)
    within = torch.arange(int(n_tiles.sum())) - torch.repeat_interleave(torch.cumsum(n_tiles, 0) - n_tiles, n_tiles)
    tile_start = first[tile_bh] + within * TILE_ROWS
    tile_rows = torch.clamp(counts[tile_bh] - within * TILE_ROWS, max=TILE_ROWS)
    return row_idx, tile_bh, tile_start, tile_rows


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, spans: list[int],
                     sinks: list[int], two_sided: bool, causal: bool, scale: float,
                     rows: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> list[int]:
    """Writes every sparse head (span >= 0) of `out` (B, H, S, D), contiguous; returns the (query,
    key) scores computed per head. q (B, H, S, D), k / v (B, Hkv, S, D). rows: (B, H, S) bool, the
    only rows to compute (routed heads); the others are not written. key_mask: bool (B or 1,
    H or 1, 1, S), False = a padding key no row may attend (a row left with none gets 0)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"C window kernel unavailable: {native.why_unavailable('window_attention')}")
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    if not out.is_contiguous() or out.shape != q.shape:
        raise ValueError("out must be a contiguous tensor shaped like q")
    if rows is not None and rows.shape != (b, h, s):
        raise ValueError(f"rows must have shape (B, H, S) = {(b, h, s)}, got {tuple(rows.shape)}")
    if rows is not None and not bool(rows.any()):
        return [0] * h  # nothing chosen (an empty row list would read as "every row" in C)
    # contiguous copies are bound to names: a temporary's memory would be freed before the C call
    qc, vc = q.contiguous(), v.contiguous()
    kt = q.new_zeros(b, h_kv, d, s + _PAD)
    kt[..., :s] = k.transpose(-1, -2)
    span_t = torch.tensor(spans, dtype=torch.int64)
    sink_t = torch.tensor(sinks, dtype=torch.int64)
    pairs = torch.zeros(h, dtype=torch.int64)
    tiles = row_tiles(rows) if rows is not None else None
    ok, ok_sb, ok_sh = None, 0, 0
    if key_mask is not None:
        if not is_key_mask(key_mask, b, h, s):
            raise ValueError(f"key_mask must be bool (B or 1, H or 1, 1, S), got {tuple(key_mask.shape)}")
        ok = key_mask.to(torch.uint8).contiguous()
        ok_sh = s if key_mask.shape[1] > 1 else 0
        ok_sb = key_mask.shape[1] * s if key_mask.shape[0] > 1 else 0
    failed = lib.window_attention(qc.data_ptr(), kt.data_ptr(), vc.data_ptr(), out.data_ptr(), b, h, h_kv, s, d, s + _PAD,
                         span_t.data_ptr(), sink_t.data_ptr(), int(two_sided), int(causal), float(scale),
                         pairs.data_ptr(), torch.get_num_threads(),
                         *(t.data_ptr() for t in tiles) if tiles else (None,) * 4,
                         tiles[1].numel() if tiles else 0, None if ok is None else ok.data_ptr(), ok_sb, ok_sh)
    if failed:
        raise MemoryError(f"C window kernel: no memory for its per-thread scratch ({TILE_ROWS} x {s} floats)")
    return pairs.tolist()


__all__ = ["TILE_ROWS", "available", "applies", "is_key_mask", "row_tiles", "supports", "window_attention"]
