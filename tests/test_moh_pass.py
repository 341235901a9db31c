"""The MoH pass through compile: exact at identity, exactly k routed + shared heads per token, the
op equals a masked dense reference for the chosen gates, re-export, CLI, plan round trip, errors."""
import json

import pytest
import torch

import moh_compile
from moh_compile.calibrate import moh_fit
from moh_compile.cli import main
from moh_compile.passes.moh_router import HeadRouter
from moh_compile.rewrite import record_values
from tests.minilm import minilm_with_calibration
from tests.models import ALL, build, captured, main_output, reshape_inputs
from tests.op_checks import dense_reference

OP = torch.ops.moh_compile.attention.default


def _run(m, inputs):
    with torch.no_grad():
        return main_output(m(**inputs) if isinstance(inputs, dict) else m(*inputs))


def _moh(**opts):
    return moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": opts})


def _calibration(name, inputs, n=4):
    """Random inputs shaped like the example (4 batches of 4), as an iterable of batches."""
    return [reshape_inputs(inputs, 4, 8 + i) for i in range(n)]


def _gates(compiled, inputs):
    """Head gates each router produced in one forward: [(B, S, H)] in graph order."""
    gm = compiled.graph_module
    nodes = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), HeadRouter):
            nodes[f"g{len(nodes)}"] = next(u for u in n.users if u.args[1] == 0)
    values = record_values(gm, nodes, lambda: _run(gm, inputs))
    return [values[k][0] for k in nodes]


@pytest.mark.parametrize("name", ALL)
def test_identity_setting_is_exact_on_every_model(name):
    """All heads active: every router gives gates exactly 1 and no compensation."""
    model, inputs, (n_attn, _), _ = build(name)
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=1.0, router="query_norm"), captured=captured(name))
    assert [n.target for n in compiled.graph_module.graph.nodes].count(OP) == n_attn
    assert all(a["identity_max_abs_diff"] <= 1e-5 for a in compiled.report.actions)
    for batch, seq in ((3, 5), (2, 13)):
        x = reshape_inputs(inputs, batch, seq)
        assert (_run(compiled, x) - _run(model, x)).abs().max().item() <= 1e-5


def test_learned_router_at_full_heads_is_exact():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=1.0), calibration=_calibration("bert", inputs))
    assert all(torch.equal(g, torch.ones_like(g)) for g in _gates(compiled, inputs))
    assert (_run(compiled, inputs) - _run(model, inputs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,router", [("bert", "learned"), ("llama", "query_norm"), ("llama_mqa", "learned"),
                                         ("tel", "learned"), ("gpt2", "query_norm"),
                                         ("gqa_sdpa", "query_norm"), ("gpt_neox", "learned"), ("gptj", "query_norm"),
                                         ("bart", "learned"), ("t5", "query_norm"), ("qwen3", "learned"),
                                         ("einsum_block", "learned")])
def test_topk_routing_exact_counts_and_masked_dense_reference(name, router):
    model, inputs, _, facts = build(name)
    calib = _calibration(name, inputs) if router == "learned" else None
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.5, shared_heads=0.25, router=router),
                                   calibration=calib, captured=captured(name))
    x = reshape_inputs(inputs, 3, 11)
    for bp, gates in zip([b for b in compiled.plan.blocks if b.transform == "moh"], _gates(compiled, x)):
        s = bp.settings
        assert (s["heads"], s["kv_heads"], s["num_shared"], s["k"]) == (4, facts["kv"], 1, 1)
        assert len(s["shared"]) == 1
        on = gates != 0
        assert torch.equal(on.sum(-1), torch.full(on.shape[:2], 2))                 # shared + k per token
        assert on[..., s["shared"]].all()
    # the same graph with every op replaced by the dense reference (every head computed, then masked)
    dense = dense_reference(compiled)
    got, want = _run(compiled, x), _run(dense, x)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - _run(model, x)).abs().max().item() > 1e-3                          # it did change something


