"""The MoH pass: multi-head attention -> mixture-of-head attention (arXiv 2410.11842).

Why it is built this way: the pass only adds a router (a HeadRouter submodule called on the
block input) to the shared attention op, which takes the router's head gates and adds its
compensation. Rewritten, the router sits at its identity setting (every head on, gates 1,
compensation 0), so the rewrite is verified exact like any other. `finalize` then fits the
routers block by block in graph order, each on the activations of the model whose earlier
blocks are already converted (so a layer corrects the drift of the layers before it), and
switches them to top-k. See docs/moh.md.
"""
from __future__ import annotations

import io
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from moh_compile.calibrate import moh_fit
from moh_compile.calibrate.head_allocation import (ALLOCATIONS, PROBE_BATCHES, PROBE_TOKENS, BlockChoices, allocate,
                                                   candidate_ks)
from moh_compile.calibrate.metrics import main_outputs, token_distortion
from moh_compile.errors import MohCompileError
from moh_compile.flops import block_attention_flops
from moh_compile.match import graph as g
from moh_compile.passes.base import Pass
from moh_compile.passes.moh_router import GATE_STYLES, KINDS, HeadRouter
from moh_compile.plan import BlockPlan
from moh_compile.rewrite import constant_value, drop_unread_attrs, free_name, record_values

aten = torch.ops.aten
ATTENTION_OP = torch.ops.moh_compile.attention.default
DEFAULTS = {"active_heads": 0.75, "shared_heads": 0.0, "gate_style": "binary", "router": "learned", "comp_rank": 0,
            "head_allocation": "calibrated", "refit": True}


def head_counts(options: dict, heads: int) -> tuple[int, int]:
    """(shared heads, routed heads per token k) from the fractions in `options`; clear errors otherwise."""
    active, shared = options["active_heads"], options["shared_heads"]
    if not isinstance(active, (int, float)) or not 0 < active <= 1:
        raise MohCompileError(f"MoH active heads must be a fraction in (0, 1], got {active!r}")
    if not isinstance(shared, (int, float)) or not 0 <= shared <= 1:
        raise MohCompileError(f"MoH shared heads must be a fraction in [0, 1], got {shared!r}")
    if shared > active:
        raise MohCompileError(f"MoH: more shared heads ({shared:g}) than active heads ({active:g})")
    n_active, n_shared = math.floor(active * heads + 0.5), math.floor(shared * heads + 0.5)
    if n_active - n_shared < 1:
        raise MohCompileError(f"MoH: {active:g} active and {shared:g} shared of {heads} heads leave k = "
                              f"{n_active - n_shared} routed heads per token; k must be at least 1")
    return n_shared, n_active - n_shared


def validate_options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise MohCompileError(f"unknown MoH options {sorted(unknown)} (known: {', '.join(DEFAULTS)})")
    o = {**DEFAULTS, **options}
    if o["gate_style"] not in GATE_STYLES:
        raise MohCompileError(f"MoH gate style must be one of {', '.join(GATE_STYLES)}, not {o['gate_style']!r}")
    if o["router"] not in KINDS:
        raise MohCompileError(f"MoH router must be one of {', '.join(KINDS)}, not {o['router']!r}")
    if o["head_allocation"] not in ALLOCATIONS:
        raise MohCompileError(f"MoH head allocation must be one of {', '.join(ALLOCATIONS)}, "
                              f"not {o['head_allocation']!r}")
    if not isinstance(o["comp_rank"], int) or o["comp_rank"] < 0:
        raise MohCompileError(f"MoH compensation rank must be an integer >= 0, got {o['comp_rank']!r}")
    if o["comp_rank"] and o["router"] != "learned":
        raise MohCompileError("MoH compensation is fitted only with the learned router (--comp-rank needs --router learned)")
    head_counts(o, 12)  # fraction checks that do not depend on the block
    return o


