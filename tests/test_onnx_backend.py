"""ONNX lowering of moh_compile ops in both forms, run in ONNX Runtime against PyTorch."""
from __future__ import annotations

import copy
import logging
import math
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import moh_compile  # noqa: F401  (registers the ops)
from moh_compile.backends import dispatch_plan, onnx_portable
from moh_compile.backends.onnx_custom import DOMAIN
from moh_compile.backends.aoti import decompose_project_ops
from moh_compile.backends.onnx_export import attach_capacity_plans, export_onnx
from moh_compile.backends.onnx_registry import portable_decompositions
from moh_compile.backends.ort_runtime import OnnxMismatchError, make_session, run_onnx, verify_onnx
from moh_compile.ops.attention import attention_reference

HAS_EXT = True
try:
    import onnxruntime_extensions  # noqa: F401
except ImportError:
    HAS_EXT = False
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="onnxruntime-extensions not installed (custom form)")


def rope_tables(s: int, d: int):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


class Block(nn.Module):
    """Attention (k/v by nn.Linear, q/o inside the op) + residual + FFN, both as project ops."""

    def __init__(self, e=32, h=4, hkv=2, d=8, rope=True, routed=True, shared=0, top_k=2, window=None,
                 gated=True, act="silu"):
        super().__init__()
        self.h, self.hkv, self.d, self.rope, self.routed, self.shared, self.top_k = h, hkv, d, rope, routed, shared, top_k
        self.window = window or {}
        self.q, self.k, self.v, self.o = nn.Linear(e, h * d), nn.Linear(e, hkv * d), nn.Linear(e, hkv * d), nn.Linear(h * d, e)
        self.router = nn.Linear(e, h - shared)
        self.up, self.down = nn.Linear(e, 48), nn.Linear(48, e)
        self.gate = nn.Linear(e, 48, bias=False) if gated else None
        self.act = act

    def head_gates(self, x):
        logits = self.router(x)
        top = logits.topk(self.top_k, dim=-1)
        routed = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        return torch.cat([torch.ones_like(x[..., : self.shared]), routed], dim=-1) if self.shared else routed

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        k = self.k(x).view(b, s, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, self.hkv, self.d).transpose(1, 2)
        cos, sin = rope_tables(s, self.d) if self.rope else (None, None)
        gates = self.head_gates(x) if self.routed else None
        a = torch.ops.moh_compile.attention(x, self.q.weight, self.q.bias, k, v, mask, cos, sin, self.o.weight,
                                            self.o.bias, gates, self.d ** -0.5, **self.window)
        y = x + a
        w_gate = None if self.gate is None else self.gate.weight
        return y + torch.ops.moh_compile.ffn(y, self.up.weight, self.up.bias, self.down.weight, self.down.bias,
                                             w_gate, None, self.act)


WINDOW = dict(window_sink=[1, 0, 1, 0], window_alpha=[2, -1, 3, 1], window_beta=[0.0, 0.0, 0.25, 0.1],
              window_two_sided=False)
WINDOW_2S = dict(WINDOW, window_two_sided=True)


def make_mask(kind: str, b: int, s: int, h: int):
    g = torch.Generator().manual_seed(b * 100 + s)
    if kind == "none":
        return None
    if kind == "bool":  # per-query rows, shared by heads
        m = torch.rand(b, 1, s, s, generator=g) > 0.3
    elif kind == "bool_heads":  # per-head rows
        m = torch.rand(b, h, s, s, generator=g) > 0.3
    else:  # additive key-padding mask, one row for all queries
        m = torch.zeros(b, 1, 1, s)
        m[-1, ..., -2:] = float("-inf")
        return m
    m[..., 0] = True  # every query sees key 0, so no row is fully masked
    return m


