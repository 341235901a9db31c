"""Recognise rotary position embeddings (RoPE) in an exported graph, in every common spelling.

Why one description for all of them: every RoPE variant rotates pairs of a head's dims,
out[a] = x[a] cos[a] - x[b] sin[a] and out[b] = x[b] cos[b] + x[a] sin[b], and leaves the
other dims alone. The variants differ only in which dims pair up:

- rotate-half (LLaMA, Mistral, Qwen): pairs (i, i + D/2) over the whole head;
- partial rotate-half (GPT-NeoX/Pythia, Phi): the same over the first r dims, the rest passed
  through (`cat([rope(x[..., :r]), x[..., r:]])`);
- interleaved, "rotate every two" (GPT-J, also partial there): pairs (2i, 2i + 1);
- rotate-half written on the two halves, cat([x1 cos - x2 sin, x2 cos + x1 sin]) with half-width
  tables (GPT-OSS): pairs (i, i + D/2), tables repeated to the full head by the rewrite.

The attention op implements rotate-half over the full head only. Any pairing is that one
after a fixed permutation of the head's dims (`head_dim_permutation`), applied to W_q's rows
and to the keys, with cos/sin tables padded (cos 1, sin 0 on passed-through dims) and
gathered by the same permutation. Attention scores are sums over head dims, so permuting the
dims of q and k alike changes nothing: the rewrite stays exact.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from moh_compile.match import graph as g

aten = g.aten
_END = 2**62  # slice ends at or beyond this mean "to the end"
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


@dataclass
class Rope:
    src: fx.Node  # the tensor before rotation; its last dim is the head dim
    cos: fx.Node  # tables over the rotated dims [offset, offset + width) of src's last dim
    sin: fx.Node
    offset: int
    width: int
    pairs: list[tuple[int, int]]  # rotated (a, b) dim pairs, as dims of src (offset included)
    head_dim: int
    half_tables: bool = False  # cos/sin cover one half of the head (the same for both halves)


def head_dim_permutation(rope: Rope) -> list[int]:
    """Order of the head's dims that turns the rope's pairs into rotate-half pairs (j, j + D/2):
    position j of the permuted head holds dim perm[j]. Identity for plain rotate-half."""
    paired = {d for p in rope.pairs for d in p}
    rest = [d for d in range(rope.head_dim) if d not in paired]
    half = len(rest) // 2
    first = [a for a, _ in rope.pairs] + rest[:half]
    second = [b for _, b in rope.pairs] + rest[half:]
    return first + second


def match_rope(node) -> Rope | None:
    """`node` as RoPE applied to some tensor, or None."""
    full = _rotation_sum(node)
    if full is not None:
        x, cos, sin, pairs = full
        d = g.static_int(g.val(x).shape[-1])
        return Rope(x, cos, sin, 0, d, pairs, d)
    return _partial(node) or _rotated_halves(node)


def _rotated_halves(node) -> Rope | None:
    """cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1) for the halves x1, x2 of x (GPT-OSS)."""
    if not (g.is_call(node, {aten.cat.default}) and _is_last_dim(node, node.args[1] if len(node.args) > 1 else 0)
            and len(node.args[0]) == 2):
        return None
    first, second = node.args[0]
    if not (g.is_call(first, {aten.sub.Tensor}) and g.is_call(second, {aten.add.Tensor})):
        return None
    products = [_product(t) for t in (*first.args[:2], *second.args[:2])]
    if None in products:
        return None
    (p1, m1), seconds = products[:2], {frozenset(p) for p in products[2:]}
    for x1, cos in (p1, p1[::-1]):          # first half: x1 * cos - x2 * sin
        for x2, sin in (m1, m1[::-1]):
            h1, h2 = _halves(x1), _halves(x2)
            if (h1 is not None and h2 is not None and h1 == (h2[0], 0) and h2[1] == 1
                    and seconds == {frozenset((x2, cos)), frozenset((x1, sin))}):  # second: x2 cos + x1 sin
                d = g.static_int(g.val(h1[0]).shape[-1])
                return Rope(h1[0], cos, sin, 0, d, [(i, i + d // 2) for i in range(d // 2)], d, half_tables=True)
    return None


def _product(node):
    """(a, b) when node = a * b of two tensors, else None."""
    if g.is_call(node, {aten.mul.Tensor}) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return node.args[0], node.args[1]
    return None


def _halves(node):
    """(x, 0 or 1) when node is the first / second half of x's last dim (chunk(2), split or slice)."""
    if isinstance(node, fx.Node) and node.target is operator.getitem and g.is_call(node.args[0], _SPLITS):
        split, index = node.args[0], node.args[1]
        x, size = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        d = g.static_int(g.val(x).shape[-1])
        if not (d and d % 2 == 0 and _is_last_dim(x, dim) and index in (0, 1)):
            return None
        want = {aten.chunk.default: 2, aten.split.Tensor: d // 2,
                aten.split_with_sizes.default: [d // 2, d // 2]}[split.target]  # two equal halves
        return (x, index) if (list(size) if isinstance(size, (list, tuple)) else size) == want else None
    sliced = _last_dim_slice(node)
    if sliced is None or sliced[0] is node:
        return None
    x, start, end = sliced
    d = g.static_int(g.val(x).shape[-1])
    if d and (start, end) in ((0, d // 2), (d // 2, d)):
        return x, int(start != 0)
    return None


def _partial(node) -> Rope | None:
    """cat([rope(x[..., s:e]), x[..., e:]], -1) and similar: parts that cover x's last dim in
    order, exactly one of them rotated."""
    if not g.is_call(node, {aten.cat.default}) or not _is_last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return None
    src, pos, rotated = None, 0, None
    for part in node.args[0]:
        rot = _rotation_sum(part)
        piece = rot[0] if rot is not None else part
        sliced = _last_dim_slice(piece)
        if sliced is None:
            return None
        base, start, end = sliced
        if (src is not None and base is not src) or start != pos:
            return None
        src, pos = base, end
        if rot is not None:
            if rotated is not None:
                return None
            rotated = (rot, start, end)
    d = g.static_int(g.val(src).shape[-1]) if src is not None else None
    if rotated is None or pos != d:
        return None
    (_, cos, sin, pairs), start, end = rotated
    return Rope(src, cos, sin, start, end - start, [(a + start, b + start) for a, b in pairs], d)


def _rotation_sum(node):
    """x * cos + rotate(x) * sin (either order) -> (x, cos, sin, pairs over x's last dim)."""
    if not g.is_call(node, {aten.add.Tensor}):
        return None
    a, b = node.args[0], node.args[1]
    if not (g.is_call(a, {aten.mul.Tensor}) and g.is_call(b, {aten.mul.Tensor})):
        return None
    for plain, rotated in ((a, b), (b, a)):
        for i in (0, 1):
            src, cos = plain.args[i], plain.args[1 - i]
            for j in (0, 1):
                pairs = _rotation_pairs(rotated.args[j], src)
                if pairs is not None:
                    return src, cos, rotated.args[1 - j], pairs
    return None


def _rotation_pairs(node, src) -> list[tuple[int, int]] | None:
    """The pairs (a, b) when node = rotate(src): out[a] = -src[b], out[b] = src[a]."""
    if not isinstance(src, fx.Node) or g.val(src) is None:
        return None
    src, node = _full_slice_source(src), _full_slice_source(node)  # Ernie 4.5 casts the rotated copy
    d = g.static_int(g.val(src).shape[-1])
    if not d or d % 2:
        return None
    half = d // 2
    # rotate-half: cat([-x[..., D/2:], x[..., :D/2]], -1)
    if g.is_call(node, {aten.cat.default}) and _is_last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        parts = node.args[0]
        if (len(parts) == 2 and g.is_call(parts[0], {aten.neg.default})
                and _last_dim_slice(parts[0].args[0]) == (src, half, d)
                and _last_dim_slice(parts[1]) == (src, 0, half)):
            return [(i, i + half) for i in range(half)]
    # rotate every two: stack([-x[..., 1::2], x[..., ::2]], -1) flattened over the last two dims
    if g.is_call(node, {aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                        aten._unsafe_view.default}) and g.val(node).shape[-1] == d:
        stack = node.args[0]
        if (g.is_call(stack, {aten.stack.default}) and (stack.args[1] if len(stack.args) > 1 else 0) in
                (-1, g.val(stack).dim() - 1) and g.static_int(g.val(stack).shape[-1]) == 2):
            parts = stack.args[0]
            if (len(parts) == 2 and g.is_call(parts[0], {aten.neg.default})
                    and _last_dim_slice(parts[0].args[0], step=2) == (src, 1, d)
                    and _last_dim_slice(parts[1], step=2) == (src, 0, d)):
                return [(2 * i, 2 * i + 1) for i in range(half)]
    return None


def _is_last_dim(node, dim) -> bool:
    return isinstance(dim, int) and dim in (-1, g.val(node).dim() - 1)


def _full_slice_source(node):
    """Strip aliases, same-dtype casts (ModernBERT rotates `q.float()` of a float32 q) and slices
    that keep a whole dim (x[:, :] as exported): they change nothing."""
    while g.is_call(node, {aten.slice.Tensor, aten.alias.default}) or (g.is_call(node, g.CASTS)
                                                                        and g.is_passthrough(node)):
        if node.target is not aten.slice.Tensor:
            node = node.args[0]
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        start, end, step = args[2] or 0, args[3], args[4] or 1
        if start != 0 or step != 1 or not (end is None or (isinstance(end, int) and end >= _END)):
            break
        node = node.args[0]
    return node


def _last_dim_slice(node, step: int = 1):
    """(source, start, end) when node = source[..., start:end:step] (through whole-dim slices);
    a node that is not such a slice is (node, 0, its last dim) when step is 1."""
    node = _full_slice_source(node)
    v = g.val(node)
    if v is None:
        return None
    if g.is_call(node, {aten.slice.Tensor}):
        args = list(node.args) + [None] * (5 - len(node.args))
        src = _full_slice_source(args[0])
        rank = g.val(src).dim()
        d = g.static_int(g.val(src).shape[-1])
        dim = args[1] if args[1] is not None else 0
        if dim % rank == rank - 1 and (args[4] or 1) == step and d:
            end = args[3]
            end = d if end is None or (isinstance(end, int) and end >= d) else end
            return src, args[2] or 0, end
        return None
    return (node, 0, g.static_int(v.shape[-1])) if step == 1 else None
