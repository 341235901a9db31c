"""`moh_compile::moepp_ffn`: an MoE++ feed-forward block (arXiv 2410.07348) as one op.

The dense FFN's hidden neurons are partitioned into N FFN experts; zero-computation experts
(zero, copy, constant) are appended after them. Expert numbering:

    [0, N)                        FFN experts   E(x) = FFN_e(x)  (plain or gated)
    [N, N+n_zero)                 zero          E(x) = 0
    [N+n_zero, N+n_zero+n_copy)   copy          E(x) = x                       (d_out == d)
    [.., +n_const)                constant      E(x) = a1 x + a2 v_c,
                                                [a1, a2] = softmax(G_c x)      (d_out == d)

    out = b_out + sum_j expert_weight[..., j] * E_{expert_idx[..., j]}(x)

Duplicate indices in one token's k slots simply add. With every FFN expert chosen at weight
1 and the experts built by `split_ffn_into_experts`, the op equals `ffn_reference`.
The real implementation is the sorted-dispatch CPU kernel in kernels/moe_dispatch.py, which
skips unchosen experts; the dense reference below is the definition and gives the backward.
"""
from __future__ import annotations

import torch

from moh_compile.ops.dispatch import FastKernels

from moh_compile.ops.activations import ACTIVATIONS, apply_activation
from moh_compile.ops.recompute import register_recompute_autograd


def _n_const(const_vectors) -> int:
    return 0 if const_vectors is None else const_vectors.shape[0]


