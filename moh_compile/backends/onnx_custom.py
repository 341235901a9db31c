"""Custom-form ONNX lowering: each project op becomes ONE node in the "moh_compile" domain.

Why one node: a runtime with a kernel for the op (ORT through ort_runtime.py, a TensorRT
plugin) gets the whole block, with the plan in attributes, and can skip work its own way.
TensorRT maps an unknown node to a plugin by op_type alone and reads `plugin_version` and
`plugin_namespace`, so every node carries both, and op types never collide with standard ops.

The exporter (onnxscript) refuses a custom-domain op without a registered OpSchema, so
`register_schemas()` runs before export. Runtime kernels here are numpy in / numpy out and
call the torch op itself, so numbers agree with PyTorch (fast kernels included).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnxscript
import torch
from onnx import defs

DOMAIN = "moh_compile"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = DOMAIN

_moh = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_MASKS = ["tensor(bool)", *_FLOATS]


@dataclass(frozen=True)
class Port:
    """One formal input of a custom op: name, type variable, optional or not."""

    name: str
    type_var: str = "T"
    optional: bool = False


_A = defs.OpSchema.AttrType
_PLUGIN_ATTRS = [("plugin_version", _A.STRING, False), ("plugin_namespace", _A.STRING, False)]


def _output_like(ports: list[Port], weight: str, axis: int):
    """Type/shape inference: y has x's dtype and shape with the last dim = `weight`.shape[axis]."""
    xi, wi = [p.name for p in ports].index("x"), [p.name for p in ports].index(weight)

    def infer(ctx) -> None:
        x, w = ctx.get_input_type(xi), ctx.get_input_type(wi)
        if x is None or not x.HasField("tensor_type"):
            return
        out = onnx.TypeProto()
        out.tensor_type.elem_type = x.tensor_type.elem_type
        if x.tensor_type.HasField("shape") and w is not None and w.tensor_type.HasField("shape"):
            for dim in list(x.tensor_type.shape.dim)[:-1] + [w.tensor_type.shape.dim[axis]]:
                out.tensor_type.shape.dim.add().CopyFrom(dim)
        ctx.set_output_type(0, out)

    return infer


def make_schema(op_type: str, ports: list[Port], attrs: list[tuple[str, object, bool]], doc: str,
                out_weight: str, out_weight_axis: int = 0, masks: bool = False, int_index: bool = False
                ) -> defs.OpSchema:
    """OpSchema for one custom op; attrs are (name, AttrType, required); out_weight sizes y's last dim."""
    param = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption
    inputs = [param(p.name, p.type_var, param_option=opt.Optional if p.optional else opt.Single) for p in ports]
    constraints = [("T", _FLOATS, "floating tensors")]
    if masks:
        constraints.append(("M", _MASKS, "bool (True = visible) or additive float mask"))
    if int_index:
        constraints.append(("I", ["tensor(int64)"], "indices"))
    schema = defs.OpSchema(
        op_type, DOMAIN, DOMAIN_VERSION, doc=doc, inputs=inputs, outputs=[param("y", "T")],
        type_constraints=constraints,
        attributes=[defs.OpSchema.Attribute(n, t, "", required=r) for n, t, r in attrs + _PLUGIN_ATTRS],
    )
    schema.set_type_and_shape_inference_function(_output_like(ports, out_weight, out_weight_axis))
    return schema


def register_schema_once(schema: defs.OpSchema) -> None:
    try:
        defs.get_schema(schema.name, DOMAIN_VERSION, schema.domain)
    except defs.SchemaError:
        defs.register_schema(schema)


def _plugin_attrs() -> dict:
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


