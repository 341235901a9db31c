"""The shape every pass has: check (can this block be transformed, and if not why),
plan (per-block settings as plain data) and rewrite (insert the new op, unwired), plus an
optional configure/calibrate step after the rewrite is verified at its identity setting, and an
optional exact layout step after every pass is calibrated."""
from __future__ import annotations

import torch.fx as fx

from moh_compile.config import CompileConfig
from moh_compile.plan import BlockPlan
from moh_compile.rewrite import PendingRewrite, insert_attention


class Pass:
    name: str = ""
    kind: str = ""  # "attention" or "ffn"

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add this pass's CLI options (an argparse group named after the pass)."""

    def options_from_args(self, args) -> dict:
        """This pass's options from parsed CLI args; stored as config.options[self.name]."""
        return {}

    def options(self, config: CompileConfig) -> dict:
        return config.options.get(self.name, {})

    def check(self, match, config: CompileConfig) -> str | None:
        """Why this block cannot be transformed, or None."""
        return None

    def plan(self, match, config: CompileConfig) -> BlockPlan:
        return BlockPlan(match.block.name, self.kind, self.name, {})

    def rewrite(self, gm: fx.GraphModule, match, block_plan: BlockPlan) -> PendingRewrite:
        if self.kind == "attention":
            return insert_attention(gm, match, **self.attention_parts(gm, match, block_plan))
        raise NotImplementedError

    def attention_parts(self, gm: fx.GraphModule, match, block_plan: BlockPlan) -> dict:
        """What an attention pass adds to the shared attention op, so passes compose (moh+sparse):
        {"gates_fn": builder, operands -> (head_gates, compensation)} and/or {"window": {...}}
        (see rewrite.insert_attention). At the identity setting both must leave the op exact."""
        return {}

    def finalize(self, gm: fx.GraphModule, rewrites: list, config: CompileConfig, calibration=None) -> dict:
        """Leave the identity setting (e.g. switch routers to top-k) and calibrate. Returns report data.

        rewrites: [(match, block_plan, pending_rewrite)] of the blocks whose identity rewrite
        was verified; calibration: a calibrate.data.Calibration or None. Report data may hold
        "markdown" (shown in report.md) and "files" ({name: bytes}, e.g. PNG plots).
        """
        return {}

    def optimize(self, gm: fx.GraphModule, rewrites: list, config: CompileConfig, example: tuple) -> dict:
        """Exact layout changes once every pass is calibrated (e.g. reorder heads so kernels batch
        them), verified on the example inputs `(args, kwargs)`. Returns report data (may be empty)."""
        return {}
