"""Several attention passes on the same blocks (e.g. `--attention moh+sparse`).

Why it works: every attention pass only contributes parts to the one shared attention op
(routed-head gates, a per-head window pattern), so composing is merging those parts. Each
part's plan is kept under its pass's name; calibration runs in the order given (put pattern
passes first, so routers are fitted on the model with its windows already applied).
"""
from __future__ import annotations

from moh_compile.errors import MohCompileError
from moh_compile.passes.base import Pass
from moh_compile.plan import BlockPlan


class ComposedAttention(Pass):
    kind = "attention"

    def __init__(self, parts: list[Pass]):
        if len(parts) < 2 or any(p.kind != "attention" for p in parts):
            raise MohCompileError("composition needs two or more attention passes")
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def _sub_plan(self, p: Pass, bp: BlockPlan) -> BlockPlan:
        return BlockPlan(bp.name, bp.kind, p.name, bp.settings.get(p.name, {}))

    def check(self, match, config):
        return next((r for r in (p.check(match, config) for p in self.parts) if r), None)

    def plan(self, match, config) -> BlockPlan:
        return BlockPlan(match.block.name, self.kind, self.name,
                         {p.name: p.plan(match, config).settings for p in self.parts})

    def attention_parts(self, gm, match, block_plan) -> dict:
        merged: dict = {}
        for p in self.parts:
            for key, value in p.attention_parts(gm, match, self._sub_plan(p, block_plan)).items():
                if key in merged:
                    raise MohCompileError(f"passes {self.name} both set the attention op's {key}")
                merged[key] = value
        return merged

    def finalize(self, gm, rewrites, config, calibration=None) -> dict:
        sections = {}
        for p in self.parts:
            sub = [(m, self._sub_plan(p, bp), rw) for m, bp, rw in rewrites]
            sections[p.name] = p.finalize(gm, sub, config, calibration) or {}
            for (_, bp, _), (_, sbp, _) in zip(rewrites, sub):  # a pass may record fitted settings
                bp.settings[p.name] = sbp.settings
        markdown = "\n\n".join(s["markdown"] for s in sections.values() if "markdown" in s)
        files = {k: v for s in sections.values() for k, v in s.get("files", {}).items()}
        return {"parts": {k: {kk: vv for kk, vv in v.items() if kk != "files"} for k, v in sections.items()},
                "markdown": markdown, "files": files}

    def optimize(self, gm, rewrites, config, example) -> dict:
        sections = {}
        for p in self.parts:
            sub = [(m, self._sub_plan(p, bp), rw) for m, bp, rw in rewrites]
            sections[p.name] = p.optimize(gm, sub, config, example) or {}
        sections = {k: v for k, v in sections.items() if v}
        if not sections:
            return {}
        return {"parts": sections, "markdown": "\n\n".join(s["markdown"] for s in sections.values() if "markdown" in s)}


__all__ = ["ComposedAttention"]