# ---------------------------------------------------------------- attention
ATTENTION_OP = "MohRoutedAttention"
ATTENTION_PORTS = [
    Port("x"), Port("q_weight", optional=True), Port("q_bias", optional=True), Port("k"), Port("v"),
    Port("attn_mask", "M", optional=True), Port("rope_cos", optional=True), Port("rope_sin", optional=True),
    Port("o_weight"), Port("o_bias", optional=True), Port("head_gates", optional=True),
    Port("q_norm_weight", optional=True), Port("sinks", optional=True), Port("query", optional=True),
    Port("out_gate", optional=True),
]
ATTENTION_SCHEMA = make_schema(
    ATTENTION_OP, ATTENTION_PORTS,
    [("scale", _A.FLOAT, True), ("num_heads", _A.INT, True), ("num_kv_heads", _A.INT, True),
     ("head_dim", _A.INT, True), ("routed", _A.INT, True), ("window_sink", _A.INTS, False),
     ("window_alpha", _A.INTS, False), ("window_beta", _A.FLOATS, False), ("window_two_sided", _A.INT, False),
     ("q_norm_eps", _A.FLOAT, False), ("softcap", _A.FLOAT, False), ("v_head_dim", _A.INT, False)],
    "moh_compile::attention: Q projection (per-head RMS norm when q_norm_weight is given, RoPE; or the "
    "query input, (B, H, S, D), when q_weight is absent), per-head (routed, windowed) attention, the "
    "out_gate input (B, H, S, Dv) times each head's context if given, gated O projection.",
    out_weight="o_weight", masks=True,
)


def translate_attention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                        scale, window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
                        q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None, query=None, out_gate=None):
    """onnxscript translation of moh_compile::attention (head counts read from static weight shapes)."""
    head_dim = int(k.shape[-1])
    heads = int(query.shape[1]) if q_weight is None else int(q_weight.shape[0]) // head_dim
    attrs = dict(scale=float(scale), num_heads=heads, num_kv_heads=int(k.shape[1]),
                 head_dim=head_dim, routed=int(head_gates is not None), **_plugin_attrs())
    if window_sink is not None:
        attrs.update(window_sink=[int(s) for s in window_sink], window_alpha=[int(a) for a in window_alpha],
                     window_beta=[float(b) for b in window_beta], window_two_sided=int(window_two_sided))
    if int(v.shape[-1]) != head_dim:
        attrs["v_head_dim"] = int(v.shape[-1])
    if q_norm_weight is not None:
        attrs["q_norm_eps"] = float(q_norm_eps)
    if softcap:
        attrs["softcap"] = float(softcap)
    return _moh.MohRoutedAttention(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias,
                                   head_gates, q_norm_weight, sinks, query, out_gate, **attrs)


def attention_kernel(inputs: dict[str, torch.Tensor | None], attrs: dict) -> torch.Tensor:
    """Run one MohRoutedAttention node with the torch op (reference or registered fast kernel)."""
    window = {}
    if "window_sink" in attrs:
        window = dict(window_sink=list(attrs["window_sink"]), window_alpha=list(attrs["window_alpha"]),
                      window_beta=list(attrs["window_beta"]), window_two_sided=bool(attrs["window_two_sided"]))
    tensors = {p.name: inputs.get(p.name) for p in ATTENTION_PORTS}  # ports are named as the op's arguments
    return torch.ops.moh_compile.attention(**tensors, scale=float(attrs["scale"]), **window,
                                           q_norm_eps=float(attrs.get("q_norm_eps", 0.0)),
                                           softcap=float(attrs.get("softcap", 0.0)))


# ---------------------------------------------------------------- ffn
FFN_OP = "MohFFN"
FFN_PORTS = [Port("x"), Port("w_in"), Port("b_in", optional=True), Port("w_out"), Port("b_out", optional=True),
             Port("w_gate", optional=True), Port("b_gate", optional=True)]
FFN_SCHEMA = make_schema(
    FFN_OP, FFN_PORTS,
    [("activation", _A.STRING, True), ("gated", _A.INT, True), ("hidden_size", _A.INT, True)],
    "moh_compile::ffn: act(x W_in^T + b_in) [* gate] W_out^T + b_out.", out_weight="w_out",
)


def translate_ffn(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation):
    return _moh.MohFFN(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation=str(activation),
                       gated=int(w_gate is not None), hidden_size=int(w_in.shape[0]), **_plugin_attrs())


def ffn_kernel(inputs: dict[str, torch.Tensor | None], attrs: dict) -> torch.Tensor:
    args = [inputs.get(p.name) for p in FFN_PORTS]
    return torch.ops.moh_compile.ffn(*args, str(attrs["activation"]))


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The custom-domain nodes of a model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN]

