"""Einsum contractions are lowered at capture into permute -> matmul -> permute (lower_einsum.py):
exact, only for matrix products, and what lets einsum-written attention (tests/models.py
EinsumBlock, XLNet, Funnel) be matched and routed like any other."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import moh_compile
from moh_compile.calibrate.data import Calibration
from moh_compile.capture import capture
from moh_compile.lower_einsum import contraction_plan
from tests.op_checks import dense_reference

EINSUM = torch.ops.aten.einsum.default
LOWERED = [  # (equation, operand shapes): attention, projections, ellipses, implicit output
    ("bqhd,bkhd->bhqk", [(2, 5, 3, 4), (2, 7, 3, 4)]),
    ("bhqk,bkhd->bqhd", [(2, 3, 5, 7), (2, 7, 3, 4)]),
    ("bsd,dhk->bshk", [(2, 5, 6), (6, 3, 4)]),
    ("bshk,hkd->bsd", [(2, 5, 3, 4), (3, 4, 6)]),
    ("bsd,fd->bsf", [(2, 5, 6), (8, 6)]),
    ("hd,bsd->bsh", [(8, 6), (2, 5, 6)]),
    ("ibnd,jbnd->bnij", [(5, 2, 3, 4), (7, 2, 3, 4)]),
    ("...qd,...kd->...qk", [(2, 3, 5, 4), (2, 3, 7, 4)]),
    ("bij,bjk", [(2, 5, 4), (2, 4, 3)]),
    ("bhqk , bhkd -> bhqd", [(2, 3, 5, 7), (2, 3, 7, 4)]),
]
KEPT = [  # not one matrix product: outer product, a letter summed on one side, diagonal, 3 operands
    ("i,j->ij", [(3,), (4,)]),
    ("bij,bjk->bk", [(2, 5, 4), (2, 4, 3)]),
    ("bii,bij->bij", [(2, 4, 4), (2, 4, 3)]),
    ("bi,bi->b", [(2, 4), (2, 4)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
]


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, a, b, c=None):
        return torch.einsum(self.equation, *(x for x in (a, b, c) if x is not None))


def _captured(equation, shapes):
    g = torch.Generator().manual_seed(len(equation))
    xs = tuple(torch.randn(*s, generator=g) for s in shapes)
    model = Einsum(equation)
    gm = capture(model, xs, dynamic=False).module
    return model, gm, xs


@pytest.mark.parametrize("equation,shapes", LOWERED, ids=[e for e, _ in LOWERED])
def test_matrix_products_are_lowered_exactly(equation, shapes):
    model, gm, xs = _captured(equation, shapes)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert EINSUM not in targets and torch.ops.aten.matmul.default in targets
    assert (gm(*xs) - model(*xs)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("equation,shapes", KEPT, ids=[e for e, _ in KEPT])
def test_other_contractions_stay_einsums(equation, shapes):
    model, gm, xs = _captured(equation, shapes)
    assert [n.target for n in gm.graph.nodes].count(EINSUM) == 1
    assert torch.equal(gm(*xs), model(*xs))


def test_plan_writes_keys_as_a_transpose_and_flattens_head_groups():
    """Q K^T's keys become permute + transpose(-2, -1), the form hand-written attention has (the
    matcher walks it); a (d, heads, head_dim) weight is flattened and the product unflattened."""
    _, gm, _ = _captured("bqhd,bkhd->bhqk", [(2, 5, 3, 4), (2, 7, 3, 4)])
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default)
    assert mm.args[1].target is torch.ops.aten.transpose.int and mm.args[1].args[1:] == (-2, -1)
    _, gm, _ = _captured("bsd,dhk->bshk", [(2, 5, 6), (6, 3, 4)])
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default)
    assert mm.args[1].target is torch.ops.aten.flatten.using_ints
    assert [u.target for u in mm.users] == [torch.ops.aten.unflatten.int]
    assert contraction_plan(mm) is None  # not an einsum node


class WeightFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.einsum("hd,bsd->bsh", self.w, x)


def test_weight_written_first_becomes_x_at_w_transposed():
    """With b and s dynamic the product cannot be unflattened to (b, s): the operands are swapped,
    giving x @ W^T, the linear the matcher knows."""
    model, x = WeightFirst(), torch.randn(2, 5, 6)
    gm = capture(model, (x,)).module
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default)
    assert mm.args[0].op == "placeholder" and mm.args[1].target is torch.ops.aten.transpose.int
    x = torch.randn(3, 7, 6)
    assert (gm(x) - model(x)).abs().max().item() <= 1e-6


def _ids(b, s, seed):
    return {"input_ids": torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xlnet", "funnel"])
def test_einsum_relative_attention_routes_like_the_reference(name):
    """XLNet / Funnel: MoH at half the heads on their einsum-written relative attention equals the
    masked dense reference (the position terms reach the op as a mask, the query from the graph)."""
    from tests.test_more_architectures import CONFIGS

    torch.manual_seed(0)
    model = CONFIGS[name]().eval()
    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": {"active_heads": 0.5}})
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg,
                                   calibration=Calibration(batches=[_ids(4, 8, s) for s in range(3)]))
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert len(blocks) == 2 and all(b["has_mask"] for b in blocks)
    x = _ids(3, 8, 9)
    with torch.no_grad():
        got = compiled(**x).last_hidden_state
        assert (got - dense_reference(compiled)(**x).last_hidden_state).abs().max().item() <= 1e-5
        assert (got - model(**x).last_hidden_state).abs().max().item() > 1e-3
