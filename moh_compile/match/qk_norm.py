"""Recognise an RMS norm over the last dim (the QK-norm of Qwen3 and Gemma 3) in an exported graph.

Why by structure: models spell RMSNorm as x * rsqrt(mean(x^2, -1, keepdim) + eps), times a
learned scale w (Qwen3, LLaMA-style), (1 + w) (Gemma), or nothing, with dtype casts anywhere
in between; nn.RMSNorm exports as one aten.rms_norm. All of them are one description here:
the input, the scale parameter and its offset, eps and the normalised width. The attention
matcher applies it to the query (match/attention.py); the op recomputes it per head, so a
token's unchosen heads still cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moh_compile.match import graph as g

aten = g.aten
_ADDS = {aten.add.Tensor, aten.add.Scalar}
_MAX_FACTORS_DEPTH = 4


@dataclass
class RmsNorm:
    src: fx.Node  # the tensor before the norm; its last dim is normalised
    weight: fx.Node | None  # parameter scaling each feature (None: no scale)
    weight_offset: float  # the scale is weight + offset (Gemma: 1 + w)
    eps: float
    width: int  # size of the normalised last dim


def match_rms_norm(node) -> RmsNorm | None:
    """`node` as an RMS norm over its last dim, or None."""
    if not isinstance(node, fx.Node):
        return None
    node = _strip_casts(node)
    if g.is_call(node, {aten.rms_norm.default}):
        return _from_rms_norm_op(node)
    rsqrts = [f for f in _factors(node, stop=None) if g.is_call(f, {aten.rsqrt.default})]
    if len(rsqrts) != 1:
        return None
    stat = _mean_square_plus_eps(rsqrts[0])
    if stat is None:
        return None
    src, eps = stat
    rest = _factors(node, stop=src)
    rest.remove(rsqrts[0])
    if sum(f is src for f in rest) != 1:
        return None
    rest = [f for f in rest if f is not src]
    width = g.static_int(g.val(src).shape[-1]) if g.val(src) is not None else None
    if width is None or len(rest) > 1:
        return None
    weight, offset = (None, 0.0) if not rest else _scale_parameter(rest[0], width)
    if rest and weight is None:
        return None
    return RmsNorm(src, weight, offset, eps, width)


def _strip_casts(node):
    while g.is_call(node, g.CASTS) or g.is_call(node, {aten.type_as.default}):
        node = node.args[0]
    return node


def _factors(node, stop, depth: int = 0) -> list:
    """The operands of a product of tensors (mul chains through casts), not expanding `stop`."""
    node = _strip_casts(node)
    if (node is not stop and depth < _MAX_FACTORS_DEPTH and g.is_call(node, {aten.mul.Tensor})
            and all(isinstance(a, fx.Node) for a in node.args[:2])):
        return _factors(node.args[0], stop, depth + 1) + _factors(node.args[1], stop, depth + 1)
    return [node]


def _mean_square_plus_eps(rsqrt: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, eps) when rsqrt's input is mean(x^2 over the last dim, keepdim) + eps."""
    add = rsqrt.args[0]
    if not g.is_call(add, _ADDS):
        return None
    a, b = add.args[:2]
    mean, eps = (a, g.scalar_of(b)) if g.scalar_of(b) is not None else (b, g.scalar_of(a))
    if eps is None or not g.is_call(mean, {aten.mean.dim}):
        return None
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    rank = g.val(mean.args[0]).dim()
    if not keepdim or dims is None or [d % rank for d in dims] != [rank - 1]:
        return None
    square = mean.args[0]
    if g.is_call(square, {aten.pow.Tensor_Scalar}) and g.scalar_of(square.args[1]) == 2.0:
        x = square.args[0]
    elif g.is_call(square, {aten.mul.Tensor}) and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    return _strip_casts(x), float(eps)


def _scale_parameter(node, width: int) -> tuple[fx.Node | None, float]:
    """(parameter, offset) when `node` is a (width,) parameter, or the parameter plus a constant."""
    offset = 0.0
    if g.is_call(node, _ADDS):
        a, b = node.args[:2]
        param, c = (a, g.scalar_of(b)) if g.scalar_of(b) is not None else (b, g.scalar_of(a))
        if c is None:
            return None, 0.0
        node, offset = _strip_casts(param), c
    value = g.val(node)
    if not g.is_weight(node) or value is None or tuple(value.shape) != (width,):
        return None, 0.0
    return node, offset


def _from_rms_norm_op(node: fx.Node) -> RmsNorm | None:
    shape = node.args[1]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    src = node.args[0]
    value = g.val(src)
    if value is None or len(shape) != 1:
        return None
    if eps is None:  # torch's default: the input dtype's machine epsilon
        eps = torch.finfo(value.dtype).eps
    return RmsNorm(src, weight, 0.0, float(eps), int(shape[0]))
