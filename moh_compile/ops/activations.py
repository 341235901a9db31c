"""The activations the FFN ops know by name (matched numerically in graphs, see match/ffn.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu2": lambda t: torch.square(F.relu(t)),  # squared ReLU (Primer; Persimmon, Nemotron)
    "identity": lambda t: t,
}


def apply_activation(name: str, t: torch.Tensor) -> torch.Tensor:
    try:
        return ACTIVATIONS[name](t)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# In-place forms, bit-identical to ACTIVATIONS, for kernels that own their buffer: a large
# fresh activation output is page-faulted in on every call.
_INPLACE = {
    "relu": torch.relu_,
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
    "silu": lambda t: F.silu(t, inplace=True),
    "quick_gelu": lambda t: t.mul_(torch.sigmoid(1.702 * t)),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "relu2": lambda t: torch.relu_(t).square_(),
    "identity": lambda t: t,
}


def apply_activation_(name: str, t: torch.Tensor) -> torch.Tensor:
    """`apply_activation` written into `t` (no autograd: for inference kernels' scratch buffers)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return _INPLACE[name](t)


def identify_activation(fn, atol: float = 1e-5) -> str | None:
    """Name the known activation that `fn` computes, by evaluating both on a probe grid."""
    probe = torch.linspace(-6.0, 6.0, 997, dtype=torch.float64).to(torch.float32)
    with torch.no_grad():
        got = fn(probe)
        if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
            return None
        for name, ref in ACTIVATIONS.items():
            if name == "identity":
                continue
            if torch.allclose(got, ref(probe), atol=atol, rtol=1e-4):
                return name
    return None


__all__ = ["ACTIVATIONS", "apply_activation", "identify_activation"]
