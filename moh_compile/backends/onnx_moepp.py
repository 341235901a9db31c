"""ONNX lowering of `moh_compile::moepp_ffn` (MoE++ experts): custom node + portable capacity dispatch.

Portable form: routing is an input of the op (expert_idx / expert_weight), so per-expert
weights are scatter-added into a (T, E_total) table; each FFN expert then takes its top-C
tokens by weight (TopK over tokens), runs on just those rows (batched MatMul over experts)
and scatter-adds back, weighted (weight 0 slots add exactly 0). Zero experts cost nothing,
copy and constant experts are elementwise. C = min(T, ceil(capacity_factor * f * T)) over the
T = batch*seq tokens with f the mean chosen fraction of the FFN experts (measured per call
site at export, like attention); capacity="exact" sets C = T. Overflowing tokens drop that
expert (output then differs from exact routing).
"""
from __future__ import annotations

import math

import torch

from moh_compile.backends.onnx_custom import _A, Port, _moh, _plugin_attrs, make_schema
from moh_compile.backends.onnx_portable import CAPACITY_DENOMINATOR
from moh_compile.ops.activations import apply_activation

MOEPP_OP = "MohMoEppFFN"
MOEPP_PORTS = [Port("x"), Port("w_in"), Port("b_in", optional=True), Port("w_gate", optional=True),
               Port("b_gate", optional=True), Port("w_out"), Port("b_out", optional=True),
               Port("expert_idx", "I"), Port("expert_weight"), Port("const_vectors", optional=True),
               Port("const_gate_weight", optional=True)]
MOEPP_SCHEMA = make_schema(
    MOEPP_OP, MOEPP_PORTS,
    [("activation", _A.STRING, True), ("gated", _A.INT, True), ("num_ffn_experts", _A.INT, True),
     ("expert_hidden", _A.INT, True), ("n_zero", _A.INT, True), ("n_copy", _A.INT, True),
     ("n_const", _A.INT, True), ("top_k", _A.INT, True)],
    "moh_compile::moepp_ffn: MoE++ FFN experts + zero/copy/constant experts, routing given as inputs.",
    out_weight="w_out", out_weight_axis=1, int_index=True,
)


def translate_moepp(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                    const_gate_weight, n_zero, n_copy, activation):
    n_const = 0 if const_vectors is None else int(const_vectors.shape[0])
    return _moh.MohMoEppFFN(
        x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors, const_gate_weight,
        activation=str(activation), gated=int(w_gate is not None), num_ffn_experts=int(w_in.shape[0]),
        expert_hidden=int(w_in.shape[1]), n_zero=int(n_zero), n_copy=int(n_copy), n_const=n_const,
        top_k=int(expert_idx.shape[-1]), **_plugin_attrs())


def moepp_kernel(inputs: dict, attrs: dict) -> torch.Tensor:
    args = [inputs.get(p.name) for p in MOEPP_PORTS]
    return torch.ops.moh_compile.moepp_ffn(*args, int(attrs["n_zero"]), int(attrs["n_copy"]), str(attrs["activation"]))


def portable_moepp(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                   const_gate_weight, n_zero, n_copy, activation, cap_num=1, cap_den=1):
    """Capacity dispatch of the FFN experts; zero/copy/constant experts elementwise."""
    d = x.shape[-1]
    n, f_e, _ = w_in.shape
    d_out = w_out.shape[1]
    k = expert_idx.shape[-1]
    xf = x.reshape(-1, d)
    t = xf.shape[0]
    n_const = 0 if const_vectors is None else const_vectors.shape[0]
    total = n + n_zero + n_copy + n_const
    table = torch.zeros(t, total, dtype=x.dtype, device=x.device)
    table = table.scatter_add(1, expert_idx.reshape(t, k), expert_weight.reshape(t, k).to(x.dtype))
    capacity = torch.sym_min(t, (t * cap_num + cap_den - 1) // cap_den)
    vals, idx = torch.topk(table[:, :n].transpose(0, 1), capacity, dim=-1)  # (N, C)
    xg = xf[idx]  # (N, C, d)
    h = torch.matmul(xg, w_in.transpose(1, 2))
    if b_in is not None:
        h = h + b_in.unsqueeze(1)
    if w_gate is not None:
        g = torch.matmul(xg, w_gate.transpose(1, 2))
        if b_gate is not None:
            g = g + b_gate.unsqueeze(1)
        h = apply_activation(activation, g) * h
    else:
        h = apply_activation(activation, h)
    y = torch.matmul(h, w_out.transpose(1, 2))  # (N, C, d_out)
    w = vals.unsqueeze(-1)
    y = torch.where(w != 0, y * w, torch.zeros_like(y))
    out = torch.zeros(t, d_out, dtype=x.dtype, device=x.device).index_add(0, idx.reshape(-1), y.reshape(-1, d_out))
    if n_copy:
        out = out + table[:, n + n_zero: n + n_zero + n_copy].sum(-1, keepdim=True) * xf
    if n_const:
        a = torch.softmax(torch.einsum("td,cjd->tcj", xf, const_gate_weight), dim=-1)  # (T, n_const, 2)
        wc = table[:, total - n_const:].unsqueeze(-1)  # (T, n_const, 1)
        out = out + (wc * a[..., 0:1]).sum(1) * xf + torch.matmul((wc * a[..., 1:2]).squeeze(-1), const_vectors)
    if b_out is not None:
        out = out + b_out
    return out.reshape(*x.shape[:-1], d_out)


def moepp_capacity_plan(expert_idx: torch.Tensor, num_ffn_experts: int, capacity, active_fraction):
    """(cap_num, cap_den) for one call site from its observed routing."""
    if capacity != "exact" and (not isinstance(capacity, (int, float)) or capacity <= 0):
        raise ValueError(f"capacity must be 'exact' or a positive capacity factor, got {capacity!r}")
    if capacity == "exact":
        return 1, 1
    idx = expert_idx.reshape(-1, expert_idx.shape[-1])
    chosen = torch.zeros(idx.shape[0], num_ffn_experts, dtype=torch.bool)
    ffn = idx < num_ffn_experts
    chosen[torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[ffn], idx[ffn]] = True
    frac = active_fraction if active_fraction is not None else float(chosen.float().mean())
    num = max(1, math.ceil(capacity * frac * CAPACITY_DENOMINATOR))
    return min(num, CAPACITY_DENOMINATOR), CAPACITY_DENOMINATOR


@torch.library.custom_op("moh_compile_onnx::moepp_capacity", mutates_args=())
def moepp_capacity(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, expert_idx: torch.Tensor,
    expert_weight: torch.Tensor, const_vectors: torch.Tensor | None, const_gate_weight: torch.Tensor | None,
    n_zero: int, n_copy: int, activation: str, cap_num: int, cap_den: int,
) -> torch.Tensor:
    """A call site of moh_compile::moepp_ffn with its capacity plan attached (export-time only)."""
    return portable_moepp(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                          const_gate_weight, n_zero, n_copy, activation, cap_num, cap_den)


@moepp_capacity.register_fake
def _moepp_capacity_fake(x, w_in, b_in, w_gate, b_gate, w_out, *rest):
    return x.new_empty((*x.shape[:-1], w_out.shape[1]))
