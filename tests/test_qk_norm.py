"""QK-norm (each query head RMS-normalised before RoPE, as Qwen3 and Gemma 3 do) in every
spelling the matcher reads, exact at the identity setting and with routed heads. The orders the op
cannot hold (a norm after RoPE, a scaling before the norm) leave the query to the model's graph:
tests/test_query_from_graph.py."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moh_compile
from moh_compile.match.qk_norm import match_rms_norm
from tests.op_checks import dense_reference

OP = torch.ops.moh_compile.attention.default
EPS = 1e-6


class QKNormBlock(nn.Module):
    """Hand-written GQA attention with QK-norm. style: how the norm is spelled; rope: "half"
    (LLaMA) or "interleaved" (GPT-J: the op sees the head dims permuted, so the norm's scale
    must be permuted with them); order: "norm_rope" (the models), or "rope_norm" / "scaled_first", which the op leaves to the graph."""

    def __init__(self, style="manual", rope="half", order="norm_rope", d=64, h=4, kv=2):
        super().__init__()
        self.style, self.rope_kind, self.order = style, rope, order
        self.h, self.kv, self.hd = h, kv, d // h
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        g = torch.Generator().manual_seed(7)
        self.w_q = nn.Parameter(torch.rand(self.hd, generator=g) + 0.5)
        self.w_k = nn.Parameter(torch.rand(self.hd, generator=g) + 0.5)
        self.q_rms, self.k_rms = nn.RMSNorm(self.hd, eps=EPS), nn.RMSNorm(self.hd, eps=EPS)
        with torch.no_grad():
            self.q_rms.weight.copy_(self.w_q)
            self.k_rms.weight.copy_(self.w_k)

    def norm(self, t, w, module):
        if self.style == "module":  # nn.RMSNorm
            return module(t)
        if self.style == "gemma":  # float32 compute, scale (1 + w)
            tf = t.float()
            return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w.float())).type_as(t)
        if self.style == "no_weight":
            return t * torch.rsqrt((t * t).mean(-1, keepdim=True) + EPS)
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS))

    def rope(self, t):
        s, hd = t.shape[2], self.hd
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
        if self.rope_kind == "interleaved":
            cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
            return t * cos + torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2) * sin
        ang = torch.cat([ang, ang], -1)
        return t * ang.cos() + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * ang.sin()

    def forward(self, x):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.h, self.hd)
        k = self.k(x).view(b, s, self.kv, self.hd)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        if self.order == "scaled_first":
            q = q * 0.5
        if self.order != "rope_norm":
            q, k = self.norm(q, self.w_q, self.q_rms), self.norm(k, self.w_k, self.k_rms)
        q, k = self.rope(q.transpose(1, 2)), self.rope(k.transpose(1, 2))
        if self.order == "rope_norm":
            q, k = self.norm(q, self.w_q, self.q_rms), self.norm(k, self.w_k, self.k_rms)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, d))


def _x(b, s, seed=0):
    return (torch.randn(b, s, 64, generator=torch.Generator().manual_seed(seed)),)


CASES = [("manual", "half"), ("module", "half"), ("gemma", "half"), ("no_weight", "half"),
         ("manual", "interleaved")]


@pytest.mark.parametrize("style,rope", CASES)
def test_identity_compile_is_exact(style, rope):
    model = QKNormBlock(style, rope).eval()
    compiled = moh_compile.compile(model, _x(2, 8))
    blocks = [m for m in compiled.report.blocks if m["kind"] == "attention"]
    assert len(blocks) == 1 and blocks[0]["qk_norm"], compiled.report.skipped
    assert compiled.report.attention_table()[1][3] == "GQA (QK-norm)"
    op = next(n for n in compiled.graph_module.graph.nodes if n.target is OP)
    assert isinstance(op.args[16], torch.fx.Node) and op.args[17] == pytest.approx(EPS)
    x = _x(3, 13, seed=1)
    with torch.no_grad():
        assert (compiled(*x) - model(*x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("style,rope", [("manual", "interleaved"), ("gemma", "half")])
def test_routed_heads_match_the_masked_dense_reference(style, rope):
    """MoH at half the heads on a QK-norm model: the kernel (norm on the chosen rows only) equals
    the reference that computes every head, normalises and masks."""
    model = QKNormBlock(style, rope).eval()
    cfg = moh_compile.CompileConfig(attention="moh", options={"moh": {"active_heads": 0.5, "router": "query_norm"}})
    compiled = moh_compile.compile(model, _x(2, 8), cfg)
    dense = dense_reference(compiled)
    x = _x(3, 40, seed=2)
    with torch.no_grad():
        got, want = compiled(*x), dense(*x)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - model(*x)).abs().max().item() > 1e-3  # routing changed something


def test_recogniser_reads_scale_offset_and_eps():
    model = QKNormBlock("gemma").eval()
    gm = torch.export.export(model, _x(2, 8)).module()
    found = [f for f in map(match_rms_norm, gm.graph.nodes) if f is not None]
    # every node from x * rsqrt(...) on reads as a norm; the scaled ones are q's and k's, (1 + w)
    scaled = [f for f in found if f.weight is not None]
    assert {f.weight.target for f in scaled} == {"w_q", "w_k"}
    assert all(f.weight_offset == 1.0 for f in scaled)
    assert all(f.eps == EPS and f.width == 16 for f in found)


def test_head_reorder_is_exact_through_the_key_norm():
    """Reordering heads by window pattern permutes the K projection's rows through the model's
    key norm (shared per-dim scale, so it needs no permuting); outputs stay exact."""
    from tests.test_head_order import A, DENSE, _compile, _layout, _out, _plan

    model = QKNormBlock("manual", "interleaved", kv=4).eval()
    x0 = _x(2, 8)
    plan = _plan(model, x0, lambda blk: [A if h % 2 == 0 else DENSE for h in range(blk.num_heads)])
    reordered, plain = _compile(model, x0, plan, True), _compile(model, x0, plan, False)
    assert [r.get("order") for r in _layout(reordered).values()] == [[0, 2, 1, 3]]
    x = _x(2, 24, seed=3)
    assert (_out(reordered, x) - _out(plain, x)).abs().max().item() <= 1e-5


def test_bfloat16_qwen3_identity_is_bit_exact():
    """The op normalises in float32 and casts back before the scale, as Qwen3's RMSNorm does, so a
    bfloat16 model compiles to the same bits (a norm in bfloat16 would round differently)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.Qwen3Model(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = moh_compile.compile(model, {"input_ids": ids, "use_cache": False})
    assert [a["transform"] for a in compiled.report.actions if a["kind"] == "attention"] == ["identity"] * 2
    x = {"input_ids": torch.randint(0, 100, (3, 13), generator=torch.Generator().manual_seed(1)), "use_cache": False}
    with torch.no_grad():
        assert torch.equal(compiled(**x).last_hidden_state, model(**x).last_hidden_state)