CONFIGS = {
    # name: (Block kwargs, mask kind, tolerance)
    "routed_rope_gqa_window_bool": (dict(rope=True, hkv=2, routed=True, window=WINDOW), "bool", 1e-4),
    "routed_twosided_perheadmask": (dict(rope=False, hkv=4, routed=True, window=WINDOW_2S, gated=False,
                                         act="gelu"), "bool_heads", 1e-4),
    "identity_rope_gqa_additive_mask": (dict(rope=True, hkv=2, routed=False, gated=False, act="gelu"), "float", 1e-5),
    "window_only_rope_gqa_bool": (dict(rope=True, hkv=2, routed=False, window=WINDOW), "bool", 1e-4),  # sparse alone
}
SHAPES = [(2, 7), (3, 12)]


def inputs_for(block, mask_kind, b, s, seed=0):
    x = torch.randn(b, s, 32, generator=torch.Generator().manual_seed(seed + b * 7 + s))
    mask = make_mask(mask_kind, b, s, block.h)
    return (x,) if mask is None else (x, mask)


def dynamic_shapes_for(mask_kind):
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    x = {0: b, 1: s}
    if mask_kind == "none":
        return (x,)
    if mask_kind == "float":
        return (x, {0: b, 3: s})
    return (x, {0: b, 2: s, 3: s})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every config exported once in both forms: {(config, form): (block, path, model)}; the
    portable form with the default dispatch ("dynamic": exact routing, run-time capacities)."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for name, (kwargs, mask_kind, _) in CONFIGS.items():
        torch.manual_seed(0)
        block = Block(**kwargs).eval()
        example = inputs_for(block, mask_kind, 2, 9)
        for form in ("custom", "portable"):
            path = root / f"{name}_{form}.onnx"
            model = export_onnx(block, example, path, form=form, dynamic_shapes=dynamic_shapes_for(mask_kind))
            out[name, form] = (block, path, model)
    return out


@needs_ext
@pytest.mark.parametrize("name", CONFIGS)
def test_custom_form_matches_pytorch(exported, name):
    block, path, _ = exported[name, "custom"]
    _, mask_kind, tol = CONFIGS[name]
    for b, s in SHAPES:
        assert verify_onnx(block, inputs_for(block, mask_kind, b, s), path, atol=tol) <= tol


@pytest.mark.parametrize("name", CONFIGS)
def test_portable_form_matches_pytorch(exported, name):
    """Dynamic dispatch (the default) reproduces exact routing, at shapes other than the example's."""
    block, path, _ = exported[name, "portable"]
    _, mask_kind, tol = CONFIGS[name]
    for b, s in SHAPES:
        assert verify_onnx(block, inputs_for(block, mask_kind, b, s), path, atol=tol, form="portable") <= tol


def _plan_for(gates, capacity, active_fraction):
    """The dispatch plan of one call site from its observed gates (as export makes it)."""
    return dispatch_plan.plan_dispatch(onnx_portable.head_usage(gates).tolist(), capacity, active_fraction)


@pytest.mark.parametrize("name", CONFIGS)
def test_node_counts(exported, name):
    kwargs = CONFIGS[name][0]
    custom = exported[name, "custom"][2]
    ours = [n for n in custom.graph.node if n.domain == DOMAIN]
    assert sorted(n.op_type for n in ours) == ["MohFFN", "MohRoutedAttention"]
    portable = exported[name, "portable"][2]
    assert not [n for n in portable.graph.node if n.domain not in ("", "ai.onnx")]
    assert not custom.functions and not portable.functions
    topk = [n for n in portable.graph.node if n.op_type == "TopK"]
    if not kwargs["routed"]:
        assert not topk
        return
    # the module's own router has one TopK; routed dispatch adds one per group of routed heads
    block = exported[name, "portable"][0]
    example = inputs_for(block, CONFIGS[name][1], 2, 9)
    with torch.no_grad():
        _, _, sizes, _ = _plan_for(block.head_gates(example[0]), "dynamic", None)
    assert len(topk) == 1 + len(sizes) and sizes


