"""One grow-only scratch buffer per thread, shared by the CPU kernels that gather rows.

Why: gathered inputs and per-unit outputs (heads or experts) are a multiple of the size of x.
Fresh CPU allocations that large are mmap'ed by malloc and page-fault on every call, which
cost as much as the matmuls they feed; reusing one buffer removes that. A kernel takes it for
the length of one call (kernels do not nest) and must not return a view of it. Memory stays
held until `release_workspace()`.
"""
from __future__ import annotations

import threading

import torch


class Workspace(threading.local):
    def __init__(self):
        self.buf: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of `numel` elements of `dtype` on `device` (contents undefined)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.buf is None or self.buf.numel() < nbytes or self.buf.device != device:
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.buf[:nbytes].view(dtype)


WORKSPACE = Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffer (it is re-created on the next call)."""
    WORKSPACE.buf = None


__all__ = ["Workspace", "WORKSPACE", "release_workspace"]
