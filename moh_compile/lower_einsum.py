"""Canonical form for einsum contractions: permute -> matmul -> permute, as einsum itself runs them.

Why: torch.export keeps `torch.einsum` as one `aten.einsum` node, so attention written with
einsums (`'bqhd,bkhd->bhqk'` for Q K^T, `'bhqk,bkhd->bqhd'` for P V: XLNet, Funnel, much
research code) shows the structural matcher no matmul to anchor on, and an einsum projection
(`'bsd,fd->bsf'`) no linear. Lowering every two-operand einsum that is a matrix product into the
permutes and matmul that einsum computes anyway makes those blocks look like every other one.

Lowered: any contraction with at least one contracted letter and one free letter on each side,
letters shared by both operands and kept in the output being batch dims; with batch dims the left
operand has one free letter, without them any number (`x @ W`); groups of several contracted or
free letters are flattened into one dim (the right operand's free sizes must be static, e.g. a
(d_model, heads, head_dim) weight). Everything else (outer products, letters summed on one side,
diagonals, three operands) stays an einsum.
The keys side is written as `permute` + `transpose(-2, -1)` when its contracted letter comes last,
the way Q K^T is written by hand, so the matcher walks it like any other.
"""
from __future__ import annotations

import string

import torch
import torch.fx as fx

from moh_compile.match import graph as g

aten = torch.ops.aten
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


def lower_einsums(gm: fx.GraphModule) -> int:
    """Rewrite each lowerable `aten.einsum` node of `gm` in place; returns how many were lowered."""
    from moh_compile.rewrite import GraphBuilder  # rewrite imports the matcher, which this module serves

    lowered = 0
    for node in list(gm.graph.nodes):
        if not g.is_call(node, {aten.einsum.default}):
            continue
        plan = contraction_plan(node)
        if plan is None:
            continue
        b = GraphBuilder(gm.graph, node.prev)
        order, left_steps, right_steps, tail = plan
        left, right = (_apply(b, node.args[1][i], steps) for i, steps in zip(order, (left_steps, right_steps)))
        result = _apply(b, b.call(aten.matmul.default, left, right), tail)
        for new in b.nodes:
            new.meta.update({key: node.meta[key] for key in _COPIED_META if key in node.meta})
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered


def _apply(b, x: fx.Node, steps: list[tuple]) -> fx.Node:
    for target, *args in steps:
        x = b.call(target, x, *args)
    return x


def contraction_plan(node: fx.Node):
    """(operand order, steps for the left operand, steps for the right one, steps for the product):
    the layout ops that turn the einsum into one matmul, each step (aten op, *args); None when it is
    not a lowerable matrix product. The operands are swapped when only that order lowers (a weight
    written first, `'hd,bsd->bsh'`)."""
    if len(node.args) != 2 or node.kwargs.get("path") is not None:
        return None
    equation, operands = node.args
    if not isinstance(equation, str) or len(operands) != 2 or any(g.val(x) is None for x in operands):
        return None
    terms = _parse(equation, [g.val(x).dim() for x in operands])
    if terms is None:
        return None
    (a, b), out = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None  # diagonals, or output letters that come from nowhere
    for order in ((0, 1), (1, 0)):
        (left, right), shapes = ((a, b), (b, a))[order[0]], [g.val(operands[i]).shape for i in order]
        plan = _matmul_plan(left, right, out, shapes[1])
        if plan is not None:
            return (order, *plan)
    return None


def _matmul_plan(a: list[str], b: list[str], out: list[str], b_shape):
    """contraction_plan for the operands in this order (b_shape: the right operand's shape)."""
    batch = [c for c in out if c in a and c in b]
    contract = [c for c in a if c in b and c not in out]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    if not (contract and free_a and free_b) or not set(free_a + free_b) <= set(out):
        return None  # outer products, or letters summed over on one side only
    if batch and len(free_a) != 1:
        return None  # several free letters on the left broadcast only against a 2-D right operand
    sizes = [g.static_int(b_shape[b.index(c)]) for c in free_b]
    if len(free_b) > 1 and None in sizes:
        return None  # the product's last dim is unflattened to these sizes: they must be known
    left = _grouped(a, batch + free_a, [contract])
    if b.index(contract[0]) < b.index(free_b[0]):
        right = _grouped(b, batch, [contract, free_b])
    else:  # keys, written K^T by hand: [.., free, contract], then transposed
        right = _grouped(b, batch, [free_b, contract]) + [(aten.transpose.int, -2, -1)]
    product = batch + free_a + free_b
    tail = [(aten.unflatten.int, -1, sizes)] if len(free_b) > 1 else []
    if product != out:
        tail.append((aten.permute.default, [product.index(x) for x in out]))
    return left, right, tail


def _grouped(letters: list[str], lead: list[str], groups: list[list[str]]) -> list[tuple]:
    """Steps that order `letters` as lead + the groups, then flatten each group of several letters
    into one dim (the last group first, so earlier dims keep their index)."""
    want = lead + [c for grp in groups for c in grp]
    steps = [] if letters == want else [(aten.permute.default, [letters.index(x) for x in want])]
    end = len(want)
    for grp in reversed(groups):
        if len(grp) > 1:
            steps.append((aten.flatten.using_ints, end - len(grp), end - 1))
        end -= len(grp)
    return steps


def _parse(equation: str, ranks: list[int]):
    """([letters of each operand], output letters), with '...' expanded into fresh letters; the
    implicit output (no '->') is every letter used once, sorted, after the ellipsis. None for
    ellipses of different lengths (broadcast batch dims the plan does not handle)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ranks):
        return None
    spare = [c for c in string.ascii_letters if c not in eq]
    ellipsis: list[str] | None = None
    terms = []
    for term, rank in zip(inputs, ranks):
        if "..." in term:
            n = rank - (len(term) - 3)
            if n < 0 or (ellipsis is not None and len(ellipsis) != n):
                return None
            ellipsis = spare[:n]
            head, _, tail = term.partition("...")
            terms.append(list(head) + ellipsis + list(tail))
        else:
            if len(term) != rank:
                return None
            terms.append(list(term))
    if arrow:
        if "..." in rhs:
            head, _, tail = rhs.partition("...")
            out = list(head) + (ellipsis or []) + list(tail)
        else:
            out = list(rhs)
    else:
        named = [c for t in inputs for c in t.replace("...", "")]
        out = (ellipsis or []) + sorted(c for c in set(named) if named.count(c) == 1)
    if not all(c.isalpha() for t in terms + [out] for c in t):
        return None
    return terms, out


__all__ = ["lower_einsums", "contraction_plan"]
