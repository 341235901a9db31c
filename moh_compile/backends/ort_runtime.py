"""Run exported models in ONNX Runtime; the custom form gets its kernels from Python.

Why onnxruntime-extensions: ORT's wheel ships no C headers (no native custom-op library can
be built here) and plain ORT refuses unknown nodes. onnxruntime-extensions' PyOp calls a
Python function per node, which calls the same torch op as PyTorch (numbers agree).

Limits of PyOp shape how a session is made: fixed input lists (no optional inputs), scalar
attributes only, and ops must all be registered before the first session. So a fixed set of
variant op types (per float/mask dtype) is registered once, and `make_session` works on an
in-memory copy: each custom node points at its variant, absent optional inputs get an empty
placeholder, and its attributes (plus which inputs are present) are packed into one JSON
string attribute `moh_plan`. The file on disk is untouched.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from moh_compile.backends.onnx_custom import DOMAIN, custom_nodes
from moh_compile.backends.onnx_registry import LOWERINGS

PLAN_ATTR = "moh_plan"
_VARIANTS: dict[str, object] = {}  # variant op_type -> registered onnx_op (process-wide, registered once)


class OnnxMismatchError(AssertionError):
    """ONNX output differs from the PyTorch module by more than the tolerance."""


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise ImportError("the custom ONNX form needs onnxruntime-extensions "
                          "(pip install 'moh-compile[extensions]')") from None
    return onnxruntime_extensions


def _pyop_dtype(ext, elem_type: int) -> int:
    table = {onnx.TensorProto.FLOAT: "dt_float", onnx.TensorProto.BOOL: "dt_bool",
             onnx.TensorProto.FLOAT16: "dt_float16", onnx.TensorProto.DOUBLE: "dt_double",
             onnx.TensorProto.INT64: "dt_int64"}
    if elem_type not in table:
        raise ValueError(f"custom-form ORT kernels support float32/float16/float64/bool/int64, got elem_type {elem_type}")
    return getattr(ext.PyCustomOpDef, table[elem_type])


@functools.lru_cache(maxsize=256)
def _decode_plan(text: str) -> dict:
    return json.loads(text)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


_KERNEL_DTYPES = {"float": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                  "double": onnx.TensorProto.DOUBLE}


def _variant_name(op_type: str, t: int, m: int) -> str:
    return f"{op_type}_{onnx.helper.tensor_dtype_to_np_dtype(t).name}_{onnx.helper.tensor_dtype_to_np_dtype(m).name}"


def _register_all_variants(ext) -> None:
    """Register one PyOp per (op type, float dtype T, mask dtype) before any session exists.

    onnxruntime-extensions keeps PyOps in a process-wide list that sessions point into;
    adding ops after a session was created crashed ORT (segfault) here, so the set is fixed
    once, up front, and every input is always present (absent ones get an empty placeholder).
    """
    if _VARIANTS:
        return
    for op_type, lowering in LOWERINGS.items():
        for t in _KERNEL_DTYPES.values():
            for m in sorted({t, onnx.TensorProto.BOOL}):
                variant = _variant_name(op_type, t, m)
                types = [m if p.type_var == "M" else onnx.TensorProto.INT64 if p.type_var == "I" else t
                         for p in lowering.ports]
                _VARIANTS[variant] = ext.onnx_op(
                    op_type=f"{DOMAIN}::{variant}", inputs=[_pyop_dtype(ext, x) for x in types],
                    outputs=[_pyop_dtype(ext, t)], attrs={PLAN_ATTR: ext.PyCustomOpDef.dt_string},
                )(_kernel_body(lowering))
    _install_array_hook({opdef._id for opdef in _VARIANTS.values()})


def _install_array_hook(ours: set[int]) -> None:
    """Hand our ops' outputs to ORT as arrays, not Python lists.

    onnxruntime-extensions' Python hook returns every output as `flatten().tolist()`, which
    its C++ side turns back into an array: about 0.1 s per 1.5M floats, more than the kernels
    themselves (the custom form ran at 0.28x of dense ONNX on MiniLM, 0.88x without it). That
    C++ side accepts any array (it memcpy's a contiguous one), so for our own op ids the hook
    returns the array itself; every other PyOp keeps the library's hook.
    """
    from onnxruntime_extensions import _ocos

    library_hook = getattr(_ocos, "_on_pyop_invocation", None)
    if library_hook is None or not hasattr(_ocos.Opdef, "_odlist"):
        return                                        # another layout of the library: keep its hook
    _ocos.PyCustomOpDef.install_hooker(array_hook(ours, library_hook, _ocos.Opdef._odlist))


def array_hook(ours: set[int], library_hook, opdefs: dict):
    """The PyOp invocation hook: (op id, inputs, attributes) -> (op id, shape, flat output)."""
    def hook(k_id, feed, attributes):
        if k_id not in ours:
            return library_hook(k_id, feed, attributes)
        op = opdefs[k_id]
        out = op.body(*feed, **op.cast_attributes(attributes))
        return k_id, out.shape, np.ascontiguousarray(out).reshape(-1)

    return hook


def _kernel_body(lowering):
    names = [p.name for p in lowering.ports]

    def body(*arrays, **attrs):
        plan = _decode_plan(attrs[PLAN_ATTR])
        present = set(plan["present"])
        # the arrays are fresh copies made for this call, so torch may use them in place
        inputs = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays) if n in present}
        with torch.no_grad():
            y = lowering.ort_kernel(inputs, plan)
        return y.numpy()

    return body


def prepare_custom_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` whose custom nodes are rewritten for PyOp (see module docstring)."""
    ext = _extensions()
    _register_all_variants(ext)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = _value_types(model)
    placeholders: dict[int, str] = {}
    for node in custom_nodes(model):
        if node.op_type not in LOWERINGS:
            raise ValueError(f"no ONNX lowering registered for {DOMAIN}::{node.op_type}")
        ports = LOWERINGS[node.op_type].ports
        given = list(node.input) + [""] * (len(ports) - len(node.input))
        t = types.get(given[0], onnx.TensorProto.FLOAT)
        mask_port = next((i for i, p in enumerate(ports) if p.type_var == "M"), None)
        m = types.get(given[mask_port], onnx.TensorProto.BOOL) if mask_port is not None and given[mask_port] else \
            onnx.TensorProto.BOOL
        if t not in _KERNEL_DTYPES.values():
            raise ValueError(f"custom-form ORT kernels support float32/float16/float64 tensors, got elem_type {t}")
        inputs = []
        for port, name in zip(ports, given):
            if not name:
                dtype = m if port.type_var == "M" else onnx.TensorProto.INT64 if port.type_var == "I" else t
                if dtype not in placeholders:
                    placeholders[dtype] = f"moh_absent_{dtype}"
                    model.graph.initializer.append(
                        helper.make_tensor(placeholders[dtype], dtype, [0], []))
                name = placeholders[dtype]
            inputs.append(name)
        plan = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
        plan["present"] = [p.name for p, n in zip(ports, given) if n]
        variant = _variant_name(node.op_type, t, m)
        if variant not in _VARIANTS:
            raise ValueError(f"{node.op_type} was registered after the first custom-form session; "
                             "register lowerings before making sessions")
        node.op_type = variant
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.append(helper.make_attribute(PLAN_ATTR, json.dumps(plan, sort_keys=True)))
    return model


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def make_session(path: str | os.PathLike, form: str = "custom", intra_op_threads: int | None = None,
                 spinning: bool = True, profile_prefix: str | None = None) -> ort.InferenceSession:
    """ORT CPU session; for the custom form, with the moh_compile kernels registered.

    spinning=False stops idle pool threads from busy-waiting after a run: needed when several
    sessions take turns on the same cores (benchmarks), where spinning pools of the others
    slowed every session by up to 40% here. profile_prefix turns on ORT's profiler (the trace
    file's path prefix; `session.end_profiling()` writes it), e.g. for benchmarks/profile_onnx.py."""
    if form not in ("custom", "portable"):
        raise ValueError(f"form must be 'custom' or 'portable', got {form!r}")
    so = ort.SessionOptions()
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    model = onnx.load(os.fspath(path))
    has_custom = bool(custom_nodes(model))
    if form == "portable":
        if has_custom:
            raise ValueError(f"{path} has {DOMAIN} nodes; open it with form='custom'")
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    prepared = prepare_custom_model(model)
    so.register_custom_ops_library(_extensions().get_library_path())
    return ort.InferenceSession(prepared.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def run_session(session: ort.InferenceSession, inputs) -> list[np.ndarray]:
    """Feed inputs in any form `capture.normalize_inputs` accepts: positional tensors (graph input
    order), a {name: value} dict, or an (args, kwargs) pair. Non-tensor values (flags such as
    use_cache=False) were constants at export and are dropped; keyword tensors go to the graph
    input of the same name, the rest fill the remaining inputs in order."""
    from moh_compile.capture import normalize_inputs

    names = [i.name for i in session.get_inputs()]
    args, kwargs = normalize_inputs(inputs)
    feed = {k: _numpy(v) for k, v in kwargs.items() if isinstance(v, (torch.Tensor, np.ndarray)) and k in names}
    rest = [v for v in torch.utils._pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k not in feed}))
            if isinstance(v, (torch.Tensor, np.ndarray))]
    free = [n for n in names if n not in feed]
    if len(rest) != len(free):
        raise ValueError(f"model takes {len(names)} inputs {names}, got {len(feed) + len(rest)} tensors")
    feed.update(zip(free, map(_numpy, rest)))
    return session.run(None, feed)


