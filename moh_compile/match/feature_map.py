"""Which output feature of a projection each entry of a downstream tensor holds.

Why by running, not by pattern: fused QKV projections are split in many layouts (q, k, v as
three blocks; per head [q_h, k_h, v_h] as GPT-NeoX does; grouped [q.., k, v] per KV head as
Falcon does), through views, transposes, chunks, slices and selects. Running exactly the
graph's own layout ops (and gathers by constant indices) on a tensor that holds each feature's
index answers every layout the same way. Rotary embeddings, RMS norms over the last dim and
scalar scalings keep every entry where it is, so they are walked through. Symbolic sizes get
small distinct concrete values, so a view that mixes batch or sequence with features cannot
pass unnoticed.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moh_compile.match import graph as g
from moh_compile.match.qk_norm import match_rms_norm
from moh_compile.match.rope import match_rope

aten = g.aten
_SIZE_VALUES = (3, 5, 7, 11, 13, 17)  # concrete stand-ins for symbolic sizes, distinct primes
GATHERS = {aten.index_select.default, aten.index.Tensor}
PADS = {aten.constant_pad_nd.default}  # move values too; padded entries hold NO_FEATURE
NO_FEATURE = -1
# what layout ops and size arithmetic raise on sizes that do not fit them (Swin: side // window on a
# side of 3 divides by zero; SigLIP: reshaping 0 patches)
_SIZE_ERRORS = (RuntimeError, ValueError, IndexError, ArithmeticError)


class NotALayoutPath(Exception):
    """The tensor is computed from the projection through something other than layout ops."""


def in_place_source(node) -> fx.Node | None:
    """The input of a node that keeps each entry's feature in place (RoPE, an RMS norm over the
    last dim, a scalar scaling)."""
    rope = match_rope(node)
    if rope is not None:
        return rope.src
    norm = match_rms_norm(node)
    if norm is not None:
        return norm.src
    scaled = g.scalar_scaling(node)
    return scaled[0] if scaled is not None else None


def feature_index(node: fx.Node, projection: fx.Node) -> torch.Tensor:
    """int64 tensor shaped like `node` (symbolic sizes made concrete) holding, at each entry,
    the output feature of `projection` it comes from; NotALayoutPath when some op on the way
    computes rather than moves values.

    Symbolic sizes first get small distinct primes; where the graph's size arithmetic cannot run
    on those (_SIZE_ERRORS), they get the sizes the graph was traced with instead."""
    try:
        return _run_layout_path(node, projection, lambda sym, i: _SIZE_VALUES[i] if i < len(_SIZE_VALUES) else None)
    except _SIZE_ERRORS:
        pass
    try:
        return _run_layout_path(node, projection, lambda sym, i: _traced_value(sym, node))
    except _SIZE_ERRORS as err:
        raise NotALayoutPath(f"layout ops failed on stand-in sizes ({type(err).__name__})") from None


def _traced_value(sym, node: fx.Node) -> int | None:
    """The value a size symbol had when the graph was traced (its shape environment's hint)."""
    for n in node.graph.nodes:
        val = n.meta.get("val")
        for s in getattr(val, "shape", ()):
            if isinstance(s, torch.SymInt) and sym in s.node.expr.free_symbols:
                env = s.node.shape_env
                hint = getattr(env, "backed_var_to_val", None) or env.var_to_val  # renamed in torch 2.13
                hint = hint.get(sym)
                return None if hint is None else int(hint)
    return None


def _run_layout_path(node: fx.Node, projection: fx.Node, size_of) -> torch.Tensor:
    """feature_index with symbol values from size_of(symbol, index of first appearance)."""
    gm = node.graph.owning_module
    sizes: dict = {}
    env: dict = {}

    def concrete(s):
        if isinstance(s, torch.SymInt):
            expr = s.node.expr
            for sym in sorted(expr.free_symbols, key=str):
                if sym not in sizes:
                    value = size_of(sym, len(sizes))
                    if value is None:
                        raise NotALayoutPath(f"no stand-in size for {sym}")
                    sizes[sym] = value
            return int(expr.subs(sizes))
        return s

    def run(n):
        if not isinstance(n, fx.Node):
            return n
        if n in env:
            return env[n]
        if n is projection:
            shape = [concrete(s) for s in g.val(n).shape]
            out = torch.arange(shape[-1]).expand(shape).contiguous()
        elif (source := in_place_source(n)) is not None:
            out = run(source)
        elif isinstance(n.meta.get("val"), (torch.SymInt, int)) and n.op == "call_function":
            out = concrete(n.meta["val"])
        elif n.op == "get_attr":
            out = _attribute(gm, n.target)  # constant indices of a gather
        elif n.op == "call_function" and n.target in PADS:
            out = n.target(run(n.args[0]), n.args[1], NO_FEATURE)
        elif n.op == "call_function" and (n.target in g.LAYOUT or n.target in g.SPLITS or n.target in GATHERS
                                          or n.target is operator.getitem):
            args = fx.node.map_arg(n.args, run)
            kwargs = fx.node.map_arg(n.kwargs, run)
            out = n.target(*args, **kwargs)
        elif g.is_passthrough(n):  # same-dtype casts, eval dropout
            out = run(n.args[0])
        else:
            raise NotALayoutPath(f"{n.op} {getattr(n.target, '__name__', n.target)}")
        env[n] = out
        return out

    return run(node)


def _attribute(gm, target: str) -> torch.Tensor:
    """An integer constant of the module (weights would make the path compute, not move)."""
    obj = g.attribute(gm, target)
    if not isinstance(obj, torch.Tensor) or obj.is_floating_point():
        raise NotALayoutPath(f"get_attr {target}")
    return obj


def head_rows(index: torch.Tensor, num_heads: int | None) -> list[int] | None:
    """Projection rows per head, heads in order, from the feature index of a query as the
    attention core takes it: (B, H, S, D), or (B*H, S, D) with H = num_heads (None: infer from
    the distinct rows). None when a head's features change with the batch or the position."""
    if index.dim() == 4:
        rows = index[0, :, 0, :]
        if not torch.equal(index, rows[None, :, None, :].expand_as(index)):
            return None
        return rows.reshape(-1).tolist()
    if index.dim() == 3:
        per_row = index[:, 0, :]
        if not torch.equal(index, per_row[:, None, :].expand_as(index)):
            return None
        if num_heads is None:
            num_heads = len({tuple(r) for r in per_row.tolist()})
        if per_row.shape[0] % num_heads:
            return None
        heads = per_row.view(-1, num_heads, per_row.shape[-1])
        if not torch.equal(heads, heads[:1].expand_as(heads)):
            return None
        return heads[0].reshape(-1).tolist()
    return None
