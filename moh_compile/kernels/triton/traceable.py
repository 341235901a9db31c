"""Launch Triton kernels so that the same code runs eagerly and traces under torch.compile/export.

Why a switch: torch.library.wrap_triton is what lets compilers see a kernel launch (they then
compile the kernel into their own output), but its eager path dispatches a higher-order op per
launch, measured at ~1 ms of host time per MoE++ call on H100 (stream timing 1.26 -> 2.45 ms at
25% work; GPU time unchanged). So: wrap only while tracing. Triton's CPU interpreter cannot be
traced at all; there the plain kernel runs.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import wrap_triton

_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL"))


def is_tracing(probe: torch.Tensor) -> bool:
    """True under torch.compile, a fake/proxy/functional dispatch mode, or when `probe` is fake."""
    return (torch.compiler.is_compiling() or isinstance(probe, FakeTensor) or torch._is_functional_tensor(probe)
            or any(torch._C._get_dispatch_mode(k) is not None for k in _TRACING_MODES))


def launcher(kernel, probe: torch.Tensor):
    """`kernel` itself in eager mode, wrap_triton(kernel) while tracing (see module docstring)."""
    return wrap_triton(kernel) if is_tracing(probe) else kernel