def detect_form(path: str | os.PathLike) -> str:
    return "custom" if custom_nodes(onnx.load(os.fspath(path), load_external_data=False)) else "portable"


def run_onnx(path: str | os.PathLike, inputs, form: str | None = None) -> list[np.ndarray]:
    """Run an exported model once (form detected from its nodes when not given)."""
    return run_session(make_session(path, form or detect_form(path)), inputs)


def max_difference(expected, got: list[np.ndarray]) -> float:
    """Max |a - b| over the leaves of a PyTorch output (None leaves dropped) and ORT's outputs."""
    expected = [_numpy(t) for t in torch.utils._pytree.tree_leaves(expected) if t is not None]
    if len(got) != len(expected):
        raise OnnxMismatchError(f"ONNX gave {len(got)} outputs, PyTorch {len(expected)}")
    diff = 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise OnnxMismatchError(f"output shape {g.shape} != PyTorch {e.shape}")
        if e.size:
            d = float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64))))
            if d != d:  # NaN: Python's max() would drop it
                return d
            diff = max(diff, d)
    return diff


def verify_onnx(module: torch.nn.Module, inputs, path: str | os.PathLike, atol: float = 1e-4,
                form: str | None = None) -> float:
    """Max |ONNX - PyTorch| over all outputs; raises OnnxMismatchError above atol (NaN included).

    `inputs`: positional tuple, keyword dict or (args, kwargs), fed alike to both."""
    from moh_compile.capture import normalize_inputs

    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        expected = module(*args, **kwargs)
    diff = max_difference(expected, run_onnx(path, (args, kwargs), form))
    if not diff <= atol:
        raise OnnxMismatchError(f"ONNX output differs from PyTorch by {diff:.3g} > atol {atol:g}")
    return diff
