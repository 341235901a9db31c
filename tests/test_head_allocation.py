"""MoH head allocation: the knapsack picks the exact optimum, heads move to the sensitive block,
the FLOPs budget holds, probes leave the model as it was, and plans replay the chosen k."""
import itertools

import pytest
import torch

import moh_compile
from moh_compile.calibrate.head_allocation import BlockChoices, allocate, candidate_ks
from moh_compile.calibrate.metrics import token_distortion
from moh_compile.passes.moh import _installed, _op_of, _router_node
from moh_compile.passes.moh_router import HeadRouter
from tests.models import build, main_output, reshape_inputs
from tests.op_checks import dense_reference


def _blocks(shapes):
    """BlockChoices for (k_uniform, n_routed, FLOPs per head, FLOPs fixed) per block."""
    out = []
    for i, (k_u, n_routed, per_head, fixed) in enumerate(shapes):
        ks = candidate_ks(k_u, n_routed)
        out.append(BlockChoices(f"b{i}", ks, [fixed + per_head * k for k in ks], k_u))
    return out


def test_candidates_run_from_about_half_the_uniform_k_to_every_head():
    assert candidate_ks(9, 12) == list(range(5, 13))
    assert candidate_ks(6, 12) == list(range(3, 13))
    assert candidate_ks(1, 3) == [1, 2, 3]
    assert candidate_ks(4, 4) == [2, 3, 4]


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_exhaustive_optimum_under_the_uniform_flops(seed):
    g = torch.Generator().manual_seed(seed)
    blocks = _blocks([(3, 6, 2.0, 5.0), (4, 8, 1.0, 3.0), (2, 4, 3.0, 1.0), (3, 5, 1.5, 0.0)])
    # decreasing in k, zero when the block keeps every head (as the probes measure it)
    table = []
    for b in blocks:
        steps = torch.rand(len(b.ks) - 1, generator=g).tolist()
        table.append([sum(steps[i:]) for i in range(len(b.ks) - 1)] + [0.0])
    asked = []

    def block_losses(i, ks):
        asked.append((i, list(ks)))
        return [table[i][blocks[i].ks.index(k)] for k in ks]

    result = allocate(blocks, block_losses, progress=False)
    assert asked == [(i, b.ks[:-1]) for i, b in enumerate(blocks)]          # the dense k is never probed
    uniform = sum(b.flops[b.ks.index(b.k_uniform)] for b in blocks)
    best = min((sum(table[i][b.ks.index(k)] for i, (b, k) in enumerate(zip(blocks, ks))), ks)
               for ks in itertools.product(*(b.ks for b in blocks))
               if sum(b.flops[b.ks.index(k)] for b, k in zip(blocks, ks)) <= uniform + 1e-9)
    got = sum(table[i][b.ks.index(k)] for i, (b, k) in enumerate(zip(blocks, result["k"])))
    assert got == pytest.approx(best[0], abs=1e-9)
    assert result["flops_chosen"] <= result["flops_uniform"] + 1e-9 == uniform + 1e-9


def test_heads_move_to_the_block_that_loses_most():
    blocks = _blocks([(9, 12, 1.0, 0.0)] * 3)
    scale = [1.0, 1.0, 20.0]
    result = allocate(blocks, lambda i, ks: [scale[i] * (12 - k) ** 2 for k in ks], progress=False)
    assert result["k"][2] == 12 and sum(result["k"]) == 27
    assert "chosen k" in result["markdown"] and "**12**" in result["markdown"]
    with pytest.raises(ValueError, match="not among the candidates"):
        allocate([BlockChoices("b", [5, 6], [5.0, 6.0], 9)], lambda i, ks: [0.0] * len(ks), progress=False)


def test_token_distortion_counts_real_tokens_only():
    ref = torch.randn(2, 3, 8)
    assert token_distortion([ref.clone()], [ref], [None]) == pytest.approx(0.0, abs=1e-12)
    out = ref.clone()
    out[0, 0] = -ref[0, 0]          # cosine -1: distortion 2 on that token
    out[1, 2] = torch.randn(8)      # a padding token: not counted
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert token_distortion([out], [ref], [mask]) == pytest.approx(2.0 / 5)


def _moh(**opts):
    return moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": opts})


def _calib(inputs, n=6):
    return [reshape_inputs(inputs, 4, 8 + i) for i in range(n)]


def _run(m, x):
    with torch.no_grad():
        return main_output(m(**x) if isinstance(x, dict) else m(*x))