def test_custom_node_attributes(exported):
    model = exported["routed_rope_gqa_window_bool", "custom"][2]
    node = next(n for n in model.graph.node if n.op_type == "MohRoutedAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"moh_compile"
    assert (attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"], attrs["routed"]) == (4, 2, 8, 1)
    assert list(attrs["window_alpha"]) == WINDOW["window_alpha"] and list(attrs["window_sink"]) == WINDOW["window_sink"]
    assert attrs["scale"] == pytest.approx(8 ** -0.5)
    ffn = next(n for n in model.graph.node if n.op_type == "MohFFN")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in ffn.attribute}["activation"] == b"silu"


@pytest.mark.parametrize("form", ["custom", "portable"])
def test_checker_shape_inference_and_dynamic_dims(exported, form):
    _, path, _ = exported["routed_rope_gqa_window_bool", form]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = inferred.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in out.shape.dim]
    assert isinstance(dims[0], str) and dims[0] and isinstance(dims[1], str) and dims[1] and dims[2] == 32
    x_dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert all(x_dims)


@pytest.mark.parametrize("factor", [1.0, 0.1])
def test_capacity_drops_lowest_gates_per_head(tmp_path, factor):
    """With a capacity factor, each routed head keeps its top-C tokens; a shared head keeps all.
    0.1: C on the export's sample is the floor of 2, and other shapes must still get their own C."""
    torch.manual_seed(1)
    block = Block(rope=True, hkv=2, routed=True, shared=1, top_k=2, window=WINDOW).eval()
    example = inputs_for(block, "bool", 2, 16)
    path = tmp_path / "cap.onnx"
    export_onnx(block, example, path, form="portable", dynamic_shapes=dynamic_shapes_for("bool"), capacity=factor)

    with torch.no_grad():
        dense, routed, sizes, caps = _plan_for(block.head_gates(example[0]), factor, None)
    assert 0 in dense and routed  # the shared head takes the dense path, the others are dispatched
    for b, s in [(2, 16), (3, 24)]:
        x, mask = inputs_for(block, "bool", b, s, seed=5)
        with torch.no_grad():
            gates = block.head_gates(x)
            kept = gates.clone()
            for heads, cap in dispatch_plan.iter_groups(routed, sizes, caps):
                c = min(s, max(2, math.ceil(s * cap / dispatch_plan.CAPACITY_DENOMINATOR)))
                for h in heads:  # per (batch, head): top-C tokens by gate
                    top = gates[..., h].topk(c, dim=1)
                    kept[..., h] = torch.zeros_like(gates[..., h]).scatter(1, top.indices, top.values)
            assert (kept != gates).any(), "test setup must overflow some head"
            a_drop, a_exact = (_attention_of(block, x, mask, g) for g in (kept, gates))
        got = run_onnx(path, (x, mask))[0]
        y = x + a_drop
        want = y + torch.ops.moh_compile.ffn(y, block.up.weight, block.up.bias, block.down.weight, block.down.bias,
                                             block.gate.weight, None, "silu")
        assert np.abs(got - want.detach().numpy()).max() < 1e-4
        assert np.abs(got - block(x, mask).detach().numpy()).max() > 1e-3  # dropping really changed the output
        assert (a_drop - a_exact).abs().max() > 1e-3


def _attention_of(block, x, mask, gates):
    b, s, _ = x.shape
    k = block.k(x).view(b, s, block.hkv, block.d).transpose(1, 2)
    v = block.v(x).view(b, s, block.hkv, block.d).transpose(1, 2)
    cos, sin = rope_tables(s, block.d)
    return attention_reference(x, block.q.weight, block.q.bias, k, v, mask, cos, sin, block.o.weight, block.o.bias,
                               gates, block.d ** -0.5, **block.window)


def test_capacity_plan_splits_shared_heads():
    gates = torch.zeros(2, 10, 4)
    gates[..., 0] = 0.5  # shared
    gates[:, :3, 1] = 1.0  # 30% active
    gates[:, :5, 2] = 1.0  # 50% active
    dense, routed, sizes, caps = _plan_for(gates, 1.0, None)
    assert dense == [0] and sorted(routed) == [1, 2, 3] and sum(sizes) == 3
    for heads, cap in dispatch_plan.iter_groups(routed, sizes, caps):
        mean = float((gates[..., heads] != 0).float().mean())
        assert cap == max(1, math.ceil(mean * dispatch_plan.CAPACITY_DENOMINATOR))  # never 0 tokens
    assert _plan_for(gates, "exact", None)[2:] == ([3], [dispatch_plan.CAPACITY_DENOMINATOR])
    assert set(_plan_for(gates, "dynamic", None)[3]) == {dispatch_plan.DYNAMIC}
    with pytest.raises(ValueError, match="capacity"):
        _plan_for(gates, -1.0, None)