def test_report_usage_load_balance_flops_and_reexport():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.75, head_allocation="uniform"),
                                   calibration=_calibration("bert", inputs))
    section = compiled.report.sections["attention:moh"]
    assert section["files"]["moh_head_usage.png"][:4] == b"\x89PNG"
    for layer in section["layers"]:
        assert len(layer["usage"]) == 4 and layer["tokens"] > 0
        assert sum(layer["usage"]) == pytest.approx(3.0)                            # 3 of 4 heads per real token
        assert layer["flops_after"] < layer["flops_before"]
        assert 0 <= layer["load_balance"]["min"] <= layer["load_balance"]["max"] <= 1
        assert 0 <= layer["fit_error"] < 1
    assert "moh_head_usage.png" in section["markdown"]
    program = compiled.export()
    assert OP in {n.target for n in program.graph.nodes}
    x = reshape_inputs(inputs, 2, 7)
    assert (main_output(program.module()(**x)) - _run(compiled, x)).abs().max().item() <= 1e-5


def test_weighted_gates_and_finetune_router():
    model, inputs, _, _ = build("sdpa_block")
    calib = [(torch.randn(4, 8, 64),) for _ in range(4)]
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.5, gate_style="weighted"), calibration=calib)
    gates = _gates(compiled, inputs)[0]
    assert torch.equal((gates != 0).sum(-1), torch.full(gates.shape[:2], 2))
    # the softmax temperature is fitted per block and recorded (plan settings and report)
    layers = compiled.report.sections["attention:moh"]["layers"]
    assert all(layer["gate_scale"] in moh_fit.GATE_SCALES for layer in layers)
    plans = [bp for bp in compiled.plan.blocks if bp.transform == "moh"]
    assert [bp.settings["gate_scale"]["scale"] for bp in plans] == [layer["gate_scale"] for layer in layers]
    before = [p.detach().clone() for p in compiled.graph_module.parameters()]
    result = moh_compile.finetune(compiled, model, calib, train="router", minutes=None, steps=3, progress=False)
    assert result["steps"] == 3
    routers = [m for m in compiled.graph_module.modules() if isinstance(m, HeadRouter)]
    assert routers and all(p.grad is None or torch.isfinite(p.grad).all() for r in routers for p in r.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, compiled.graph_module.parameters())]
    assert any(changed)


def test_finetune_validates_on_held_out_batches_and_keeps_the_best():
    """With >= 10 calibration batches, finetune trains on the first 90% and keeps the weights of
    the best validation check (here: before training and after its 4 steps)."""
    model, inputs, _, _ = build("sdpa_block")
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 8, 64, generator=g),) for _ in range(12)]
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.5), calibration=calib)
    result = moh_compile.finetune(compiled, model, calib, train="all", minutes=None, steps=4, lr=1e-3,
                                  progress=False)
    assert (result["train_batches"], result["validation_batches"]) == (10, 2)
    assert [s for s, _ in result["val_losses"]] == [0, 4] and result["best_step"] in (0, 4)
    assert result["best_val_loss"] == min(v for _, v in result["val_losses"])
    off = moh_compile.finetune(compiled, model, calib, minutes=None, steps=2, progress=False, validation=0)
    assert (off["train_batches"], off["validation_batches"]) == (12, 0) and "best_step" not in off
    with pytest.raises(moh_compile.MohCompileError, match="validation"):
        moh_compile.finetune(compiled, model, calib, minutes=None, steps=2, progress=False, validation=1.0)


def test_learned_router_without_calibration_is_an_error():
    model, inputs, _, _ = build("bert")
    with pytest.raises(moh_compile.MohCompileError, match="calibration data"):
        moh_compile.compile(model, inputs, _moh(active_heads=0.5))


