"""What the user asks for (validated), kept apart from what a pass or backend supports."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moh_compile.errors import MohCompileError

ATTENTION_CHOICES = ("identity", "keep")
FFN_CHOICES = ("identity", "keep")


@dataclass
class CompileConfig:
    """attention / ffn: which pass rewrites those blocks ("keep" leaves them as they are).

    Passes register further choices (e.g. "moh", "moepp") and read their own options from
    `options` (plain data, so a config round-trips through JSON).
    """

    attention: str = "identity"
    ffn: str = "identity"
    options: dict = field(default_factory=dict)
    verify_rtol: float = 1e-4
    # compute only the output rows of projections the rewritten graph still reads (a fused QKV
    # projection's query rows are projected by the attention op): passes/narrow_projections.py
    narrow_projections: bool = True

    def validate(self, attention_choices=ATTENTION_CHOICES, ffn_choices=FFN_CHOICES) -> "CompileConfig":
        if any(part not in attention_choices for part in self.attention.split("+")) or (
                "+" in self.attention and "keep" in self.attention.split("+")):
            raise MohCompileError(f"attention must be one of {', '.join(attention_choices)} (or passes joined "
                                  f"by '+', e.g. moh+sparse), not {self.attention!r}")
        if self.ffn not in ffn_choices:
            raise MohCompileError(f"ffn must be one of {', '.join(ffn_choices)}, not {self.ffn!r}")
        if not (0 < self.verify_rtol < 1):
            raise MohCompileError("verify_rtol must be in (0, 1)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