def check_settings(s: dict, heads: int) -> dict:
    """A block's plan settings (possibly edited by hand) are consistent with its block."""
    try:
        k, n_shared, shared = int(s["k"]), int(s["num_shared"]), s.get("shared")
        if int(s["heads"]) != heads:
            raise MohCompileError(f"MoH plan is for {s['heads']} heads, the block has {heads}")
    except (KeyError, TypeError, ValueError) as err:
        raise MohCompileError(f"MoH plan settings are incomplete or malformed ({err}): {s}") from None
    if s.get("gate_style") not in GATE_STYLES or s.get("router") not in KINDS or \
            s.get("head_allocation", "uniform") not in ALLOCATIONS:
        raise MohCompileError(f"MoH plan settings have an unknown gate style, router or head allocation: {s}")
    if k < 1 or n_shared < 0 or n_shared + k > heads:
        raise MohCompileError(f"MoH plan: k = {k} routed + {n_shared} shared heads do not fit {heads} heads (k >= 1)")
    if shared is not None and (len(set(shared)) != n_shared or any(not 0 <= h < heads for h in shared)):
        raise MohCompileError(f"MoH plan: shared heads {shared} must be {n_shared} distinct indices in [0, {heads})")
    return s


class MoHAttention(Pass):
    name, kind = "moh", "attention"

    @classmethod
    def add_arguments(cls, parser) -> None:
        a = parser.add_argument_group("MoH: mixture-of-head attention (--attention moh)")
        a.add_argument("--active-heads", type=float, metavar="F",
                       help="fraction of heads each token uses, in (0, 1] (default: 0.75)")
        a.add_argument("--shared-heads", type=float, metavar="F",
                       help="fraction of all heads that are always on, chosen per layer from measured importance "
                            "(default: 0.0)")
        a.add_argument("--gate-style", choices=GATE_STYLES, help="binary 0/1 gates or the paper's weighted "
                                                                 "two-stage gates (default: binary)")
        a.add_argument("--router", choices=KINDS,
                       help="learned (ridge-fitted on --calib data), query_norm (the paper's parameter-free "
                            "router; no data needed) or random (a baseline) (default: learned)")
        a.add_argument("--comp-rank", type=int, metavar="R",
                       help="rank of the linear compensation of dropped heads (learned router; default: 0, "
                            "the dropped heads' mean contribution)")
        a.add_argument("--head-allocation", choices=ALLOCATIONS,
                       help="calibrated: spread the model's heads over its blocks by measured sensitivity, at "
                            "the attention FLOPs of --active-heads in every block (learned router); uniform: "
                            "--active-heads in every block (default: calibrated)")

    def options_from_args(self, args) -> dict:
        opts = {k: getattr(args, k, None) for k in DEFAULTS if k != "refit"}
        opts = {k: v for k, v in opts.items() if v is not None}
        used = self.name in str(getattr(args, "attention", "")).split("+")
        if opts and not used:
            raise MohCompileError("MoH options (--active-heads, --shared-heads, --gate-style, --router, --comp-rank, "
                                  "--head-allocation) "
                                  "need --attention moh")
        if used and getattr(args, "refit", None) is not None:  # --refit is shared with the moepp pass
            opts["refit"] = args.refit
        return validate_options(opts) if opts else {}

    def check(self, match, config) -> str | None:
        validate_options(self.options(config))
        return None

    def plan(self, match, config) -> BlockPlan:
        o = validate_options(self.options(config))
        b = match.block
        n_shared, k = head_counts(o, b.num_heads)
        settings = {"heads": b.num_heads, "kv_heads": b.num_kv_heads, "num_shared": n_shared, "k": k,
                    "shared": None, "gate_style": o["gate_style"], "router": o["router"], "comp_rank": o["comp_rank"],
                    "head_allocation": o["head_allocation"], "refit": bool(o["refit"])}
        return BlockPlan(b.name, self.kind, self.name, settings)

    def attention_parts(self, gm: fx.GraphModule, match, block_plan: BlockPlan) -> dict:
        b = match.block
        check_settings(block_plan.settings, b.num_heads)
        name = free_name(gm, "moh_router")
        # identity: all heads, gates 1; eval mode like the captured graph (no load-balance bookkeeping)
        gm.add_submodule(name, HeadRouter(b.num_heads, b.d_model, out_dim=b.d_out).train(False))

        def gates_fn(builder, ops):
            out = builder.module(name, ops["x"])
            return builder.call(operator.getitem, out, 0), builder.call(operator.getitem, out, 1)

        return {"gates_fn": gates_fn}

    def finalize(self, gm: fx.GraphModule, rewrites: list, config, calibration=None) -> dict:
        if not rewrites:
            return {}
        settings = [check_settings(bp.settings, m.block.num_heads) for m, bp, _ in rewrites]
        if calibration is None and any(_fitted(s) for s in settings):
            raise MohCompileError("the learned MoH router is fitted on calibration data: pass --calib DATA "
                                  "(Python: calibration=...), or use --router query_norm, which needs none")
        allocation = _allocate_heads(gm, rewrites, settings, calibration)
        layers, replaced = [], []
        for (m, bp, rw), s in zip(rewrites, settings):
            node = _router_node(gm, rw)
            op = _op_of(node)
            if _fitted(s):
                router, fit_error, new_o = _fit_recorded(m, s, _record_block(gm, m, op, rw, calibration))
                if new_o is not None:
                    _replace_output_projection(gm, op, new_o)
                    replaced.append(m.block.o.weight)
            else:
                if m.query is not None and s["router"] == "query_norm":
                    raise MohCompileError(f"the query_norm router reads the query projection, and {m.block.name} "
                                          f"leaves its queries to the model's graph ({m.block.query_from_graph}); "
                                          "use --router learned")
                shared = s["shared"] if s["shared"] is not None else list(range(s["num_shared"]))  # the paper's choice
                q_weight, q_bias = (None if a is None else _const_value(gm, a, m) for a in op.args[1:3])
                router = HeadRouter(m.block.num_heads, m.block.d_model, shared, s["k"], s["gate_style"], s["router"],
                                    m.block.d_out, q_weight=q_weight, q_bias=q_bias)
                fit_error = None
            gm.add_submodule(node.target, router.train(False))
            s["shared"] = list(router.shared)
            layers.append({"block": m.block.name, "shared": router.shared, "routed": router.routed, "k": router.k,
                           "router": s["router"], "gate_style": s["gate_style"], "fit_error": fit_error,
                           **({"gate_scale": s["gate_scale"]["scale"]} if "gate_scale" in s else {}),
                           **_flops(m, router)})
        if replaced:  # the original W_O nodes and parameters nothing reads any more
            g.remove_dead_code(gm)
            drop_unread_attrs(gm, replaced)
        gm.recompile()
        if calibration is not None:
            for layer, usage in zip(layers, _head_usage(gm, [_gates_node(_router_node(gm, rw)) for _, _, rw in rewrites],
                                                         calibration)):
                layer.update(usage)
        return _report(layers, allocation)


