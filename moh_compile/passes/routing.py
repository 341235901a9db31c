"""What every router module shares, so fine-tuning and reports treat them alike.

A router decides, per token, which heads or experts run. During distillation it also exposes
its load-balance loss (`last_load_balance_loss`, computed when training or when
`track_load_balance` is set), which the fine-tune loop adds with weight beta.
"""
from __future__ import annotations

from torch import nn


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.track_load_balance = False
        self.last_load_balance_loss = None

    @property
    def wants_load_balance(self) -> bool:
        return self.training or self.track_load_balance


def find_routers(module: nn.Module) -> list[Router]:
    """All router submodules, in module order."""
    return [m for m in module.modules() if isinstance(m, Router)]


__all__ = ["Router", "find_routers"]
