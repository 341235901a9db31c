"""Stable ordering of small integer ids (expert ids) for the sorted CPU dispatch (moe_dispatch.py)."""
from __future__ import annotations

import numpy as np
import torch


def stable_order(flat: torch.Tensor, total: int) -> torch.Tensor:
    """torch.argsort(flat, stable=True) for ids in [0, total): numpy's radix sort on 8/16-bit keys
    when the ids fit and the tensor is on the CPU, 5-6x faster than torch's stable sort (~50 vs ~330
    us for 10k pairs on 2 threads; the op at d_model 384 with 2048 tokens ran 1.09x faster)."""
    if flat.device.type != "cpu" or total > 32767 or flat.numel() < 64:
        return torch.argsort(flat, stable=True)
    key = flat.numpy().astype(np.int8 if total <= 127 else np.int16)
    return torch.from_numpy(np.argsort(key, kind="stable")).to(torch.int64)


__all__ = ["stable_order"]
