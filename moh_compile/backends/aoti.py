"""AOTInductor packages of a compiled model that load without moh-compile's Python code.

How the project's ops get into the package: they are NOT kept as custom ops (a package
calling `moh_compile::attention` would need this library's Python registration at load
time). Before packaging, every op call is decomposed into aten ops with the same torch
functions as the portable ONNX form (onnx_portable / onnx_moepp, through
onnx_registry.portable_decompositions), including the capacity plan of routed call sites.
Why these and not the dense references: they are the aten-level statement of the ops that
skips work (capacity dispatch: TopK, gathers, batched matmuls, scatter-add), they already
keep batch/sequence symbolic, and one capacity semantics then covers ONNX and AOTI
(capacity="exact" reproduces the PyTorch model). The Triton GPU kernels are Python-level
fast paths of the ops and are not inside the package (see docs/deploy.md).
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch

from moh_compile.backends.dispatch_plan import DEFAULT_CAPACITY
from moh_compile.backends.onnx_export import attach_capacity_plans
from moh_compile.backends.onnx_registry import portable_decompositions

# Faster C++ build of the generated wrapper (the kernels keep inductor's defaults).
DEFAULT_INDUCTOR_CONFIGS = {"aot_inductor.compile_wrapper_opt_level": "O0"}


def aoti_capacity(capacity: str | float) -> str | float:
    """Inductor cannot lower the run-time ("dynamic") capacities: it guards on the data-dependent
    size (`Eq(u0, 1)`). Packages then use static exact dispatch (C = S: exact, no work saved); a
    capacity factor skips work (and may drop tokens) as in the portable ONNX form."""
    return "exact" if capacity == "dynamic" else capacity


def decompose_project_ops(ep: torch.export.ExportedProgram, args: tuple = (), kwargs: dict | None = None,
                          capacity: str | float = DEFAULT_CAPACITY) -> torch.export.ExportedProgram:
    """A copy of `ep` with every moh_compile op replaced by aten ops (capacity plans attached)."""
    capacity = aoti_capacity(capacity)
    ep = copy.deepcopy(ep)
    attach_capacity_plans(ep, args, kwargs or {}, capacity, None)
    out = ep.run_decompositions(portable_decompositions())
    left = sorted({str(n.target) for n in out.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("moh_compile")})
    if left:
        raise RuntimeError(f"project ops left after decomposition: {left}")
    return out


def package_aoti(ep: torch.export.ExportedProgram, path: str | os.PathLike, args: tuple = (),
                 kwargs: dict | None = None, capacity: str | float = DEFAULT_CAPACITY,
                 inductor_configs: dict | None = None) -> str:
    """Compile `ep` with AOTInductor into a .pt2 package at `path` (written atomically)."""
    program = decompose_project_ops(ep, args, kwargs, capacity)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt2", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={**DEFAULT_INDUCTOR_CONFIGS, **(inductor_configs or {})})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
