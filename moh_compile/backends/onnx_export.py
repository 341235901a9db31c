"""Lower a module that calls the project's ops to ONNX, in the custom or the portable form.

Both forms start from one torch.export ExportedProgram (dynamic batch/sequence dims kept):
- "custom": the stock dynamo exporter with a custom_translation_table, one custom-domain node
  per op call (needs a runtime with kernels: ort_runtime.make_session, a TensorRT plugin).
- "portable": the ops are decomposed into their portable torch functions first
  (run_decompositions), so the exporter emits standard ONNX ops only (any runtime).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings

import onnx
import onnxscript.optimizer
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moh_compile.backends.onnx_custom import DOMAIN
from moh_compile.backends.dispatch_plan import CAPACITY_MODES, DEFAULT_CAPACITY, check_capacity, plan_dispatch
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
    capacity: str | float = DEFAULT_CAPACITY,
    active_fraction: float | None = None,
) -> onnx.ModelProto:
    """Export `module(*example_inputs)` to `path` (written atomically) and return the checked model.

    Portable form only: `capacity` is the capacity factor of routed dispatch, or "exact"
    (C = S, reproduces exact routing); `active_fraction` overrides the measured mean fraction
    of active (token, routed head/expert) pairs per call site.
    """
    if not isinstance(example_inputs, tuple):
        raise ValueError("example_inputs must be a tuple of positional inputs")
    check_settings(form, opset, capacity)
    ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    return export_program(ep, path, form, example_inputs, {}, opset, capacity, active_fraction)


def check_settings(form: str, opset: int = DEFAULT_OPSET, capacity: str | float = DEFAULT_CAPACITY) -> None:
    """Reject bad export settings before any work (ValueError; the CLI turns it into one line)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if opset < 18:
        raise ValueError(f"opset must be >= 18 for the dynamo exporter, got {opset}")
    check_capacity(capacity)


def parse_capacity(text: str) -> str | float:
    """CLI spelling of a capacity: "dynamic", "exact" or a positive float such as 1.25."""
    if text in CAPACITY_MODES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"capacity must be 'dynamic', 'exact' or a positive number such as 1.25, got {text!r}")
    return value


def export_program(
    ep: torch.export.ExportedProgram,
    path: str | os.PathLike,
    form: str,
    args: tuple = (),
    kwargs: dict | None = None,
    opset: int = DEFAULT_OPSET,
    capacity: str | float = DEFAULT_CAPACITY,
    active_fraction: float | None = None,
    samples: tuple | list = (),
) -> onnx.ModelProto:
    """Lower an ExportedProgram (dynamic dims kept) to one ONNX form; `ep` is not modified.

    `args`/`kwargs` are sample inputs: the portable form runs them, and the extra `samples`
    ((args, kwargs) pairs, e.g. calibration batches), once each to plan each routed call site's
    dispatch. The model is checked (onnx.checker, strict shape inference), tagged with its form
    and capacity in metadata_props, and written atomically.
    """
    check_settings(form, opset, capacity)
    if form == "custom":
        with quiet_exporter():
            program = torch.onnx.export(ep, dynamo=True, opset_version=opset, optimize=False, verbose=False,
                                        custom_translation_table=custom_translation_table())
    else:
        with quiet_exporter():
            ep = copy.deepcopy(ep)
        attach_capacity_plans(ep, args, kwargs or {}, capacity, active_fraction, samples)
        with quiet_exporter():
            program = torch.onnx.export(ep.run_decompositions(portable_decompositions()), dynamo=True,
                                        opset_version=opset, optimize=False, verbose=False)
    # Constant folding and dead-code removal only: the exporter's optimize=True also applies
    # opset-23 fusions, and its fused RotaryEmbedding fails in ORT 1.31 once the batch differs
    # from the example's ("cos_cache ... expected to have the same shape as input").
    program.model = onnxscript.optimizer.optimize(program.model)
    model = program.model_proto
    if model.functions:
        raise RuntimeError("export produced ONNX local functions; TensorRT and this backend expect none")
    if form == "portable" and any(n.domain == DOMAIN for n in model.graph.node):
        raise RuntimeError("portable export still contains moh_compile nodes")
    onnx.helper.set_model_props(model, {"moh_compile.form": form, "moh_compile.capacity": str(capacity)})
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    save_atomic(model, path)
    return model


REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
_EXPORTER_NOISE = ("torchvision is not installed",)


class _DropExporterNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPORTER_NOISE)


@contextlib.contextmanager
def quiet_exporter():
    """Silence two messages torch's ONNX exporter prints on every export that concern neither
    the user nor the model: one warning per torchvision op when torchvision is absent (it is not
    a dependency), and a FutureWarning from torch's own pytree copying (also
    raised by deep-copying an ExportedProgram). Everything else it logs
    or warns still shows."""
    logger = logging.getLogger(REGISTRATION_LOGGER)
    noise = _DropExporterNoise()
    logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(noise)


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


def attach_capacity_plans(ep, args: tuple, kwargs: dict, capacity, active_fraction, samples=()) -> int:
    """Point each routed op node at its lowering's capacity op with the site's plan; returns count.

    The plan is made from each site's unit usage averaged (per token) over the sample inputs and
    the extra `samples` ((args, kwargs) pairs, e.g. calibration batches): usage seen on a few
    example tokens is a noisy guide to which units deserve the dense path and how to group them.
    """
    routed = {lw.torch_op: lw for lw in LOWERINGS.values() if lw.capacity_op is not None}
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function" and n.target in routed]
    if not nodes:
        return 0
    totals: list = [None] * len(nodes)
    module = ep.module()
    for s_args, s_kwargs in ((args, kwargs), *samples):
        recorder = _RecordCalls(routed)
        with torch.no_grad(), recorder:
            module(*s_args, **s_kwargs)
        if [n.target for n in nodes] != [f for f, _ in recorder.calls]:
            raise RuntimeError(f"graph has {len(nodes)} routed op nodes but {len(recorder.calls)} calls were observed")
        for i, (op, observed) in enumerate(recorder.calls):
            seen = routed[op].unit_usage(observed)
            if seen is not None:
                usage, tokens = seen
                prev = totals[i] or (0.0, 0)
                totals[i] = (prev[0] + usage.double() * tokens, prev[1] + tokens)
    changed = 0
    for node, total in zip(nodes, totals):
        if total is None:
            continue
        plan = plan_dispatch((total[0] / max(1, total[1])).tolist(), capacity, active_fraction)
        bound = bind_op_args(node.target, node.args, node.kwargs)
        node.target = routed[node.target].capacity_op
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
