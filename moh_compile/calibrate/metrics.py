"""Fidelity metrics: how far a compiled model's outputs moved from the original's.

Why these: a compiled encoder is mostly used for retrieval or as features; the cosine between
each example's new and original embedding says how much each vector moved, and top-k
neighbour overlap says whether rankings within a set survive. Generic over any model whose
output is a tensor or an HF-style output with a last hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moh_compile.calibrate.data import call_on


def last_hidden(output) -> torch.Tensor:
    """The main tensor of a model output: a plain tensor, `.last_hidden_state`, `logits`, or the first."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("last_hidden_state", "logits"):
        if isinstance(output, dict) and key in output:
            return output[key]
        if hasattr(output, key) and isinstance(getattr(output, key), torch.Tensor):
            return getattr(output, key)
    if isinstance(output, dict) and output:
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find an output tensor in a {type(output).__name__}")


def mean_pooled_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real (unmasked) tokens, then L2-normalise: (B, S, D), (B, S) -> (B, D).

    A (B, D) input is only normalised; other ranks are flattened to (B, -1).
    """
    if hidden.dim() == 3:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype)
        if hidden.shape[:2] != attention_mask.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(attention_mask.shape)} disagree")
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        hidden = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(hidden.reshape(hidden.shape[0], -1).float(), dim=-1)


def embeddings(model, batches) -> torch.Tensor:
    """(N, D) normalised embeddings of the model's main output over batches (mean-pooled over real tokens)."""
    masks = [b.get("attention_mask") if isinstance(b, dict) else None for b in batches]
    return torch.cat([mean_pooled_embeddings(h, m) for h, m in zip(main_outputs(model, batches), masks)])


@torch.no_grad()
def main_outputs(model, batches) -> list[torch.Tensor]:
    """The model's main output tensor (`last_hidden`) for each batch."""
    return [last_hidden(call_on(model, batch)) for batch in batches]


def token_distortion(outputs: list[torch.Tensor], references: list[torch.Tensor], masks: list) -> float:
    """Mean over real tokens of 1 - cosine(output, reference) along the feature dim: how far a
    change moves the model's per-token output (masks[i]: (B, S) real tokens of batch i, or None)."""
    total, count = 0.0, 0
    for out, ref, mask in zip(outputs, references, masks):
        cos = F.cosine_similarity(out.double(), ref.double(), dim=-1)
        if mask is not None and cos.shape == mask.shape:
            cos = cos[mask]
        total, count = total + float((1.0 - cos).sum()), count + cos.numel()
    return total / max(count, 1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) sets, in float64."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(cosines(a, b).mean())


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


def fidelity(reference: torch.Tensor, converted: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean and worst cosine, and top-k neighbour overlap when there are more than k rows."""
    cos = cosines(reference, converted)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "n": int(cos.numel())}
    if reference.shape[0] > k:
        out[f"knn{k}"] = topk_neighbour_overlap(reference, converted, k)
    return out


__all__ = ["last_hidden", "mean_pooled_embeddings", "embeddings", "main_outputs", "token_distortion", "cosines", "mean_cosine", "topk_neighbour_overlap", "fidelity"]
