"""Einsum contractions are lowered at capture into permute -> matmul -> permute (lower_einsum.py):
exact, and only for matrix products. (Einsum-written attention through the passes: EinsumBlock in
tests/models.py; XLNet and Funnel in tests/test_more_architectures.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moh_compile.capture import capture
from moh_compile.lower_einsum import contraction_plan

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
