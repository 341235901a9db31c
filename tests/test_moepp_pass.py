"""The MoE++ FFN pass through compile: identity exactness on every test model, routing, the
zero-computation experts, re-export, CLI options and errors, --plan round trip, composition;
real MiniLM fidelity (slow)."""
from __future__ import annotations

import json

import pytest
import torch

import moh_compile
from moh_compile.calibrate.data import Calibration
from moh_compile.cli import main
from moh_compile.config import CompileConfig
from moh_compile.errors import MohCompileError
from moh_compile.passes.moepp import expert_usage
from moh_compile.passes.moepp_router import ExpertRouter
from moh_compile.plan import Plan
from tests.minilm import minilm_with_calibration
from tests.models import ALL, build, captured, main_output


def _run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def _bert_calibration(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:3, 9:] = 0  # padding: must not count as tokens
        batches.append({"input_ids": torch.randint(0, 100, (8, 12), generator=g), "attention_mask": mask})
    return Calibration(batches=batches[:-2], eval_batches=batches[-2:])


def _moepp(**opts):
    return CompileConfig(attention="keep", ffn="moepp", options={"moepp": opts})


@pytest.fixture(scope="module")
def bert_fitted():
    model, inputs, _, _ = build("bert")
    calib = _bert_calibration()
    compiled = moh_compile.compile(model, inputs, _moepp(experts=8, ffn_keep=0.5, const_experts=1, copy_experts=1),
                                   calibration=calib)
    return model, inputs, calib, compiled


@pytest.mark.parametrize("name", ALL)
def test_identity_is_exact_on_every_model(name):
    """All FFN experts active, no zero-computation expert chosen: the dense FFN within 1e-5."""
    model, inputs, (_, n_ffn), facts = build(name)
    compiled = moh_compile.compile(model, inputs, _moepp(experts=4, ffn_keep=1.0, zero_experts=1, copy_experts=1,
                                                         const_experts=1, gating_residual=True),
                                    captured=captured(name))
    applied = [a for a in compiled.report.actions if a.get("transform") == "moepp"]
    assert len(applied) == n_ffn, compiled.report.skipped
    assert (_run(compiled, inputs) - _run(model, inputs)).abs().max().item() <= 1e-5
    blocks = [b for b in compiled.plan.blocks if b.kind == "ffn"]
    assert all(sorted(i for g in b.settings["groups"] for i in g) == list(range(len(b.settings["groups"]) *
               len(b.settings["groups"][0]))) for b in blocks)


def test_every_token_gets_exactly_k_choices_and_budget_is_met(bert_fitted):
    model, inputs, calib, compiled = bert_fitted
    routers = [m for m in compiled.graph_module.modules() if isinstance(m, ExpertRouter)]
    assert len(routers) == 2
    seen = []
    hooks = [r.register_forward_hook(lambda m, i, o: seen.append((m.config, o[0], o[1]))) for r in routers]
    try:
        _run(compiled, calib.batches[0])
    finally:
        for h in hooks:
            h.remove()
    for cfg, idx, w in seen:
        assert cfg.top_k == 6 and idx.shape == (8, 12, 6)  # ceil(1.5 * 0.5 * 8)
        ffn = idx < cfg.n_ffn
        for row, m in zip(idx.reshape(-1, 6), ffn.reshape(-1, 6)):
            assert len(set(row[m].tolist())) == int(m.sum())  # FFN choices are distinct
        assert torch.all(w[ffn] == 1) and torch.all(w[~ffn] == 0)  # non-FFN slots are the zero expert
        assert torch.all((idx[~ffn] >= cfg.n_ffn) & (idx[~ffn] < cfg.n_ffn + cfg.n_zero))
    section = compiled.report.sections["ffn:moepp"]
    assert abs(section["mean_ffn_fraction"] - 0.5) < 0.03  # the zero-expert threshold meets the budget
    assert section["flops_moepp"] < 0.65 * section["flops_dense"]
    usage = expert_usage(compiled.graph_module, calib.batches, calib.token_mask)
    assert all(u["tokens"] == 4 * (8 * 12 - 9) for u in usage.values())  # real tokens only
    for u in usage.values():
        assert u["ffn_fraction"] == pytest.approx(sum(u["choice_rate"][:8]) / 8)
        assert u["copy_per_token"] == u["const_per_token"] == 0.0
    assert "moepp_experts.png" in section["files"] and section["files"]["moepp_experts.png"][:4] == b"\x89PNG"
    rates = section["blocks"][0]["choice_rate"]
    assert len(rates) == 8 + 1 + 1 + 1 and rates[-2:] == [0.0, 0.0]  # copy/const off training-free (documented)


