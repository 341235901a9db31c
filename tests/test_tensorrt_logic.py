"""TensorRT plugin shape/type rules (plain functions) against the torch ops and real custom-form nodes;
the engine build fails with one exact message when TensorRT is absent."""
from __future__ import annotations

import sys

import onnx
import pytest
import torch

import moh_compile  # noqa: F401  (registers the ops)
from moh_compile.backends import tensorrt as T
from moh_compile.errors import MohCompileError

_DT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.bool: "bool",
       torch.int64: "int64", torch.int32: "int32"}


def _attention_args(b=2, s=5, e=16, h=4, hkv=2, d=8, routed=True, window=False, q_norm=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    args = dict(x=r(b, s, e), q_weight=r(h * d, e), q_bias=r(h * d), k=r(b, hkv, s, d), v=r(b, hkv, s, d),
                attn_mask=torch.ones(b, 1, s, s, dtype=torch.bool), rope_cos=None, rope_sin=None,
                o_weight=r(12, h * d), o_bias=None, head_gates=(r(b, s, h) > 0).float() if routed else None)
    attrs = dict(num_heads=h, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5)
    kw = {}
    if window:
        kw = dict(window_sink=[1] * h, window_alpha=[2] * h, window_beta=[0.0] * h, window_two_sided=False)
        attrs.update({k: v for k, v in kw.items() if k != "window_two_sided"})
    if q_norm:  # QK-norm: the optional last input, one scale per head dim
        kw.update(q_norm_weight=r(d), q_norm_eps=1e-6)
        attrs["q_norm_eps"] = 1e-6
    y = torch.ops.moh_compile.attention(*args.values(), d ** -0.5, **kw)
    if q_norm:
        args["q_norm_weight"] = kw["q_norm_weight"]
    return args, attrs, y


def _moepp_args(t=(2, 5), d=16, n=3, f_e=4, k=2):
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)
    args = dict(x=r(*t, d), w_in=r(n, f_e, d), b_in=None, w_gate=r(n, f_e, d), b_gate=None, w_out=r(n, d, f_e),
                b_out=r(d), expert_idx=torch.randint(0, n + 2, (*t, k), generator=g), expert_weight=r(*t, k),
                const_vectors=None, const_gate_weight=None)
    y = torch.ops.moh_compile.moepp_ffn(*args.values(), 1, 1, "silu")
    return args, dict(top_k=k), y


def _ffn_args():
    g = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=g)
    args = dict(x=r(3, 4, 16), w_in=r(24, 16), b_in=r(24), w_out=r(10, 24), b_out=None, w_gate=r(24, 16), b_gate=None)
    return args, {}, torch.ops.moh_compile.ffn(*args.values(), "silu")


CASES = {
    "MohRoutedAttention": lambda: _attention_args(),
    "MohRoutedAttention_window_dense": lambda: _attention_args(routed=False, window=True),
    "MohRoutedAttention_qk_norm": lambda: _attention_args(q_norm=True),
    "MohFFN": _ffn_args,
    "MohMoEppFFN": _moepp_args,
}


@pytest.mark.parametrize("case", CASES)
def test_shape_and_type_rules_match_the_torch_op(case):
    args, attrs, y = CASES[case]()
    op = case.split("_")[0]
    shapes = {k: tuple(v.shape) for k, v in args.items() if v is not None}
    dtypes = {k: _DT[v.dtype] for k, v in args.items() if v is not None}
    assert T.output_shape(op, shapes, attrs) == tuple(y.shape)
    assert T.output_dtype(op, dtypes) == _DT[y.dtype]
    assert T.supports_combination(op, dtypes)
    # symbolic batch / sequence dims pass through
    sym = dict(shapes, x=("B", "S") + shapes["x"][2:] if len(shapes["x"]) == 3 else ("B", "S", shapes["x"][-1]))
    assert T.output_shape(op, sym, attrs)[:2] == ("B", "S")
    half = {k: ("float16" if v == "float32" else v) for k, v in dtypes.items()}
    assert T.supports_combination(op, half) and T.output_dtype(op, half) == "float16"
    mixed = dict(dtypes, x="float16")
    assert not T.supports_combination(op, mixed)  # weights must share x's type
    assert not T.supports_combination(op, {k: v for k, v in dtypes.items() if k != "x"})  # x is required


