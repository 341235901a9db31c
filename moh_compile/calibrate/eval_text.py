"""Sentence-embedding fidelity metrics for judging a converted text encoder against the original.

Why these: a compiled encoder is used for retrieval; the cosine between each sentence's new and
original embedding says how much each vector moved, and top-k neighbour overlap says whether
retrieval results (rankings within a set) survive.
"""
from __future__ import annotations

from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def load_sentences(name: str) -> list[str]:
    """Sentences of a bundled file ('calib' or 'eval') or any text path, one per line."""
    path = DATA_DIR / f"{name}_sentences.txt" if name in ("calib", "eval") else Path(name)
    if not path.exists():
        raise ValueError(f"no sentence file {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens, L2-normalised (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def last_hidden(output) -> torch.Tensor:
    """The last hidden state of a plain tensor output or an HF-style output object/tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find a hidden-state tensor in a {type(output).__name__}")


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """(N, E) normalised mean-pooled embeddings."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(mean_pool(last_hidden(model(**enc)), enc["attention_mask"]))
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine between matching rows."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def knn_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean |top-k neighbours in a  ∩  top-k neighbours in b| / k within the set (self excluded)."""
    if a.shape[0] <= k:
        raise ValueError(f"need more than k={k} rows, got {a.shape[0]}")

    def topk(e):
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    ia, ib = topk(a), topk(b)
    hits = (ia.unsqueeze(-1) == ib.unsqueeze(-2)).any(-1).sum(-1).float()
    return (hits / k).mean().item()


def fidelity(reference: torch.Tensor, converted: torch.Tensor, k: int = 10) -> dict[str, float]:
    """The two metrics side by side, plus the worst sentence's cosine."""
    cos = torch.nn.functional.cosine_similarity(reference, converted, dim=-1)
    return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(),
            f"knn{k}": knn_overlap(reference, converted, k)}