@pytest.mark.parametrize("opts,needle", [
    (dict(active_heads=0.0), "(0, 1]"),
    (dict(active_heads=1.5), "(0, 1]"),
    (dict(active_heads=0.5, shared_heads=0.75), "more shared heads"),
    (dict(active_heads=0.5, shared_heads=0.5), "k must be at least 1"),
    (dict(active_heads=0.1), "k must be at least 1"),      # 0.1 of 4 heads rounds to 0
    (dict(router="bogus"), "router must be one of"),
    (dict(gate_style="soft"), "gate style"),
    (dict(comp_rank=2, router="query_norm"), "--comp-rank needs --router learned"),
    (dict(heads=3), "unknown MoH options"),
])
def test_bad_settings(opts, needle):
    model, inputs, _, _ = build("sdpa_block")
    with pytest.raises(moh_compile.MohCompileError, match=None) as err:
        moh_compile.compile(model, inputs, _moh(**opts))
    assert needle in str(err.value) and "\n" not in str(err.value)


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("moh-compile: error:") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("args,needle", [
    (["--attention", "moh", "--active-heads", "0"], "(0, 1]"),
    (["--attention", "moh", "--active-heads", "0.5", "--shared-heads", "0.5"], "k must be at least 1"),
    (["--attention", "moh", "--shared-heads", "1.5"], "[0, 1]"),
    (["--attention", "moh", "--active-heads", "0.5"], "calibration data"),
    (["--active-heads", "0.5"], "need --attention moh"),
])
def test_cli_bad_settings_one_line(capsys, tmp_path, args, needle):
    out = tmp_path / "o"
    code = main(["tests.models:SDPABlock", "--input-shape", "2,8,64", "--out", str(out), *args])
    _one_line_error(capsys, code, needle)
    assert not out.exists()


def test_cli_learned_router_and_plan_round_trip(tmp_path):
    torch.save(torch.randn(32, 8, 64), tmp_path / "calib.pt")
    out = tmp_path / "a"
    base = ["tests.models:SDPABlock", "--input-shape", "2,8,64", "--attention", "moh", "--ffn", "keep",
            "--active-heads", "0.5", "--shared-heads", "0.25", "--calib", str(tmp_path / "calib.pt"),
            "--batch-size", "8"]
    assert main([*base, "--out", str(out)]) == 0
    assert (out / "moh_head_usage.png").read_bytes()[:4] == b"\x89PNG"
    assert "MoH" in (out / "report.md").read_text() or "head" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["sections"]["attention:moh"]["files"] == ["moh_head_usage.png"]
    plan = json.loads((out / "plan.json").read_text())
    (attn,) = [b for b in plan["blocks"] if b["kind"] == "attention"]
    assert attn["transform"] == "moh" and attn["settings"]["k"] == 1 and len(attn["settings"]["shared"]) == 1
    assert attn["settings"]["refit"] is True and "refit_result" in attn["settings"]
    plain = tmp_path / "plain"
    assert main([*base, "--no-refit", "--out", str(plain)]) == 0
    (attn_plain,) = [b for b in json.loads((plain / "plan.json").read_text())["blocks"] if b["kind"] == "attention"]
    assert attn_plain["settings"]["refit"] is False and "refit_result" not in attn_plain["settings"]
    # re-apply: the plan's shared heads are kept even when other options say otherwise
    attn["settings"]["shared"] = [3 if attn["settings"]["shared"] != [3] else 0]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    again = tmp_path / "b"
    assert main(["tests.models:SDPABlock", "--input-shape", "2,8,64", "--attention", "moh", "--ffn", "keep",
                 "--calib", str(tmp_path / "calib.pt"), "--batch-size", "8", "--plan", str(tmp_path / "plan.json"),
                 "--out", str(again)]) == 0
    plan2 = json.loads((again / "plan.json").read_text())
    (attn2,) = [b for b in plan2["blocks"] if b["kind"] == "attention"]
    assert attn2["settings"]["shared"] == attn["settings"]["shared"] and attn2["settings"]["k"] == 1
    program = torch.export.load(str(again / "model.pt2"))
    x = torch.randn(2, 9, 64)
    assert program.module()(x).shape == x.shape


def test_cli_query_norm_needs_no_calibration(tmp_path):
    out = tmp_path / "q"
    assert main(["tests.models:SDPABlock", "--input-shape", "2,8,64", "--attention", "moh", "--router", "query_norm",
                 "--active-heads", "0.5", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    (attn,) = [b for b in plan["blocks"] if b["kind"] == "attention"]
    assert attn["settings"]["router"] == "query_norm" and attn["settings"]["shared"] == []


def test_bad_plan_settings_are_one_line_errors():
    model, inputs, _, _ = build("sdpa_block")
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.5, router="query_norm"))
    plan = moh_compile.Plan.from_json(compiled.plan.to_json())
    attn = next(b for b in plan.blocks if b.kind == "attention")
    attn.settings["k"] = 9
    with pytest.raises(moh_compile.MohCompileError, match="do not fit"):
        moh_compile.compile(model, inputs, plan=plan)