def validate_moepp_args(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                        const_vectors, const_gate_weight, n_zero, n_copy, activation) -> None:
    """Shape/setting checks (no data-dependent ones, so they also run on fake tensors)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if w_in.dim() != 3:
        raise ValueError(f"w_in must be (N, F_e, d), got shape {tuple(w_in.shape)}")
    n, f_e, d = w_in.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has last dim {x.shape[-1]} but w_in expects d={d}")
    if w_out.dim() != 3 or w_out.shape[0] != n or w_out.shape[2] != f_e:
        raise ValueError(f"w_out must be (N={n}, d_out, F_e={f_e}), got shape {tuple(w_out.shape)}")
    d_out = w_out.shape[1]
    if b_in is not None and tuple(b_in.shape) != (n, f_e):
        raise ValueError(f"b_in must be (N={n}, F_e={f_e}), got shape {tuple(b_in.shape)}")
    if w_gate is None and b_gate is not None:
        raise ValueError("b_gate given without w_gate")
    if w_gate is not None and tuple(w_gate.shape) != (n, f_e, d):
        raise ValueError(f"w_gate must match w_in's shape {(n, f_e, d)}, got {tuple(w_gate.shape)}")
    if b_gate is not None and tuple(b_gate.shape) != (n, f_e):
        raise ValueError(f"b_gate must be (N={n}, F_e={f_e}), got shape {tuple(b_gate.shape)}")
    if b_out is not None and tuple(b_out.shape) != (d_out,):
        raise ValueError(f"b_out must be (d_out={d_out},), got shape {tuple(b_out.shape)}")
    if expert_idx.dtype != torch.int64:
        raise ValueError(f"expert_idx must be int64, got {expert_idx.dtype}")
    if expert_idx.dim() != x.dim() or expert_idx.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"expert_idx must be (*x.shape[:-1], k), got {tuple(expert_idx.shape)} for x {tuple(x.shape)}")
    if expert_weight.shape != expert_idx.shape:
        raise ValueError(f"expert_weight shape {tuple(expert_weight.shape)} != expert_idx shape {tuple(expert_idx.shape)}")
    if n_zero < 0 or n_copy < 0:
        raise ValueError(f"n_zero and n_copy must be >= 0, got {n_zero}, {n_copy}")
    if (const_vectors is None) != (const_gate_weight is None):
        raise ValueError("const_vectors and const_gate_weight must be given together")
    n_const = _n_const(const_vectors)
    if const_vectors is not None:
        if tuple(const_vectors.shape) != (n_const, d_out):
            raise ValueError(f"const_vectors must be (n_const, d_out={d_out}), got {tuple(const_vectors.shape)}")
        if tuple(const_gate_weight.shape) != (n_const, 2, d):
            raise ValueError(f"const_gate_weight must be (n_const={n_const}, 2, d={d}), got {tuple(const_gate_weight.shape)}")
    if (n_copy > 0 or n_const > 0) and d_out != d:
        raise ValueError(f"copy/constant experts need d_out == d, got d_out={d_out}, d={d}")
    total = n + n_zero + n_copy + n_const
    k = expert_idx.shape[-1]
    if k > total:
        raise ValueError(f"k={k} exceeds the number of experts {total} (N={n}, zero={n_zero}, copy={n_copy}, const={n_const})")


def check_index_values(expert_idx: torch.Tensor, total: int) -> None:
    """Data-dependent range check; runs eagerly only (skipped while tracing)."""
    if torch.compiler.is_compiling() or expert_idx.numel() == 0:
        return
    if isinstance(expert_idx, torch._subclasses.FakeTensor):
        return
    lo, hi = int(expert_idx.min()), int(expert_idx.max())
    if lo < 0 or hi >= total:
        raise ValueError(f"expert_idx values must lie in [0, {total}), got range [{lo}, {hi}]")


def total_experts(w_in, n_zero: int, n_copy: int, const_vectors) -> int:
    return w_in.shape[0] + n_zero + n_copy + _n_const(const_vectors)


def moepp_ffn_reference(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                        const_vectors, const_gate_weight, n_zero: int, n_copy: int, activation: str):
    """Dense definition: compute every expert for every token, then gather the chosen ones."""
    validate_moepp_args(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                        const_vectors, const_gate_weight, n_zero, n_copy, activation)
    check_index_values(expert_idx, total_experts(w_in, n_zero, n_copy, const_vectors))
    d = x.shape[-1]
    d_out = w_out.shape[1]
    k = expert_idx.shape[-1]
    xf = x.reshape(-1, d)
    t = xf.shape[0]
    h = torch.einsum("td,nfd->tnf", xf, w_in)
    if b_in is not None:
        h = h + b_in
    if w_gate is not None:
        g = torch.einsum("td,nfd->tnf", xf, w_gate)
        if b_gate is not None:
            g = g + b_gate
        h = apply_activation(activation, g) * h
    else:
        h = apply_activation(activation, h)
    parts = [torch.einsum("tnf,nof->tno", h, w_out)]
    if n_zero:
        parts.append(xf.new_zeros(t, n_zero, d_out))
    if n_copy:
        parts.append(xf.unsqueeze(1).expand(t, n_copy, d))
    if const_vectors is not None and const_vectors.shape[0]:
        a = torch.softmax(torch.einsum("td,cjd->tcj", xf, const_gate_weight), dim=-1)
        parts.append(a[..., 0:1] * xf.unsqueeze(1) + a[..., 1:2] * const_vectors.unsqueeze(0))
    every = torch.cat(parts, dim=1)  # (T, E_total, d_out)
    idx = expert_idx.reshape(t, k)
    picked = every[torch.arange(t, device=x.device).unsqueeze(1), idx]  # (T, k, d_out)
    out = (expert_weight.reshape(t, k, 1).to(picked.dtype) * picked).sum(dim=1)
    if b_out is not None:
        out = out + b_out
    return out.reshape(*x.shape[:-1], d_out)


_FAST_KERNELS = FastKernels()
register_fast_kernel = _FAST_KERNELS.register  # kernels take the op's arguments, return a tensor or None


@torch.library.custom_op("moh_compile::moepp_ffn", mutates_args=())
def moepp_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    expert_idx: torch.Tensor,
    expert_weight: torch.Tensor,
    const_vectors: torch.Tensor | None,
    const_gate_weight: torch.Tensor | None,
    n_zero: int,
    n_copy: int,
    activation: str,
) -> torch.Tensor:
    from moh_compile.kernels.moe_dispatch import moepp_dispatch

    args = (x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
            const_vectors, const_gate_weight, n_zero, n_copy, activation)
    validate_moepp_args(*args)
    check_index_values(expert_idx, total_experts(w_in, n_zero, n_copy, const_vectors))
    out = _FAST_KERNELS.run(*args)
    if out is not None:
        return out
    return moepp_dispatch(*args)


@moepp_ffn.register_fake
def _moepp_ffn_fake(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                    const_vectors, const_gate_weight, n_zero, n_copy, activation):
    validate_moepp_args(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight,
                        const_vectors, const_gate_weight, n_zero, n_copy, activation)
    return x.new_empty((*x.shape[:-1], w_out.shape[1]))


register_recompute_autograd(moepp_ffn, moepp_ffn_reference)


def split_ffn_into_experts(w_in, b_in, w_out, w_gate=None, b_gate=None, groups=None) -> dict:
    """Stack a dense FFN's hidden neurons into N experts by `groups` (a partition of range(F)).

    Groups of unequal size are padded with zero neurons (weight rows 0, bias 0, w_out columns
    0), which contribute exactly 0, so all experts at weight 1 sum to the dense FFN.
    Returns {"w_in", "b_in", "w_gate", "b_gate", "w_out"} (None where the input was None).
    """
    if groups is None:
        raise ValueError("groups is required: a list of neuron-index lists or a LongTensor (N, F_e)")
    f = w_in.shape[0]
    if isinstance(groups, torch.Tensor):
        if groups.dim() != 2:
            raise ValueError(f"groups tensor must be (N, F_e), got shape {tuple(groups.shape)}")
        groups = groups.tolist()
    groups = [[int(i) for i in g] for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("groups must be a non-empty list of non-empty neuron lists")
    flat = [i for g in groups for i in g]
    if any(i < 0 or i >= f for i in flat):
        raise ValueError(f"group indices must lie in [0, {f})")
    if len(flat) != f or len(set(flat)) != f:
        raise ValueError(f"groups must partition all {f} hidden neurons exactly once, got {len(flat)} entries, {len(set(flat))} distinct")
    n, f_e = len(groups), max(len(g) for g in groups)
    # Padded index table; slot f (one past the end) points at an appended zero neuron.
    table = torch.full((n, f_e), f, dtype=torch.long)
    for e, g in enumerate(groups):
        table[e, : len(g)] = torch.tensor(g, dtype=torch.long)
    table = table.to(w_in.device)

    def rows(w):  # (F, ...) -> (N, F_e, ...) with zero padding
        if w is None:
            return None
        padded = torch.cat([w, w.new_zeros((1, *w.shape[1:]))], dim=0)
        return padded[table].contiguous()

    w_out_cols = rows(w_out.t())  # (N, F_e, d_out)
    return {
        "w_in": rows(w_in),
        "b_in": rows(b_in),
        "w_gate": rows(w_gate),
        "b_gate": rows(b_gate),
        "w_out": w_out_cols.transpose(1, 2).contiguous(),
    }


__all__ = ["moepp_ffn", "moepp_ffn_reference", "split_ffn_into_experts", "validate_moepp_args"]
