"""Score forms SDPA cannot run, so the op computes them explicitly: soft-capped scores (Gemma 2:
cap * tanh(scale QK^T / cap), then the mask) and attention sinks (GPT-OSS: a learned per-head logit
in every softmax row, its probability dropped). For each: the op's definition against the model's
formula, the routed kernel against the reference, a tiny model through MoH and both ONNX forms,
and the sparse pass leaving it dense with its reason."""
from __future__ import annotations


import pytest
import torch

import moh_compile
from moh_compile.kernels import routed_attention as ra
from moh_compile.ops.attention import attention_reference
from tests.test_routed_attention_kernel import make_args
from tests.op_checks import assert_onnx_forms_reproduce, dense_reference

transformers = pytest.importorskip("transformers")
CAP = 2.0


def _formula(args, cap, sinks):
    """The models' own attention, written out: GQA repeat, scores, cap, mask, sink column, P @ V."""
    x, wq, bq, k, v, m, cos, sin, wo, bo, g, scale = args
    (b, s, _), h, d = x.shape, g.shape[-1], k.shape[-1]
    q = (x @ wq.T + bq).view(b, s, h, d).transpose(1, 2)
    q = q * cos + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin
    kk, vv = (t.repeat_interleave(h // k.shape[1], 1) for t in (k, v))
    scores = q @ kk.transpose(-1, -2) * scale
    if cap:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, h, 1, 1).expand(b, h, s, 1)], -1)
    probs = torch.softmax(scores, -1)[..., :s]
    ctx = probs @ vv
    return (ctx * g.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(b, s, h * d) @ wo.T + bo


@pytest.mark.parametrize("form", ["softcap", "sinks", "both"])
@pytest.mark.parametrize("mask", ["causal", "additive", "padding"])
def test_reference_is_the_models_formula_and_the_kernel_agrees(form, mask):
    args = make_args(b=3, s=11, h=8, hkv=2, d=8, rope=True, mask=mask, gates="random", seed=4)
    cap = CAP if form != "sinks" else 0.0
    sinks = torch.linspace(-2.0, 3.0, 8) if form != "softcap" else None
    tail = (None, None, None, False, None, 0.0, cap, sinks)
    ref = attention_reference(*args, *tail)
    assert (ref - _formula(args, cap, sinks)).abs().max().item() <= 1e-5
    assert (ref - attention_reference(*args)).abs().max().item() > 1e-2  # the form matters at these values
    out = ra.routed_attention_cpu(*args, *tail)
    assert (out - ref).abs().max().item() <= 1e-5


def _gemma2():
    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
                                       attn_logit_softcapping=CAP, sliding_window=4)
    torch.manual_seed(0)
    return transformers.Gemma2Model(config).eval()


def _gpt_oss():
    """MoE FFNs (left as they are), RoPE written on the two halves, sinks, a sliding-window layer."""
    config = transformers.GptOssConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                       experts_implementation="batched_mm")  # the MoE form that exports to ONNX
    torch.manual_seed(0)
    model = transformers.GptOssModel(config).eval()
    with torch.no_grad():  # sinks start at 0; spread them so some heads attend mostly to "nothing"
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-2.0, 3.0, p.numel()))
    return model


MODELS = {"gemma2": (_gemma2, "softcap", CAP, "soft-capped"), "gpt_oss": (_gpt_oss, "sinks", True, "sinks")}


def _ids(b, s, seed):
    return {"input_ids": torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed)),
            "use_cache": False}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_is_bit_exact(name):
    factory, field, value, label = MODELS[name]
    model = factory()
    compiled = moh_compile.compile(model, _ids(2, 8, 0))
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert len(blocks) == 2 and all(b[field] == value for b in blocks), compiled.report.skipped
    assert all(label in row[3] for row in compiled.report.attention_table()[1:])  # the report's "type" column
    x = _ids(3, 13, 1)  # longer than the sliding window: the local layer's mask matters
    with torch.no_grad():
        assert torch.equal(compiled(**x).last_hidden_state, model(**x).last_hidden_state)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_routed_heads_match_the_reference_and_export(name, tmp_path):
    model = MODELS[name][0]()
    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep",
                                    options={"moh": {"active_heads": 0.5, "router": "query_norm"}})
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg)
    dense = dense_reference(compiled)
    x = _ids(3, 13, 1)
    with torch.no_grad():
        got, want = compiled(**x).last_hidden_state, dense(**x).last_hidden_state
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - model(**x).last_hidden_state).abs().max().item() > 1e-3
    assert_onnx_forms_reproduce(compiled, x, tmp_path)


def test_sparse_pass_keeps_these_forms_dense_with_the_reason():
    from moh_compile.calibrate.data import Calibration

    model = _gemma2()
    cfg = moh_compile.CompileConfig(attention="sparse", ffn="keep",
                                    options={"sparse": {"profile_lengths": [16, 32], "validate_length": 24}})
    calib = Calibration(batches=[_ids(2, 32, s) for s in range(2)])
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg, calibration=calib)
    reasons = [s["reason"] for s in compiled.report.skipped if s["kind"] == "attention"]
    assert len(reasons) == 2 and all("soft-capped" in r for r in reasons), compiled.report.skipped