def test_zero_copy_const_experts_behave_as_defined_in_the_graph(bert_fitted):
    """Force each zero-computation expert through the router bias; the block follows its definition."""
    model, inputs, calib, compiled = bert_fitted
    gm = compiled.graph_module
    name = "moepp_encoder_layer_0"
    router, experts = gm.get_submodule(name + "_router"), gm.get_submodule(name + "_experts")
    cfg = router.config
    x = torch.randn(5, 7, router.proj.in_features)
    v = experts.const_vectors.detach()
    assert v.abs().sum() > 0  # constant expert's v: mean FFN output on calibration tokens

    def block(force):
        saved = {k: t.clone() for k, t in router.state_dict().items()}
        with torch.no_grad():
            router.proj.weight.zero_()
            router.proj.bias.fill_(-1e4)
            router.proj.bias[cfg.n_ffn] = -1e3  # the zero expert outranks every other expert but `force`
            router.proj.bias[force] = 10.0
        try:
            idx, w, _, comp = router(x)
            out = torch.ops.moh_compile.moepp_ffn(x, experts.w_in, experts.b_in, None, None, experts.w_out, None,
                                                   idx, w, experts.const_vectors, experts.const_gate_weight,
                                                   cfg.n_zero, cfg.n_copy, "gelu")
            return idx, w, out, comp
        finally:
            router.load_state_dict(saved)

    comp_all = router.comp_table.detach().sum(0)
    idx, w, out, comp = block(cfg.n_ffn)  # zero expert: nothing computed, only the compensation
    assert torch.all(idx == cfg.n_ffn) and torch.all(w == 0) and torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(comp, comp_all.expand_as(comp))
    copy, const = cfg.n_ffn + cfg.n_zero, cfg.n_ffn + cfg.n_zero + cfg.n_copy
    idx, w, out, _ = block(copy)  # copy expert: E(x) = x at the slot's weight (binary 1)
    chosen = idx == copy  # slots come unsorted: the forced expert is in one slot per token, any one
    assert torch.all(chosen.sum(-1) == 1) and torch.all(w[chosen] == 1) and torch.all(w[~chosen] == 0)
    assert torch.all(idx[~chosen] == cfg.n_ffn)  # every other slot is the zero expert
    torch.testing.assert_close(out, x)
    idx, w, out, _ = block(const)  # constant expert: a1 x + a2 v, [a1, a2] = softmax(W_c x)
    assert torch.all((idx == const).sum(-1) == 1)
    a = torch.softmax(torch.einsum("btd,jd->btj", x, experts.const_gate_weight[0].detach()), -1)
    torch.testing.assert_close(out, a[..., :1] * x + a[..., 1:] * v[0])


def test_reexport_and_saved_program_match(bert_fitted, tmp_path):
    model, inputs, calib, compiled = bert_fitted
    program = compiled.export()
    batch = calib.eval_batches[0]
    got = program.module()(**batch)["last_hidden_state"]
    torch.testing.assert_close(got, _run(compiled, batch), atol=1e-5, rtol=1e-5)
    compiled.save(tmp_path / "out")
    assert (tmp_path / "out" / "moepp_experts.png").exists()
    assert "MoE++ FFN experts" in (tmp_path / "out" / "report.md").read_text()


def test_factored_router_meets_the_budget_and_reexports():
    """--router-rank: each router is down (rank x d) then proj; the fit keeps the budget, the
    report counts its cheaper FLOPs, and the program re-exports."""
    model, inputs, _, _ = build("bert")
    calib = _bert_calibration()
    compiled = moh_compile.compile(model, inputs, _moepp(experts=8, ffn_keep=0.5, router_rank=3), calibration=calib)
    routers = [m for m in compiled.graph_module.modules() if isinstance(m, ExpertRouter)]
    d = routers[0].down.weight.shape[1]
    assert all(r.down.weight.shape == (3, d) and r.proj.weight.shape == (9, 3) for r in routers)
    section = compiled.report.sections["ffn:moepp"]
    assert abs(section["mean_ffn_fraction"] - 0.5) < 0.03
    # factored logits 2 r (d + n_total), plus the compensation's (n_ffn,) x (n_ffn, d) product
    assert all(b["router_rank"] == 3 and b["router_flops_per_token"] == 2 * 3 * (d + 9) + 2 * 8 * d
               for b in section["blocks"])
    batch = calib.eval_batches[0]
    got = compiled.export().module()(**batch)["last_hidden_state"]
    torch.testing.assert_close(got, _run(compiled, batch), atol=1e-5, rtol=1e-5)


