"""One entry per project op: how it becomes ONNX in each form and how ORT runs the custom node.

Why a registry: the exporter and the runtime loop over entries and know no op by name, so a
new op is one `register_lowering(...)` call (moh_compile::moepp_ffn registers itself below
when that op exists).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from onnx import defs

from moh_compile.backends import onnx_custom as custom
from moh_compile.backends import onnx_portable as portable


@dataclass(frozen=True)
class OnnxLowering:
    """torch_op -> custom node (schema + onnxscript translation) or standard ops (torch decomposition)."""

    torch_op: torch._ops.OpOverload
    op_type: str  # custom-form node type in domain "moh_compile"
    schema: defs.OpSchema
    ports: list  # the schema's formal inputs (onnx_custom.Port), in order
    custom_translation: Callable  # onnxscript-traced function emitting the one custom node
    portable: Callable  # torch function of the op's arguments, exports to standard ops only
    ort_kernel: Callable  # (inputs: dict[name, Tensor | None], attrs: dict) -> Tensor, for the custom node
    # Routed ops: a private op taking the op's arguments + a per-call-site plan, and the usage
    # probe (observed arguments by name) -> ((N,) fraction of tokens using each unit, token count),
    # or None for "no plan" (dispatch_plan.plan_dispatch makes the plan from the usage).
    capacity_op: torch._ops.OpOverload | None = None
    unit_usage: Callable | None = None


LOWERINGS: dict[str, OnnxLowering] = {}


def register_lowering(lowering: OnnxLowering) -> None:
    custom.register_schema_once(lowering.schema)
    LOWERINGS[lowering.op_type] = lowering


def lowering_for(torch_op) -> OnnxLowering | None:
    return next((lw for lw in LOWERINGS.values() if lw.torch_op is torch_op), None)


def custom_translation_table() -> dict:
    return {lw.torch_op: lw.custom_translation for lw in LOWERINGS.values()}


def portable_decompositions() -> dict:
    table = {lw.torch_op: lw.portable for lw in LOWERINGS.values()}
    table.update({lw.capacity_op: lw.portable for lw in LOWERINGS.values() if lw.capacity_op is not None})
    return table


def bind_op_args(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict:
    """All of an op call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


register_lowering(OnnxLowering(
    torch.ops.moh_compile.attention.default, custom.ATTENTION_OP, custom.ATTENTION_SCHEMA, custom.ATTENTION_PORTS,
    custom.translate_attention, portable.portable_attention, custom.attention_kernel,
    torch.ops.moh_compile_onnx.attention_capacity.default,
    lambda a: None if a["head_gates"] is None else (portable.head_usage(a["head_gates"]),
                                                    a["head_gates"][..., 0].numel()),
))
register_lowering(OnnxLowering(
    torch.ops.moh_compile.ffn.default, custom.FFN_OP, custom.FFN_SCHEMA, custom.FFN_PORTS,
    custom.translate_ffn, portable.portable_ffn, custom.ffn_kernel,
))

try:  # the MoE++ op lives on another branch until merged
    import moh_compile.ops.moepp  # noqa: F401
except ImportError:
    pass
else:
    from moh_compile.backends import onnx_moepp as moepp

    register_lowering(OnnxLowering(
        torch.ops.moh_compile.moepp_ffn.default, moepp.MOEPP_OP, moepp.MOEPP_SCHEMA, moepp.MOEPP_PORTS,
        moepp.translate_moepp, moepp.portable_moepp, moepp.moepp_kernel,
        torch.ops.moh_compile_onnx.moepp_capacity.default,
        lambda a: (moepp.ffn_expert_usage(a["expert_idx"], a["expert_weight"], a["w_in"].shape[0]),
                   a["expert_idx"][..., 0].numel()),
    ))
