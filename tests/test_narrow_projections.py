"""Narrowing projections after the rewrites (passes/narrow_projections.py): a fused QKV
projection stops computing the query rows the attention op now projects itself. Exact on every
fused layout (blocks [q|k|v], per head [q_h,k_h,v_h], Falcon's per-KV-group with gathered
heads), switchable off, counted in the FLOPs, and undone when verification fails."""
from __future__ import annotations

import pytest
import torch

import moh_compile
from moh_compile.match import graph as g
from moh_compile.passes import narrow_projections as narrow
from moh_compile.passes.narrow_projections import periodic_range
from tests.models import build, captured, main_output, reshape_inputs

FUSED = ["gpt2", "gpt_neox", "falcon", "tel", "mha", "nanogpt", "manual_block"]


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def _compile(model, inputs, attention="identity", narrow_on=True, **kw):
    cfg = moh_compile.CompileConfig(attention=attention, ffn="keep", narrow_projections=narrow_on,
                                    options=kw.pop("options", {}))
    return moh_compile.compile(model, inputs, cfg, **kw)


def _projection_widths(compiled) -> dict[str, int]:
    """Output width each projection of the compiled graph computes, by weight parameter."""
    out = {}
    for node in compiled.graph_module.graph.nodes:
        lin = g.as_linear(node)
        if lin is not None:
            out[g.param_name(lin.weight)] = int(g.val(node).shape[-1])
    return out


def test_periodic_range_finds_the_fused_layouts():
    d, h = 4, 3
    qkv = 3 * h * d
    assert periodic_range(set(range(h * d, qkv)), qkv) == (qkv, h * d, qkv)  # [q | k | v]: k, v read
    per_head = {p * 3 * d + f for p in range(h) for f in range(d, 3 * d)}      # [q_h, k_h, v_h] per head
    assert periodic_range(per_head, qkv) == (3 * d, d, 3 * d)
    group = {p * 4 * d + f for p in range(2) for f in range(2 * d, 4 * d)}     # per KV group [q, q, k, v]
    assert periodic_range(group, 8 * d) == (4 * d, 2 * d, 4 * d)
    assert periodic_range({0, 2}, 4) == (2, 0, 1)
    assert periodic_range({0, 2, 3}, 4) is None                                  # not one range per block


@pytest.mark.parametrize("name", FUSED)
def test_fused_qkv_computes_only_key_and_value_rows_and_stays_exact(name):
    model, inputs, _, facts = build(name)
    compiled = _compile(model, inputs, captured=captured(name))
    section = compiled.report.sections["narrowed projections"]
    assert section["narrowed"] and "| rows computed |" in section["markdown"]
    assert "fused, Q rows dropped" in compiled.report.markdown()
    widths = _projection_widths(compiled)
    heads, kv, d = facts["heads"], facts["kv"], model_width(model, inputs) // facts["heads"]
    for item in section["narrowed"]:
        assert item["of"] > item["rows"] == widths[item["weight"]]
        if not facts.get("kv_repeated"):
            assert item["rows"] == 2 * kv * d and item["of"] == (heads + 2 * kv) * d
    x = reshape_inputs(inputs, 2, 24) if isinstance(inputs, dict) else reshape_inputs(inputs, 3, 11)
    assert (_out(compiled, x) - _out(model, x)).abs().max().item() <= 1e-5


def model_width(model, inputs) -> int:
    return int(moh_compile.inspect(model, inputs).matches.attention[0].block.d_model)


def test_switched_off_keeps_the_whole_projection_with_the_same_outputs():
    model, inputs, _, _ = build("gpt2")
    capture = captured("gpt2")
    whole = _compile(model, inputs, narrow_on=False, captured=capture)
    narrowed = _compile(model, inputs, captured=capture)
    assert "narrowed projections" not in whole.report.sections
    assert set(_projection_widths(whole).values()) >= {192}
    assert 192 not in _projection_widths(narrowed).values()
    x = reshape_inputs(inputs, 3, 20)
    assert (_out(whole, x) - _out(narrowed, x)).abs().max().item() <= 1e-5


