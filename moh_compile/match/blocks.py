"""Plain-data descriptions of what the matchers found (serialisable, shown in reports).

The fx nodes behind a match live in `*Match` objects next to these; descriptions never hold
graph references so they can be saved as JSON and compared across runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ProjectionInfo:
    weight: str | None  # parameter name
    bias: str | None
    rows: tuple[int, int] | None = None  # slice of a fused projection's output features
    fused: bool = False
    # the compiled graph's fused projection no longer computes these rows (passes/narrow_projections.py)
    narrowed: bool = False


@dataclass
class AttentionBlock:
    name: str
    layer: int | None
    core: str  # "sdpa" or "softmax(QK^T)V"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    d_out: int
    scale: float
    causal: bool | None
    has_mask: bool
    rope: bool
    layout: str  # "batch_first" or "seq_first"
    q: ProjectionInfo
    k: ProjectionInfo | None
    v: ProjectionInfo | None
    o: ProjectionInfo
    params: int = 0
    kind: str = "attention"
    cross: bool = False  # keys/values from another sequence (encoder-decoder cross-attention)
    qk_norm: bool = False  # each query head RMS-normalised before RoPE (Qwen3, Gemma 3)
    softcap: float = 0.0  # > 0: scores soft-capped to softcap * tanh(scores / softcap) (Gemma 2)
    sinks: bool = False  # a learned per-head logit in every softmax row, dropped after it (GPT-OSS)
    # why the op cannot project the queries itself, when the model's graph keeps computing them
    # (the op then skips no Q projection rows); "" when the op projects them
    query_from_graph: str = ""
    v_head_dim: int | None = None  # the values' head dim where it differs from head_dim (DeepSeek's MLA)
    output_gate: bool = False  # each head's context multiplied by a gate before W_o (Qwen3-Next)

    @property
    def attention_type(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention_type"] = self.attention_type
        return d


@dataclass
class FFNBlock:
    name: str
    layer: int | None
    activation: str
    gated: bool
    fused_gate_up: bool
    d_model: int
    d_hidden: int
    d_out: int
    fc_in: ProjectionInfo
    fc_out: ProjectionInfo
    gate: ProjectionInfo | None = None
    params: int = 0
    kind: str = "ffn"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skipped:
    """A place that looked like a block but was left alone, and why."""

    name: str
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MatchResult:
    attention: list = field(default_factory=list)  # AttentionMatch
    ffn: list = field(default_factory=list)  # FFNMatch
    skipped: list[Skipped] = field(default_factory=list)