def test_dynamic_dispatch_attends_only_active_queries(monkeypatch):
    """The work really shrinks: each group's attention runs on the busiest row's active tokens, not S."""
    torch.manual_seed(2)
    b, s, e, h, d = 2, 24, 32, 4, 8
    x, k, v = torch.randn(b, s, e), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    qw, ow = torch.randn(e, e) / 6, torch.randn(e, e) / 6
    gates = torch.zeros(b, s, h)
    gates[:, :6, 0] = 1.0  # head 0: 6 tokens
    gates[0, 5:12, 1] = 0.5  # head 1: 7 tokens in row 0, none in row 1
    gates[:, :, 2] = 1.0  # head 2: every token (dense path)
    gates[:, ::3, 3] = 1.0  # head 3: 8 tokens
    dense, routed, sizes, caps = _plan_for(gates, "dynamic", None)
    assert dense == [2]
    seen = []
    real_core = onnx_portable.attention_core

    def recording_core(q, *args, **kwargs):
        seen.append(tuple(q.shape[1:3]))
        return real_core(q, *args, **kwargs)

    monkeypatch.setattr(onnx_portable, "attention_core", recording_core)
    got = onnx_portable.portable_attention(x, qw, None, k, v, None, None, None, ow, None, gates, d ** -0.5,
                                           dense_heads=dense, routed_heads=routed, group_sizes=sizes,
                                           group_caps=caps)
    monkeypatch.undo()
    want = attention_reference(x, qw, None, k, v, None, None, None, ow, None, gates, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    counts = {0: 6, 1: 7, 3: 8}
    expected = [(1, s)] + [(len(g), max(counts[u] for u in g))
                           for g, _ in dispatch_plan.iter_groups(routed, sizes, caps)]
    assert seen == expected


def test_verify_raises_on_mismatch(exported):
    block, path, _ = exported["identity_rope_gqa_additive_mask", "portable"]
    other = Block(rope=True, hkv=2, routed=False, gated=False, act="gelu").eval()  # different weights
    with pytest.raises(OnnxMismatchError, match="differs"):
        verify_onnx(other, inputs_for(block, "float", 2, 7), path, atol=1e-4)


def test_invalid_settings_and_atomic_write(tmp_path, exported):
    block = Block(routed=False).eval()
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="form"):
        export_onnx(block, (x,), tmp_path / "a.onnx", form="tensorrt")
    with pytest.raises(ValueError, match="tuple"):
        export_onnx(block, x, tmp_path / "a.onnx")
    export_onnx(block, (x,), tmp_path / "a.onnx", form="portable", dynamic_shapes=dynamic_shapes_for("none"))
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]  # no temp file left behind
    assert verify_onnx(block, (torch.randn(3, 6, 32),), tmp_path / "a.onnx", atol=1e-5) <= 1e-5  # mask=None
    custom = exported["identity_rope_gqa_additive_mask", "custom"][1]
    with pytest.raises(ValueError, match="form='custom'"):
        make_session(custom, form="portable")


def test_missing_extensions_message(exported, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match="onnxruntime-extensions"):
        make_session(exported["identity_rope_gqa_additive_mask", "custom"][1], form="custom")


@needs_ext
def test_pyop_hook_returns_arrays_for_our_ops_only():
    """Our ops hand ORT a flat array (the library's hook builds a Python list per output);
    any other PyOp id goes to the library's hook."""
    from moh_compile.backends.ort_runtime import array_hook

    class Op:
        def body(self, a, b, plan):
            return (a + b).T                              # non-contiguous on purpose

        def cast_attributes(self, attrs):
            return attrs

    library_calls = []
    hook = array_hook({7}, lambda *args: library_calls.append(args) or "library", {7: Op()})
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    k_id, shape, flat = hook(7, [a, b], {"plan": "{}"})
    assert (k_id, shape) == (7, (3, 2)) and isinstance(flat, np.ndarray) and flat.dtype == np.float32
    assert np.array_equal(flat, ((a + b).T).reshape(-1))
    assert hook(8, [a], {}) == "library" and library_calls == [(8, [a], {})]


