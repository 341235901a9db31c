"""Closed-form ridge regression, the workhorse of training-free router fitting.

Why one shared solver: routers and compensations of every pass are linear maps fitted on
recorded activations; one float64 solve with a scale-free penalty keeps them comparable.
"""
from __future__ import annotations

import torch


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """y ~ x @ W + b with intercept; returns W (in, out) and b (out,) in float32.

    lam is relative to the mean diagonal of the centred Gram matrix, so it does not depend on
    the scale of x or the number of rows.
    """
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc = x64 - mx
    gram = xc.T @ xc
    reg = lam * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y64 - my))
    return w.float(), (my - mx @ w).float()


__all__ = ["ridge"]