def test_composes_with_other_attention_passes():
    model, inputs, _, _ = build("sdpa_block")
    cfg = moh_compile.CompileConfig(attention="identity+moh", options={"moh": {"router": "query_norm",
                                                                              "active_heads": 0.5}})
    compiled = moh_compile.compile(model, inputs, cfg)
    attn = next(b for b in compiled.plan.blocks if b.kind == "attention")
    assert attn.transform == "identity+moh" and attn.settings["moh"]["shared"] == [] and attn.settings["moh"]["k"] == 2
    gates = _gates(compiled, inputs)[0]
    assert torch.equal((gates != 0).sum(-1), torch.full(gates.shape[:2], 2))


@pytest.mark.slow
def test_minilm_75_percent_heads_training_free_through_compile():
    """The real model, fewer lines than the benchmark (96 calibration lines, 128 held-out) to stay short.
    Measured: 0.9924 with the calibrated head allocation (k per block 7,7,8,11,9,12), 0.9861 uniform."""
    loaded, cal = minilm_with_calibration()
    capture = moh_compile.capture(loaded.model, loaded.example_inputs)
    cos = {}
    for allocation in ("calibrated", "uniform"):
        compiled = moh_compile.compile(loaded.model, loaded.example_inputs,
                                       _moh(active_heads=0.75, head_allocation=allocation), calibration=cal,
                                       captured=capture)
        cos[allocation] = compiled.report.sections["fidelity"]["cosine"]
    assert cos["uniform"] > SLOW_FLOOR_75 and cos["calibrated"] > SLOW_FLOOR_75_ALLOCATED, cos
    assert cos["calibrated"] > cos["uniform"] + 0.003, cos


SLOW_FLOOR_75 = 0.975   # measured 0.9861 (96 calibration lines, 128 held-out, 9 of 12 heads), minus a margin
SLOW_FLOOR_75_ALLOCATED = 0.985  # measured 0.9924, same data


@pytest.mark.slow
def test_minilm_half_heads_refit_beats_no_refit_on_held_out_text():
    """Measured (96 calibration lines, 128 held-out, 6 of 12 heads): 0.9574 with the W_O refit, 0.9491 without."""
    loaded, cal = minilm_with_calibration()
    cos = {refit: moh_compile.compile(loaded.model, loaded.example_inputs,
                                      _moh(active_heads=0.5, refit=refit, head_allocation="uniform"), calibration=cal).report.sections["fidelity"]["cosine"] for refit in (True, False)}
    assert cos[True] > 0.945 and cos[True] > cos[False] + 0.004, cos


def test_refit_gives_the_op_its_own_output_projection_and_lowers_the_error():
    """Default refit: W_O is refitted under the routing into a new parameter (the user's model and
    its W_O stay as they were), and the token-weighted error on the fit tokens goes down;
    refit=False keeps reading the original W_O."""
    model, inputs, _, _ = build("bert")
    calib = _calibration("bert", inputs, n=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refit = moh_compile.compile(model, inputs, _moh(active_heads=0.5), calibration=calib)
    plain = moh_compile.compile(model, inputs, _moh(active_heads=0.5, refit=False), calibration=calib)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def o_weights(compiled):  # what each attention op reads as W_O
        return [n.args[8].target for n in compiled.graph_module.graph.nodes if n.target is OP]

    assert all(name.startswith("moh_o_weight") for name in o_weights(refit))
    assert not any(name.startswith("moh_o_weight") for name in o_weights(plain))
    # the replaced W_O is no longer carried by the compiled module (its bias still is)
    params = dict(refit.graph_module.named_parameters())
    assert "encoder.layer.0.attention.output.dense.weight" not in params
    assert "encoder.layer.0.attention.output.dense.bias" in params
    for bp in (b for b in refit.plan.blocks if b.transform == "moh"):
        r = bp.settings["refit_result"]
        assert r["rel_error_after"] < r["rel_error_before"], r
    assert all("refit_result" not in b.settings for b in plain.plan.blocks)
    x = reshape_inputs(inputs, 3, 11)
    assert (_run(refit, x) - _run(plain, x)).abs().max().item() > 1e-4   # the refit changed the outputs
