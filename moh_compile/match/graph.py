"""Small helpers for reading an exported aten graph: op families, walks, shapes, names.

Why a module of its own: the matchers must be exporter-agnostic, so they reason about
*kinds* of ops (layout-only, pointwise, linear-like) rather than about node sequences of a
particular model family.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch._ops import OpOverload

aten = torch.ops.aten

SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}  # dtype conversions
MATMUL = {aten.matmul.default, aten.bmm.default}
BADDBMM = {aten.baddbmm.default}

# Ops that only move or relabel data: walking through them keeps the same values.
LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.select.int, aten.slice.Tensor,
    aten.unflatten.int, aten.flatten.using_ints, aten.alias.default, aten.expand.default, aten.broadcast_to.default,
    aten.t.default, aten.numpy_T.default, aten.detach.default, aten.lift_fresh_copy.default,
}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
          aten.split.sizes, aten.tensor_split.sections}

POINTWISE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.sub.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.erf.default, aten.sigmoid.default, aten.exp.default, aten.neg.default, aten.gelu.default,
    aten.relu.default, aten.silu.default, aten.rsub.Scalar, aten.sqrt.default, aten.reciprocal.default,
    aten.clamp_min.default, aten.clamp.default, aten.hardtanh.default, aten.leaky_relu.default,
    aten.mish.default, aten.hardswish.default, aten.elu.default, aten.square.default,
}


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_eval_dropout(node) -> bool:
    """Dropout that is a no-op in the captured (eval) graph."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in (aten.dropout.default, aten.native_dropout.default):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return p == 0.0 or train is False
    return False


def is_passthrough(node) -> bool:
    """A node whose output holds the same values as its first input (possibly re-laid out)."""
    if is_eval_dropout(node):
        return True
    if isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in LAYOUT:
            return True
        if node.target in CASTS:
            src, dst = val(node.args[0]), val(node)
            return src is not None and dst is not None and src.dtype == dst.dtype
        if node.target is operator.getitem and is_call(node.args[0], SPLITS):
            return True
        if node.target in SPLITS:
            return True
    return False


def residual_add_after(node: fx.Node, max_hops: int = 4) -> fx.Node | None:
    """The add that puts a block's output back on the residual stream: the only user of `node`,
    through no-op nodes (eval dropout, clone, passthroughs), whose other input is an activation
    of the output's shape (not a bias or other parameter); else None."""
    def same_shape(a, b) -> bool:
        sa, sb = getattr(val(a), "shape", None), getattr(val(b), "shape", None)
        return sa is None or sb is None or sa == sb

    cur = node
    for _ in range(max_hops):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_call(u, {aten.add.Tensor}):
            other = u.args[1] if u.args[0] is cur else u.args[0]
            ok = isinstance(other, fx.Node) and other.op != "get_attr" and val(other) is not None \
                and same_shape(other, u) and same_shape(cur, u)
            return u if ok else None
        if not (is_call(u, {aten.clone.default}) or is_passthrough(u)) or not same_shape(cur, u):
            return None
        cur = u
    return None


def val(node):
    """The FakeTensor recorded by export for a node (shape/dtype carrier), or None."""
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        return v if isinstance(v, torch.Tensor) else None
    return None


def dim_key(d) -> str:
    """A comparable key for a possibly symbolic dimension."""
    if isinstance(d, torch.SymInt):
        return str(d.node.expr)
    return str(int(d))


def shape_keys(node) -> tuple[str, ...] | None:
    v = val(node)
    return None if v is None else tuple(dim_key(d) for d in v.shape)


def static_int(d) -> int | None:
    if isinstance(d, torch.SymInt):
        try:
            return int(d.node.expr)
        except TypeError:
            return None
    return int(d)


def scalar_scaling(node) -> tuple[fx.Node, float] | None:
    """(input, factor) when node = input * scalar or input / scalar; else None."""
    if is_call(node, {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}):
        f = constant_scalar(node.args[1], parameters=False)
        if f is not None:
            return node.args[0], (f if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / f)
    return None


