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
    "identity": lambda t: t,
}


def apply_activation(name: str, t: torch.Tensor) -> torch.Tensor:
    try:
        return ACTIVATIONS[name](t)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


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