def test_rules_reject_inconsistent_plans():
    args, attrs, _ = _attention_args()
    shapes = {k: tuple(v.shape) for k, v in args.items() if v is not None}
    with pytest.raises(ValueError, match="q_weight"):
        T.output_shape("MohRoutedAttention", shapes, dict(attrs, num_heads=8))
    with pytest.raises(ValueError, match="multiple"):
        T.output_shape("MohRoutedAttention", shapes, dict(attrs, num_kv_heads=3))
    with pytest.raises(ValueError, match="window_alpha"):
        T.output_shape("MohRoutedAttention", shapes, dict(attrs, window_alpha=[1, 2]))
    with pytest.raises(ValueError, match="q_norm_weight"):
        T.output_shape("MohRoutedAttention", dict(shapes, q_norm_weight=(4 * 8,)), attrs)  # all heads, not one
    assert T.output_shape("MohRoutedAttention", dict(shapes, sinks=(4,)), attrs) == (2, 5, 12)
    with pytest.raises(ValueError, match="sinks"):
        T.output_shape("MohRoutedAttention", dict(shapes, sinks=(2,)), attrs)  # one per KV head, not query head
    margs, mattrs, _ = _moepp_args()
    mshapes = {k: tuple(v.shape) for k, v in margs.items() if v is not None}
    with pytest.raises(ValueError, match="top_k"):
        T.output_shape("MohMoEppFFN", mshapes, dict(top_k=3))
    with pytest.raises(ValueError, match="required inputs missing"):
        T.output_shape("MohFFN", {"x": (2, 3, 4)}, {})
    with pytest.raises(ValueError, match="no TensorRT plugin"):
        T.output_shape("Attention", {}, {})
    assert not T.supports_combination("MohMoEppFFN", {**{k: "float32" for k in mshapes}, "expert_idx": "float32"})


def test_rules_on_exported_custom_nodes(tmp_path):
    """Every custom node of a real export: attributes + inferred input dims give the inferred output dims."""
    from tests import models

    model, inputs, _, _ = models.build("llama_mqa")  # GQA (1 kv head), RoPE, gated FFN
    compiled = moh_compile.compile(model, inputs)
    proto = onnx.shape_inference.infer_shapes(compiled.export_onnx(tmp_path / "m.onnx", form="custom"))
    g = proto.graph
    info = {v.name: v.type.tensor_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    info.update({t.name: t for t in g.initializer})

    def dims(name):
        t = info[name]
        if isinstance(t, onnx.TensorProto):
            return tuple(t.dims)
        return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)

    nodes = [n for n in g.node if n.domain == "moh_compile"]
    assert sorted({n.op_type for n in nodes}) == ["MohFFN", "MohRoutedAttention"]
    for n in nodes:
        ports = [p[0] for p in T.PORTS[n.op_type]]
        shapes = {p: dims(name) for p, name in zip(ports, n.input) if name}
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_version"].decode() == T.PLUGIN_VERSION
        assert T.output_shape(n.op_type, shapes, attrs) == dims(n.output[0])


def test_engine_build_without_tensorrt_fails_with_exact_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MohCompileError) as err:
        T.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", {})
    assert str(err.value) == T.TENSORRT_MISSING
    assert not (tmp_path / "m.engine").exists()


def test_default_profile_reads_dynamic_dims(tmp_path):
    """Symbolic dims become batch then sequence ranges; static ones (the exporter writes some as "64") stay."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s28", "s98", "64"])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, ids], [y])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    profile = T.default_profile(tmp_path / "m.onnx")
    assert profile["x"] == ((1, 1, 64), (8, 128, 64), (64, 512, 64))
    assert profile["ids"] == ((1, 7), (8, 7), (64, 7))