def test_plan_round_trip_reapplies_grouping_and_fit():
    model, inputs, _, _ = build("bert")
    calib = _bert_calibration(seed=1)
    config = _moepp(experts=4, ffn_keep=0.5, gating_residual=True)
    first = moh_compile.compile(model, inputs, config, calibration=calib)
    plan = Plan.from_json(first.plan.to_json())
    ffn = [b for b in plan.blocks if b.kind == "ffn"]
    assert all(b.transform == "moepp" and len(b.settings["groups"]) == 4 for b in ffn)
    again = moh_compile.compile(model, inputs, config, plan=plan, calibration=calib)
    assert [b.settings["groups"] for b in again.plan.blocks if b.kind == "ffn"] == [b.settings["groups"] for b in ffn]
    batch = calib.eval_batches[0]
    torch.testing.assert_close(_run(again, batch), _run(first, batch), atol=1e-5, rtol=1e-5)
    # the gating residual is wired: the second router reads the first one's logits
    routers = [m for m in again.graph_module.modules() if isinstance(m, ExpertRouter)]
    assert routers[1].residual is not None and routers[1].residual.weight.abs().sum() > 0


def test_composes_with_an_attention_pass_at_identity():
    model, inputs, (n_attn, n_ffn), _ = build("llama")
    compiled = moh_compile.compile(model, inputs, CompileConfig(attention="identity", ffn="moepp",
                                                                options={"moepp": {"experts": 4, "ffn_keep": 1.0}}))
    kinds = [a.get("transform") for a in compiled.report.actions]
    assert kinds.count("moepp") == n_ffn and kinds.count("identity") == n_attn
    assert (_run(compiled, inputs) - _run(model, inputs)).abs().max().item() <= 1e-5


def test_composes_with_moh_at_identity():
    """MoH (all heads, gates 1) and MoE++ (all experts) in one compile reproduce the original; at
    full heads the learned router needs no calibration data (its zero initialisation gives gates 1)."""
    model, inputs, (n_attn, n_ffn), _ = build("llama")
    compiled = moh_compile.compile(model, inputs, CompileConfig(
        attention="moh", ffn="moepp", options={"moh": {"active_heads": 1.0}, "moepp": {"experts": 4, "ffn_keep": 1.0}}))
    kinds = [a.get("transform") for a in compiled.report.actions]
    assert kinds.count("moepp") == n_ffn and kinds.count("moh") == n_attn
    assert (_run(compiled, inputs) - _run(model, inputs)).abs().max().item() <= 1e-5


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("moh-compile: error:") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("args,needle", [
    (["--experts", "0"], "--experts"),
    (["--ffn-keep", "0"], "--ffn-keep"),
    (["--ffn-keep", "1.5"], "--ffn-keep"),
    (["--top-k", "40"], "--top-k"),
    (["--top-k", "2", "--ffn-keep", "0.5"], "cannot spend"),
    (["--zero-experts", "0", "--ffn-keep", "0.3"], "without a zero expert"),
    (["--copy-experts", "-1"], "--copy-experts"),
    (["--experts", "512"], "only 256 hidden neurons"),
    (["--experts", "3"], "not divisible"),
    (["--router-rank", "0"], "--router-rank"),
    (["--router-rank", "17"], "--router-rank must be an integer in [1, 17)"),
    (["--experts", "128", "--router-rank", "64"], "not below d_model 64"),
    (["--ffn-keep", "0.5"], "calibration data"),
    (["--finetune-pooled-weight", "-1"], "--finetune-pooled-weight"),
    (["--finetune-validation", "1"], "--finetune-validation"),
])
def test_invalid_settings_are_one_line_errors(capsys, tmp_path, args, needle):
    out = tmp_path / "x"
    code = main(["tests.models:ManualBlock", "--input-shape", "2,8,64", "--out", str(out), "--ffn", "moepp", *args])
    _one_line_error(capsys, code, needle)
    assert not out.exists()


def test_api_errors():
    model, inputs, _, _ = build("manual_block")
    with pytest.raises(MohCompileError, match="unknown moepp option"):
        moh_compile.compile(model, inputs, _moepp(expert=4))


