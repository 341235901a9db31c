"""Candidate sparse patterns and cheap statistics to rank them per head at calibration time.

Why the attention-mass proxy: the output error of dropping keys is bounded by the softmax
mass they carried, so the mass a pattern drops (per head, averaged over queries) ranks
candidates without re-running the model for every (head, pattern) pair.
A pattern is (sink, alpha, beta): span = alpha + beta * N keys (see moh_compile.ops.attention);
alpha < 0 means dense.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moh_compile.ops.attention import as_4d, window_mask, window_spans

DENSE = (-1, 0.0)


def candidate_grid(lengths: Sequence[int], alphas: Sequence[int] | None = None,
                   betas: Sequence[float] = (0.0, 0.125, 0.25, 0.5), include_dense: bool = True
                   ) -> list[tuple[int, float]]:
    """(alpha, beta) pairs whose span differs from every other pair at some calibration length.

    Default alphas: multiples of 64 (64, 128, 256, ...) below the longest length; for short
    sequences (< 256 tokens) also N/8 and N/4 of the shortest, so there is something to choose.
    Pairs whose span reaches N at every length (dense in effect) are dropped; DENSE is added last.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths}")
    if any(b < 0 for b in betas):
        raise ValueError(f"betas must be >= 0, got {list(betas)}")
    n_max, n_min = max(lengths), min(lengths)
    if alphas is None:
        alphas = [0]
        a = 64
        while a < n_max:
            alphas.append(a)
            a *= 2
        if n_min < 256:
            alphas += [max(1, n_min // 8), max(1, n_min // 4)]
    if any(a < 0 for a in alphas):
        raise ValueError(f"alphas must be >= 0 (use include_dense for a dense head), got {list(alphas)}")
    out, seen = [], set()
    for a in sorted(set(int(a) for a in alphas)):
        for b in sorted(set(float(b) for b in betas)):
            spans = tuple(window_spans([a], [b], n)[0] for n in lengths)
            if a == 0 and b == 0:
                continue  # span 1 everywhere: only the diagonal, never useful
            if all(s >= n for s, n in zip(spans, lengths)) or spans in seen:
                continue
            seen.add(spans)
            out.append((a, b))
    if include_dense:
        out.append(DENSE)
    return out


def pattern_density(s: int, sink: int, alpha: int, beta: float, two_sided: bool, causal: bool) -> float:
    """Visible (query, key) pairs of the pattern over the dense count (S(S+1)/2 causal, S^2 not)."""
    if s < 1:
        raise ValueError(f"sequence length must be >= 1, got {s}")
    if alpha < 0:
        return 1.0
    span = window_spans([alpha], [beta], s)[0]
    i = np.arange(s)
    allowed_hi = i + 1 if causal else np.full(s, s)        # keys [0, allowed_hi) allowed by the model
    if two_sided:
        r = span // 2
        lo, hi = np.maximum(0, i - r), np.minimum(s, i + r + 1)
    else:
        lo, hi = np.maximum(0, i - span + 1), i + 1
    hi = np.minimum(hi, allowed_hi)
    sink_part = np.minimum(sink, allowed_hi)
    band_part = np.maximum(0, hi - np.maximum(lo, sink))
    rows = np.where(i < sink, allowed_hi, sink_part + band_part)
    dense = s * (s + 1) / 2 if causal else s * s
    return float(rows.sum() / dense)


def attention_mass_outside(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                           sink, alpha, beta, two_sided: bool, chunk: int = 256) -> torch.Tensor:
    """(H,) fraction of each head's softmax mass that falls outside its pattern, mean over queries.

    q (B,H,S,D), k (B,Hkv,S_k,D); sink/alpha/beta are scalars (same pattern for all heads) or
    per-head lists. Queries are processed in chunks so memory stays at chunk x S_k per head.
    """
    return mass_outside_candidates(q, k, mask, scale, [(sink, alpha, beta)], two_sided, chunk)[0]


def _pattern_bounds(s_q: int, s_k: int, sink, alpha, beta, two_sided: bool, device):
    """Per head and query row (H, S_q): the local band [lo, hi) of keys, the sink keys below it
    [0, cut), and whether the row is a global (sink) row. Same semantics as window_mask."""
    spans = torch.tensor(window_spans(alpha, beta, s_k), device=device).view(-1, 1)
    sinks = torch.tensor(sink, device=device).view(-1, 1)
    i = torch.arange(s_q, device=device).view(1, -1)
    if two_sided:
        lo, hi = i - spans // 2, i + spans // 2 + 1
    else:
        lo, hi = i - spans + 1, i + 1
    dense = spans < 0
    lo = torch.where(dense, 0, lo).clamp(0, s_k)
    hi = torch.where(dense, s_k, hi).clamp(0, s_k)
    hi = torch.maximum(hi, lo)
    cut = torch.minimum(sinks.clamp(max=s_k), lo)
    return lo, hi, cut, (i < sinks).expand(lo.shape)


def mass_outside_candidates(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                            patterns: Sequence[tuple], two_sided: bool, chunk: int = 256) -> torch.Tensor:
    """(C, H) attention mass outside each of C patterns (sink, alpha, beta), softmax computed once.

    Each pattern's fields are scalars or per-head lists. Why cumulative sums: a pattern is a
    contiguous band plus a prefix of sink keys per row, so the mass it keeps is three lookups
    in the row's cumulative probabilities, O(S) per pattern instead of O(S x S_k).
    """
    b, h, s_q, _ = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({h_kv})")
    if not patterns:
        raise ValueError("patterns must not be empty")

    def per_head(x, name):
        x = list(x) if isinstance(x, (list, tuple)) else [x] * h
        if len(x) != h:
            raise ValueError(f"{name} needs one value per head ({h}), got {len(x)}")
        return x

    bounds = [_pattern_bounds(s_q, s_k, per_head(sk, "sink"), per_head(a, "alpha"), per_head(bt, "beta"),
                              two_sided, q.device) for sk, a, bt in patterns]
    k = k.repeat_interleave(h // h_kv, dim=1)
    if mask is not None:
        mask = as_4d(mask)
    total = torch.zeros(len(bounds), h, dtype=torch.float64)
    count = torch.zeros(h, dtype=torch.float64)
    for q0 in range(0, s_q, chunk):
        q1 = min(s_q, q0 + chunk)
        logits = torch.matmul(q[:, :, q0:q1].float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            m = mask[:, :, q0:q1] if mask.shape[2] != 1 else mask
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
        p = torch.softmax(logits, -1).double()
        cum = F.pad(p.cumsum(-1), (1, 0))                               # (B, H, rows, S_k + 1)
        valid = torch.isfinite(cum[..., -1])                           # fully masked rows carry no mass
        at = lambda idx: cum.gather(-1, idx[:, q0:q1].expand(b, -1, -1).unsqueeze(-1)).squeeze(-1)  # noqa: E731
        for c, (lo, hi, cut, glob) in enumerate(bounds):
            inside = torch.where(glob[:, q0:q1], cum[..., -1], at(hi) - at(lo) + at(cut))
            outside = (cum[..., -1] - inside).clamp(min=0)
            total[c] += torch.where(valid, outside, 0).sum((0, 2))
        count += valid.sum((0, 2)).double()
    return (total / count.clamp(min=1)).to(q.dtype)
