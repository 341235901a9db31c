"""One entry per project op: how it becomes ONNX in each form and how ORT runs the custom node.

Why a registry: the exporter and the runtime loop over entries and know no op by name, so a
new op (e.g. moh_compile::moepp_ffn) is one `register_lowering(...)` call.
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


LOWERINGS: dict[str, OnnxLowering] = {}


def register_lowering(lowering: OnnxLowering) -> None:
    custom.register_schema_once(lowering.schema)
    LOWERINGS[lowering.op_type] = lowering


def custom_translation_table() -> dict:
    return {lw.torch_op: lw.custom_translation for lw in LOWERINGS.values()}


def portable_decompositions() -> dict:
    return {lw.torch_op: lw.portable for lw in LOWERINGS.values()}


register_lowering(OnnxLowering(
    torch.ops.moh_compile.attention.default, custom.ATTENTION_OP, custom.ATTENTION_SCHEMA, custom.ATTENTION_PORTS,
    custom.translate_attention, portable.portable_attention, custom.attention_kernel,
))
register_lowering(OnnxLowering(
    torch.ops.moh_compile.ffn.default, custom.FFN_OP, custom.FFN_SCHEMA, custom.FFN_PORTS,
    custom.translate_ffn, portable.portable_ffn, custom.ffn_kernel,
))