def test_compile_allocates_within_the_budget_and_a_saved_plan_replays_it():
    model, inputs, _, _ = build("bert")
    calib = _calib(inputs)
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=0.5), calibration=calib)
    section = compiled.report.sections["attention:moh"]
    alloc = section["allocation"]
    blocks = [b for b in compiled.plan.blocks if b.transform == "moh"]
    assert len(blocks) == 2 and all(b.settings["allocated"] and b.settings["head_allocation"] == "calibrated"
                                    for b in blocks)
    assert [b.settings["k"] for b in blocks] == alloc["k"]
    assert alloc["flops_chosen"] <= alloc["flops_uniform"]
    for table in alloc["losses"].values():
        assert table[4] == 0.0 and all(v >= 0 for v in table.values())
    assert "Head allocation (calibrated)" in section["markdown"]
    x = reshape_inputs(inputs, 3, 11)
    assert (_run(compiled, x) - _run(dense_reference(compiled), x)).abs().max().item() <= 1e-5
    # the saved plan's k are kept: no second allocation, the same model
    again = moh_compile.compile(model, inputs, plan=compiled.plan, calibration=calib)
    assert "allocation" not in again.report.sections["attention:moh"]
    assert [b.settings["k"] for b in again.plan.blocks if b.transform == "moh"] == alloc["k"]
    assert (_run(again, x) - _run(compiled, x)).abs().max().item() <= 1e-6
    # uniform: the same k everywhere
    uniform = moh_compile.compile(model, inputs, _moh(active_heads=0.5, head_allocation="uniform"), calibration=calib)
    assert [b.settings["k"] for b in uniform.plan.blocks if b.transform == "moh"] == [2, 2]
    assert "allocation" not in uniform.report.sections["attention:moh"]


def test_a_probe_leaves_the_graph_as_it_was():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs, _moh(active_heads=1.0))
    gm = compiled.graph_module
    code, params = gm.code, dict(gm.named_parameters())
    x = reshape_inputs(inputs, 2, 9)
    before = _run(gm, x)
    rw = type("Rewrite", (), {})()
    router_node = next(n for n in gm.graph.nodes if n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), HeadRouter))
    rw.inserted = [router_node]
    old = gm.get_submodule(router_node.target)
    router = HeadRouter(4, old.embed_dim, [], 1, kind="random", out_dim=old.out_dim)
    new_o = torch.randn_like(gm.get_parameter(_op_of(router_node).args[8].target))
    with _installed(gm, rw, router, new_o):
        assert (_run(gm, x) - before).abs().max().item() > 1e-3
    assert gm.code == code and dict(gm.named_parameters()).keys() == params.keys()
    assert gm.get_submodule(router_node.target) is old and _router_node(gm, rw) is router_node
    assert torch.equal(_run(gm, x), before)


def test_bad_allocation_option_is_a_one_line_error():
    model, inputs, _, _ = build("bert")
    with pytest.raises(moh_compile.MohCompileError, match="head allocation must be one of"):
        moh_compile.compile(model, inputs, _moh(active_heads=0.5, head_allocation="greedy"),
                            calibration=_calib(inputs))


class TwoBlocks(torch.nn.Module):
    """Two SDPA attention blocks in a row: the smallest model with heads to move (CLI tests)."""

    def __init__(self):
        super().__init__()
        from tests.models import SDPABlock
        self.a, self.b = SDPABlock(), SDPABlock()

    def forward(self, x):
        return self.b(self.a(x))


def test_cli_head_allocation_option(tmp_path):
    import json

    from moh_compile.cli import main

    torch.save(torch.randn(48, 8, 64), tmp_path / "calib.pt")
    base = ["tests.test_head_allocation:TwoBlocks", "--input-shape", "2,8,64", "--attention", "moh", "--ffn", "keep",
            "--active-heads", "0.5", "--calib", str(tmp_path / "calib.pt"), "--batch-size", "8"]
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    assert "Head allocation (calibrated)" in (tmp_path / "c" / "report.md").read_text()
    assert main([*base, "--head-allocation", "uniform", "--out", str(tmp_path / "u")]) == 0
    plan = json.loads((tmp_path / "u" / "plan.json").read_text())
    assert [b["settings"]["k"] for b in plan["blocks"] if b["transform"] == "moh"] == [2, 2]
    assert "Head allocation" not in (tmp_path / "u" / "report.md").read_text()
    with pytest.raises(SystemExit) as bad:
        main([*base, "--head-allocation", "greedy", "--out", str(tmp_path / "x")])
    assert bad.value.code == 2 and not (tmp_path / "x").exists()
