"""Registry of passes, by the block kind they rewrite. Order of application is explicit:
attention passes first, then FFN passes, block by block in graph order."""
from __future__ import annotations

from moh_compile.passes.base import Pass
from moh_compile.passes.identity import IdentityAttention, IdentityFFN
from moh_compile.passes.sparse import SparseAttention
from moh_compile.passes.moh import MoHAttention

ATTENTION_PASSES: dict[str, Pass] = {"identity": IdentityAttention()}
FFN_PASSES: dict[str, Pass] = {"identity": IdentityFFN()}


def all_passes() -> list[Pass]:
    """Every registered pass once (a pass may serve both registries)."""
    seen, out = set(), []
    for p in list(ATTENTION_PASSES.values()) + list(FFN_PASSES.values()):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def register(p: Pass) -> Pass:
    (ATTENTION_PASSES if p.kind == "attention" else FFN_PASSES)[p.name] = p
    return p


from moh_compile.passes.moepp import MoEPPPass  # noqa: E402

register(MoEPPPass())
register(SparseAttention())
register(MoHAttention())

__all__ = ["ATTENTION_PASSES", "FFN_PASSES", "Pass", "register", "all_passes"]
