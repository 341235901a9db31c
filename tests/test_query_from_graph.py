"""Query paths the op cannot absorb (a norm over all heads as in OLMo 2, a LayerNorm QK-norm, a
norm after RoPE, a scaling before the norm) stay in the model's graph: the op
takes the queries as computed (`query` argument, no W_q) and still skips the attention rows and
W_o columns of unchosen heads. Exact at the identity setting; the routed and block-sparse kernels
against the masked dense reference; MoH compiles, exports to both ONNX forms and runs in ORT."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moh_compile
from moh_compile.backends import tensorrt as trt
from moh_compile.calibrate.data import Calibration
from moh_compile.flops import block_attention_flops
from moh_compile.kernels import block_sparse as bs
from moh_compile.kernels import routed_attention as ra
from moh_compile.ops.attention import attention_reference
from tests.op_checks import (assert_onnx_forms_reproduce, assert_routed_like_the_reference,
                             compile_hf_moh_half_heads, dense_reference, hf_ids)
from tests.test_qk_norm import QKNormBlock
from tests.test_routed_attention_kernel import make_args

OP = torch.ops.moh_compile.attention.default


class QueryPathBlock(nn.Module):
    """Hand-written GQA attention whose query path the op cannot hold. kind:
    "all_heads" (OLMo 2: one RMS norm over the whole query projection), "layernorm" (a per-head
    LayerNorm QK-norm, as Persimmon / StableLM); and "low_rank" (DeepSeek-style q = W_b norm(W_a x)),
    which the op does hold."""

    def __init__(self, kind: str, d=64, h=4, kv=2):
        super().__init__()
        self.kind, self.h, self.kv, self.hd = kind, h, kv, d // h
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        self.o = nn.Linear(d, d)
        if kind == "low_rank":
            self.q_a, self.q_b = nn.Linear(d, 24, bias=False), nn.Linear(24, d, bias=False)
            self.q_norm = nn.RMSNorm(24)
        else:
            self.q = nn.Linear(d, d)
            self.q_norm = nn.RMSNorm(d) if kind == "all_heads" else nn.LayerNorm(self.hd)
        with torch.no_grad():  # non-trivial scales, so a misplaced norm shows
            for p in self.q_norm.parameters():
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(p.numel()))

    def forward(self, x):
        b, s, d = x.shape
        if self.kind == "low_rank":
            q = self.q_b(self.q_norm(self.q_a(x))).view(b, s, self.h, self.hd)
        elif self.kind == "all_heads":
            q = self.q_norm(self.q(x)).view(b, s, self.h, self.hd)
        else:
            q = self.q_norm(self.q(x).view(b, s, self.h, self.hd))
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, d))


MODELS = {
    "all_heads": (lambda: QueryPathBlock("all_heads"), "over 64 features, not per head"),
    "layernorm": (lambda: QueryPathBlock("layernorm"), "something other than a per-head RMS norm"),
    "norm_after_rope": (lambda: QKNormBlock(order="rope_norm"), "normalised after its rotary embedding"),
    "scaled_before_norm": (lambda: QKNormBlock(order="scaled_first"), "scaled before its QK-norm"),
}


def _x(b, s, seed=0):
    return (torch.randn(b, s, 64, generator=torch.Generator().manual_seed(seed)),)


def _op(compiled):
    return next(n for n in compiled.graph_module.graph.nodes if n.target is OP)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_compile_is_exact(name):
    make, reason = MODELS[name]
    model = make().eval()
    compiled = moh_compile.compile(model, _x(2, 8))
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert len(blocks) == 1 and reason in blocks[0]["query_from_graph"], compiled.report.skipped
    assert compiled.report.attention_table()[1][3] == "GQA (query from graph)"
    assert "Queries left to the model's graph" in compiled.report.markdown()
    op = _op(compiled)
    assert op.args[1] is None and isinstance(op.args[20], torch.fx.Node)  # no W_q; the graph's queries
    x = _x(3, 13, seed=1)
    with torch.no_grad():
        assert (compiled(*x) - model(*x)).abs().max().item() <= 1e-5


def test_low_rank_query_is_projected_from_its_latent():
    """q = W_b norm(W_a x): the op owns W_b (its input, the normalised latent, is token-wise), so
    unchosen heads skip their W_b rows; the latent stays in the graph, shared by all heads."""
    model = QueryPathBlock("low_rank").eval()
    compiled = moh_compile.compile(model, _x(2, 8))
    block = next(b for b in compiled.report.blocks if b["kind"] == "attention")
    assert block["query_from_graph"] == "" and block["d_model"] == 24
    assert tuple(_op(compiled).args[1].meta["val"].shape) == (64, 24)
    x = _x(3, 13, seed=1)
    with torch.no_grad():
        assert (compiled(*x) - model(*x)).abs().max().item() <= 1e-5


def _with_query(args, seed=0):
    """The op's arguments with the queries given instead of projected: W_q, b_q and RoPE dropped."""
    x, k = args[0], args[3]
    h = args[1].shape[0] // k.shape[-1]
    query = torch.randn(x.shape[0], h, x.shape[1], k.shape[-1], generator=torch.Generator().manual_seed(seed))
    args = list(args)
    args[1] = args[2] = args[6] = args[7] = None
    return args, query


