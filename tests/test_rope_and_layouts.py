"""RoPE pairings and fused-projection layouts: what the matcher reads off the graph.

The end-to-end exactness of these rewrites is in test_identity_rewrite (GPT-NeoX, Phi, GPT-J and
Falcon are in the model zoo); here the pieces are checked one by one, with numbers.
"""
import pytest
import torch
from torch import nn

import moh_compile
from moh_compile.match.rope import Rope, head_dim_permutation, match_rope
from moh_compile.ops.attention import rotate_half
from tests.models import build


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class _RopeSpelling(nn.Module):
    """q after one of the RoPE spellings models use (rotated dims: `rot` of 16)."""

    def __init__(self, style: str, rot: int):
        super().__init__()
        self.style, self.rot = style, rot

    def forward(self, q, cos, sin):
        r = self.rot
        part, rest = q[..., :r], q[..., r:]
        if self.style == "halves":  # GPT-OSS: rotate-half written on the halves, half-width tables
            x1, x2 = part.chunk(2, dim=-1)
            c, s = cos[..., :r // 2], sin[..., :r // 2]
            roped = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
            return roped if r == q.shape[-1] else torch.cat([roped, rest], dim=-1)
        rotated = _rotate_every_two(part) if self.style == "interleaved" else rotate_half(part)
        roped = part * cos + rotated * sin
        return roped if r == q.shape[-1] else torch.cat([roped, rest], dim=-1)


def _tables(s: int, r: int, interleaved: bool):
    angle = torch.arange(s)[:, None] * torch.rand(r // 2)[None, :] * 3
    if interleaved:
        angle = angle.repeat_interleave(2, dim=-1)
    else:
        angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("style,rot,pairs", [
    ("half", 16, [(i, i + 8) for i in range(8)]),
    ("half", 4, [(0, 2), (1, 3)]),  # GPT-NeoX / Phi partial rotary
    ("interleaved", 8, [(0, 1), (2, 3), (4, 5), (6, 7)]),  # GPT-J
    ("interleaved", 16, [(2 * i, 2 * i + 1) for i in range(8)]),
    ("halves", 16, [(i, i + 8) for i in range(8)]),
])
def test_every_pairing_is_full_rotate_half_after_the_permutation(style, rot, pairs):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 16)
    cos, sin = _tables(5, rot, style == "interleaved")
    program = torch.export.export(_RopeSpelling(style, rot), (q, cos, sin))
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    rope = match_rope(out)
    assert isinstance(rope, Rope) and rope.pairs == pairs and (rope.offset, rope.width) == (0, rot)
    assert rope.half_tables is (style == "halves")
    # the op's rotate-half over all 16 dims, on permuted q with padded, permuted tables,
    # gives the model's RoPE output, permuted the same way
    perm = torch.tensor(head_dim_permutation(rope))
    assert sorted(perm.tolist()) == list(range(16))
    assert (perm.tolist() == list(range(16))) is (style != "interleaved" and rot == 16)  # rotate-half stays
    pad = [0, 16 - rot]
    cos_p = nn.functional.pad(cos, pad, value=1.0)[..., perm]
    sin_p = nn.functional.pad(sin, pad, value=0.0)[..., perm]
    qp = q[..., perm]
    want = _RopeSpelling(style, rot)(q, cos, sin)[..., perm]
    assert torch.allclose(qp * cos_p + rotate_half(qp) * sin_p, want, atol=1e-6)


def test_head_dim_permutation_of_rotate_half_is_the_identity():
    rope = Rope(src=None, cos=None, sin=None, offset=0, width=8, pairs=[(i, i + 4) for i in range(4)], head_dim=8)
    assert head_dim_permutation(rope) == list(range(8))


@pytest.mark.parametrize("name,rows_of_head", [
    # GPT-NeoX: qkv viewed as (.., H, 3 * D), q is the first D of each head's 3 * D rows
    ("gpt_neox", lambda h, d: [h * 48 + j for j in range(d)]),
    # Falcon (new architecture, 8 query heads over 2 KV heads): per KV group [4 q heads, k, v]
    ("falcon", lambda h, d: [(h // 4) * 48 + (h % 4) * 8 + j for j in range(d)]),
])
def test_fused_layouts_give_each_query_head_its_rows(name, rows_of_head):
    model, inputs, _, facts = build(name)
    for m in moh_compile.inspect(model, inputs).matches.attention:
        d, heads = m.block.head_dim, m.block.num_heads
        perm = m.head_perm or list(range(d))
        want = [rows_of_head(h, d)[p] for h in range(heads) for p in perm]
        assert m.q_rows == want
        assert m.block.q.fused and m.block.q.rows is None  # not one range: recorded as fused only


def test_partial_rope_models_get_a_head_dim_permutation():
    for name, rotated in (("gpt_neox", 4), ("phi", 8), ("gptj", 8)):
        model, inputs, _, _ = build(name)
        for m in moh_compile.inspect(model, inputs).matches.attention:
            assert m.rope.width == rotated and m.head_perm is not None and m.head_perm != sorted(m.head_perm)
    model, inputs, _, _ = build("llama")
    assert all(m.head_perm is None for m in moh_compile.inspect(model, inputs).matches.attention)


class _WindowAttention(nn.Module):
    """Swin-style: (B, H, W, C) features cut into ws x ws windows, attention inside each window."""

    def __init__(self, c=32, heads=2, ws=4):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, hh, ww, c = x.shape
        ws = self.ws
        win = x.view(b, hh // ws, ws, ww // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        qkv = self.qkv(win).reshape(win.shape[0], ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        o = self.proj(o.transpose(1, 2).reshape(-1, ws * ws, c))
        return x + o.view(b, hh // ws, ww // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)


def test_windows_of_symbolic_image_sides():
    """The window count (H // ws) * (W // ws) is 0 on the feature map's small stand-in sizes and a
    -1 view then divides by zero: the map retries with the traced sizes (this crashed Swin)."""
    model = _WindowAttention().eval()
    compiled = moh_compile.compile(model, (torch.randn(2, 8, 8, 32),))
    assert [a["transform"] for a in compiled.report.actions] == ["identity"], compiled.report.skipped
    x = torch.randn(3, 12, 8, 32)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-5
