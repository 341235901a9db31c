"""CPU dispatch kernel for `moh_compile::moepp_ffn`: compute only the chosen experts.

Why sorting: grouping the (token, slot) pairs by expert id turns the routed FFN into one
dense matmul chain per FFN expert over just its tokens, so the cost follows the chosen
fraction of neurons. Zero experts cost nothing; copy and constant experts are O(d) per token
and are folded into the combine as two vectorised terms (a per-token multiple of x and a
(T, n_const) @ (n_const, d) product).

Layouts for the FFN part (`moepp_dispatch(..., layout=...)`; "auto", the default, takes "rows" for
experts of at most ROWS_MAX_WIDTH neurons when its C kernels build here, else "sorted"):
  "rows"     C row kernels for fine-grained experts (moe_fine.py): pairs grouped by (token tile,
             expert), each expert's few weight rows kept in L1, no gather or scatter buffers.
  "sorted"   sort the (token, slot) pairs by expert; per expert gather its token rows
             into a small cache-resident buffer and run the input GEMM into its contiguous slice
             of one hidden buffer; one activation call and one routing-weight scaling over that
             buffer; per expert the output GEMM into a small buffer, scatter-added into the
             output rows of its tokens.
  "capacity" pad every expert to the largest expert's token count and run batched bmm.
benchmarks/bench_moepp.py measures them side by side ("op" is the op, i.e. "sorted").
History, side by side on 2 threads: the sorted layout first replaced a per-expert gather /
weight / index_add variant (0.96-1.3x as fast at d_model 384); it then gathered every pair
into one pairs x d buffer and summed a pairs x d_out contributions buffer per token with one
embedding_bag. Gathering and scattering per expert instead (this version) keeps those d-wide
rows in cache: 0.85-0.95x of the time at d_model 384 and 2048 tokens, 0.92-1.03x elsewhere
(benchmarks/results/moepp_cpu_2026-11-23.md). A single gathered buffer without the workspace
had been 10-40% slower: buffers that large are freshly mapped by the allocator on every call.
"""
from __future__ import annotations

import torch

from moh_compile.kernels import moe_fine
from moh_compile.kernels.sort_ids import stable_order
from moh_compile.kernels.workspace import WORKSPACE
from moh_compile.ops.activations import apply_activation, apply_activation_