def _fitted(settings: dict) -> bool:
    """Whether a block's router is fitted on calibration data: a learned router that routes.
    With every head active a learned router stays at its zero initialisation, which gives
    gates of exactly 1 (the identity), so it needs no data."""
    return settings["router"] == "learned" and int(settings["k"]) + int(settings["num_shared"]) < int(settings["heads"])


# ---------------------------------------------------------------- head allocation
def _allocate_heads(gm, rewrites: list, settings: list[dict], calibration) -> dict | None:
    """Set k per block by measured sensitivity (calibrate/head_allocation.py) where the settings
    ask for it and it was not done before (a saved plan keeps its k); returns the allocation."""
    todo = [i for i, s in enumerate(settings) if s.get("head_allocation") == "calibrated" and not s.get("allocated")
            and _fitted(s)]
    for s in settings:
        if s.get("head_allocation") == "calibrated":
            s["allocated"] = True
    if len(todo) < 2:  # nothing to move
        return None
    if calibration.loop is not None:
        return {"k": [settings[i]["k"] for i in todo],
                "markdown": "Head allocation: uniform k (a forward loop gives no batches to score blocks on; "
                            "pass calibration batches for the calibrated allocation)."}
    batches = calibration.batches[:PROBE_BATCHES]
    masks = [calibration.token_mask(b) for b in batches]
    reference = main_outputs(gm, batches)

    def block_losses(j: int, ks: list[int]) -> list[float]:
        m, _, rw = rewrites[todo[j]]
        op = _op_of(_router_node(gm, rw))
        rec = _record_block(gm, m, op, rw, calibration).subset(PROBE_TOKENS)
        out = []
        for k in ks:
            router, _, new_o = _fit_recorded(m, {**settings[todo[j]], "k": k}, rec)
            with _installed(gm, rw, router, new_o):
                out.append(token_distortion(main_outputs(gm, batches), reference, masks))
        return out

    blocks = []
    for i in todo:
        m, s = rewrites[i][0], settings[i]
        ks = candidate_ks(s["k"], m.block.num_heads - s["num_shared"])
        flops = [_flops_at(m, (s["num_shared"] + k) / m.block.num_heads) for k in ks]
        blocks.append(BlockChoices(m.block.name, ks, flops, s["k"]))
    result = allocate(blocks, block_losses)
    for i, k in zip(todo, result["k"]):
        settings[i]["k"] = k
    return result