def test_cli_options_calibration_file_and_plan(tmp_path, capsys):
    torch.manual_seed(0)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 8, 64), calib)
    out = tmp_path / "o"
    args = ["tests.models:ManualBlock", "--input-shape", "2,8,64", "--ffn", "moepp", "--experts", "8",
            "--ffn-keep", "0.25", "--top-k", "4", "--const-experts", "1", "--calib", str(calib)]
    assert main([*args, "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    ffn = [b for b in plan["blocks"] if b["kind"] == "ffn"][0]
    assert ffn["settings"]["top_k"] == 4 and ffn["settings"]["const_experts"] == 1 and len(ffn["settings"]["groups"]) == 8
    refit = ffn["settings"]["fit"]["refit"]  # on by default: the down projections refitted under the routing
    assert ffn["settings"]["refit"] is True and refit["rel_error_after"] < refit["rel_error_before"], refit
    report = json.loads((out / "report.json").read_text())
    section = report["sections"]["ffn:moepp"]
    assert abs(section["mean_ffn_fraction"] - 0.25) < 0.03
    assert (out / "moepp_experts.png").exists()
    out2 = tmp_path / "o2"
    assert main([*args, "--out", str(out2), "--plan", str(out / "plan.json"), "--finetune-minutes", "0.01",
                 "--finetune-train", "all", "--finetune-pooled-weight", "0.5"]) == 0
    plan2 = json.loads((out2 / "plan.json").read_text())
    assert [b["settings"].get("groups") for b in plan2["blocks"]] == [b["settings"].get("groups") for b in plan["blocks"]]
    sections = json.loads((out2 / "report.json").read_text())["sections"]
    assert sections["finetune"]["pooled_weight"] == 0.5 and sections["finetune"]["steps"] >= 1
    assert [round(r["after"], 2) for r in sections["ffn_budget"]["routers"].values()] == [0.25]  # budget re-set


def test_cli_ffn_budget_data(tmp_path, capsys):
    """--ffn-budget-data re-sets the budget on other data after compiling: the work on that data
    is the asked --ffn-keep (as close as whole expert counts allow), recorded in the report."""
    torch.manual_seed(0)
    calib, other = tmp_path / "calib.pt", tmp_path / "other.pt"
    torch.save(torch.randn(32, 8, 64), calib)
    torch.save(torch.randn(32, 8, 64) * 3.0 + 1.0, other)          # other statistics: the work differs
    out = tmp_path / "o"
    args = ["tests.models:ManualBlock", "--input-shape", "2,8,64", "--ffn", "moepp", "--experts", "8",
            "--ffn-keep", "0.25", "--calib", str(calib), "--ffn-budget-data", str(other), "--out", str(out)]
    assert main(args) == 0
    assert "FFN budget re-set on" in capsys.readouterr().err
    routers = json.loads((out / "report.json").read_text())["sections"]["ffn_budget"]["routers"]
    (r,) = routers.values()
    assert r["before"] != 0.25 and r["shift"] != 0 and abs(r["after"] - 0.25) <= 1 / 8 / (32 * 8) + 1e-6, r
    _one_line_error(capsys, main(["tests.models:ManualBlock", "--input-shape", "2,8,64", "--out",
                                  str(tmp_path / "x"), "--ffn-budget-data", str(other)]), "need --ffn moepp")


def test_cli_ffn_budget_length(tmp_path, capsys):
    """--ffn-budget-length packs the calibration examples into documents of that length and re-sets
    the budget on them (the work there is the asked --ffn-keep); bad combinations are one-line errors."""
    torch.manual_seed(0)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 8, 64), calib)
    base = ["tests.models:ManualBlock", "--input-shape", "2,8,64", "--ffn", "moepp", "--experts", "8",
            "--ffn-keep", "0.25", "--calib", str(calib)]
    assert main([*base, "--ffn-budget-length", "16", "--out", str(tmp_path / "o")]) == 0
    assert "FFN budget re-set on 16 calibration documents of 16 tokens" in capsys.readouterr().err
    (r,) = json.loads((tmp_path / "o" / "report.json").read_text())["sections"]["ffn_budget"]["routers"].values()
    assert abs(r["after"] - 0.25) <= 1 / 8 / (16 * 16) + 1e-6, r
    for extra, needle in ((["--ffn-budget-length", "1"], "at least 2"),
                          (["--ffn-budget-length", "16", "--ffn-budget-data", str(calib)], "not both"),
                          (["--ffn-budget-length", "4096"], "--ffn-budget-length at length 4096 needs at least")):
        _one_line_error(capsys, main([*base, *extra, "--out", str(tmp_path / "x"), "--force"]), needle)


def _work(compiled, batches, calib) -> list[float]:
    return [u["ffn_fraction"] for u in expert_usage(compiled.graph_module, batches, calib.token_mask).values()]


