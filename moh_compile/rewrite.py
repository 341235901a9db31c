"""Graph surgery: replace a matched block by one call to the project's op.

Every rewrite is checked before it is committed: the new op's output and the old block's
output are both computed on the example inputs (probe nodes in the same forward), and a
block whose rewrite does not reproduce the original is left untouched and reported.
A wrong rewrite is never kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from moh_compile.match import graph as g
from moh_compile.match.graph import remove_dead_code
from moh_compile.match.attention import AttentionMatch, MaskStep
from moh_compile.match.ffn import FFNMatch
from moh_compile.errors import MohCompileError

aten = torch.ops.aten

_PROBES: dict[str, list] = {}


def _probe(key: str, t: torch.Tensor) -> None:
    # a copy: graphs may update a value in place later (Falcon adds attention into the MLP output)
    _PROBES.setdefault(key, []).append(t.detach().clone())


torch.fx.wrap("_probe")


@dataclass
class PendingRewrite:
    """Nodes inserted for one block, not yet wired in (old block still computes the output)."""

    name: str
    kind: str
    old: fx.Node
    new: fx.Node
    inserted: list[fx.Node] = field(default_factory=list)


class GraphBuilder:
    """Inserts nodes in order right after `anchor`, remembering what it inserted. Inserted nodes
    get shape metadata (meta["val"]) like export's own, so later graph analysis reads them alike."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph = graph
        self.before = anchor.next
        self.nodes: list[fx.Node] = []
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes])

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, tuple(args), kwargs)
        self._infer_val(node)
        self.nodes.append(node)
        return node

    def _infer_val(self, node: fx.Node) -> None:
        """Run the node on its inputs' fake values; no metadata when an input has none."""
        if self.fake_mode is None:
            return
        missing = []
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda n: n.meta["val"] if "val" in n.meta else missing.append(n))
        if missing:
            return
        try:
            with self.fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # metadata is a convenience: a node it cannot describe still runs
            pass

    def module(self, name: str, *args) -> fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_module(name, tuple(args))
        self.nodes.append(node)
        return node

    def attr(self, name: str) -> fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.get_attr(name)
        value = g.attribute(self.graph.owning_module, name)
        if self.fake_mode is not None and isinstance(value, torch.Tensor):
            node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        self.nodes.append(node)
        return node

    def constant(self, prefix: str, value: torch.Tensor) -> fx.Node:
        """A new buffer of the module (an index table, say), read by a get_attr node."""
        gm = self.graph.owning_module
        name = free_name(gm, prefix)
        gm.register_buffer(name, value)
        return self.attr(name)


def _weight_as_linear(b: GraphBuilder, lin: g.LinearLike, rows: list[int] | None):
    """Weight in nn.Linear layout (out, in), restricted to `rows` of the projection, in that
    order: a slice when they are one range (a fused projection's q block), else a gather (per
    head interleaved fused layouts, RoPE dim permutations)."""
    w, bias = lin.weight, lin.bias
    out_dim = 1 if lin.weight_is_in_out else 0
    if rows is not None and rows != list(range(lin.out_features)):
        if rows == list(range(rows[0], rows[0] + len(rows))):
            w = b.call(aten.slice.Tensor, w, out_dim, rows[0], rows[0] + len(rows))
            if bias is not None:
                bias = b.call(aten.slice.Tensor, bias, 0, rows[0], rows[0] + len(rows))
        else:
            index = b.constant("moh_q_rows", torch.tensor(rows))
            w = b.call(aten.index_select.default, w, out_dim, index)
            if bias is not None:
                bias = b.call(aten.index_select.default, bias, 0, index)
    if lin.weight_is_in_out:
        w = b.call(aten.t.default, w)
    return w, bias


def _rope_operands(b: GraphBuilder, m: AttentionMatch, k: fx.Node):
    """(cos, sin, k) for the op's full-head rotate-half RoPE: tables padded to the head (cos 1,
    sin 0 on dims the model does not rotate) and, for other pairings, the tables and the keys
    put in the permuted head-dim order the op's W_q rows already have (match/rope.py)."""
    rope, d = m.rope, m.block.head_dim
    if rope is None:
        return None, None, k
    cos, sin = rope.cos, rope.sin
    if rope.half_tables:  # GPT-OSS: one half-width table serves both halves
        cos, sin = (b.call(aten.cat.default, [t, t], -1) for t in (cos, sin))
    if (rope.offset, rope.width) != (0, d):
        pad = [rope.offset, d - rope.offset - rope.width]
        cos = b.call(aten.constant_pad_nd.default, cos, pad, 1.0)
        sin = b.call(aten.constant_pad_nd.default, sin, pad, 0.0)
    if m.head_perm is not None:
        perm = b.constant("moh_head_perm", torch.tensor(m.head_perm))
        cos, sin, k = (b.call(aten.index_select.default, t, -1, perm) for t in (cos, sin, k))
    if m.rope_seq_major and g.val(rope.cos).dim() >= 3:
        # cos/sin broadcast as (.., S, 1, D): the op applies RoPE heads-major, (.., 1, S, D)
        cos, sin = (b.call(aten.transpose.int, t, -3, -2) for t in (cos, sin))
    return cos, sin, k


