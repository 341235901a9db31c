"""Lower a module that calls the project's ops to ONNX, in the custom or the portable form.

Both forms start from one torch.export ExportedProgram (dynamic batch/sequence dims kept):
- "custom": the stock dynamo exporter with a custom_translation_table, one custom-domain node
  per op call (needs a runtime with kernels: ort_runtime.make_session, a TensorRT plugin).
- "portable": the ops are decomposed into their portable torch functions first
  (run_decompositions), so the exporter emits standard ONNX ops only (any runtime).
"""
from __future__ import annotations

import os
import tempfile

import onnx
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moh_compile.backends.onnx_custom import DOMAIN
from moh_compile.backends.onnx_registry import (
    LOWERINGS, bind_op_args, custom_translation_table, portable_decompositions,
)

FORMS = ("custom", "portable")
DEFAULT_OPSET = 23  # opset 23: SDPA exports as the standard Attention op, which ORT >= 1.23 runs


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    form: str = "custom",
    dynamic_shapes=None,
    opset: int = DEFAULT_OPSET,
    capacity: str | float = 1.25,
    active_fraction: float | None = None,
) -> onnx.ModelProto:
    """Export `module(*example_inputs)` to `path` (written atomically) and return the checked model.

    Portable form only: `capacity` is the capacity factor of routed-head dispatch, or "exact"
    (C = S, reproduces exact routing); `active_fraction` overrides the measured mean fraction
    of active (token, routed head) pairs per call site.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not isinstance(example_inputs, tuple):
        raise ValueError("example_inputs must be a tuple of positional inputs")
    if opset < 18:
        raise ValueError(f"opset must be >= 18 for the dynamo exporter, got {opset}")
    ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    if form == "custom":
        program = torch.onnx.export(ep, dynamo=True, opset_version=opset, optimize=True,
                                    custom_translation_table=custom_translation_table())
    else:
        attach_capacity_plans(ep, example_inputs, capacity, active_fraction)
        program = torch.onnx.export(ep.run_decompositions(portable_decompositions()), dynamo=True, opset_version=opset, optimize=True)
    model = program.model_proto
    if model.functions:
        raise RuntimeError("export produced ONNX local functions; TensorRT and this backend expect none")
    if form == "portable" and any(n.domain == DOMAIN for n in model.graph.node):
        raise RuntimeError("portable export still contains moh_compile nodes")
    onnx.checker.check_model(model)
    save_atomic(model, path)
    return model


class _RecordCalls(TorchDispatchMode):
    """Collects the arguments of every call to the given ops, in call order."""

    def __init__(self, ops):
        super().__init__()
        self.ops = set(ops)
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            self.calls.append((func, bind_op_args(func, args, kwargs)))
        return func(*args, **kwargs)


def attach_capacity_plans(ep, example_inputs: tuple, capacity, active_fraction) -> int:
    """Point each routed op node at its lowering's capacity op with the site's plan; returns count."""
    routed = {lw.torch_op: lw for lw in LOWERINGS.values() if lw.capacity_op is not None}
    recorder = _RecordCalls(routed)
    with torch.no_grad(), recorder:
        ep.module()(*example_inputs)
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function" and n.target in routed]
    if [n.target for n in nodes] != [f for f, _ in recorder.calls]:
        raise RuntimeError(f"graph has {len(nodes)} routed op nodes but {len(recorder.calls)} calls were observed")
    changed = 0
    for node, (op, observed) in zip(nodes, recorder.calls):
        lowering = routed[op]
        plan = lowering.capacity_plan(observed, capacity, active_fraction)
        if plan is None:
            continue
        bound = bind_op_args(op, node.args, node.kwargs)
        node.target = lowering.capacity_op
        node.args, node.kwargs = tuple(bound.values()) + tuple(plan), {}
        changed += 1
    ep.graph_module.recompile()
    return changed


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write to a temp file in the target directory, then os.replace (readers never see half a file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
