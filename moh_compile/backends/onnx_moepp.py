"""ONNX lowering of `moh_compile::moepp_ffn` (MoE++ experts): custom node + portable capacity dispatch.

Portable form: routing is an input of the op (expert_idx / expert_weight), so per-expert
weights are scatter-added into a (T, E_total) table over the T = batch*seq tokens. Zero experts
cost nothing; copy and constant experts are elementwise. FFN experts follow the call site's
plan (dispatch_plan.py): heavy experts run densely on every token, weighted; the others run in
groups of similar load, each one batched dispatch (TopK over tokens -> Gather -> batched MatMul
-> ScatterND add, one per expert so that no row repeats: onnx_portable.scatter_add_units) with C
tokens per expert: the group's largest load at run time ("dynamic", exact), a capacity factor
(static shapes; tokens over capacity drop that expert) or T ("exact").
Rows are weighted before the output projection, so weight-0 slots add exactly 0.
"""
from __future__ import annotations


import torch

from moh_compile.backends.onnx_custom import _A, Port, _moh, _plugin_attrs, make_schema
from moh_compile.backends.dispatch_plan import group_capacity, iter_groups
from moh_compile.backends.onnx_portable import _const, scatter_add_units
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


def _expert_ffn(xg, w_in, b_in, w_gate, b_gate, w_out, weights, activation):
    """FFN expert(s) on gathered rows xg (..., R, d), weighted per row before the (wide) output
    projection, so weight-0 padding rows add exactly 0 at the cost of the narrow hidden tensor."""
    h = torch.matmul(xg, w_in.transpose(-1, -2))
    if b_in is not None:
        h = h + b_in.unsqueeze(-2)
    if w_gate is not None:
        g = torch.matmul(xg, w_gate.transpose(-1, -2))
        if b_gate is not None:
            g = g + b_gate.unsqueeze(-2)
        h = apply_activation(activation, g) * h
    else:
        h = apply_activation(activation, h)
    return torch.matmul(h * weights.unsqueeze(-1), w_out.transpose(-1, -2))


def _select(t, units: list[int]):
    """t[units] along dim 0 (None stays None); one Gather of a constant index."""
    return None if t is None else t.index_select(0, _const(units, torch.int64, t.device))


def _expert_group(xf, table, units: list[int], w_in, b_in, w_gate, b_gate, w_out, activation, cap, out):
    """One group of FFN experts, batched: top-C tokens per expert by weight, scatter-added into out."""
    t = xf.shape[0]
    weights = table.index_select(1, _const(units, torch.int64, xf.device)).transpose(0, 1)  # (G, T)
    vals, idx = torch.topk(weights, group_capacity(weights != 0, t, cap), dim=-1)  # (G, C)
    xg = xf.index_select(0, idx.reshape(-1)).view(len(units), -1, xf.shape[-1])
    y = _expert_ffn(xg, *(_select(w, units) for w in (w_in, b_in, w_gate, b_gate, w_out)), vals, activation)
    return scatter_add_units(out, idx, y)


def _dense_experts(xf, table, units: list[int], w_in, b_in, w_gate, b_gate, w_out, activation, out):
    """Heavy experts on every token as one FFN of their joint width (two wide GEMMs, no gather or
    scatter); each expert's hidden slice is scaled by the token's weight for it (0 if not chosen)."""
    g, f_e, d = len(units), w_in.shape[1], w_in.shape[2]
    weights = table.index_select(1, _const(units, torch.int64, xf.device))  # (T, G)

    def wide(w, b):
        y = torch.matmul(xf, _select(w, units).reshape(g * f_e, d).t())
        return y if b is None else y + _select(b, units).reshape(g * f_e)
    h = wide(w_in, b_in)
    h = apply_activation(activation, h) if w_gate is None else apply_activation(activation, wide(w_gate, b_gate)) * h
    h = (h.view(-1, g, f_e) * weights.unsqueeze(-1)).reshape(-1, g * f_e)
    return out + torch.matmul(h, _select(w_out, units).permute(1, 0, 2).reshape(w_out.shape[1], g * f_e).t())


def portable_moepp(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                   const_gate_weight, n_zero, n_copy, activation, dense_experts=None, routed_experts=None,
                   group_sizes=None, group_caps=None):
    """FFN experts by the call site's plan (default: all dense); zero/copy/constant experts elementwise."""
    d = x.shape[-1]
    n = w_in.shape[0]
    d_out = w_out.shape[1]
    k = expert_idx.shape[-1]
    xf = x.reshape(-1, d)
    t = xf.shape[0]
    n_const = 0 if const_vectors is None else const_vectors.shape[0]
    total = n + n_zero + n_copy + n_const
    table = torch.zeros(t, total, dtype=x.dtype, device=x.device)
    table = table.scatter_add(1, expert_idx.reshape(t, k), expert_weight.reshape(t, k).to(x.dtype))
    if routed_experts is None:
        dense_experts, routed_experts, group_sizes, group_caps = list(range(n)), [], [], []
    experts = (w_in, b_in, w_gate, b_gate, w_out, activation)
    out = torch.zeros(t, d_out, dtype=x.dtype, device=x.device)
    if dense_experts:
        out = _dense_experts(xf, table, list(dense_experts), *experts, out)
    for units, cap in iter_groups(routed_experts, group_sizes, group_caps):
        out = _expert_group(xf, table, units, *experts, cap, out)
    if n_copy:
        out = out + table[:, n + n_zero: n + n_zero + n_copy].sum(-1, keepdim=True) * xf
    if n_const:
        a = torch.softmax(torch.einsum("td,cjd->tcj", xf, const_gate_weight), dim=-1)  # (T, n_const, 2)
        wc = table[:, total - n_const:].unsqueeze(-1)  # (T, n_const, 1)
        out = out + (wc * a[..., 0:1]).sum(1) * xf + torch.matmul((wc * a[..., 1:2]).squeeze(-1), const_vectors)
    if b_out is not None:
        out = out + b_out
    return out.reshape(*x.shape[:-1], d_out)


def ffn_expert_usage(expert_idx: torch.Tensor, expert_weight: torch.Tensor, num_ffn_experts: int) -> torch.Tensor:
    """(N,) fraction of the tokens that compute each FFN expert."""
    idx = expert_idx.reshape(-1, expert_idx.shape[-1])
    live = (expert_weight.reshape(idx.shape) != 0).unsqueeze(-1)
    chosen = (idx.unsqueeze(-1) == torch.arange(num_ffn_experts)) & live  # (T, k, N)
    return chosen.any(1).float().mean(0)


@torch.library.custom_op("moh_compile_onnx::moepp_capacity", mutates_args=())
def moepp_capacity(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, expert_idx: torch.Tensor,
    expert_weight: torch.Tensor, const_vectors: torch.Tensor | None, const_gate_weight: torch.Tensor | None,
    n_zero: int, n_copy: int, activation: str, dense_experts: list[int], routed_experts: list[int],
    group_sizes: list[int], group_caps: list[int],
) -> torch.Tensor:
    """A call site of moh_compile::moepp_ffn with its capacity plan attached (export-time only)."""
    return portable_moepp(x, w_in, b_in, w_gate, b_gate, w_out, b_out, expert_idx, expert_weight, const_vectors,
                          const_gate_weight, n_zero, n_copy, activation, dense_experts, routed_experts,
                          group_sizes, group_caps)


@moepp_capacity.register_fake
def _moepp_capacity_fake(x, w_in, b_in, w_gate, b_gate, w_out, *rest):
    return x.new_empty((*x.shape[:-1], w_out.shape[1]))