class MoEppBlock(nn.Module):
    """Router top-k over 4 FFN experts + zero, copy and constant experts -> moh_compile::moepp_ffn."""

    def __init__(self, e=32, n=4, f_e=8, k=2):
        super().__init__()
        self.k, self.n = k, n
        self.router = nn.Linear(e, n + 3)
        self.w_in, self.w_gate = nn.Parameter(torch.randn(n, f_e, e) / 6), nn.Parameter(torch.randn(n, f_e, e) / 6)
        self.b_in, self.w_out = nn.Parameter(torch.randn(n, f_e) / 6), nn.Parameter(torch.randn(n, e, f_e) / 3)
        self.b_out = nn.Parameter(torch.randn(e) / 6)
        self.const_vectors, self.const_gate = nn.Parameter(torch.randn(1, e)), nn.Parameter(torch.randn(1, 2, e) / 6)

    def forward(self, x):
        top = self.router(x).topk(self.k, dim=-1)
        return torch.ops.moh_compile.moepp_ffn(x, self.w_in, self.b_in, self.w_gate, None, self.w_out, self.b_out,
                                               top.indices, top.values.softmax(-1), self.const_vectors,
                                               self.const_gate, 1, 1, "silu")


def test_moepp_both_forms(tmp_path):
    pytest.importorskip("moh_compile.ops.moepp")
    torch.manual_seed(3)
    block = MoEppBlock().eval()
    ds = dynamic_shapes_for("none")
    example = (torch.randn(2, 9, 32),)
    forms = ["portable", "custom"] if HAS_EXT else ["portable"]
    for form in forms:
        path = tmp_path / f"moepp_{form}.onnx"
        model = export_onnx(block, example, path, form=form, dynamic_shapes=ds, capacity="exact")
        ours = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
        assert ours == (["MohMoEppFFN"] if form == "custom" else [])
        for b, s in SHAPES:
            assert verify_onnx(block, (torch.randn(b, s, 32),), path, atol=1e-4) <= 1e-4


class MoHMoEpp(nn.Module):
    """Routed + windowed attention block followed by a MoE++ FFN: all three transforms in one graph."""

    def __init__(self):
        super().__init__()
        self.attn, self.moe = Block(rope=True, hkv=2, routed=True, window=WINDOW), MoEppBlock()

    def forward(self, x, mask):
        return self.moe(self.attn(x, mask))


def test_moh_sparse_moepp_combined_both_forms(tmp_path):
    pytest.importorskip("moh_compile.ops.moepp")
    torch.manual_seed(4)
    block = MoHMoEpp().eval()
    example = inputs_for(block.attn, "bool", 2, 9)
    for form in ["portable", "custom"] if HAS_EXT else ["portable"]:
        path = tmp_path / f"combined_{form}.onnx"
        model = export_onnx(block, example, path, form=form, dynamic_shapes=dynamic_shapes_for("bool"))
        ours = sorted(n.op_type for n in model.graph.node if n.domain == DOMAIN)
        assert ours == (["MohFFN", "MohMoEppFFN", "MohRoutedAttention"] if form == "custom" else [])
        for b, s in SHAPES:
            assert verify_onnx(block, inputs_for(block.attn, "bool", b, s), path, atol=1e-4) <= 1e-4


