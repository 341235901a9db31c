"""Sentence-embedding fidelity metrics, generic over any encoder's last hidden state.

Why these: a converted encoder is judged by how close its sentence embeddings stay to the
original's (mean cosine) and whether retrieval neighbourhoods survive (top-k NN overlap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pooled_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens, then L2-normalise: (B, S, D), (B, S) -> (B, D)."""
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(attention_mask.shape)} disagree")
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two (N, D) embedding sets."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def topk_neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each item's k nearest neighbours (cosine, self excluded) shared by a and b."""
    n = a.shape[0]
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}], got {k}")

    def knn(e):
        e = F.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    na, nb = knn(a), knn(b)
    shared = (na.unsqueeze(-1) == nb.unsqueeze(-2)).any(-1).sum(-1).double()
    return float((shared / k).mean())


__all__ = ["mean_pooled_embeddings", "mean_cosine", "topk_neighbour_overlap"]