def _q_norm_operand(b: GraphBuilder, m: AttentionMatch) -> fx.Node | None:
    """The op's per-dim query-norm scale: the model's parameter (plus its offset, Gemma's 1 + w;
    ones when the norm has no scale), in the op's head-dim order. None without QK-norm."""
    norm = m.q_norm
    if norm is None:
        return None
    if norm.weight is None:
        w = b.constant("moh_q_norm_ones", torch.ones(norm.width, dtype=g.val(m.q_proj.weight).dtype))
    else:
        w = norm.weight
        if norm.weight_offset:
            w = b.call(aten.add.Tensor, w, norm.weight_offset)
    if m.head_perm is not None:
        w = b.call(aten.index_select.default, w, 0, b.constant("moh_head_perm", torch.tensor(m.head_perm)))
    return w


def attention_operands(b: GraphBuilder, m: AttentionMatch) -> dict:
    """Graph nodes for the op's operands, in the op's canonical layouts."""
    blk = m.block
    x = m.x if blk.layout == "batch_first" else b.call(aten.transpose.int, m.x, 0, 1)
    wq, bq = (None, None) if m.query is not None else _weight_as_linear(b, m.q_proj, m.q_rows)
    wo, bo = _weight_as_linear(b, m.o_proj, None)
    cos, sin, k = _rope_operands(b, m, m.k)
    v = m.v
    bsz = b.call(aten.sym_size.int, x, 0)
    seq = b.call(aten.sym_size.int, x, 1)
    seq_k = b.call(aten.sym_size.int, m.k, -2)  # the keys' own length (cross-attention: the encoder's)
    if g.val(m.k).dim() == 3:
        k = b.call(aten.view.default, k, [bsz, blk.num_heads, seq_k, blk.head_dim])
        v = b.call(aten.view.default, v, [bsz, blk.num_heads, seq_k, blk.v_head_dim or blk.head_dim])
    mask = _mask_operand(b, m.mask_steps, x, bsz)
    if m.is_causal_flag:
        ones = b.call(aten.new_ones.default, x, [seq, seq_k], dtype=torch.bool)  # SDPA's: top-left aligned
        mask = b.call(aten.tril.default, ones)
    return dict(x=x, q_weight=wq, q_bias=bq, k=k, v=v, attn_mask=mask, rope_cos=cos,
                rope_sin=sin, o_weight=wo, o_bias=bo, q_norm_weight=_q_norm_operand(b, m),
                sinks=None if m.sinks is None else b.call(aten.reshape.default, m.sinks, [-1]), query=m.query,
                out_gate=_out_gate_operand(b, m, bsz, seq))


def _out_gate_operand(b: GraphBuilder, m: AttentionMatch, bsz: fx.Node, seq: fx.Node) -> fx.Node | None:
    """The model's gate on the heads' contexts as the op takes it, (B, H, S, Dv)."""
    gate, blk = m.out_gate, m.block
    if gate is None or m.out_gate_layout == "bhsd":
        return gate
    if m.out_gate_layout == "bsf":
        gate = b.call(aten.view.default, gate, [bsz, seq, blk.num_heads, blk.v_head_dim or blk.head_dim])
    return b.call(aten.transpose.int, gate, 1, 2)


def _mask_operand(b: GraphBuilder, steps: list[MaskStep], x: fx.Node, bsz: fx.Node) -> fx.Node | None:
    """The op's one mask from the model's masking steps: additive terms summed; a masked_fill as
    the model's fill value where its condition holds (a bool "visible" mask when it is the only
    step and fills -inf). Terms of (B*H, S, S_k) scores are viewed as (B, H, S, S_k); a step's
    `factor` (scores scaled after it) scales its term or fill value."""
    mask = None
    for step in steps:
        t = step.tensor
        if step.scores_rank == 3 and g.val(t).dim() == 3:
            rows, cols = (b.call(aten.sym_size.int, t, i) for i in (1, 2))
            t = b.call(aten.view.default, t, [bsz, -1, rows, cols])
        if step.kind == "add":
            if step.factor != 1.0:
                t = b.call(aten.mul.Tensor, t, step.factor)
            mask = t if mask is None else b.call(aten.add.Tensor, mask, t)
        elif len(steps) == 1 and step.value == float("-inf"):
            mask = b.call(aten.logical_not.default, t) if step.fill_where else t
        else:
            base = mask if mask is not None else b.call(aten.new_zeros.default, x, [])
            value = step.value * step.factor
            mask = (b.call(aten.where.ScalarSelf, t, value, base) if step.fill_where
                    else b.call(aten.where.ScalarOther, t, base, value))
    return mask


