"""Soft-capped attention scores (Gemma 2: cap * tanh(scale QK^T / cap), then the mask): the op's
definition against the model's formula, the routed kernel against the reference, a tiny Gemma 2
through MoH and both ONNX forms, and the sparse pass leaving it dense with its reason."""
from __future__ import annotations

import copy

import pytest
import torch

import moh_compile
from moh_compile.kernels import routed_attention as ra
from moh_compile.ops.attention import attention_reference
from tests.test_routed_attention_kernel import make_args

transformers = pytest.importorskip("transformers")
OP = torch.ops.moh_compile.attention.default
CAP = 2.0


@pytest.mark.parametrize("mask", ["causal", "additive", "padding"])
def test_reference_is_the_models_formula_and_the_kernel_agrees(mask):
    b, s, h, hkv, d = 3, 11, 8, 2, 8
    args = make_args(b=b, s=s, h=h, hkv=hkv, d=d, rope=True, mask=mask, gates="random", seed=4)
    x, wq, bq, k, v, m, cos, sin, wo, bo, g, scale = args
    tail = (None, None, None, False, None, 0.0, CAP)
    ref = attention_reference(*args, *tail)
    q = (x @ wq.T + bq).view(b, s, h, d).transpose(1, 2)
    q = q * cos + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin
    kk, vv = (t.repeat_interleave(h // hkv, 1) for t in (k, v))
    scores = torch.tanh(q @ kk.transpose(-1, -2) * scale / CAP) * CAP
    scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    ctx = torch.softmax(scores, -1) @ vv
    want = (ctx * g.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(b, s, h * d) @ wo.T + bo
    assert (ref - want).abs().max().item() <= 1e-5
    assert (ref - attention_reference(*args)).abs().max().item() > 1e-2  # the cap matters at CAP = 2
    out = ra.routed_attention_cpu(*args, *tail)
    assert (out - ref).abs().max().item() <= 1e-5


def _gemma2():
    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
                                       attn_logit_softcapping=CAP, sliding_window=4)
    torch.manual_seed(0)
    return transformers.Gemma2Model(config).eval()


def _ids(b, s, seed):
    return {"input_ids": torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed)),
            "use_cache": False}


def test_gemma2_routed_heads_match_the_reference_and_export(tmp_path):
    from moh_compile.backends.ort_runtime import verify_onnx

    model = _gemma2()
    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep",
                                    options={"moh": {"active_heads": 0.5, "router": "query_norm"}})
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg)
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert [b["softcap"] for b in blocks] == [CAP, CAP]
    dense = copy.deepcopy(compiled.graph_module)
    for n in dense.graph.nodes:
        if n.target is OP:
            n.target = attention_reference
    dense.recompile()
    x = _ids(3, 13, 1)  # longer than the sliding window: the local layer's mask matters
    with torch.no_grad():
        got, want = compiled(**x).last_hidden_state, dense(**x).last_hidden_state
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - model(**x).last_hidden_state).abs().max().item() > 1e-3
    forms = ["portable"]
    try:
        import onnxruntime_extensions  # noqa: F401
        forms.append("custom")
    except ImportError:
        pass
    program = compiled.export()
    for form in forms:
        path = tmp_path / f"model.{form}.onnx"
        compiled.export_onnx(path, form=form, program=program, capacity="exact")
        assert verify_onnx(compiled, x, path, atol=1e-4, form=form) <= 1e-4


def test_sparse_pass_keeps_soft_capped_attention_dense_with_its_reason():
    model = _gemma2()
    cfg = moh_compile.CompileConfig(attention="sparse", ffn="keep",
                                    options={"sparse": {"profile_lengths": [16, 32], "validate_length": 24}})
    from moh_compile.calibrate.data import Calibration

    calib = Calibration(batches=[_ids(2, 32, s) for s in range(2)])
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg, calibration=calib)
    reasons = [s["reason"] for s in compiled.report.skipped if s["kind"] == "attention"]
    assert len(reasons) == 2 and all("soft-capped" in r for r in reasons), compiled.report.skipped