class _installed:
    """A fitted router (and refitted W_O) in a block for the duration of a with-block; the
    identity router and the original W_O come back afterwards."""

    def __init__(self, gm, rw, router: HeadRouter, new_o: torch.Tensor | None):
        self.gm, self.node, self.router, self.new_o = gm, _router_node(gm, rw), router, new_o

    def __enter__(self):
        self.old_router = self.gm.get_submodule(self.node.target)
        self.gm.add_submodule(self.node.target, self.router.train(False))
        self.op = _op_of(self.node)
        self.old_o = self.op.args[8]
        if self.new_o is not None:
            _replace_output_projection(self.gm, self.op, self.new_o)
        self.gm.recompile()
        return self

    def __exit__(self, *exc):
        self.gm.add_submodule(self.node.target, self.old_router)
        new_o = self.op.args[8]
        if new_o is not self.old_o:
            self.op.update_arg(8, self.old_o)
            self.gm.graph.erase_node(new_o)
            delattr(self.gm, new_o.target)
        self.gm.recompile()
        return False


# ---------------------------------------------------------------- graph helpers
def _router_node(gm: fx.GraphModule, rw) -> fx.Node:
    for n in rw.inserted:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), HeadRouter) and n.graph is gm.graph:
            return n
    raise MohCompileError(f"MoH router of {rw.name} is missing from the graph")


def _gates_node(router_node: fx.Node) -> fx.Node:
    return next(u for u in router_node.users if u.target is operator.getitem and u.args[1] == 0)


def _op_of(router_node: fx.Node) -> fx.Node:
    gates = _gates_node(router_node)
    return next(u for u in gates.users if u.target is ATTENTION_OP)


def _const_value(gm: fx.GraphModule, node, m, what: str = "query projection (the query_norm router needs it)"):
    try:
        return constant_value(gm, node)
    except ValueError:
        raise MohCompileError(f"the {what} of {m.block.name} is not a constant weight") from None


def _norm_after(node: fx.Node):
    """(residual add, LayerNorm) right after the block output, as in post-LN encoders; else None.

    Why: the next LayerNorm rescales each token and each feature, so an error is weighed as that
    LayerNorm will see it (gamma per feature, 1/std of the residual stream per token)."""
    add = g.residual_add_after(node)
    ln = None if add is None else next((w for w in add.users if g.is_call(w, {aten.layer_norm.default})
                                        and w.args[0] is add and len(w.args) > 2 and isinstance(w.args[2], fx.Node)),
                                       None)
    return (add, ln) if ln is not None else None


# ---------------------------------------------------------------- fitting
def _batch_masks(calibration, n_calls: int) -> list:
    """Real-token masks aligned with the recorded calls (None = every token)."""
    if calibration.loop is None and len(calibration.batches) == n_calls:
        return [calibration.token_mask(b) for b in calibration.batches]
    return [None] * n_calls


@dataclass
class RecordedBlock:
    """One block's calibration activations at real tokens, as the fit reads them."""
    x: torch.Tensor                       # (T, E) block input
    ctx: torch.Tensor                     # (T, H, D) every head's context
    o_weight: torch.Tensor                # the op's W_O (float32)
    o_dtype: torch.dtype
    out_weight: torch.Tensor | None       # gamma of the LayerNorm after the block (post-LN), else None
    token_weight: torch.Tensor | None     # 1 / std of each token's residual stream (post-LN), else None

    def subset(self, n: int, seed: int = 0) -> "RecordedBlock":
        """At most n tokens, drawn at random (fixed seed)."""
        if self.x.shape[0] <= n:
            return self
        idx = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return RecordedBlock(self.x[idx], self.ctx[idx], self.o_weight, self.o_dtype, self.out_weight,
                             None if self.token_weight is None else self.token_weight[idx])