def test_separate_projections_are_left_alone():
    model, inputs, _, _ = build("llama")
    assert "narrowed projections" not in _compile(model, inputs, captured=captured("llama")).report.sections


def test_moh_flops_count_the_query_rows_once_when_narrowed():
    """MoH at half the heads on GPT-2: without narrowing the fused GEMM computes every Q row on top
    of the op's; narrowed, the Q projection costs the chosen heads only."""
    model, inputs, _, _ = build("gpt2")
    calib = [reshape_inputs(inputs, 4, 16) for _ in range(2)]
    opts = {"moh": {"active_heads": 0.5}}
    layers = {on: _compile(model, inputs, "moh", on, options=opts, calibration=calib, captured=captured("gpt2"))
              .report.sections["attention:moh"]["layers"] for on in (True, False)}
    blk = moh_compile.inspect(model, inputs).matches.attention[0].block
    seq = layers[True][0]["seq_for_flops"]
    q_rows_flops = 2 * seq * blk.d_model * blk.num_heads * blk.head_dim  # all Q rows of one sequence
    for narrowed, whole in zip(layers[True], layers[False]):
        assert whole["flops_after"] - narrowed["flops_after"] == pytest.approx(q_rows_flops)
        assert narrowed["flops_after"] < narrowed["flops_before"]


def test_neox_heads_are_still_reordered_after_narrowing():
    """The per-head fused layout is narrowed by a constant row gather and padded back; the sparse
    pass's head reorder must still find and permute the K/V rows through both."""
    from tests.test_head_order import A, DENSE, _compile as sparse_compile, _layout, _plan

    model, inputs, _, _ = build("gpt_neox")
    plan = _plan(model, inputs, lambda blk: [A if h % 2 == 0 else DENSE for h in range(blk.num_heads)],
                 capture=captured("gpt_neox"))
    compiled = sparse_compile(model, inputs, plan, True, capture=captured("gpt_neox"))
    assert compiled.report.sections["narrowed projections"]["narrowed"]
    assert all(r.get("order") == [0, 2, 1, 3] for r in _layout(compiled).values())
    x = reshape_inputs(inputs, 2, 24)
    plain = sparse_compile(model, inputs, plan, False, capture=captured("gpt_neox"))
    assert (_out(compiled, x) - _out(plain, x)).abs().max().item() <= 1e-5


def test_a_narrowed_graph_that_fails_to_run_is_undone(monkeypatch):
    """Simulated bug (a pad to the wrong width breaks the graph's views): the compile goes on with
    the projections whole and says why."""
    model, inputs, _, _ = build("gpt2")
    real = narrow.periodic_range

    def too_wide(read, total):
        layout = real(read, total)
        return None if layout is None else (layout[0] + 1, layout[1], layout[2])

    monkeypatch.setattr(narrow, "periodic_range", too_wide)
    compiled = _compile(model, inputs, captured=captured("gpt2"))
    assert "failed to run" in compiled.report.sections["narrowed projections"]["markdown"]
    x = reshape_inputs(inputs, 2, 24)
    assert (_out(compiled, x) - _out(model, x)).abs().max().item() <= 1e-5


def test_a_narrowing_that_changes_the_outputs_is_undone(monkeypatch):
    """Simulated bug (the pad put back one position off): verification catches it, every edit is
    undone, and the compile keeps the whole projections with the original outputs."""
    model, inputs, _, _ = build("gpt2")
    real = narrow.periodic_range

    def off_by_one(read, total):
        layout = real(read, total)
        return None if layout is None else (layout[0], layout[1] - 1, layout[2] - 1)

    monkeypatch.setattr(narrow, "periodic_range", off_by_one)
    compiled = _compile(model, inputs, captured=captured("gpt2"))
    assert "outputs changed" in compiled.report.sections["narrowed projections"]["markdown"]
    assert 192 in _projection_widths(compiled).values()
    assert not [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.constant_pad_nd.default]
    x = reshape_inputs(inputs, 2, 24)
    assert (_out(compiled, x) - _out(model, x)).abs().max().item() <= 1e-5
