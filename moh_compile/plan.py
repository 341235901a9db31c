"""The plan: per block, what will be done. Plain data a user can read, edit and re-apply."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class BlockPlan:
    name: str
    kind: str  # "attention" | "ffn"
    transform: str  # pass name, or "keep"
    settings: dict = field(default_factory=dict)


@dataclass
class Plan:
    blocks: list[BlockPlan] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        return cls(blocks=[BlockPlan(**b) for b in data.get("blocks", [])], config=data.get("config", {}),
                   version=data.get("version", 1))

    def for_block(self, name: str, kind: str) -> BlockPlan | None:
        return next((b for b in self.blocks if b.name == name and b.kind == kind), None)