def _record_block(gm, m, op: fx.Node, rw, calibration) -> RecordedBlock:
    """This block's op inputs over the calibration data, on the model as it is now."""
    nodes = {f"a{i}": a for i, a in enumerate(op.args) if isinstance(a, fx.Node) and i != 10}
    post = _norm_after(rw.new)
    if post is not None:
        nodes["residual"] = post[0]
    values = record_values(gm, nodes, lambda: calibration.run(gm, desc=f"MoH: recording {m.block.name}"))
    n_calls = len(values.get("a0", []))
    if not n_calls:
        raise MohCompileError(f"calibration never ran {m.block.name}")
    xs, ctxs, token_w = [], [], []
    for j, mask in enumerate(_batch_masks(calibration, n_calls)):
        args = [values[f"a{i}"][j] if f"a{i}" in values else (None if i == 10 else a) for i, a in enumerate(op.args)]
        x = args[0]
        if mask is None or mask.shape != x.shape[:2]:
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        xs.append(x[mask].float())
        ctxs.append(moh_fit.op_head_contexts(*args)[mask].float())
        if post is not None:
            res = values["residual"][j]
            res = res if m.block.layout == "batch_first" else res.transpose(0, 1)
            token_w.append(1.0 / res[mask].float().std(-1, unbiased=False).clamp_min(1e-6))
    o_orig = _const_value(gm, op.args[8], m, "output projection (the fit reads it)")
    out_weight = None if post is None else _const_value(gm, post[1].args[2], m, "LayerNorm after the block").float()
    return RecordedBlock(torch.cat(xs), torch.cat(ctxs), o_orig.float(), o_orig.dtype, out_weight,
                         torch.cat(token_w) if token_w else None)


def _fit_recorded(m, s: dict, rec: RecordedBlock) -> tuple[HeadRouter, float, torch.Tensor | None]:
    """Router (moh_fit.fit_block), gate temperature and W_O refit for the settings `s` (updated with
    what was fitted); returns (router, relative block error, new W_O or None)."""
    contrib = moh_fit.contributions(rec.ctx, rec.o_weight)
    try:
        fit = moh_fit.fit_block(rec.x, contrib, s["num_shared"] + s["k"], s["num_shared"], shared=s["shared"],
                                comp_rank=s["comp_rank"], out_weight=rec.out_weight, token_weight=rec.token_weight)
    except ValueError as err:
        raise MohCompileError(f"MoH fit of {m.block.name}: {err}") from err
    router = fit.router(s["gate_style"])
    gate_scale = moh_fit.fit_gate_scale(router, rec.x, contrib, rec.out_weight, rec.token_weight)
    if gate_scale:
        s["gate_scale"] = gate_scale
    if not s.get("refit", False) or router.num_active == router.num_heads:
        return router, moh_fit.block_error(rec.x, contrib, router), None
    new_o, info = moh_fit.refit_output_projection(router, rec.x, rec.ctx, rec.o_weight, rec.token_weight)
    s["refit_result"] = info
    return (router, moh_fit.block_error(rec.x, moh_fit.contributions(rec.ctx, new_o), router, contrib.sum(1)),
            new_o.to(rec.o_dtype))


def _replace_output_projection(gm: fx.GraphModule, op: fx.Node, weight: torch.Tensor) -> None:
    """Point the op's o_weight at a new parameter (the original stays the user's, untouched)."""
    name = free_name(gm, "moh_o_weight")
    gm.register_parameter(name, torch.nn.Parameter(weight))
    with gm.graph.inserting_before(op):
        op.update_arg(8, gm.graph.get_attr(name))


def _head_usage(gm, gates_nodes: list[fx.Node], calibration) -> list[dict]:
    """Per block: fraction of real calibration tokens that chose each head, and load balance."""
    nodes = {f"g{i}": n for i, n in enumerate(gates_nodes)}
    values = record_values(gm, nodes, lambda: calibration.run(gm, desc="MoH: measuring head usage"))
    out = []
    for i in range(len(gates_nodes)):
        calls = values.get(f"g{i}", [])
        counts, tokens = 0.0, 0
        for gates, mask in zip(calls, _batch_masks(calibration, len(calls))):
            on = gates != 0
            on = on[mask] if mask is not None and mask.shape == on.shape[:2] else on.reshape(-1, on.shape[-1])
            counts, tokens = counts + on.double().sum(0), tokens + on.shape[0]
        usage = (counts / max(tokens, 1)).tolist() if tokens else []
        out.append({"usage": usage, "tokens": tokens})
    return out


