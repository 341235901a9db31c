"""Head reordering after the sparse pass (passes.head_order): heads with equal window patterns made
adjacent by permuting weights once. It must be exact on every architecture it applies to, move
K/V projection rows (not copy K/V per call), leave the user's model untouched, and undo itself
where a projection is not laid out head by head."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moh_compile
from moh_compile.passes.head_order import head_permutation
from moh_compile.plan import BlockPlan, Plan
from tests.models import ALL, build, captured, main_output, reshape_inputs

A = (1, 4, 0.0)   # sink 1, local span 4: sparse at the test length (24 tokens)
DENSE = (0, -1, 0.0)


def _plan(model, inputs, patterns_of, transform="sparse", capture=None):
    """A plan giving each attention block the per-head patterns `patterns_of(block)` returns."""
    blocks = []
    for m in moh_compile.inspect(model, inputs, capture).matches.attention:
        sink, alpha, beta = zip(*patterns_of(m.block))
        window = {"sink": list(sink), "alpha": list(alpha), "beta": list(beta), "two_sided": not m.block.causal}
        blocks.append(BlockPlan(m.block.name, "attention", transform,
                                window if transform == "sparse" else {"identity": {}, "sparse": window}))
    return Plan(blocks=blocks)


def _compile(model, inputs, plan, reorder, attention="sparse", capture=None):
    cfg = moh_compile.CompileConfig(attention=attention, ffn="keep", options={"sparse": {"reorder_heads": reorder}})
    return moh_compile.compile(model, inputs, cfg, plan=plan, captured=capture)


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def _layout(compiled):
    sec = compiled.report.sections.get("attention:sparse:layout") or {}
    return sec.get("head_order", {})


def test_permutation_groups_equal_patterns_and_moves_kv_groups_whole():
    a, b = (1, 4, 0.0), (1, 8, 0.0)
    assert head_permutation(*zip(a, b, a, b), rep=1) == [0, 2, 1, 3]
    assert head_permutation(*zip(a, a, b, b), rep=1) is None  # already grouped
    # GQA, 2 query heads per KV head: KV groups [a, b, a] -> [a, a, b], each group's heads together
    assert head_permutation(*zip(a, a, b, b, a, a), rep=2) == [0, 1, 4, 5, 2, 3]
    assert head_permutation(*zip(a, a, a, a), rep=4) is None


@pytest.mark.parametrize("name", ALL)
def test_reorder_is_exact_on_every_model(name):
    """Interleaved patterns [A, dense, A, dense]: reordered to [A, A, dense, dense] where the model
    has one KV head per query head, outputs equal to the unreordered compile at a length where the
    windows matter; K/V projections read permuted copies; the user's model is untouched."""
    model, inputs, _, facts = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture = captured(name)
    plan = _plan(model, inputs, lambda blk: [A if h % 2 == 0 else DENSE for h in range(blk.num_heads)], capture=capture)
    reordered, plain = _compile(model, inputs, plan, True, capture=capture), _compile(model, inputs, plan, False,
                                                                                        capture=capture)
    results = _layout(reordered)
    assert results and not _layout(plain)
    if facts["kv"] == facts["heads"] and not facts.get("kv_repeated") and not facts.get("per_head_mask"):
        want = [h for h in range(facts["heads"]) if h % 2 == 0] + [h for h in range(facts["heads"]) if h % 2]
        assert all(r.get("order") == want for r in results.values()), results
        assert sum(n.startswith("head_order_weight") for n, _ in reordered.graph_module.named_parameters()) >= 4
    else:  # GQA / MQA with pairs sharing a KV head: [A, A, dense, dense] per KV group order is already grouped;
        # K/V repeated to every query head before the op (Falcon): query heads share their rows;
        # a per-head mask (T5's position bias) would need permuting every call
        assert all("skipped" in r for r in results.values()), results
    x = reshape_inputs(inputs, 2, 24) if name != "vit" else reshape_inputs(inputs, 2, 17)
    diff = (_out(reordered, x) - _out(plain, x)).abs().max().item()
    assert diff <= 1e-5, diff
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _GQA6(nn.Module):
    """6 query heads sharing 3 KV heads (pairs), so KV groups can be interleaved and reordered."""

    def __init__(self, d=96, h=6, h_kv=3):
        super().__init__()
        self.h, self.h_kv, self.dh = h, h_kv, d // h
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, h_kv * self.dh), nn.Linear(d, h_kv * self.dh)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k, v = (p(x).view(b, s, self.h_kv, self.dh).transpose(1, 2) for p in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


def test_gqa_moves_query_heads_with_their_kv_head():
    torch.manual_seed(0)
    model, inputs = _GQA6().eval(), (torch.randn(2, 8, 96),)
    pats = [A, A, DENSE, DENSE, A, A]
    plan = _plan(model, inputs, lambda blk: pats)
    reordered, plain = _compile(model, inputs, plan, True), _compile(model, inputs, plan, False)
    assert [r["order"] for r in _layout(reordered).values()] == [[0, 1, 4, 5, 2, 3]]
    assert "| 0 1 4 5 2 3 |" in reordered.report.sections["attention:sparse:layout"]["markdown"]
    assert "attention:sparse:layout" in reordered.report.markdown()
    x = (torch.randn(2, 24, 96),)
    assert (_out(reordered, x) - _out(plain, x)).abs().max() <= 1e-5


def test_rope_mha_llama_reorders_through_the_rotary_ops():
    """K reaches the op through RoPE (mul, rotate-half slices, neg, cat, add): the walk back must
    still find the one K projection. A LLaMA with as many KV heads as query heads."""
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaModel(T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=4, intermediate_size=128, vocab_size=100)).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}
    plan = _plan(model, inputs, lambda blk: [A, DENSE, A, DENSE])
    reordered, plain = _compile(model, inputs, plan, True), _compile(model, inputs, plan, False)
    assert all(r.get("order") == [0, 2, 1, 3] for r in _layout(reordered).values())
    x = {"input_ids": torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1)), "use_cache": False}
    assert (_out(reordered, x) - _out(plain, x)).abs().max() <= 1e-5


