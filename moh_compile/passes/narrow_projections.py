"""Graph optimisation after the rewrites: projections compute only the output rows something reads.

Why: a fused QKV projection (GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj,
Falcon, Bloom, MPT) keeps computing every query row after the rewrite, because the graph still
needs its K/V rows, while the attention op projects the queries itself (MoH: only the chosen
heads). Left so, MoH on such a model would spend more on Q than the model did, and every pass
would compute Q twice.

Which output features are read is found from the graph: walk forward from the projection
through ops that only move values (views, splits, slices) to the first op that reads them, and
run the graph's own layout ops on feature indices (match/feature_map.py) to learn which
features reach it. Where the read features are one range of every block of rows (the fused
layouts models use: [q | k | v], per head [q_h, k_h, v_h], per KV group [q.., k, v]), the
projection then runs on those rows only (its weight sliced, or gathered by a constant index)
and is padded back to full width with zeros where the unread rows were, so every consumer
keeps its shapes and indices. Exact (the same dot products), verified on the example inputs,
undone if the outputs change.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from moh_compile.match import graph as g
from moh_compile.match.feature_map import GATHERS, NotALayoutPath, feature_index
from moh_compile.rewrite import GraphBuilder, probe_values, same_values

aten = torch.ops.aten
_SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


def read_features(lin: g.LinearLike) -> set[int] | None:
    """The output features of `lin` that some op reads (None: all of them, or not knowable)."""
    total = lin.out_features
    read: set[int] = set()
    stack, seen = [lin.node], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if g.is_metadata_assert(user) or g.is_call(user, _SHAPE_ONLY):
                continue
            if _moves_values(user, node):
                stack.append(user)  # follow it to the ops that read the values
                continue
            try:
                read.update(feature_index(node, lin.node).unique().tolist())
            except NotALayoutPath:
                return None
            if len(read) == total:
                return None
    return read


def _moves_values(user: fx.Node, node: fx.Node) -> bool:
    """`user` only moves `node`'s values: a view, split, slice, same-dtype cast, or a gather by
    constant indices (Falcon picks its K/V heads so)."""
    if user.op != "call_function" or not user.args or user.args[0] is not node:
        return False
    if g.is_passthrough(user):
        return True
    if user.target in GATHERS:
        index = user.args[2] if user.target is aten.index_select.default else user.args[1]
        return all(i is None or g.is_weight(i) for i in (index if isinstance(index, (list, tuple)) else [index]))
    return False


def periodic_range(read: set[int], total: int) -> tuple[int, int, int] | None:
    """(period, start, stop) when the read features are features [start, stop) of every
    consecutive block of `period` (GPT-2: [q | k | v], one block, k and v read; GPT-NeoX, Bloom:
    per head [q_h, k_h, v_h]; Falcon: per KV group [q.., k, v]); None for any other pattern."""
    mask = [f in read for f in range(total)]
    for period in (p for p in range(1, total + 1) if total % p == 0):
        first = mask[:period]
        if mask != first * (total // period):
            continue
        start = first.index(True)
        stop = start + sum(first)
        return (period, start, stop) if all(first[start:stop]) else None
    return None


def _narrow(gm: fx.GraphModule, lin: g.LinearLike, layout: tuple[int, int, int]) -> list[fx.Node]:
    """Insert the projection on the read rows only, padded back to full width (zeros where the
    unread rows were), and make it feed every user of the old one. Returns the inserted nodes
    (the last one is the full-width result)."""
    period, start, stop = layout
    blocks = lin.out_features // period
    b = GraphBuilder(gm.graph, lin.node)
    out_dim = 1 if lin.weight_is_in_out else 0
    if blocks == 1:
        def pick(t, dim):
            return b.call(aten.slice.Tensor, t, dim, start, stop)
    else:
        rows = torch.tensor([p * period + f for p in range(blocks) for f in range(start, stop)])
        index = b.constant("narrow_rows", rows)

        def pick(t, dim):
            return b.call(aten.index_select.default, t, dim, index)
    weight = pick(lin.weight, out_dim)
    bias = None if lin.bias is None else pick(lin.bias, 0)
    node = lin.node
    if node.target is aten.linear.default:
        new = b.call(aten.linear.default, lin.x, weight, bias)
    elif node.target is aten.addmm.default:
        new = b.call(aten.addmm.default, bias, lin.x, weight, **node.kwargs)
    else:
        new = b.call(node.target, lin.x, weight)
    # a pad, not a gather: a copy at memory speed (index_select along the last dim ran ~20x slower)
    if blocks > 1:
        new = b.call(aten.unflatten.int, new, -1, [blocks, stop - start])
    full = b.call(aten.constant_pad_nd.default, new, [start, period - stop], 0.0)
    if blocks > 1:
        full = b.call(aten.flatten.using_ints, full, -2, -1)
    node.replace_all_uses_with(full, delete_user_cb=lambda u: u not in b.nodes)
    return b.nodes


def _undo(gm: fx.GraphModule, lin: g.LinearLike, inserted: list[fx.Node]) -> None:
    inserted[-1].replace_all_uses_with(lin.node)
    for node in reversed(inserted):
        if node.op == "get_attr":
            delattr(gm, node.target)
        gm.graph.erase_node(node)


def worth_narrowing(lin: g.LinearLike, kept: int) -> bool:
    """Dropping rows saves in_features multiply-adds per row and token; putting the output back
    costs one copied value per output feature and token: narrow when it saves more than that."""
    return (lin.out_features - kept) * lin.in_features > lin.out_features


def narrow_projections(gm: fx.GraphModule, args: tuple, kwargs: dict, rtol: float = 1e-4) -> dict:
    """Narrow every projection whose output rows are not all read, in place; verified on the example
    inputs (all undone if the model's outputs change). Returns {"narrowed": [{"node", "weight",
    "rows", "of"}], "linears": the old linear nodes narrowed} or {"skipped": reason}."""
    candidates = []
    for node in list(gm.graph.nodes):
        lin = g.as_linear(node)
        if lin is None:
            continue
        read = read_features(lin)
        layout = periodic_range(read, lin.out_features) if read else None
        if layout is not None and worth_narrowing(lin, len(read)):
            candidates.append((lin, layout))
    if not candidates:
        return {}
    watch = g.output_nodes(gm)
    before = probe_values(gm, watch, args, kwargs)
    edits = [(lin, _narrow(gm, lin, layout)) for lin, layout in candidates]
    gm.recompile()
    try:
        after = probe_values(gm, g.output_nodes(gm), args, kwargs)
        reason = None if all(same_values(after.get(k), v, rtol) for k, v in before.items()) else \
            "the model's outputs changed when narrowing"
    except Exception as err:  # a narrowing bug must not break the compile: undo it
        reason = f"the narrowed graph failed to run ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
    if reason:
        for lin, inserted in reversed(edits):
            _undo(gm, lin, inserted)
        gm.recompile()
        return {"skipped": f"{reason}; projections kept whole"}
    g.remove_dead_code(gm)
    return {"narrowed": [{"node": lin.node.name, "weight": g.param_name(lin.weight),
                          "rows": lin.out_features // period * (stop - start), "of": lin.out_features}
                         for lin, (period, start, stop) in candidates],
            "linears": [lin.node for lin, _ in candidates]}


def markdown(result: dict) -> str:
    if "skipped" in result:
        return result["skipped"]
    lines = ["Projections whose output rows are not all read any more (e.g. a fused QKV projection's query "
             "rows, which the attention op now projects itself) compute only the rows read (exact; verified "
             "on the example inputs):", "", "| weight | rows computed | of |", "|---|---|---|"]
    lines += [f"| {n['weight']} | {n['rows']} | {n['of']} |" for n in result["narrowed"]]
    return "\n".join(lines)