# ---------------------------------------------------------------- report
def _router_flops_per_token(r: HeadRouter) -> float:
    nr, e = len(r.routed), r.embed_dim
    flops = 2 * e * nr * (r.head_dim if r.kind == "query_norm" else 1) if r.kind != "random" else 0
    if r.gate_style == "weighted":
        flops += 2 * e * (len(r.shared) + 2)
    flops += 2 * r.num_heads * r.out_dim + 2 * r.num_heads * r.comp_rank * (e + r.out_dim)
    return float(flops)


def _flops_at(m, active_heads: float) -> float:
    """Attention FLOPs of the rewritten block at the report's sequence length (router excluded)."""
    from moh_compile.report import _block_seq

    return block_attention_flops(m.block, _block_seq(m), rewritten=True, active_heads=active_heads)["total"]


def _flops(m, router: HeadRouter) -> dict:
    from moh_compile.report import _block_seq

    seq = _block_seq(m)
    return {"seq_for_flops": seq, "flops_before": block_attention_flops(m.block, seq)["total"],
            "flops_after": _flops_at(m, router.num_active / m.block.num_heads) + seq * _router_flops_per_token(router)}


def _load_balance(usage: list[float], routed: list[int], k: int) -> dict:
    """Routed heads' usage vs the ideal k / n_routed each: coefficient of variation, min and max."""
    if not usage or not routed:
        return {}
    u = torch.tensor([usage[h] for h in routed], dtype=torch.float64)
    return {"ideal": k / len(routed), "min": float(u.min()), "max": float(u.max()),
            "cv": float(u.std(unbiased=False) / u.mean().clamp_min(1e-12))}


def _report(layers: list[dict], allocation: dict | None = None) -> dict:
    for layer in layers:
        layer["load_balance"] = _load_balance(layer.get("usage", []), layer["routed"], layer["k"])
    rows = ["| block | shared heads | k of routed | router | fit rel. error | routed usage min / ideal / max | CV "
            "| MFLOPs before -> after |", "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        lb = layer["load_balance"]
        rows.append(f"| {layer['block']} | {layer['shared'] or '-'} | {layer['k']} of {len(layer['routed'])} "
                    f"| {layer['router']} ({layer['gate_style']}) "
                    f"| {'-' if layer['fit_error'] is None else format(layer['fit_error'], '.3f')} "
                    + (f"| {lb['min']:.2f} / {lb['ideal']:.2f} / {lb['max']:.2f} | {lb['cv']:.2f} " if lb else "| - | - ")
                    + f"| {layer['flops_before'] / 1e6:.2f} -> {layer['flops_after'] / 1e6:.2f} |")
    before, after = sum(x["flops_before"] for x in layers), sum(x["flops_after"] for x in layers)
    text = [f"Attention FLOPs (projections + core + router, sequence of {layers[0]['seq_for_flops']}): "
            f"{before / 1e6:.2f} -> {after / 1e6:.2f} MFLOPs ({after / before:.2f}x).", ""] + rows
    out = {"layers": layers, "flops_before": before, "flops_after": after}
    if any(layer.get("usage") for layer in layers):
        text += ["", "Fraction of real calibration tokens using each head (rows: blocks; shared heads are 1.00):", "",
                 "| block | " + " | ".join(f"h{i}" for i in range(len(layers[0]["usage"]))) + " |",
                 "|---|" + "---|" * len(layers[0]["usage"])]
        text += [f"| {x['block']} | " + " | ".join(f"{u:.2f}" for u in x["usage"]) + " |" for x in layers]
        text += ["", "![head usage](moh_head_usage.png)"]
        out["files"] = {"moh_head_usage.png": _heat_map(layers)}
    if allocation is not None:
        text += ["", allocation["markdown"]]
        out["allocation"] = {k: v for k, v in allocation.items() if k != "markdown"}
    out["markdown"] = "\n".join(text)
    return out


def _heat_map(layers: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = [x["usage"] for x in layers]
    width = max(len(u) for u in usage)
    grid = torch.full((len(usage), width), float("nan"))
    for i, u in enumerate(usage):
        grid[i, :len(u)] = torch.tensor(u)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * width, 1.0 + 0.45 * len(usage)))
    im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, u in enumerate(usage):
        for h, v in enumerate(u):
            ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(usage)), [x["block"] for x in layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_title("MoH: fraction of calibration tokens using each head")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["MoHAttention", "head_counts", "validate_options"]