def test_composed_identity_plus_sparse_reorders_too():
    model, inputs, _, _ = build("bert")
    plan = _plan(model, inputs, lambda blk: [A, DENSE, A, DENSE], transform="identity+sparse")
    both = _compile(model, inputs, plan, True, attention="identity+sparse")
    sec = both.report.sections["attention:identity+sparse:layout"]
    assert all(r["order"] == [0, 2, 1, 3] for r in sec["parts"]["sparse"]["head_order"].values())
    plain = _compile(model, inputs, plan, False, attention="identity+sparse")
    x = reshape_inputs(inputs, 2, 24)
    assert (_out(both, x) - _out(plain, x)).abs().max() <= 1e-5


def test_routed_heads_get_their_gates_permuted(tmp_path):
    """sparse+moh: the router keeps its head order, its gates are gathered into the new one; the
    reordered graph still lowers to both ONNX forms (custom: when onnxruntime-extensions is here)."""
    import importlib.util

    from moh_compile.backends.ort_runtime import verify_onnx
    from moh_compile.calibrate.data import Calibration

    model, inputs, _, _ = build("bert")
    g = torch.Generator().manual_seed(1)
    calib = Calibration(batches=[{"input_ids": torch.randint(0, 100, (4, 40), generator=g),
                                  "attention_mask": torch.ones(4, 40, dtype=torch.long)} for _ in range(3)])
    def cfg(reorder):
        return moh_compile.CompileConfig(attention="sparse+moh", ffn="keep", options={
            "sparse": {"reorder_heads": reorder, "profile_lengths": [16, 32]}, "moh": {"active_heads": 0.5}})

    plan = moh_compile.compile(model, inputs, cfg(False), calibration=calib).plan
    for b in plan.blocks:  # interleaved patterns, the MoH structure as planned
        if b.kind == "attention":
            b.settings["sparse"] = {"sink": [1, 0, 1, 0], "alpha": [4, -1, 4, -1], "beta": [0.0] * 4,
                                    "two_sided": True}
    out = {reorder: moh_compile.compile(model, inputs, cfg(reorder), plan=plan, calibration=calib)
           for reorder in (True, False)}
    sec = out[True].report.sections["attention:sparse+moh:layout"]["parts"]["sparse"]["head_order"]
    assert all(r.get("order") == [0, 2, 1, 3] for r in sec.values()), sec
    gathers = [n for n in out[True].graph_module.graph.nodes if n.target is torch.ops.aten.index_select.default
               and str(n.args[2].target).startswith("head_order_index")]
    assert len(gathers) == 2
    x = reshape_inputs(inputs, 2, 24)
    assert (_out(out[True], x) - _out(out[False], x)).abs().max() <= 1e-5
    program = out[True].export()
    forms = ["portable"] + (["custom"] if importlib.util.find_spec("onnxruntime_extensions") else [])
    for form in forms:
        path = tmp_path / f"model.{form}.onnx"
        out[True].export_onnx(path, form=form, program=program, capacity="exact")
        assert verify_onnx(out[True], x, path, atol=1e-4, form=form) <= 1e-4


class _HeadMinorK(nn.Module):
    """K laid out head-minor (feature = d * H + h): a head's rows are strided, not a block."""

    def __init__(self, d=64, h=4, k_scale=False):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.k_scale = nn.Parameter(torch.rand(d) + 0.5) if k_scale else None

    def forward(self, x):
        b, s, d = x.shape
        q, v = (p(x).view(b, s, self.h, self.dh).transpose(1, 2) for p in (self.q, self.v))
        k = self.k(x) if self.k_scale is None else self.k(x) * self.k_scale
        k = k.view(b, s, self.dh, self.h).permute(0, 3, 1, 2)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


def test_any_head_row_layout_is_reordered():
    """Which rows make each K head is read off the graph, so a strided (head-minor) layout is
    permuted as exactly as a block layout."""
    torch.manual_seed(0)
    model, inputs = _HeadMinorK().eval(), (torch.randn(2, 8, 64),)
    plan = _plan(model, inputs, lambda blk: [A, DENSE, A, DENSE])
    reordered, plain = _compile(model, inputs, plan, True), _compile(model, inputs, plan, False)
    (result,) = _layout(reordered).values()
    assert result.get("order") == [0, 2, 1, 3], result
    x = (torch.randn(2, 24, 64),)
    assert (_out(reordered, x) - _out(plain, x)).abs().max().item() <= 1e-5


def test_unsupported_layout_is_undone_with_a_reason():
    """K scaled per feature after its projection: permuting the projection's rows alone would move
    features away from their scales, so the reorder must refuse and leave the graph as it was."""
    torch.manual_seed(0)
    model, inputs = _HeadMinorK(k_scale=True).eval(), (torch.randn(2, 8, 64),)
    plan = _plan(model, inputs, lambda blk: [A, DENSE, A, DENSE])
    reordered, plain = _compile(model, inputs, plan, True), _compile(model, inputs, plan, False)
    (result,) = _layout(reordered).values()
    assert "not re-laid out" in result["skipped"], result
    assert not any(n.startswith("head_order_weight") for n, _ in reordered.graph_module.named_parameters())
    x = (torch.randn(2, 24, 64),)
    assert torch.equal(_out(reordered, x), _out(plain, x))
