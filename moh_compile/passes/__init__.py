"""Registry of passes, by the block kind they rewrite. Order of application is explicit:
attention passes first, then FFN passes, block by block in graph order."""
from __future__ import annotations

from moh_compile.passes.base import Pass
from moh_compile.passes.identity import IdentityAttention, IdentityFFN

ATTENTION_PASSES: dict[str, Pass] = {"identity": IdentityAttention()}
FFN_PASSES: dict[str, Pass] = {"identity": IdentityFFN()}


def register(p: Pass) -> Pass:
    (ATTENTION_PASSES if p.kind == "attention" else FFN_PASSES)[p.name] = p
    return p


__all__ = ["ATTENTION_PASSES", "FFN_PASSES", "Pass", "register"]
