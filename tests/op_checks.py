"""Shared checks of a compiled model: the same graph with its attention ops on the dense masked
reference (every head computed, then gated), and both ONNX forms run in ONNX Runtime."""
from __future__ import annotations

import copy

import torch

from moh_compile.ops.attention import attention_reference

OP = torch.ops.moh_compile.attention.default


def dense_reference(compiled) -> torch.fx.GraphModule:
    """A copy of the compiled graph whose attention ops run `attention_reference` (no fast kernel)."""
    dense = copy.deepcopy(compiled.graph_module)
    for n in dense.graph.nodes:
        if n.target is OP:
            n.target = attention_reference
    dense.recompile()
    return dense


def assert_onnx_forms_reproduce(compiled, inputs, tmp_path, atol: float = 1e-4) -> None:
    """Export the portable form (and the custom form where onnxruntime-extensions is installed)
    with exact capacity; each must reproduce the PyTorch model in ONNX Runtime within atol."""
    from moh_compile.backends.ort_runtime import verify_onnx

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
        assert verify_onnx(compiled, inputs, path, atol=atol, form=form) <= atol


def hf_ids(b: int, s: int, seed: int, vocab: int = 100) -> dict:
    """Random token ids for a tiny Hugging Face decoder, KV cache off (as it is captured)."""
    return {"input_ids": torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed)),
            "use_cache": False}


def compile_hf_moh_half_heads(model):
    """MoH at half the heads, learned routers calibrated on three batches of random ids."""
    import moh_compile
    from moh_compile.calibrate.data import Calibration

    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": {"active_heads": 0.5}})
    return moh_compile.compile(model, hf_ids(2, 8, 0), cfg,
                               calibration=Calibration(batches=[hf_ids(4, 32, s) for s in range(3)]))


def assert_routed_like_the_reference(compiled, model, inputs: dict) -> None:
    """The compiled HF model equals its dense masked reference (<= 1e-5) and differs from the
    original (the routing skipped something)."""
    with torch.no_grad():
        got = compiled(**inputs).last_hidden_state
        assert (got - dense_reference(compiled)(**inputs).last_hidden_state).abs().max().item() <= 1e-5
        assert (got - model(**inputs).last_hidden_state).abs().max().item() > 1e-3
