"""Values with their own head dim (DeepSeek's multi-head latent attention: queries and keys of
nope + rope dims, values narrower), keys assembled by writing into slices of a fresh tensor, and
the compile's last check that dead-code removal left the model's outputs alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moh_compile
from moh_compile.backends import tensorrt as trt
from moh_compile.kernels import block_sparse as bs
from moh_compile.kernels import routed_attention as ra
from moh_compile.match import graph as g
from moh_compile.ops.attention import attention_reference
from tests.op_checks import (assert_onnx_forms_reproduce, assert_routed_like_the_reference,
                             compile_hf_moh_half_heads, hf_ids)
from tests.test_routed_attention_kernel import make_args



class LatentBlock(nn.Module):
    """MLA-shaped attention: q/k heads of 24 dims (16 + 8), values of 16; the keys are written
    into slices of `new_empty` as DeepSeek's modelling code does."""

    def __init__(self, d=64, h=4, nope=16, rope=8, dv=16):
        super().__init__()
        self.h, self.nope, self.rope, self.dv = h, nope, rope, dv
        self.q = nn.Linear(d, h * (nope + rope))
        self.kv = nn.Linear(d, h * (nope + dv))
        self.k_pe = nn.Linear(d, rope)
        self.o = nn.Linear(h * dv, d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, -1).transpose(1, 2)
        k_nope, v = self.kv(x).view(b, s, self.h, -1).transpose(1, 2).split([self.nope, self.dv], -1)
        k_pe = self.k_pe(x).view(b, 1, s, self.rope).expand(b, self.h, s, self.rope)
        k = k_pe.new_empty(b, self.h, s, self.nope + self.rope)
        k[..., :self.nope] = k_nope
        k[..., self.nope:] = k_pe
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


def _x(b, s, seed=0):
    return (torch.randn(b, s, 64, generator=torch.Generator().manual_seed(seed)),)


def test_identity_is_exact_and_the_value_dim_is_recorded():
    model = LatentBlock().eval()
    compiled = moh_compile.compile(model, _x(2, 8))
    block = next(b for b in compiled.report.blocks if b["kind"] == "attention")
    assert (block["head_dim"], block["v_head_dim"]) == (24, 16)
    assert compiled.report.attention_table()[1][6] == "24 (v 16)"
    x = _x(3, 13, seed=1)
    with torch.no_grad():
        assert (compiled(*x) - model(*x)).abs().max().item() <= 1e-5


def test_writes_into_a_slice_of_a_temporary_survive_cleanup():
    """`k[..., :n] = ...` mutates k through a view: dead-code removal must keep it (it used to drop
    it as an in-place op on an unused temporary, leaving k uninitialised)."""
    model = LatentBlock().eval()
    gm = torch.export.export(model, _x(2, 8)).module()
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.copy_")]
    assert writes and not any(g.inplace_on_temporary(n) for n in writes)


def test_recorded_keys_are_the_filled_ones():
    """Calibration records a node's value just before its last use: here after the slice writes
    that fill the keys (recorded at creation they were uninitialised memory, and the MoH fit read
    garbage: a different router every compile, sometimes NaN)."""
    from moh_compile.rewrite import probe_values

    model = LatentBlock().eval()
    x = _x(2, 8)
    gm = torch.export.export(model, x).module()
    sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    got = probe_values(gm, {"k": sdpa.args[1]}, x, {})["k"]
    b, s, _ = x[0].shape
    with torch.no_grad():
        k_nope = model.kv(x[0]).view(b, s, 4, -1).transpose(1, 2)[..., :16]
        k_pe = model.k_pe(x[0]).view(b, 1, s, 8).expand(b, 4, s, 8)
    assert torch.equal(got, torch.cat([k_nope, k_pe], -1))