def test_set_ffn_budget_meets_a_new_budget_on_new_data(bert_fitted):
    """Re-setting the zero-expert thresholds on other data hits the budget there, measured by the
    compiled model's own routing (both routers, the second on inputs the first one changed)."""
    model, inputs, calib, compiled = bert_fitted
    data = Calibration(batches=calib.eval_batches)
    result = moh_compile.set_ffn_budget(compiled, data, ffn_keep=0.25, progress=False)
    assert list(result) == ["moepp_encoder_layer_0_router", "moepp_encoder_layer_1_router"]  # graph order
    tokens, n_ffn = 2 * (8 * 12 - 9), 8
    for measured, r in zip(_work(compiled, data.batches, calib), result.values()):
        assert r["after"] == pytest.approx(measured, abs=1e-6)
        assert 0.25 - 2 / (tokens * n_ffn) - 1e-6 <= measured <= 0.25 + 1e-6  # as close as whole counts allow
    assert "ffn_budget" in compiled.report.sections and "| router |" in compiled.report.markdown()
    # the portable export's dispatch plan follows the same data (which experts run densely, groups)
    assert [b["input_ids"].data_ptr() for b in compiled.plan_batches] == \
        [b["input_ids"].data_ptr() for b in data.batches[:len(compiled.plan_batches)]]
    with pytest.raises(MohCompileError, match="ffn_keep must be in"):
        moh_compile.set_ffn_budget(compiled, data, ffn_keep=1.5)
    plain = moh_compile.compile(model, inputs, CompileConfig(attention="keep", ffn="keep"))
    with pytest.raises(MohCompileError, match="no MoE\\+\\+ blocks"):
        moh_compile.set_ffn_budget(plain, data)


def test_finetune_all_trains_experts_and_routers(bert_fitted):
    """Distillation reaches expert weights (through the op's backward) and routers (binary STE).
    Runs last on the shared fixture: it changes its weights."""
    model, inputs, calib, compiled = bert_fitted
    gm = compiled.graph_module
    experts = gm.get_submodule("moepp_encoder_layer_1_experts")
    router = gm.get_submodule("moepp_encoder_layer_1_router")
    before = (experts.w_in.detach().clone(), router.proj.weight.detach().clone())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared = sum(p.data_ptr() == q.data_ptr() for p in gm.parameters() for q in model.parameters())
    result = moh_compile.finetune(compiled, model, calib, train="all", minutes=None, steps=3, lr=1e-3,
                                  progress=False)
    assert result["steps"] == 3 and "fidelity" in result
    # the compiled model shared the original's unchanged weights; training copies them first, so
    # neither the teacher nor the user's model moves (it did before: fidelity then measured drift)
    assert shared > 0 and result["unshared_tensors"] >= shared
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not any(p.data_ptr() == q.data_ptr() for p in gm.parameters() for q in model.parameters())
    assert not torch.equal(experts.w_in.detach(), before[0])
    assert not torch.equal(router.proj.weight.detach(), before[1])
    # training moved the logits; the budget is re-set to the plan's ffn_keep on the calibration data
    assert set(result["ffn_budget"]) == {"moepp_encoder_layer_0_router", "moepp_encoder_layer_1_router"}
    assert all(abs(w - 0.5) <= 2 / (4 * (8 * 12 - 9) * 8) + 1e-6 for w in _work(compiled, calib.batches, calib))


# measured through compile on real MiniLM (96 calibration sentences, keep 0.5, 16 experts, first 128
# held-out sentences): cosine 0.9612 with the default refit, 0.9403 without (work 0.54); the floors
# leave a margin for BLAS/thread noise
SLOW_COS_FLOOR = 0.945
SLOW_REFIT_GAIN = 0.01


@pytest.mark.slow
def test_real_minilm_half_ffn_fidelity_through_compile():
    loaded, calib = minilm_with_calibration()
    compiled = moh_compile.compile(loaded.model, loaded.example_inputs, _moepp(ffn_keep=0.5), calibration=calib)
    plain = moh_compile.compile(loaded.model, loaded.example_inputs, _moepp(ffn_keep=0.5, refit=False),
                                calibration=calib)
    work = expert_usage(compiled.graph_module, calib.eval_batches, calib.token_mask)
    mean_work = sum(u["ffn_fraction"] for u in work.values()) / len(work)
    cos, cos_plain = (c.report.sections["fidelity"]["cosine"] for c in (compiled, plain))
    print(f"MiniLM moepp keep 0.5: work {mean_work:.3f}, cosine {cos:.4f} (no refit {cos_plain:.4f})")
    assert abs(mean_work - 0.5) < 0.06  # budget fitted on calibration text holds on held-out text
    assert cos > SLOW_COS_FLOOR
    assert cos > cos_plain + SLOW_REFIT_GAIN  # the least-squares refit is worth its keep on unseen text