GatesFn = Callable[[GraphBuilder, dict], tuple[fx.Node | None, fx.Node | None]]


def _trailing_operands(m: AttentionMatch, ops: dict) -> tuple:
    """The op's optional last arguments (QK-norm, soft-capping, attention sinks, queries from the
    graph, output gate), trailing defaults left out so that graphs without them keep the short form."""
    tail = [ops["q_norm_weight"], float(m.q_norm.eps) if m.q_norm is not None else 0.0, float(m.block.softcap),
            ops["sinks"], ops["query"], ops["out_gate"]]
    while tail and (tail[-1] is None or (isinstance(tail[-1], float) and tail[-1] == 0.0)):  # the defaults
        tail.pop()
    return tuple(tail)


def insert_attention(gm: fx.GraphModule, m: AttentionMatch, gates_fn: GatesFn | None = None,
                     window: dict | None = None) -> PendingRewrite:
    """Insert `moh_compile.attention` for a matched block.

    gates_fn(builder, operands) may add a router and return (head_gates, compensation) nodes;
    window: {'sink': [...], 'alpha': [...], 'beta': [...], 'two_sided': bool} per-head pattern.
    """
    b = GraphBuilder(gm.graph, m.y)
    ops = attention_operands(b, m)
    gates, compensation = (None, None) if gates_fn is None else gates_fn(b, ops)
    w = window or {}
    out = b.call(torch.ops.moh_compile.attention.default, ops["x"], ops["q_weight"], ops["q_bias"], ops["k"],
                 ops["v"], ops["attn_mask"], ops["rope_cos"], ops["rope_sin"], ops["o_weight"], ops["o_bias"],
                 gates, float(m.block.scale), w.get("sink"), w.get("alpha"), w.get("beta"),
                 bool(w.get("two_sided", False)), *_trailing_operands(m, ops))
    if compensation is not None:
        out = b.call(aten.add.Tensor, out, compensation)
    if m.block.layout == "seq_first":
        out = b.call(aten.transpose.int, out, 0, 1)
    return PendingRewrite(m.block.name, "attention", m.y, out, b.nodes)


def _range_rows(rows: tuple[int, int] | None) -> list[int] | None:
    """A fused gate_up projection's half, recorded as (start, stop), as the row list it holds."""
    return None if rows is None else list(range(*rows))


def ffn_operands(b: GraphBuilder, m: FFNMatch) -> dict:
    w_in, b_in = _weight_as_linear(b, m.fc_in, _range_rows(m.in_rows))
    w_out, b_out = _weight_as_linear(b, m.fc_out, None)
    w_gate = b_gate = None
    if m.gate is not None:
        w_gate, b_gate = _weight_as_linear(b, m.gate, _range_rows(m.gate_rows))
    return dict(x=m.x, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, w_gate=w_gate, b_gate=b_gate)


def insert_ffn(gm: fx.GraphModule, m: FFNMatch, emit: Callable[[GraphBuilder, dict], fx.Node] | None = None
               ) -> PendingRewrite:
    """Insert the dense `moh_compile.ffn` op (or what `emit` builds from the operands)."""
    b = GraphBuilder(gm.graph, m.fc_out.node)
    ops = ffn_operands(b, m)
    if emit is None:
        out = b.call(torch.ops.moh_compile.ffn.default, ops["x"], ops["w_in"], ops["b_in"], ops["w_out"],
                     ops["b_out"], ops["w_gate"], ops["b_gate"], m.activation)
    else:
        out = emit(b, ops)
    return PendingRewrite(m.block.name, "ffn", m.fc_out.node, out, b.nodes)