@pytest.mark.parametrize("mask", ["none", "causal", "padding", "per_head"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_routed_kernel_gathers_the_given_queries(mask, heads):
    args, query = _with_query(make_args(b=3, s=13, h=heads[0], hkv=heads[1], mask=mask, gates="topk",
                                        seed=len(mask)))
    ra.STATS.reset()
    out = ra.routed_attention_cpu(*args, query=query)
    ref = attention_reference(*args, query=query)
    assert (out - ref).abs().max().item() <= 1e-5
    gates = args[10]
    assert ra.STATS.active_pairs == int((gates != 0).sum()) < gates.numel()  # only chosen rows attended


def test_block_sparse_kernel_takes_the_given_queries():
    args, query = _with_query(make_args(b=2, s=40, h=4, hkv=2, d=16, mask="causal"))
    args[10] = None  # every head: the block-sparse path
    window = dict(window_sink=[2, 0, 4, 1], window_alpha=[8, -1, 4, 16], window_beta=[0.0, 0.0, 0.25, 0.0],
                  window_two_sided=False)
    out = bs.sparse_attention_block(*args, **window, query=query)
    ref = attention_reference(*args, **window, query=query)
    assert (out - ref).abs().max().item() <= 1e-5


def _calibration(seeds=range(4)):
    return Calibration(batches=[_x(4, 32, seed=10 + s) for s in seeds])


@pytest.mark.parametrize("name", ["all_heads", "norm_after_rope"])
def test_moh_matches_the_reference_and_exports(name, tmp_path):
    model = MODELS[name][0]().eval()
    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": {"active_heads": 0.5}})
    compiled = moh_compile.compile(model, _x(2, 8), cfg, calibration=_calibration())
    x = _x(3, 40, seed=2)
    with torch.no_grad():
        got, want = compiled(*x), dense_reference(compiled)(*x)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - model(*x)).abs().max().item() > 1e-3  # routing changed something
    assert_onnx_forms_reproduce(compiled, x, tmp_path)


def test_flops_count_the_query_projection_the_graph_still_computes():
    """The report's MoH saving: the op's own Q projection skips unchosen heads; queries from the
    graph cost every row; a fused qkv projection computes every query row and the op its own on top."""
    from moh_compile.match.blocks import AttentionBlock, ProjectionInfo

    def block(**kw):
        proj = ProjectionInfo("w", None)
        return AttentionBlock(name="b", layer=0, core="sdpa", num_heads=4, num_kv_heads=2, head_dim=16, d_model=64,
                              d_out=64, scale=0.25, causal=True, has_mask=True, rope=False, layout="batch_first",
                              q=ProjectionInfo("w", None, fused=kw.pop("fused", False)), k=proj, v=proj, o=proj, **kw)

    full = block_attention_flops(block(), 128)["q_proj"]
    assert block_attention_flops(block(), 128, rewritten=True, active_heads=0.5)["q_proj"] == full / 2
    assert block_attention_flops(block(query_from_graph="why"), 128, rewritten=True,
                                 active_heads=0.5)["q_proj"] == full
    assert block_attention_flops(block(fused=True), 128, rewritten=True, active_heads=0.5)["q_proj"] == 1.5 * full
    assert block_attention_flops(block(fused=True), 128)["q_proj"] == full  # the model as it is


def test_query_norm_router_is_refused_with_the_reason():
    cfg = moh_compile.CompileConfig(attention="moh", options={"moh": {"active_heads": 0.5, "router": "query_norm"}})
    with pytest.raises(moh_compile.MohCompileError, match="query_norm router reads the query projection.*OLMo 2"):
        moh_compile.compile(QueryPathBlock("all_heads").eval(), _x(2, 8), cfg)


def test_sparse_pass_profiles_the_given_queries_and_keeps_the_head_order():
    from tests.test_head_order import A, DENSE, _compile, _layout, _out, _plan

    model = QueryPathBlock("all_heads", kv=4).eval()
    x0 = _x(2, 8)
    plan = _plan(model, x0, lambda blk: [A if h % 2 == 0 else DENSE for h in range(blk.num_heads)])
    compiled = _compile(model, x0, plan, True)
    assert [r.get("skipped") for r in _layout(compiled).values()] == [
        "queries computed by the model's graph (reordering them would copy them in every call)"]
    x = _x(2, 24, seed=3)
    dense = dense_reference(compiled)
    with torch.no_grad():
        assert (_out(compiled, x) - dense(*x)).abs().max().item() <= 1e-5
    cfg = moh_compile.CompileConfig(attention="sparse", ffn="keep",
                                    options={"sparse": {"density": 0.5, "profile_lengths": [16, 32],
                                                        "validate_length": 24}})
    calibrated = moh_compile.compile(model, x0, cfg, calibration=_calibration())
    assert _op(calibrated).args[12] is not None  # windows chosen from the profiled queries


def test_tensorrt_rules_take_query_or_q_weight():
    attrs = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    base = {"x": ("B", "S", 64), "k": ("B", 2, "S", 16), "v": ("B", 2, "S", 16), "o_weight": (64, 64)}
    assert trt.output_shape(trt.ATTENTION_OP, {**base, "query": ("B", 4, "S", 16)}, attrs) == ("B", "S", 64)
    with pytest.raises(ValueError, match="query .* != \\(B, 4, S, 16\\)"):
        trt.output_shape(trt.ATTENTION_OP, {**base, "query": ("B", 2, "S", 16)}, attrs)
    with pytest.raises(ValueError, match="exactly one of q_weight"):
        trt.output_shape(trt.ATTENTION_OP, base, attrs)
    with pytest.raises(ValueError, match="exactly one of q_weight"):
        trt.output_shape(trt.ATTENTION_OP, {**base, "query": ("B", 4, "S", 16), "q_weight": (64, 64)}, attrs)


def test_olmo2_moh_end_to_end():
    """A real family (OLMo 2, tiny config; its identity compile: tests/test_more_architectures.py):
    MoH at half the heads equals the masked dense reference."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Olmo2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.Olmo2Model(config).eval()
    compiled = compile_hf_moh_half_heads(model)
    assert all("OLMo 2" in b["query_from_graph"] for b in compiled.report.blocks if b["kind"] == "attention")
    assert_routed_like_the_reference(compiled, model, hf_ids(3, 21, 9))