def scalar_of(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


_CONSTANT_COPIES = {aten.lift_fresh_copy.default, aten.detach.default, aten.detach_.default, aten.clone.default}
# arithmetic a model may do on its own constants (DeBERTa's scale: sqrt(tensor(head_dim) * 3))
_CONSTANT_MATH = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                  aten.sub.Tensor, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.neg.default,
                  aten.pow.Tensor_Scalar}


def constant_scalar(x, parameters: bool = True) -> float | None:
    """A number, or the value of a one-element float tensor computed from the module's constants
    only (a model's `torch.tensor(torch.finfo(dtype).min)`, lifted by export and copied; a scale
    computed from a constant); else None. parameters=False refuses values that read a parameter
    (a learned temperature must stay in the graph, not be frozen into a number)."""
    if not isinstance(x, fx.Node):
        return scalar_of(x)
    value = _constant_value(x, parameters, depth=8)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value)
    return None


def _constant_value(x, parameters: bool, depth: int):
    """Evaluate a small subgraph of copies, casts and arithmetic on get_attr tensors and numbers."""
    if not isinstance(x, fx.Node):
        return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None
    if x.op == "get_attr":
        value = attribute(x.graph.owning_module, x.target)
        ok = isinstance(value, torch.Tensor) and value.numel() == 1 and (parameters or not isinstance(value, nn.Parameter))
        return value.detach().clone() if ok else None
    if depth == 0 or not (is_call(x, _CONSTANT_COPIES) or is_call(x, CASTS) or is_call(x, _CONSTANT_MATH)):
        return None
    args = []
    for a in x.args:
        v = _constant_value(a, parameters, depth - 1) if isinstance(a, fx.Node) else a
        if v is None:
            return None
        args.append(v)
    try:
        with torch.no_grad():
            return x.target(*args, **x.kwargs)
    except Exception:  # e.g. a cast to another device: not a constant we can read here
        return None


