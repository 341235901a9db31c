"""Triton GPU kernels for the three rewritten operations (routed heads, MoE++, sparse attention).

Why lazy: triton is an optional dependency (CPU-only installs have none), so nothing here
imports it at package import time; callers ask `triton_available()` first.
"""
from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when triton is importable (GPU use additionally needs CUDA tensors)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_mode() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["triton_available", "interpreter_mode"]
