"""Group a dense FFN's hidden neurons into equal-size experts (balanced k-means).

Why balanced: the MoE++ op stacks experts as (N, F_e, ...) tensors, and an expert's cost is
its size, so equal groups keep both the padding and the per-expert cost uniform.
Why these features: neurons whose input weight rows point the same way respond to the same
tokens; with calibration activations, neurons that are active together (co-activation) are
grouped directly, so a token's work concentrates in few experts.
"""
from __future__ import annotations

import torch


def _sq_dists(points: torch.Tensor, centroids: torch.Tensor, point_sq: torch.Tensor) -> torch.Tensor:
    d = torch.addmm(point_sq.unsqueeze(1), points, centroids.t(), alpha=-2) + (centroids * centroids).sum(1)
    return d.clamp_min_(0)


def balanced_assign(dists: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each point to a cluster, at most `capacity` per cluster, greedily by distance.

    Rounds of proposals: each unassigned point proposes to its nearest open cluster; a
    cluster keeps its closest proposers up to its free capacity and closes when full. Every
    round either assigns everything or closes a cluster, so it ends within n_clusters rounds,
    each one vectorised over all points.
    """
    f, n = dists.shape
    if capacity * n < f:
        raise ValueError(f"capacity {capacity} x {n} clusters cannot hold {f} points")
    assign = torch.full((f,), -1, dtype=torch.long)
    free = torch.full((n,), capacity, dtype=torch.long)
    todo = torch.arange(f)
    while todo.numel():
        sub = dists.index_select(0, todo).masked_fill_((free == 0).unsqueeze(0), float("inf"))
        dist, choice = sub.min(1)
        # rank proposers within each cluster by distance: sort by (cluster, distance)
        order = torch.argsort(dist, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        c_sorted = choice[order]
        counts = torch.bincount(c_sorted, minlength=n)
        rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[c_sorted]
        winners = order[rank < free[c_sorted]]
        assign[todo[winners]] = choice[winners]
        free -= torch.bincount(choice[winners], minlength=n)
        todo = torch.nonzero(assign < 0).squeeze(1)
    return assign


def _kmeans_pp_init(points: torch.Tensor, point_sq: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    f = points.shape[0]
    first = int(torch.randint(0, f, (1,), generator=gen))
    centroids = [points[first]]
    closest = _sq_dists(points, points[first : first + 1], point_sq).squeeze(1)
    for _ in range(1, n):
        probs = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1.0 / f)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(points[nxt])
        closest = torch.minimum(closest, _sq_dists(points, points[nxt : nxt + 1], point_sq).squeeze(1))
    return torch.stack(centroids)


def balanced_kmeans(points: torch.Tensor, n_groups: int, iters: int = 25, seed: int = 0,
                    n_init: int = 2) -> torch.LongTensor:
    """Equal-size clustering of F points into `n_groups` groups; returns LongTensor (N, F/N).

    k-means++ seeding, then alternate balanced assignment and centroid updates until the
    assignment stops changing; the best of `n_init` seeded restarts (by within-group squared
    distance) is kept. Rows list each group's point indices in ascending order; groups are
    ordered by their smallest index, so the result is canonical for a given seed.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (F, p), got shape {tuple(points.shape)}")
    f = points.shape[0]
    if n_groups < 1 or f % n_groups:
        raise ValueError(f"F={f} points cannot be split into {n_groups} equal groups")
    points = points.detach().to(torch.float64).cpu()
    point_sq = (points * points).sum(1)
    cap = f // n_groups
    gen = torch.Generator().manual_seed(seed)
    best, best_cost = None, float("inf")
    for _ in range(max(1, n_init)):
        centroids = _kmeans_pp_init(points, point_sq, n_groups, gen)
        assign = None
        for _ in range(max(1, iters)):
            new = balanced_assign(_sq_dists(points, centroids, point_sq), cap)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            onehot = torch.zeros(n_groups, f, dtype=points.dtype)
            onehot[assign, torch.arange(f)] = 1.0 / cap
            centroids = onehot @ points
        cost = float(_sq_dists(points, centroids, point_sq).gather(1, assign.unsqueeze(1)).sum())
        if cost < best_cost:
            best, best_cost = assign, cost
    groups = torch.argsort(best * f + torch.arange(f)).view(n_groups, cap)  # ascending within group
    return groups[torch.argsort(groups[:, 0])]


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def neuron_features(w_in: torch.Tensor, w_gate: torch.Tensor | None = None,
                    activations: torch.Tensor | None = None, max_act_dim: int = 256,
                    act_weight: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Per-neuron clustering features (F, p).

    Weight part: each neuron's input row (and gate row) L2-normalised, so distance measures
    direction. Activation part (when calibration activations (T, F) are given): each neuron's
    centred, normalised |activation| over the T tokens, so squared distance = 2 - 2 x the
    correlation of magnitudes (co-activation); reduced to `max_act_dim` columns by a seeded
    Gaussian projection when T is larger (distances preserved approximately). Each part is a
    unit vector per neuron, scaled so the parts weigh equally (activations by `act_weight`).
    """
    f = w_in.shape[0]
    parts = [_unit_rows(w_in.detach().float())]
    if w_gate is not None:
        if w_gate.shape != w_in.shape:
            raise ValueError(f"w_gate shape {tuple(w_gate.shape)} != w_in shape {tuple(w_in.shape)}")
        parts.append(_unit_rows(w_gate.detach().float()))
    weight_part = torch.cat(parts, 1) / len(parts) ** 0.5
    if activations is None:
        return weight_part
    if activations.dim() != 2 or activations.shape[1] != f:
        raise ValueError(f"activations must be (T, F={f}), got shape {tuple(activations.shape)}")
    a = activations.detach().float().abs()
    a = (a - a.mean(0, keepdim=True)).t()  # (F, T)
    if a.shape[1] > max_act_dim:
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(a.shape[1], max_act_dim, generator=gen) / max_act_dim**0.5
        a = _unit_rows(a) @ proj
    return torch.cat([weight_part, act_weight * _unit_rows(a)], 1)


__all__ = ["balanced_assign", "balanced_kmeans", "neuron_features"]