def test_aoti_decomposition_uses_static_exact_dispatch_for_dynamic():
    """Inductor cannot lower run-time capacities, so an AOTI package asked for "dynamic" gets the
    static exact dispatch (no data-dependent sizes) and still equals the routed PyTorch block."""
    torch.manual_seed(6)
    block = Block(rope=True, hkv=2, routed=True, shared=1, top_k=2).eval()
    example = inputs_for(block, "bool", 2, 16)
    ep = torch.export.export(block, example, dynamic_shapes=dynamic_shapes_for("bool"), strict=False)

    def item_calls(program):
        return [n for n in program.graph.nodes if n.op == "call_function"
                and ("local_scalar_dense" in str(n.target) or str(n.target).endswith("item.default"))]

    dynamic = copy.deepcopy(ep)
    attach_capacity_plans(dynamic, example, {}, "dynamic", None)
    assert item_calls(dynamic.run_decompositions(portable_decompositions()))  # the ONNX path: run-time sizes
    packaged = decompose_project_ops(ep, example, {}, "dynamic")
    assert not item_calls(packaged)
    x = inputs_for(block, "bool", 3, 20, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(packaged.module()(*x), block(*x), atol=1e-5, rtol=0)


def test_dispatch_plan_averages_usage_over_extra_samples():
    """Calibration batches given as samples plan the dispatch from the token-weighted mean usage of
    every input run (the example's alone is a few tokens); the plan attached to the node is
    exactly plan_dispatch of that mean, computed here independently from the router's gates."""
    from moh_compile.backends.dispatch_plan import plan_dispatch

    torch.manual_seed(7)
    block = Block(rope=False, hkv=4, routed=True, shared=0, top_k=2).eval()
    example = inputs_for(block, "bool", 2, 9)
    samples = [(inputs_for(block, "bool", b, s, seed=10 + b), {}) for b, s in ((3, 17), (1, 40))]
    with torch.no_grad():
        runs = [block.head_gates(a[0]) for a, _ in [(example, {}), *samples]]
    usage = sum(onnx_portable.head_usage(g).double() * g[..., 0].numel() for g in runs)
    usage = (usage / sum(g[..., 0].numel() for g in runs)).tolist()
    ep = torch.export.export(block, example, dynamic_shapes=dynamic_shapes_for("bool"), strict=False)

    def attached(extra):
        prog = copy.deepcopy(ep)
        assert attach_capacity_plans(prog, example, {}, 1.0, None, extra) == 1
        node = next(n for n in prog.graph.nodes if n.op == "call_function" and "attention_capacity" in str(n.target))
        return tuple(node.args[-4:])

    assert attached(samples) == tuple(plan_dispatch(usage, 1.0, None))
    alone = _plan_for(runs[0], 1.0, None)
    assert attached(()) == tuple(alone)
    assert attached(samples) != attached(())  # the samples change the plan here


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_export_prints_no_exporter_noise(tmp_path):
    """The exporter's per-export torchvision warnings and its pytree FutureWarning are dropped
    (torchvision is not a dependency), while anything else it logs still reaches handlers."""
    from moh_compile.backends.onnx_export import REGISTRATION_LOGGER, quiet_exporter
    from tests.models import SDPABlock

    compiled = moh_compile.compile(SDPABlock().eval(), (torch.randn(2, 8, 64),),
                                   moh_compile.CompileConfig(attention="identity"))
    logger = logging.getLogger(REGISTRATION_LOGGER)
    records = _Records()
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for form in ("custom", "portable"):
                compiled.export_onnx(tmp_path / f"{form}.onnx", form=form)
        with quiet_exporter():
            logger.warning("something the user should see")
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "torchvision" in m]
    assert records.messages == ["something the user should see"]
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


@needs_ext
def test_profile_splits_the_custom_form_by_op(exported):
    """benchmarks/profile_onnx.py reads ORT's own profile of a custom-form file too: the project's
    nodes show as their registered variants, next to the standard ops around them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from profile_onnx import op_times
    finally:
        sys.path.pop(0)
    name = next(n for n, (_, kind, _) in CONFIGS.items() if kind == "bool")
    block, path, _ = exported[name, "custom"]

    def feed_for(session):
        return dict(zip([i.name for i in session.get_inputs()], (t.numpy() for t in inputs_for(block, "bool", 2, 9))))

    per_op, total = op_times(str(path), feed_for, threads=1, runs=1)
    ours = [op for op in per_op if op.startswith("MohRoutedAttention_")]
    assert ours and all(per_op[op] > 0 for op in ours)
    assert abs(total - sum(per_op.values())) < 1e-9
