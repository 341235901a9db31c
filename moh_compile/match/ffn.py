"""Find feed-forward blocks by structure: linear -> pointwise activation -> linear, or the
gated form act(gate(x)) * up(x) -> down (separate or fused gate/up projections).

The activation is whatever pointwise subgraph sits between the projections; it is named by
evaluating that subgraph on a probe grid and comparing with the known activations, so a
hand-written tanh-GELU (GPT-2) is recognised as exactly as `aten.gelu`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from moh_compile.match import graph as g
from moh_compile.match.blocks import FFNBlock, ProjectionInfo, Skipped
from moh_compile.ops.activations import identify_activation

aten = g.aten


class NoMatch(Exception):
    pass


@dataclass
class FFNMatch:
    block: FFNBlock
    x: fx.Node
    fc_in: g.LinearLike  # the "up" projection (or the only one)
    fc_out: g.LinearLike
    gate: g.LinearLike | None
    in_rows: tuple[int, int] | None  # rows of a fused gate_up weight that are "up"
    gate_rows: tuple[int, int] | None
    activation: str


def find_ffn(gm: fx.GraphModule, exclude: set[fx.Node]) -> tuple[list[FFNMatch], list[Skipped]]:
    """`exclude`: linear nodes already claimed by attention blocks."""
    found, skipped = [], []
    for node in list(gm.graph.nodes):
        fc_out = g.as_linear(node)
        if fc_out is None or node in exclude:
            continue
        try:
            m = _match_from_fc_out(fc_out, exclude)
        except NoMatch as err:
            skipped.append(Skipped(name=g.module_path(node) or node.name, kind="ffn", reason=str(err)))
            continue
        except Exception as err:  # an unforeseen graph must cost one block, not the compile
            skipped.append(Skipped(name=g.module_path(node) or node.name, kind="ffn", reason=g.internal_error(err)))
            continue
        if m is not None:
            found.append(m)
    return found, skipped


def _back_through_views(node):
    while g.is_call(node, {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                           aten.contiguous.default, aten.clone.default}) or g.is_eval_dropout(node):
        node = node.args[0]
    return node


def _linear_source(node):
    """(linear, rows) if node is a linear output, possibly one chunk of a fused projection."""
    node = _back_through_views(node)
    lin = g.as_linear(node)
    if lin is not None:
        return lin, None
    if g.is_call(node, {operator.getitem}) and g.is_call(node.args[0], g.SPLITS):
        split = node.args[0]
        src = _back_through_views(split.args[0])
        lin = g.as_linear(src)
        if lin is None:
            return None, None
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if dim % g.val(src).dim() != g.val(src).dim() - 1:
            return None, None
        width = g.static_int(g.val(node).shape[-1])
        return lin, (node.args[1] * width, (node.args[1] + 1) * width)
    return None, None


def _pointwise_chain(top, source) -> list[fx.Node] | None:
    """Nodes computing `top` from `source` alone through pointwise ops (None if not so)."""
    nodes, stack, seen = [], [top], set()
    while stack:
        n = stack.pop()
        if n is source or n in seen:
            continue
        seen.add(n)
        if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in g.POINTWISE):
            return None
        nodes.append(n)
        for a in n.args:
            if isinstance(a, fx.Node):
                stack.append(a)
            elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
                return None
    return nodes if nodes else None


def _activation_name(chain: list[fx.Node], source: fx.Node, top: fx.Node) -> str | None:
    order = {n: i for i, n in enumerate(top.graph.nodes)}
    chain = sorted(chain, key=order.get)

    def run(t):
        env = {source: t}
        for n in chain:
            args = [env.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
            kwargs = {k: env.get(v, v) if isinstance(v, fx.Node) else v for k, v in n.kwargs.items()}
            env[n] = n.target(*args, **kwargs)
        return env[top]

    try:
        return identify_activation(run)
    except Exception:
        return None


def _internal_users_ok(nodes: list[fx.Node], allowed: set[fx.Node]) -> bool:
    for n in nodes:
        for u in n.users:
            if u not in allowed:
                return False
    return True


def _match_from_fc_out(fc_out: g.LinearLike, exclude) -> FFNMatch | None:
    top = _back_through_views(fc_out.x)
    # gated: mul(act(gate), up)
    if g.is_call(top, {aten.mul.Tensor}) and all(isinstance(a, fx.Node) for a in top.args[:2]):
        for act_side, up_side in ((top.args[0], top.args[1]), (top.args[1], top.args[0])):
            up, up_rows = _linear_source(up_side)
            if up is None:
                continue
            gate = _find_act_source(act_side)
            if gate is None:
                continue
            gate_lin, gate_rows, chain, name = gate
            if _back_through_views(gate_lin.x) is not _back_through_views(up.x):
                continue
            if gate_lin.node is up.node and gate_rows == up_rows:
                break  # x * f(x) of one projection (quick-GELU, CLIP): an activation, not a gate
            if name is None:
                raise NoMatch("gated FFN with an activation moh-compile does not recognise")
            return _build(fc_out, up, up_rows, gate_lin, gate_rows, name, exclude)
    gate = _find_act_source(top)
    if gate is None:
        return None
    lin, rows, chain, name = gate
    if rows is not None:
        return None
    if name is None:
        raise NoMatch("linear -> pointwise -> linear, but the activation is not one moh-compile knows")
    return _build(fc_out, lin, None, None, None, name, exclude)


def _find_act_source(node):
    """If node = act(linear(...)) (pointwise only): (linear, rows, chain, activation name)."""
    node_v = _back_through_views(node)
    # find the linear feeding the pointwise chain: walk down first args through pointwise ops
    frontier, seen = [node_v], set()
    while frontier:
        n = frontier.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        lin, rows = _linear_source(n)
        if lin is not None and n is not node_v:
            src = n
            chain = _pointwise_chain(node_v, src)
            if chain is None:
                return None
            return lin, rows, chain, _activation_name(chain, src, node_v)
        if isinstance(n, fx.Node) and n.op == "call_function" and n.target in g.POINTWISE:
            frontier.extend(a for a in n.args if isinstance(a, fx.Node))
        elif g.is_call(n, {aten.view.default, aten.reshape.default}) and n is not node_v:
            frontier.append(n.args[0])
    return None


def _build(fc_out, up, up_rows, gate, gate_rows, activation, exclude) -> FFNMatch:
    if up.node in exclude or (gate is not None and gate.node in exclude):
        raise NoMatch("projection already belongs to an attention block")
    if g.val(up.x).shape[:-1] != g.val(fc_out.node).shape[:-1]:
        raise NoMatch("FFN output is not laid out like its input (token-wise check failed)")
    hidden = (up_rows[1] - up_rows[0]) if up_rows else up.out_features
    if fc_out.in_features != hidden:
        raise NoMatch("FFN projections disagree on the hidden size")
    paths = [g.module_path(n.node) for n in (up, fc_out) if n is not None]
    name = g.common_prefix(paths) or fc_out.node.name
    fused = gate is not None and gate.node is up.node

    def info(lin, rows):
        return ProjectionInfo(weight=g.param_name(lin.weight),
                              bias=g.param_name(lin.bias) if lin.bias is not None else None,
                              rows=rows, fused=rows is not None)

    block = FFNBlock(
        name=name, layer=g.layer_index(name), activation=activation, gated=gate is not None,
        fused_gate_up=fused, d_model=up.in_features, d_hidden=hidden, d_out=fc_out.out_features,
        fc_in=info(up, up_rows), fc_out=info(fc_out, None),
        gate=info(gate, gate_rows) if gate is not None else None,
    )
    return FFNMatch(block, up.x, up, fc_out, gate, up_rows, gate_rows, activation)


