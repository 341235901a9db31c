"""Each pass's output (alone and combined) through both ONNX forms in ONNX Runtime.

The compiled PyTorch model is the reference: with capacity "exact" the portable form must drop
no token, so both forms match it within 1e-4. Tiny models from configs, calibrated on random
token batches (fidelity does not matter here, only that the exported graph computes the same)."""
from __future__ import annotations

import pytest
import torch

import moh_compile
from moh_compile.backends.ort_runtime import verify_onnx
from moh_compile.calibrate.data import Calibration
from tests.models import build, captured, reshape_inputs

try:
    import onnxruntime_extensions  # noqa: F401
    HAS_EXT = True
except ImportError:
    HAS_EXT = False


def _calibration(inputs, n=3, seq=40, seed=1):
    """Random batches like `inputs`: token ids for HF models, (4, seq, E) activations for a model
    that takes one float tensor."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(inputs, tuple):
        return Calibration(batches=[(torch.randn(4, seq, inputs[0].shape[-1], generator=g),) for _ in range(n)])
    batches = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, 100, (4, seq), generator=g)}
        b.update({k: (torch.ones(4, seq, dtype=torch.long) if k == "attention_mask" else v)
                  for k, v in inputs.items() if k != "input_ids"})
        batches.append(b)
    return Calibration(batches=batches)


CONFIGS = {
    "moh": dict(attention="moh", ffn="keep", options={"moh": {"active_heads": 0.5}}),
    # the paper's two-stage weighted gates (shared-head softmax, fitted temperature) on top of routing
    "moh-weighted": dict(attention="moh", ffn="keep",
                         options={"moh": {"active_heads": 0.5, "shared_heads": 0.25, "gate_style": "weighted"}}),
    "moepp": dict(attention="keep", ffn="moepp", options={"moepp": {"experts": 4, "ffn_keep": 0.5}}),
    # the factored router (--router-rank): two matmuls in the router subgraph
    "moepp-factored": dict(attention="keep", ffn="moepp",
                           options={"moepp": {"experts": 8, "ffn_keep": 0.5, "router_rank": 3}}),
    "sparse+moh+moepp": dict(attention="sparse+moh", ffn="moepp",
                             options={"sparse": {"profile_lengths": [16, 32], "validate_length": 24,
                                                 "density": 0.6},
                                      "moh": {"active_heads": 0.5},
                                      "moepp": {"experts": 4, "ffn_keep": 0.5}}),
}


def _cases():
    """The combined graph (all three ops) on an encoder with padding and on a GQA+RoPE decoder;
    each pass alone on the decoder (slow-marked: the combined case already covers every op)."""
    yield pytest.param("bert", "sparse+moh+moepp", id="bert-sparse+moh+moepp")
    yield pytest.param("bert", "moh-weighted", id="bert-moh-weighted")
    yield pytest.param("bert", "moepp-factored", id="bert-moepp-factored")
    # RoPE applied seq-major, (B, S, H, D): cos/sin reach the ops transposed
    yield pytest.param("rope_bshd", "sparse+moh+moepp", marks=pytest.mark.slow, id="rope_bshd-sparse+moh+moepp")
    # QK-norm: the query norm travels as the node's q_norm_weight input (custom) or standard ops
    yield pytest.param("qwen3", "sparse+moh+moepp", id="qwen3-sparse+moh+moepp")
    for name in (n for n in CONFIGS if n not in ("moh-weighted", "moepp-factored")):
        yield pytest.param("llama", name, marks=() if "+" in name else pytest.mark.slow, id=f"llama-{name}")


@pytest.mark.parametrize("arch, setting", list(_cases()))
def test_pass_output_exports_to_both_forms(arch, setting, tmp_path):
    model, inputs, _, _ = build(arch)
    compiled = moh_compile.compile(model, inputs, moh_compile.CompileConfig(**CONFIGS[setting]),
                                   calibration=_calibration(inputs), captured=captured(arch))
    applied = {a["transform"] for a in compiled.report.actions}
    assert applied - {"identity"}, applied  # the pass really rewrote blocks
    program = compiled.export()
    x = reshape_inputs(inputs, 3, 20)
    for form in ("portable", "custom"):
        if form == "custom" and not HAS_EXT:
            continue
        path = tmp_path / f"model.{form}.onnx"
        compiled.export_onnx(path, form=form, program=program, capacity="exact")
        assert verify_onnx(compiled, x, path, atol=1e-4, form=form) <= 1e-4


def test_portable_scatter_adds_never_repeat_a_row_so_threads_cannot_race(tmp_path):
    """ONNX Runtime applies ScatterND(reduction="add") on several threads without atomics, so a row
    repeated in one ScatterND's indices races (results changed from run to run on MiniLM). Every
    ScatterND of the portable form (MoH heads and MoE++ experts, default dynamic dispatch) is
    evaluated on a sample and its index rows must be distinct; and 4-thread runs repeat exactly."""
    import numpy as np
    import onnx

    from moh_compile.backends.ort_runtime import make_session, run_session

    model, inputs, _, _ = build("bert")
    cfg = dict(attention="moh", ffn="moepp", options={"moh": {"active_heads": 0.5},
                                                      "moepp": {"experts": 4, "ffn_keep": 0.5}})
    compiled = moh_compile.compile(model, inputs, moh_compile.CompileConfig(**cfg), calibration=_calibration(inputs),
                                   captured=captured("bert"))
    path = tmp_path / "model.portable.onnx"
    compiled.export_onnx(path, form="portable")
    proto = onnx.load(path)
    indices = [n.input[1] for n in proto.graph.node if n.op_type == "ScatterND"]
    assert len(indices) >= 4  # heads and experts of both layers
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
                              for name in indices)
    probe = tmp_path / "probe.onnx"
    onnx.save(proto, probe)
    x = reshape_inputs(inputs, 4, 24)
    outs = run_session(make_session(probe, "portable", intra_op_threads=4), x)
    for name, idx in zip(indices, outs[-len(indices):]):
        rows = idx.reshape(-1, idx.shape[-1])
        assert len(np.unique(rows, axis=0)) == len(rows), f"{name} repeats a row"
    session = make_session(path, "portable", intra_op_threads=4)
    first = run_session(session, x)[0]
    assert all(np.array_equal(first, run_session(session, x)[0]) for _ in range(5))
    assert verify_onnx(compiled, x, path, atol=1e-4, form="portable") <= 1e-4