def free_name(gm: fx.GraphModule, prefix: str) -> str:
    """`prefix_N`, the first N not already an attribute of gm (for parameters/submodules a pass adds)."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def drop_unread_attrs(gm: fx.GraphModule, names) -> None:
    """Delete the attributes in `names` (dotted parameter names) that no get_attr node reads any
    more, e.g. weights a pass replaced by refitted copies: the compiled module, its exports and
    saved programs then do not carry them (the user's model keeps its own)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names:
        if name and name not in read:
            parent, _, attr = name.rpartition(".")
            mod = gm.get_submodule(parent) if parent else gm
            if hasattr(mod, attr):
                delattr(mod, attr)


def constant_value(gm: fx.GraphModule, node):
    """Value of a node computed from parameters only (a weight, maybe sliced or transposed);
    ValueError when it depends on the inputs. Non-node arguments are returned as they are."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return g.attribute(gm, node.target).detach()
    if node.op == "call_function":
        args = fx.node.map_arg(node.args, lambda a: constant_value(gm, a))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: constant_value(gm, a))
        return node.target(*args, **kwargs).detach()
    raise ValueError(f"{node.name} is not computed from parameters alone")


def record_values(gm: fx.GraphModule, nodes: dict[str, fx.Node], run: Callable[[], None]) -> dict[str, list]:
    """Every value the chosen nodes take while `run()` runs the module (e.g. over calibration
    batches): {key: [tensor per call]}. Probe nodes are inserted, then removed again."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    probes = []
    for key, node in nodes.items():
        # just before its last user: after writes into views of it that come first (DeepSeek fills
        # its keys slice by slice), before an in-place update by that user (Falcon's `mlp += attn`)
        last = max((u for u in node.users if u in order), key=order.__getitem__, default=None)  # not probes
        with graph.inserting_before(last) if last is not None else graph.inserting_after(node):
            probes.append(graph.call_function(_probe, (key, node)))
    gm.recompile()
    _PROBES.clear()
    try:
        with torch.no_grad():
            run()
    finally:
        for node in probes:
            graph.erase_node(node)
        gm.recompile()
    values = dict(_PROBES)
    _PROBES.clear()
    return values


def probe_values(gm: fx.GraphModule, nodes: dict[str, fx.Node], args: tuple, kwargs: dict) -> dict:
    """Values of chosen nodes in one forward on the given inputs."""
    values = record_values(gm, nodes, lambda: gm(*args, **kwargs))
    return {k: v[-1] for k, v in values.items()}


def tolerance(reference: torch.Tensor, rtol: float) -> float:
    """Largest max-abs difference from `reference` that still counts as the same values: rtol of
    its scale (1 + max |reference|), the rule every verification of a graph change uses. rtol is
    raised to the dtype's resolution (eps: 0.0078 for bfloat16, 0.00098 for float16), below
    which half-precision blocks computed in another order cannot agree."""
    if not reference.numel():
        return 0.0
    if reference.is_floating_point():
        rtol = max(rtol, torch.finfo(reference.dtype).eps)
    return rtol * (1.0 + float(reference.abs().max()))


def same_values(new, old, rtol: float) -> bool:
    """Whether `new` holds `old`'s values: floating tensors within `tolerance`, other tensors
    equal, non-tensors equal."""
    if not isinstance(old, torch.Tensor):
        return new == old
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        return False
    if not old.numel():
        return True
    if not old.is_floating_point():
        return torch.equal(new, old)
    return float((new - old).abs().max()) <= tolerance(old, rtol)


def commit_verified(gm: fx.GraphModule, pending: list[PendingRewrite], args: tuple, kwargs: dict,
                    rtol: float = 1e-4) -> list[float | str]:
    """Compare each pending rewrite with the block it replaces on the example inputs; wire in
    those that agree, remove the others. Returns, per rewrite, the max abs diff or a reason."""
    graph = gm.graph
    watch = g.output_nodes(gm)  # the model's outputs before any change: see _check_after_cleanup
    for i, p in enumerate(pending):
        watch[f"new{i}"], watch[f"old{i}"] = p.new, p.old
    error, values = None, {}
    try:
        values = probe_values(gm, watch, args, kwargs)
    except Exception as err:  # a broken rewrite must not break compilation: reject them all
        error = f"rewritten graph failed to run: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    results: list[float | str] = []
    for i, p in enumerate(pending):
        new, old = values.get(f"new{i}"), values.get(f"old{i}")
        ok = error is None and new is not None and old is not None and new.shape == old.shape
        diff = (new - old).abs().max().item() if ok else float("inf")
        ok = ok and diff <= tolerance(old, rtol)
        if ok:
            p.old.replace_all_uses_with(p.new, delete_user_cb=lambda u, p=p: u not in p.inserted)
            results.append(diff)
        else:
            for node in reversed(p.inserted):
                if not node.users:
                    graph.erase_node(node)
            results.append(error or (f"rewrite did not reproduce the block (max diff {diff:.3g})"
                                        if diff != float("inf") else "rewrite produced a different shape"))
    remove_dead_code(gm)
    if error is None:
        _check_after_cleanup(gm, {k: v for k, v in values.items() if k.startswith("out")}, args, kwargs, rtol)
    return results


def _check_after_cleanup(gm, before: dict, args, kwargs, rtol: float) -> None:
    """The model's outputs, rewrites committed and dead code removed, must still be the original's
    (dead-code removal once dropped an in-place write into a slice of DeepSeek's keys, after the
    per-block checks had passed); fail loudly rather than return a wrong model."""
    after = probe_values(gm, g.output_nodes(gm), args, kwargs)
    for key, old in before.items():
        if not same_values(after.get(key), old, rtol):
            raise MohCompileError(f"internal error: the rewritten model's output {key} no longer matches the "
                                  "original after dead-code removal; please report it")
