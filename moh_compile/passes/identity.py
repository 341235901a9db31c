"""Identity passes: each block becomes the project's op computing exactly what it did.

They are the foundation every other pass reduces to at its identity setting.
"""
from __future__ import annotations

from moh_compile.passes.base import Pass
from moh_compile.rewrite import insert_ffn


class IdentityAttention(Pass):
    name, kind = "identity", "attention"


class IdentityFFN(Pass):
    name, kind = "identity", "ffn"

    def rewrite(self, gm, match, block_plan):
        return insert_ffn(gm, match)
