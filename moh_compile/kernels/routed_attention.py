"""CPU kernel for `moh_compile::attention` with `head_gates`: skips every (token, head) pair
whose gate is 0 (mixture-of-head attention).

Why this layout: each head is a small dense problem over the tokens that chose it. Per head
we gather those tokens, project only their queries with that head's rows of W_q, run SDPA on
the gathered queries against the full K/V, and project with that head's columns of W_o. The
per-(token, head) results are summed back per token, weighted by the gate, by one
`embedding_bag` (a parallel gather-reduce) instead of a serial scatter-add.

Heads are padded to a capacity (the most tokens any batch row sends them) so several heads run
as one batched call. Calibrated routers use heads very unevenly (0.1-1.0 of the tokens on real
text), so one capacity for all heads would pad every head to the busiest one and skip nothing;
instead heads are sorted by capacity and cut into groups whose padding stays within
`GROUP_SLACK` of their real rows, one batched call per group.

The op runs the kernel only where it is the faster path (`routing_speedup`): gathering rows and
narrow per-head GEMMs make each computed (token, head) row cost more than a dense one, so when
padding or busy routers leave most rows to compute (short sequences, many batch rows, 9 of 12
heads) the dense masked reference, whose output is the same, is faster.

Imported for its side effect: `register_fast_kernel(routed_attention_when_faster)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moh_compile.kernels.block_sparse import (dense_windowed_row_cost, flash_with_lse, merge_partial_attention,
                                             native_runs, sparse_attention_block, sparse_row_cost, window_masks_fit)
from moh_compile.kernels.workspace import WORKSPACE, release_workspace  # noqa: F401 (re-exported)
from moh_compile.ops.attention import (as_4d, attention_core, finish_queries, is_causal_mask, merge_masks,
                                      num_query_heads, register_fast_kernel, simplify_mask, window_mask)


@dataclass
class KernelStats:
    """Counters that let tests prove work was skipped (rows actually computed)."""
    calls: int = 0
    active_pairs: int = 0   # (token, head) pairs with gate != 0 seen so far
    query_rows: int = 0     # query rows projected / attended, capacity padding included
    dense_calls: int = 0    # op calls left to the dense masked path (`routing_speedup` <= 1)
    sparse_calls: int = 0   # op calls with windows run by the block-sparse kernel (gates applied after)

    def reset(self) -> None:
        self.calls = self.active_pairs = self.query_rows = self.dense_calls = self.sparse_calls = 0


STATS = KernelStats()

MASK_CHUNK_BYTES = 64 << 20   # gathered mask rows are built this many bytes at a time (heads loop)
GROUP_SLACK = 0.125           # a head joins a group if padding stays within this fraction of its rows
# Cost of one computed (token, head) row in the kernel relative to the same row in the dense path:
# projections ROW_COST_PROJ_D / D + 1 (gathered rows and per-head GEMMs only D wide: the narrower
# the heads, the further below the dense GEMMs' speed) and attention core ROW_COST_CORE (SDPA on
# gathered queries). Least-squares fit to side-by-side timings of both paths on 2 CPU threads,
# 12 heads x 32 / 64 dims, 32-1024 tokens per sequence (rms error of the predicted speed ratio 9%;
# `python benchmarks/bench_moh_dispatch.py`; benchmarks/results/moh_dispatch_2026-11-23.md).
ROW_COST_PROJ_D = 48.0
ROW_COST_CORE = 1.15
# With window patterns (moh+sparse) the kernel carries a per-head (H, S, S_k) mask: its core cost
# per key rises to this factor, fitted with the block-sparse kernel's `sparse_row_cost` and the
# dense masked path's `dense_windowed_row_cost` to side-by-side timings of the three paths,
# 12 heads x 32 / 64 dims, 256-2048 tokens, 25-75% of the heads
# (`python benchmarks/bench_moh_sparse_dispatch.py --fit`).
ROW_COST_CORE_WINDOWED = 2.7
# Causal masks: `_causal_core` runs a tile of CAUSAL_TILE positions at a time (keys before the tile
# in one unmasked flash call, the tile's own under a mask), at ROW_COST_CORE_CAUSAL per key computed.
CAUSAL_TILE = 256
ROW_COST_CORE_CAUSAL = 1.0


_WS = WORKSPACE  # shared with the MoE++ kernel (kernels/workspace.py)


def head_groups(caps: list[int], slack: float | None = None) -> list[list[int]]:
    """Heads by falling capacity, cut into runs padded to their first head's capacity.

    A head joins the current run while the run's padded rows stay within (1 + slack) of its real
    rows (default GROUP_SLACK; infinity gives one group, a single capacity for all heads); heads
    no token chose (capacity 0) are left out. Greedy, O(H log H) per call: the export-time
    `dispatch_plan.split_groups` finds the least padding for a fixed number of groups by dynamic
    programming, O(H^2) per group, too slow to run in every call for models with many heads.
    """
    slack = GROUP_SLACK if slack is None else slack
    groups: list[list[int]] = []
    rows = 0
    for head in sorted(range(len(caps)), key=lambda i: -caps[i]):
        if caps[head] == 0:
            break
        if groups and (len(groups[-1]) + 1) * caps[groups[-1][0]] <= (1 + slack) * (rows + caps[head]):
            groups[-1].append(head)
            rows += caps[head]
        else:
            groups.append([head])
            rows = caps[head]
    return groups


@dataclass
class RoutingPlan:
    """Slot layout: group g holds heads groups[g] as (G, T, B, C_gt) slots from starts[g], T tiles
    of `tile` positions (one tile of all positions when untiled), C_gt rows per batch row in tile
    t (`tile_caps[g]`, summing to caps[g]); within a tile a batch row's rows are in position
    order. Each (token, head) pair with a nonzero gate owns one slot, the rest is padding on row 0."""
    groups: list[list[int]]
    caps: list[int]           # C_g per group: rows per batch row and head, over all tiles
    starts: list[int]         # first slot of each group
    n_slots: int
    rows: torch.Tensor        # (n_slots,) row of x, viewed as (B*S, E), each slot holds
    slot: torch.Tensor        # (n_active,) slot of each active pair, token-major, heads ascending
    offsets: torch.Tensor     # (B*S,) first active pair of each token (embedding_bag bags)
    weights: torch.Tensor     # (n_active,) gate of each active pair
    tile_caps: list[list[int]]  # per group, C_gt per tile
    tile: int | None = None   # positions per tile (causal attention: `_causal_core`), None: one tile


def routing_plan(gates: torch.Tensor, tile: int | None = None) -> RoutingPlan:
    """Where every active (token, head) pair of `gates` (B, S, H) goes; see RoutingPlan."""
    b, s, h = gates.shape
    dev = gates.device
    active = gates != 0
    width = s if tile is None else tile
    n_tiles = max(1, -(-s // width))
    by_tile = F.pad(active, (0, 0, 0, n_tiles * width - s)).view(b, n_tiles, width, h)
    counts = by_tile.sum(2).amax(0)                                         # (T, H): most rows of any batch row
    # heads ascending within a group: adjacent heads' K/V are then a view, not a copy (`_group_kv`)
    groups = [sorted(heads) for heads in head_groups(counts.sum(0).tolist())]
    base = torch.zeros(n_tiles, h, dtype=torch.long, device=dev)    # per tile and head: slot of (batch 0, rank 0)
    stride = torch.zeros(n_tiles, h, dtype=torch.long, device=dev)  # per tile and head: slots per batch row
    caps, starts, tile_caps, n_slots = [], [], [], 0
    for heads in groups:
        per_tile = counts[:, heads].amax(1)                                  # (T,) C_gt
        tile_caps.append(per_tile.tolist())
        cap = int(per_tile.sum())
        caps.append(cap)
        starts.append(n_slots)
        tile_start = torch.cumsum(per_tile, 0) - per_tile
        for pos, head in enumerate(heads):
            base[:, head] = n_slots + pos * b * cap + b * tile_start
            stride[:, head] = per_tile
        n_slots += len(heads) * b * cap
    first = (base.view(1, n_tiles, 1, h) - 1
             + torch.arange(b, device=dev).view(b, 1, 1, 1) * stride.view(1, n_tiles, 1, h))
    nz = active.reshape(-1).nonzero().squeeze(1)                             # token-major, heads ascending
    slot = by_tile.cumsum(2).add_(first).view(b, n_tiles * width, h)[:, :s].reshape(-1).index_select(0, nz)
    rows = torch.zeros(n_slots, dtype=torch.long, device=dev)
    rows.index_copy_(0, slot, nz.div(h, rounding_mode="floor"))             # flat (B*S) index of the token
    offsets = active.sum(-1).reshape(-1).cumsum(0)
    offsets = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    return RoutingPlan(groups, caps, starts, n_slots, rows, slot, offsets, gates.reshape(-1).index_select(0, nz),
                       tile_caps, tile)


def _mask_rows(mask: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor, s: int, s_k: int) -> torch.Tensor:
    """Rows of a broadcastable 4-d mask for gathered queries `rows` (G, B, C) of `heads`, as
    (B|1, G|1, C|1, S_k)."""
    mb, mh = mask.shape[0], mask.shape[1]
    if mask.shape[2] == 1:                                   # one row for every query: nothing to gather
        return mask.index_select(1, heads) if mh > 1 else mask
    m = mask.expand(mb, mh, s, s_k)
    g, b, cap = rows.shape
    if mb > 1:
        rows = rows + torch.arange(b, device=rows.device).view(1, b, 1) * (mh * s)
    if mh > 1:
        rows = rows + heads.view(g, 1, 1) * s
    flat = m.reshape(mb * mh * s, s_k)                       # copies only if the mask was expanded
    return flat.index_select(0, rows.reshape(-1)).view(g, b, cap, s_k).transpose(0, 1)


def routing_speedup(fraction: float, d_in: int, d_out: int, head_dim: int, s_k: int, causal: bool,
                    tile: int | None = None) -> float:
    """Predicted time of the dense path over the kernel's when the kernel computes `fraction` of
    the (token, head) rows. Per row, projections cost ~ (d_in + d_out) and the core ~ 2 S_k (half
    of it for the dense path when the mask is causal: SDPA's is_causal skips the masked half). The
    kernel's gathered queries carry an explicit mask over every key, except with a causal `tile`
    (`_causal_core`), where a row computes the keys before its tile and its tile's keys."""
    dense = d_in + d_out + (s_k if causal else 2 * s_k)
    if tile is None:
        kernel = routed_row_cost(fraction, d_in, d_out, head_dim, s_k)
    else:
        kernel = routed_row_cost(fraction, d_in, d_out, head_dim, causal_keys_per_row(s_k, tile), ROW_COST_CORE_CAUSAL)
    return dense / kernel if kernel > 0 else float("inf")


def causal_keys_per_row(s_k: int, tile: int) -> float:
    """Keys `_causal_core` computes per query row, averaged over tiles (the keys before the tile,
    unmasked, plus the whole tile under its mask)."""
    n = max(1, -(-s_k // tile))
    return sum(min(s_k, (t + 1) * tile) for t in range(n)) / n


def routed_row_cost(fraction: float, d_in: int, d_out: int, head_dim: int, s_k: float,
                    core: float = ROW_COST_CORE) -> float:
    """Predicted kernel cost per (token, head) row when it computes `fraction` of them (units of
    `routing_speedup`: a dense row costs d_in + d_out + 2 S_k); `core`: cost per key, `s_k`: keys
    computed per row."""
    return fraction * ((1 + ROW_COST_PROJ_D / head_dim) * (d_in + d_out) + core * 2 * s_k)


def windowed_path_costs(fraction: float, d_in: int, d_out: int, head_dim: int, s_k: int, window_sink: list[int],
                        window_alpha: list[int], window_beta: list[float], two_sided: bool,
                        native: bool = False) -> dict[str, float]:
    """Predicted cost per (token, head) row of the op's three paths when it has window patterns:
    "routed" (this kernel, window masks gathered per head), "sparse" (the block-sparse kernel over
    every row, gates applied after; native: its C window kernel, which skips gate-0 rows) and "dense"
    (the masked reference)."""
    return {"sparse": sparse_row_cost(d_in, d_out, head_dim, s_k, window_sink, window_alpha, window_beta,
                                      two_sided, native=native, row_fraction=fraction),
            "routed": routed_row_cost(fraction, d_in, d_out, head_dim, s_k, ROW_COST_CORE_WINDOWED),
            "dense": dense_windowed_row_cost(d_in, d_out, s_k)}


def _applicable(x, q_weight, k, head_gates, rope_cos, query) -> bool:
    if head_gates is None or x.device.type != "cpu":
        return False
    heads = num_query_heads(q_weight, query, k.shape[-1])
    if head_gates.shape != (x.shape[0], x.shape[1], heads):
        raise ValueError(f"head_gates must have shape (B, S, H) = {(x.shape[0], x.shape[1], heads)}, "
                         f"got {tuple(head_gates.shape)}")
    return rope_cos is None or as_4d(rope_cos).shape[1] == 1


def routed_attention_cpu(
    x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates, scale,
    window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False, q_norm_weight=None, q_norm_eps=0.0,
    softcap=0.0, sinks=None, query=None, out_gate=None,
):
    """The op with gate-0 (token, head) pairs skipped; None when it does not apply."""
    if not _applicable(x, q_weight, k, head_gates, rope_cos, query):
        return None
    mask = _kernel_mask(attn_mask, x.shape[1], k.shape[2], window_sink, window_alpha, window_beta,
                        window_two_sided, x.device)
    plan = routing_plan(head_gates, causal_tile(is_causal_mask(mask, x.shape[1], k.shape[2]), k, v, softcap, sinks))
    return _routed(x, q_weight, q_bias, k, v, mask, rope_cos, rope_sin, o_weight, o_bias, scale, plan,
                   q_norm_weight, q_norm_eps, softcap, sinks, query, out_gate)


def causal_tile(causal: bool, k, v, softcap: float, sinks) -> int | None:
    """CAUSAL_TILE where the causal core applies (an exactly causal mask: `is_causal_mask`; scores
    its flash calls can compute: no soft-capping or sinks, one head size for keys and values)."""
    if not causal or softcap or sinks is not None or k.shape[-1] != v.shape[-1]:
        return None
    return CAUSAL_TILE


def routed_attention_when_faster(
    x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates, scale,
    window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False, q_norm_weight=None, q_norm_eps=0.0,
    softcap=0.0, sinks=None, query=None, out_gate=None,
):
    """What the op dispatches to: the kernel where `routing_speedup` predicts it beats the dense
    masked path, else None (the op then runs that path; the output is the same either way).

    With window patterns (moh+sparse) there is a third path, `block_sparse.sparse_attention_block`:
    every row, but only the key blocks in each head's pattern, gates applied after. Of the three
    the one with the lowest predicted cost runs; long sequences go to it, and so does every call
    whose (B, H, S, S_k) window mask, which the other two build, would be large
    (`block_sparse.window_masks_fit`)."""
    if not _applicable(x, q_weight, k, head_gates, rope_cos, query):
        return None
    d_out, head_dim, s_k = o_weight.shape[0], k.shape[-1], k.shape[2]
    d_in = 0 if query is not None else x.shape[-1]  # queries from the graph: every path pays their projection
    mask = _kernel_mask(attn_mask, x.shape[1], s_k, window_sink, window_alpha, window_beta, window_two_sided,
                        x.device)
    causal = is_causal_mask(mask, x.shape[1], s_k)  # compares the whole mask: once per call
    tile = causal_tile(causal, k, v, softcap, sinks)
    plan = routing_plan(head_gates, tile)
    fraction = plan.n_slots / max(1, head_gates.numel())
    if window_sink is not None:
        fits = window_masks_fit(x.shape[0], head_gates.shape[-1], x.shape[1], s_k)
        costs = windowed_path_costs(fraction, d_in, d_out, head_dim, s_k, window_sink, window_alpha, window_beta,
                                    window_two_sided, native=fits and native_runs(x, k, v, attn_mask, scale))
        exact_only = bool(softcap) or sinks is not None  # the block-sparse kernel's flash calls cannot do these
        if exact_only:
            costs.pop("sparse")
        best = min(costs, key=costs.get) if fits or exact_only else "sparse"  # the others build (B, H, S, S_k) masks
        if best == "sparse":
            STATS.sparse_calls += 1
            return sparse_attention_block(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight,
                                          o_bias, head_gates, scale, window_sink, window_alpha, window_beta,
                                          window_two_sided, q_norm_weight, q_norm_eps, query, out_gate)
        if best == "dense":
            STATS.dense_calls += 1
            return None
    elif routing_speedup(fraction, d_in, d_out, head_dim, s_k, causal, tile) <= 1.0:
        STATS.dense_calls += 1
        return None
    return _routed(x, q_weight, q_bias, k, v, mask, rope_cos, rope_sin, o_weight, o_bias, scale, plan,
                   q_norm_weight, q_norm_eps, softcap, sinks, query, out_gate)


def _kernel_mask(attn_mask, s, s_k, window_sink, window_alpha, window_beta, window_two_sided, device):
    """The model mask ANDed with the window patterns, if any, simplified (ops.attention.simplify_mask)."""
    if window_sink is not None:
        attn_mask = merge_masks(attn_mask, window_mask(s, s_k, window_sink, window_alpha, window_beta,
                                                       window_two_sided, device))
    return simplify_mask(attn_mask)


def _routed(x, q_weight, q_bias, k, v, mask, rope_cos, rope_sin, o_weight, o_bias, scale, plan: RoutingPlan,
            q_norm_weight=None, q_norm_eps=0.0, softcap=0.0, sinks=None, query=None, out_gate=None):
    """The kernel proper, given the prepared mask (`_kernel_mask`) and the routing plan."""
    b, s, e = x.shape
    d, dv = k.shape[-1], v.shape[-1]  # queries/keys and values (MLA's values are narrower)
    h = num_query_heads(q_weight, query, d)
    s_k = k.shape[2]
    e_out = o_weight.shape[0]
    STATS.calls += 1
    STATS.active_pairs += plan.slot.numel()
    STATS.query_rows += plan.n_slots
    if plan.n_slots == 0:
        out = x.new_zeros(b, s, e_out)
        return out + o_bias if o_bias is not None else out
    n, rows = plan.n_slots, plan.rows
    ws = _WS.take(n * (e + e_out), x.dtype, x.device)
    contrib = ws[n * e:].view(n, e_out)
    if query is None:
        xg = torch.index_select(x.reshape(b * s, e), 0, rows, out=ws[: n * e].view(n, e))
    else:  # queries computed by the graph: gather the chosen rows, (H, B*S, D) head-major
        q_heads = _head_major(query)
    if out_gate is not None:  # the model's gate on each head's context: the chosen rows of it
        gate_heads = _head_major(out_gate)
    if rope_cos is not None:
        cos_all = as_4d(rope_cos).expand(b, 1, s, d).reshape(b * s, d).index_select(0, rows)
        sin_all = as_4d(rope_sin).expand(b, 1, s, d).reshape(b * s, d).index_select(0, rows)
    per_kv = h // k.shape[1]
    # index_select on a strided view clones the whole tensor per call: copy K/V once instead
    k, v = k.contiguous(), v.contiguous()
    for gi, (group, cap, start) in enumerate(zip(plan.groups, plan.caps, plan.starts)):
        g = len(group)
        idx = torch.tensor(group, device=x.device)
        span = slice(start, start + g * b * cap)
        if query is None:
            q = _project_rows(xg[span].view(g, b * cap, e), q_weight, q_bias, group, d)
            cos = sin = None
            if rope_cos is not None:
                cos, sin = cos_all[span].view(g, b * cap, d), sin_all[span].view(g, b * cap, d)
            q = finish_queries(q, cos, sin, q_norm_weight, q_norm_eps)
        else:
            q = q_heads[idx.view(g, 1), rows[span].view(g, b * cap)]                    # (G, B*C, D)
        # Attention core on the gathered queries against every key (GQA: kv head = h // (H / Hkv)).
        kk, vv = _group_kv(k, group, per_kv), _group_kv(v, group, per_kv)
        group_sinks = None if sinks is None else sinks.index_select(0, idx)
        pos = rows[span].view(g, b * cap) % s                                         # query positions
        if plan.tile is not None:  # causal: tile by tile, the keys before each tile unmasked
            ctx = _causal_core(q, kk, vv, pos, plan.tile_caps[gi], plan.tile, b, scale)
        else:
            ctx = _masked_core(q.view(g, b, cap, d).transpose(0, 1), kk, vv, mask, pos.view(g, b, cap), idx, s,
                               scale, softcap, group_sinks).transpose(0, 1).reshape(g, b * cap, dv)
        if out_gate is not None:
            ctx = ctx * gate_heads[idx.view(g, 1), rows[span].view(g, b * cap)]
        # Output projection per head (columns h*Dv:(h+1)*Dv of W_o).
        out_g = contrib[span].view(g, b * cap, e_out)
        for j, head in enumerate(group):
            torch.mm(ctx[j], o_weight[:, head * dv:(head + 1) * dv].t(), out=out_g[j])
    # Gate-weighted sum of each token's head outputs.
    out = F.embedding_bag(plan.slot, contrib, plan.offsets, mode="sum",
                          per_sample_weights=plan.weights.to(contrib.dtype))
    if o_bias is not None:
        out.add_(o_bias)
    return out.view(b, s, e_out)


def _group_kv(t: torch.Tensor, heads: list[int], per_kv: int) -> torch.Tensor:
    """K or V (B, Hkv, S_k, D) for each query head of a group, (B, G, S_k, D): a view when the
    group's heads use adjacent KV heads one each, else a copy."""
    kv = [h // per_kv for h in heads]
    if per_kv == 1 and kv == list(range(kv[0], kv[0] + len(kv))):
        return t[:, kv[0]:kv[0] + len(kv)]
    return t.index_select(1, torch.tensor(kv, device=t.device))


def _masked_core(q, k, v, mask, pos, heads, s: int, scale: float, softcap: float, sinks):
    """Attention of gathered queries q (B, G, C, D) at positions pos (G, B, C) over every key, the
    model's mask gathered for their rows (`_mask_rows`, a bounded number of bytes at a time)."""
    if mask is None:
        return attention_core(q, k, v, None, scale, softcap, sinks)
    b, g, cap, _ = q.shape
    s_k = k.shape[2]
    ctx = q.new_empty(b, g, cap, v.shape[-1])
    row_bytes = b * (cap if mask.shape[2] > 1 else 1) * s_k * mask.element_size()
    step = max(1, min(g, MASK_CHUNK_BYTES // max(1, row_bytes)))
    for h0 in range(0, g, step):
        h1 = min(g, h0 + step)
        ctx[:, h0:h1] = attention_core(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1],
                                       _mask_rows(mask, pos[h0:h1], heads[h0:h1], s, s_k), scale, softcap,
                                       None if sinks is None else sinks[h0:h1])
    return ctx


def _causal_core(q, k, v, pos, tile_caps: list[int], tile: int, batch: int, scale: float) -> torch.Tensor:
    """Causal attention of gathered queries, a tile of positions at a time: the rows of tile t
    attend to every key before the tile unmasked (one flash call for all batch rows and heads of
    the group) and to the tile's own keys under a mask built from their positions; the two parts
    are merged exactly by their log-sum-exps. Keys after a tile are never computed, and only the
    (rows x tile) band carries a mask, where the gathered-mask path read and computed (rows x S_k).

    q (G, B*C, D) in the routing plan's (tile, batch, row) slot order, k/v (B, G, S_k, D), pos
    (G, B*C) query positions. Returns (G, B*C, Dv) in the same order."""
    g, _, d = q.shape
    s_k = k.shape[2]
    out = q.new_empty(g, q.shape[1], v.shape[-1])
    start = 0
    for t, cap in enumerate(tile_caps):
        if cap == 0:
            continue
        rows = slice(start, start + batch * cap)
        start += batch * cap
        q_t = q[:, rows].view(g, batch, cap, d).transpose(0, 1)                           # (B, G, C_t, D)
        lo, hi = t * tile, min(s_k, (t + 1) * tile)
        # padding rows (position 0) are given the tile's first position, so every row sees a key
        p = pos[:, rows].view(g, batch, cap, 1).transpose(0, 1).clamp(min=lo)
        seen = torch.arange(lo, hi, device=q.device) <= p
        o_band, l_band = flash_with_lse(q_t, k[:, :, lo:hi], v[:, :, lo:hi], seen, scale, every_row_sees_a_key=True)
        o_t = out[:, rows].view(g, batch, cap, -1).transpose(0, 1)                        # a view of out
        if lo == 0:
            o_t.copy_(o_band)
        else:
            o_before, l_before = flash_with_lse(q_t, k[:, :, :lo], v[:, :, :lo], None, scale)
            merge_partial_attention(o_t, o_before, l_before, o_band, l_band)
    return out


def _head_major(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (H, B*S, D): per head, rows indexed like the routing plan's flat tokens."""
    return t.transpose(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], t.shape[3])


def _project_rows(xq: torch.Tensor, q_weight, q_bias, group: list[int], d: int) -> torch.Tensor:
    """Q projection of the chosen tokens only, xq (G, R, E) -> (G, R, D): head h uses rows
    h*D:(h+1)*D of W_q. One GEMM per head, on slices of W_q (no weight copies); at MiniLM widths
    (3 heads x 3120 rows, 384 -> 32) a batched baddbmm on gathered weights took 5.7 ms, three
    addmm 3.0 ms."""
    q = xq.new_empty(len(group), xq.shape[1], d)
    for j, head in enumerate(group):
        w_q = q_weight[head * d:(head + 1) * d].t()
        if q_bias is None:
            torch.mm(xq[j], w_q, out=q[j])
        else:
            torch.addmm(q_bias[head * d:(head + 1) * d], xq[j], w_q, out=q[j])
    return q


register_fast_kernel(routed_attention_when_faster)