def test_a_cleanup_that_changes_the_outputs_fails_loudly(monkeypatch):
    """The compile's last check: if dead-code removal changed the model (here: forced to drop
    every in-place write, the old bug), the compile stops with an internal error, no wrong model."""
    from torch._ops import OpOverload

    def drops_every_inplace_write(node):
        return (isinstance(node, torch.fx.Node) and node.op == "call_function" and isinstance(node.target, OpOverload)
                and node.target._schema.name.endswith("_"))

    monkeypatch.setattr(g, "inplace_on_temporary", drops_every_inplace_write)
    # the keys the dropped writes filled are then uninitialised memory, which may still hold the
    # right values from the run before (allocator reuse): make it NaN so the change always shows
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(moh_compile.MohCompileError, match="internal error.*dead-code removal"):
            moh_compile.compile(LatentBlock().eval(), _x(2, 8))
    finally:
        torch.use_deterministic_algorithms(False)


def _narrow_values(args, dv):
    """The op's arguments with values of head dim dv and W_o to match."""
    args = list(args)
    b, hkv, s = args[4].shape[:3]
    h = args[1].shape[0] // args[3].shape[-1]
    gen = torch.Generator().manual_seed(dv)
    args[4] = torch.randn(b, hkv, s, dv, generator=gen)
    args[8] = torch.randn(args[8].shape[0], h * dv, generator=gen) * 0.3
    return args


@pytest.mark.parametrize("dv", [4, 12])
@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_routed_kernel_matches_the_reference(dv, mask):
    args = _narrow_values(make_args(b=3, s=13, h=8, hkv=2, d=8, mask=mask, gates="topk", seed=dv), dv)
    out = ra.routed_attention_cpu(*args)
    assert (out - attention_reference(*args)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dv", [4, 12])
def test_block_sparse_kernel_pads_to_one_head_size(dv):
    """Flash attention takes one head size; zero-padded dims change no score and no output."""
    args = _narrow_values(make_args(b=2, s=40, h=4, hkv=2, d=8, mask="causal"), dv)
    args[10] = None
    window = dict(window_sink=[2, 0, 4, 1], window_alpha=[8, -1, 4, 16], window_beta=[0.0, 0.0, 0.25, 0.0],
                  window_two_sided=False)
    out = bs.sparse_attention_block(*args, **window)
    assert (out - attention_reference(*args, **window)).abs().max().item() <= 1e-5


def test_tensorrt_rules_read_v_head_dim():
    attrs = {"num_heads": 4, "num_kv_heads": 4, "head_dim": 24, "v_head_dim": 16}
    shapes = {"x": ("B", "S", 64), "q_weight": (96, 64), "k": ("B", 4, "S", 24), "v": ("B", 4, "S", 16),
              "o_weight": (64, 64)}
    assert trt.output_shape(trt.ATTENTION_OP, shapes, attrs) == ("B", "S", 64)
    with pytest.raises(ValueError, match="v .* != \\(B, 4, S_k, 24\\)"):
        trt.output_shape(trt.ATTENTION_OP, shapes, {k: v for k, v in attrs.items() if k != "v_head_dim"})


def test_deepseek_moh_matches_the_reference_and_exports(tmp_path):
    """DeepSeek-V3 (tiny config, MLA with a low-rank query): its query stays in the graph and its
    values are narrower; MoH at half the heads equals the masked dense reference and both ONNX
    forms reproduce it in ONNX Runtime. (DeepSeek-V2 compiles too, tests/test_more_architectures.py,
    but its complex-number RoPE, in the graph, does not export to ONNX.)"""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                           num_key_value_heads=4, intermediate_size=128, vocab_size=100,
                                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                           qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=2)
    torch.manual_seed(0)
    model = transformers.DeepseekV3Model(config).eval()
    compiled = compile_hf_moh_half_heads(model)
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert len(blocks) == 2 and all(b["v_head_dim"] == 16 and b["query_from_graph"] for b in blocks)
    x = hf_ids(3, 21, 9)
    assert_routed_like_the_reference(compiled, model, x)
    assert_onnx_forms_reproduce(compiled, x, tmp_path)