@dataclass
class LinearLike:
    """A projection: y = x W^T + b, whatever aten op spelled it."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_is_in_out: bool  # True when the stored weight is (in, out), as in GPT-2's Conv1D

    @property
    def out_features(self) -> int:
        w = val(self.weight)
        return int(w.shape[1] if self.weight_is_in_out else w.shape[0])

    @property
    def in_features(self) -> int:
        w = val(self.weight)
        return int(w.shape[0] if self.weight_is_in_out else w.shape[1])


def is_weight(node) -> bool:
    """True for a parameter, a view of one, or its rows gathered by a constant index (weights
    never depend on the model's inputs)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "get_attr":
            return True
        if node.op == "call_function" and (node.target in LAYOUT or node.target is operator.getitem
                                           or node.target in SPLITS or _constant_gather(node)):
            node = node.args[0]
            seen += 1
            continue
        return False
    return False


def _constant_gather(node: fx.Node) -> bool:
    return node.target is aten.index_select.default and isinstance(node.args[2], fx.Node) \
        and node.args[2].op == "get_attr"


def as_linear(node) -> LinearLike | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if is_weight(w) and val(w) is not None and val(w).dim() == 2:
            return LinearLike(node, node.args[0], w, b, False)
    if node.target is aten.addmm.default:
        b, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1 and is_weight(w):
            return LinearLike(node, x, w, b, True)
    if node.target in (aten.mm.default, aten.matmul.default):
        lin = _bias_free_matmul(node)
        if lin is not None and _bias_added(lin) is None:  # with a bias added, the add is the linear
            return lin
    if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
        for mm in node.args:
            lin = _bias_free_matmul(mm) if is_call(mm, {aten.mm.default, aten.matmul.default}) else None
            if lin is not None and _bias_added(lin) is node:
                bias = node.args[1] if mm is node.args[0] else node.args[0]
                return LinearLike(node, lin.x, lin.weight, bias, True)
    return None


def _bias_free_matmul(node: fx.Node) -> LinearLike | None:
    """x @ W for a 2-D weight W (stored (in, out))."""
    x, w = node.args[:2]
    if is_weight(w) and val(w) is not None and val(w).dim() == 2 and not is_weight(x):
        return LinearLike(node, x, w, None, True)
    return None


def _bias_added(lin: LinearLike) -> fx.Node | None:
    """The node `x @ W + b` when the product's only use adds a 1-D weight b of out_features
    (hand-written projections, einsum ones once lowered), else None."""
    users = list(lin.node.users)
    if len(users) != 1 or not is_call(users[0], {aten.add.Tensor}) or users[0].kwargs:
        return None
    add = users[0]
    other = add.args[1] if add.args[0] is lin.node else add.args[0]
    b = val(other)
    ok = other is not lin.node and is_weight(other) and b is not None and b.dim() == 1 \
        and static_int(b.shape[0]) == lin.out_features and val(add) is not None \
        and val(add).shape == val(lin.node).shape
    return add if ok else None


def attribute(gm: fx.GraphModule, target: str):
    """The module attribute a get_attr node reads (dotted path)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def param_name(node) -> str | None:
    """Dotted parameter name behind a weight node (through views), for reports."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return str(node.target)
        if node.op != "call_function" or not node.args:
            return None
        node = node.args[0]
    return None


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    path = re.sub(r"L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.replace("getattr(", "").replace(")", "")
    return path.strip(".")


def common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


_SEEDED_BUT_PURE = {aten.scaled_dot_product_attention.default, aten.dropout.default, aten.native_dropout.default}


def internal_error(err: Exception) -> str:
    """Skip reason for a matcher failure nobody foresaw (a bug to report, not a user mistake)."""
    return f"matcher failed on this graph ({type(err).__name__}: {str(err).splitlines()[0][:160]}); please report it"


def is_metadata_assert(node) -> bool:
    """torch.export's `_assert_tensor_metadata` check of a tensor (emitted for `.to(dtype)` calls):
    a user of the tensor that carries no data."""
    return is_call(node, {aten._assert_tensor_metadata.default})


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (metadata asserts left out)."""
    return [u for u in node.users if not is_metadata_assert(u)]


def inplace_on_temporary(node) -> bool:
    """An in-place aten op (`scores += bias`, MPNet) whose mutated input is an intermediate that
    nothing else reads: the same values as its out-of-place form, and free to remove."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.target, OpOverload)):
        return False
    if not node.target._schema.name.endswith("_") or not node.args:
        return False
    target = node.args[0]
    if not (isinstance(target, fx.Node) and target.op == "call_function" and list(target.users) == [node]):
        return False
    # a view (a slice written in place, as DeepSeek fills its keys) mutates the tensor it views
    return not (isinstance(target.target, OpOverload)
                and any(r.alias_info is not None for r in target.target._schema.returns))


def output_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The nodes the graph returns, as {"out0": node, ...} in output order (each once)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    nodes: list[fx.Node] = []
    fx.node.map_arg(out.args, lambda n: nodes.append(n) or n)
    return {f"out{i}": n for i, n in enumerate(dict.fromkeys(nodes))}


def remove_dead_code(gm: fx.GraphModule) -> None:
    """DCE that also drops unused SDPA/dropout nodes (fx keeps "seeded" ops as impure), in-place
    ops on temporaries, and metadata asserts on tensors nothing else reads (they would keep a
    replaced block alive)."""
    def impure(node: fx.Node) -> bool:
        if node.op == "call_function" and node.target in _SEEDED_BUT_PURE:
            return False
        if inplace_on_temporary(node):
            return False
        if is_metadata_assert(node) and isinstance(node.args[0], fx.Node) and not data_users(node.args[0]):
            return False
        return node.is_impure()

    gm.graph.eliminate_dead_code(is_impure_node=impure)
    gm.recompile()
