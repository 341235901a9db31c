"""An elementwise gate on the heads' contexts before the output projection (Qwen3-Next's
`o_proj(ctx * sigmoid(gate))`): read in any of three layouts, carried as the op's `out_gate`,
exact at the identity setting, and applied to the chosen rows only by the routed kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moh_compile
from moh_compile.backends import tensorrt as trt
from moh_compile.kernels import block_sparse as bs
from moh_compile.kernels import routed_attention as ra
from moh_compile.ops.attention import attention_reference
from tests.op_checks import (assert_onnx_forms_reproduce, assert_routed_like_the_reference,
                             compile_hf_moh_half_heads, hf_ids)
from tests.test_routed_attention_kernel import make_args


class GatedOutputBlock(nn.Module):
    """Attention whose context is gated before W_o. layout: where the gate multiplies it, "bsf"
    (B, S, H*D: Qwen3-Next), "bshd" or "bhsd"; "self" gates the context by itself (not a gate)."""

    def __init__(self, layout="bsf", d=64, h=4):
        super().__init__()
        self.layout, self.h, self.hd = layout, h, d // h
        self.qkv, self.gate, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.h, self.hd).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
        gate = torch.sigmoid(self.gate(x))  # (B, S, H*D)
        if self.layout == "bhsd":
            ctx = ctx * gate.view(b, s, self.h, self.hd).transpose(1, 2)
        ctx = ctx.transpose(1, 2)
        if self.layout == "bshd":
            ctx = ctx * gate.view(b, s, self.h, self.hd)
        ctx = ctx.reshape(b, s, d)
        if self.layout == "bsf":
            ctx = ctx * gate
        if self.layout == "self":
            ctx = ctx * torch.sigmoid(ctx)
        return x + self.o(ctx)


def _x(b, s, seed=0):
    return (torch.randn(b, s, 64, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("layout", ["bsf", "bshd", "bhsd"])
def test_identity_is_exact_in_every_layout(layout):
    model = GatedOutputBlock(layout).eval()
    compiled = moh_compile.compile(model, _x(2, 8))
    assert compiled.report.attention_table()[1][3] == "MHA (output-gated)", compiled.report.skipped
    op = next(n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.moh_compile.attention.default)
    assert isinstance(op.args[21], torch.fx.Node)
    x = _x(3, 13, seed=1)
    with torch.no_grad():
        assert (compiled(*x) - model(*x)).abs().max().item() <= 1e-5


def test_a_factor_computed_from_the_context_is_not_a_gate():
    """ctx * sigmoid(ctx) reads the context twice: not a gate the op could take from the graph."""
    with pytest.raises(moh_compile.MohCompileError, match="attention output is used outside the block"):
        moh_compile.inspect(GatedOutputBlock("self").eval(), _x(2, 8))


def _gated(args, seed=0):
    b, s = args[0].shape[:2]
    h, dv = args[1].shape[0] // args[3].shape[-1], args[4].shape[-1]
    return torch.rand(b, h, s, dv, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_routed_kernel_gates_the_chosen_rows(mask):
    args = make_args(b=3, s=13, h=8, hkv=2, d=8, mask=mask, gates="topk", seed=len(mask))
    gate = _gated(args)
    out = ra.routed_attention_cpu(*args, out_gate=gate)
    assert (out - attention_reference(*args, out_gate=gate)).abs().max().item() <= 1e-5
    assert (out - attention_reference(*args)).abs().max().item() > 1e-3  # the gate matters


def test_block_sparse_path_applies_the_gate():
    args = make_args(b=2, s=40, h=4, hkv=2, d=16, mask="causal")
    args[10] = None
    window = dict(window_sink=[2, 0, 4, 1], window_alpha=[8, -1, 4, 16], window_beta=[0.0, 0.0, 0.25, 0.0],
                  window_two_sided=False)
    gate = _gated(args)
    out = bs.sparse_attention_block(*args, **window, out_gate=gate)
    assert (out - attention_reference(*args, **window, out_gate=gate)).abs().max().item() <= 1e-5


def test_tensorrt_rules_check_the_gate_shape():
    attrs = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    shapes = {"x": ("B", "S", 64), "q_weight": (64, 64), "k": ("B", 2, "S", 16), "v": ("B", 2, "S", 16),
              "o_weight": (64, 64)}
    assert trt.output_shape(trt.ATTENTION_OP, {**shapes, "out_gate": ("B", 4, "S", 16)}, attrs) == ("B", "S", 64)
    with pytest.raises(ValueError, match="out_gate .* != \\(B, 4, S, 16\\)"):
        trt.output_shape(trt.ATTENTION_OP, {**shapes, "out_gate": ("B", "S", 64)}, attrs)


def test_qwen3_next_moh_matches_the_reference_and_exports(tmp_path):
    """Qwen3-Next's full-attention layers (tiny config; QK-norm, and a gate made by the same
    projection as the queries): MoH at half the heads equals the masked dense reference, and both
    ONNX forms reproduce it in ONNX Runtime."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3NextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
                                          layer_types=["full_attention"] * 2, num_experts=0, mlp_only_layers=[0, 1])
    torch.manual_seed(0)
    model = transformers.Qwen3NextModel(config).eval()
    compiled = compile_hf_moh_half_heads(model)
    assert [b["output_gate"] for b in compiled.report.blocks if b["kind"] == "attention"] == [True, True]
    x = hf_ids(3, 21, 9)
    assert_routed_like_the_reference(compiled, model, x)
    assert_onnx_forms_reproduce(compiled, x, tmp_path)