def _route(expert_idx: torch.Tensor, total: int):
    """Sort the (token, slot) pairs by expert id: the order, pairs per expert, token of each pair."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = stable_order(flat, total)
    counts = torch.bincount(flat, minlength=total)
    return order, counts, torch.div(order, k, rounding_mode="floor")


def _ffn_sorted(xf, out, counts_list, order, tokens, flat_w, n, w_in, b_in, w_gate, b_gate, w_out, activation):
    """Adds every FFN expert's weighted output into `out` (T, d_out), computing only its tokens.

    The (token, slot) pairs are sorted by expert, so each expert's pairs are one contiguous slice
    of the hidden buffer H (pairs x F_e). Per expert: gather its token rows into a small buffer,
    input GEMM into its slice of H. Then ONE activation call over H and one per-row scaling by
    the routing weight (the output projection is linear, so weighting its input is exact). Per
    expert again: output GEMM into a small buffer, scatter-added into its tokens' rows of `out`.
    An expert that every token chose (calibrated routers have such experts in most MiniLM layers)
    reads x as it is and adds its output GEMM straight into `out`: no gather, no scatter.

    Why small per-expert buffers: the gathered inputs and the GEMM outputs are d-wide, several times
    wider than H (F_e = d_ffn / N, e.g. d / 4 for 16 experts of a 4d FFN); one expert's worth stays
    in cache between the gather, the GEMM and the scatter-add,
    where pairs-sized buffers go through memory (module docstring).
    One activation call instead of one per expert: each small elementwise call costs ~35-60 us
    of fixed overhead on 2 threads. The buffers live in the shared workspace (fresh large
    allocations are page-faulted in on every call).
    """
    d = xf.shape[1]
    d_out, f_e = w_out.shape[1], w_in.shape[1]
    n_pairs = sum(counts_list[:n])  # FFN ids sort first, so their pairs lead the sorted order
    if n_pairs == 0:
        return
    widest = max(counts_list[:n])
    n_hidden = 2 if w_gate is not None else 1
    ws = WORKSPACE.take(n_pairs * n_hidden * f_e + widest * (d + d_out), xf.dtype, xf.device)
    h = ws[: n_pairs * f_e].view(n_pairs, f_e)
    used = n_pairs * f_e
    g = None
    if w_gate is not None:
        g = ws[used: used + n_pairs * f_e].view(n_pairs, f_e)
        used += n_pairs * f_e
    x_rows = ws[used: used + widest * d].view(widest, d)
    y_rows = ws[used + widest * d: used + widest * (d + d_out)].view(widest, d_out)
    t = xf.shape[0]
    every_token = torch.arange(t, device=xf.device) if t in counts_list[:n] else None
    slices = []
    start = 0
    for e in range(n):
        c = counts_list[e]
        if c:
            rows = slice(start, start + c)
            # an expert every token chose (common for calibrated routers): no gather, no scatter
            whole = c == t and torch.equal(tokens[rows], every_token)
            slices.append((e, rows, whole))
            xg = xf if whole else torch.index_select(xf, 0, tokens[rows], out=x_rows[:c])
            _linear_into(h[rows], xg, w_in[e], None if b_in is None else b_in[e])
            if g is not None:
                _linear_into(g[rows], xg, w_gate[e], None if b_gate is None else b_gate[e])
        start += c
    act = apply_activation_(activation, g).mul_(h) if g is not None else apply_activation_(activation, h)
    act.mul_(flat_w.index_select(0, order[:n_pairs]).unsqueeze(1))
    for e, rows, whole in slices:
        if whole:
            out.addmm_(act[rows], w_out[e].t())
            continue
        y = torch.mm(act[rows], w_out[e].t(), out=y_rows[: rows.stop - rows.start])
        # scatter_add_ with the row index broadcast over columns (a view): ~35% faster than
        # index_add_ on 2 threads at these sizes; repeated tokens accumulate
        out.scatter_add_(0, tokens[rows].unsqueeze(1).expand(-1, d_out), y)


def _linear_into(out, x, w, b) -> None:
    """out = x @ w.T (+ b), written into `out`."""
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def _ffn_capacity(xf, out, counts, counts_list, tokens, weights, w_in, b_in, w_gate, b_gate, w_out, activation):
    n = w_in.shape[0]
    n_pairs = sum(counts_list[:n])
    if n_pairs == 0:
        return
    cap = max(counts_list[:n])
    tok = tokens[:n_pairs]
    ffn_counts = counts[:n]
    expert_of = torch.repeat_interleave(torch.arange(n, device=xf.device), ffn_counts)
    starts = torch.cumsum(ffn_counts, 0) - ffn_counts
    slot = torch.arange(n_pairs, device=xf.device) - starts[expert_of]
    flat_pos = expert_of * cap + slot
    xp = xf.new_zeros((n * cap, xf.shape[1]))
    xp.index_copy_(0, flat_pos, xf.index_select(0, tok))
    xp = xp.view(n, cap, -1)
    wt_in = w_in.transpose(1, 2)
    h = torch.baddbmm(b_in.unsqueeze(1), xp, wt_in) if b_in is not None else torch.bmm(xp, wt_in)
    if w_gate is not None:
        wt_g = w_gate.transpose(1, 2)
        g = torch.baddbmm(b_gate.unsqueeze(1), xp, wt_g) if b_gate is not None else torch.bmm(xp, wt_g)
        h = apply_activation(activation, g).mul_(h)
    else:
        h = apply_activation(activation, h)
    yp = torch.bmm(h, w_out.transpose(1, 2)).view(n * cap, -1)
    ys = yp.index_select(0, flat_pos).mul_(weights[:n_pairs].unsqueeze(1))
    out.index_add_(0, tok, ys)


def _zero_compute(xf, out, expert_idx, expert_weight, n_ffn, n_zero, n_copy, const_vectors, const_gate_weight):
    """Copy and constant experts: out += c_x * x + c_v @ V, both vectorised over tokens.

    A constant expert's [a1, a2] = softmax(W_c x) over two logits is sigmoid((W_c[0] - W_c[1]) x)
    and its complement, so the gate logits are one thin (T, n_const) product, computed only when
    some token chose a constant expert (calibrated routers usually choose none)."""
    copy_lo = n_ffn + n_zero
    n_const = 0 if const_vectors is None else const_vectors.shape[0]
    n_cc = n_copy + n_const
    # per-token weight of each copy / constant expert (T, n_cc); other slots go to a spare column
    col = expert_idx - copy_lo
    col = torch.where(col >= 0, col, n_cc)
    table = xf.new_zeros(xf.shape[0], n_cc + 1).scatter_add_(1, col, expert_weight)
    coef_x = table[:, :n_copy].sum(1) if n_copy else None
    if n_const:
        w_const = table[:, n_copy:n_cc]
        if bool(w_const.any()):
            a1 = torch.sigmoid(xf @ (const_gate_weight[:, 0] - const_gate_weight[:, 1]).t())  # (T, n_const)
            c_x = (w_const * a1).sum(1)
            coef_x = c_x if coef_x is None else coef_x.add_(c_x)
            out.addmm_(w_const - w_const * a1, const_vectors)
    if coef_x is not None:
        out.addcmul_(xf, coef_x.unsqueeze(1))


LAYOUTS = ("auto", "sorted", "capacity", "rows")
ROWS_MAX_WIDTH = 48  # widest expert (neurons) for which "auto" picks the C row kernels; see choose_layout


def choose_layout(w_in: torch.Tensor, xf: torch.Tensor) -> str:
    """"rows" for experts of at most ROWS_MAX_WIDTH neurons (float32, CPU, C kernels built), else
    "sorted": library GEMMs win on wide experts, the row kernels on narrow ones
    (benchmarks/bench_moepp.py --layouts sorted,rows --experts N)."""
    if (w_in.shape[1] <= ROWS_MAX_WIDTH and xf.dtype == torch.float32 and xf.device.type == "cpu"
            and w_in.dtype == torch.float32 and moe_fine.available()):
        return "rows"
    return "sorted"


def moepp_dispatch(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                   const_vectors, const_gate_weight, n_zero: int, n_copy: int, activation: str,
                   layout: str = "auto") -> torch.Tensor:
    """Forward of the MoE++ op; arguments as validated by ops.moepp.validate_moepp_args.
    layout "auto" picks "rows" (moe_fine.py) for narrow experts when its C kernels load, else "sorted"."""
    d = x.shape[-1]
    d_out = w_out.shape[1]
    k = expert_idx.shape[-1]
    n = w_in.shape[0]
    n_const = 0 if const_vectors is None else const_vectors.shape[0]
    total = n + n_zero + n_copy + n_const
    xf = x.reshape(-1, d).contiguous()
    t = xf.shape[0]
    idx = expert_idx.reshape(t, k)
    wts = expert_weight.reshape(t, k).to(x.dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = choose_layout(w_in, xf)
    # experts add into out, which starts as the output bias (one pass instead of zeros + add)
    out = xf.new_zeros((t, d_out)) if b_out is None else b_out.to(xf.dtype).expand(t, d_out).clone()
    if t and k:
        order, counts, tokens = _route(idx, total)
        counts_list = counts.tolist()
        if layout == "rows":
            moe_fine.ffn_rows(xf, out, idx, wts, n, w_in, b_in, w_gate, b_gate, w_out, activation)
        elif layout == "sorted":
            _ffn_sorted(xf, out, counts_list, order, tokens, wts.reshape(-1), n, w_in, b_in, w_gate, b_gate, w_out,
                        activation)
        else:
            weights = wts.reshape(-1).index_select(0, order)
            _ffn_capacity(xf, out, counts, counts_list, tokens, weights, w_in, b_in, w_gate, b_gate, w_out, activation)
        if n_copy or n_const:
            _zero_compute(xf, out, idx, wts, n, n_zero, n_copy, const_vectors, const_gate_weight)
    return out.reshape(*x.shape[:-1], d_out)


__all__ = ["moepp_dispatch"]
