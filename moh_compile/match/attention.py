"""Find multi-head attention blocks by structure.

Anchor: the attention core, either one SDPA node or softmax(Q K^T * scale + mask) @ V.
From it the matcher walks back along the query to its projection (through layout ops,
scalar pre-scaling and a rotary embedding of any pairing, match/rope.py), reads which
projection rows make each query head by running those layout ops (match/feature_map.py),
walks the keys/values back to their un-expanded (GQA) form, and walks the core's output
forward to the output projection. A query path the op cannot absorb (a norm over all heads,
a LayerNorm, a norm after RoPE, a low-rank query) is left to the model's graph: the op then
takes the queries as computed (`AttentionMatch.query`) and skips only the core and W_o work. Every decision
that the graph's symbolic shapes cannot settle is left to the rewrite's numerical check,
which rejects a block whose rewrite does not reproduce it.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch.fx as fx

from moh_compile.match import graph as g
from moh_compile.match.blocks import AttentionBlock, ProjectionInfo, Skipped
from moh_compile.match.feature_map import NotALayoutPath, feature_index, head_rows
from moh_compile.match.qk_norm import RmsNorm, match_rms_norm
from moh_compile.match.rope import Rope, head_dim_permutation, match_rope

aten = g.aten


class NoMatch(Exception):
    """Raised inside the matcher with the human-readable reason a candidate was skipped."""


@dataclass
class MaskStep:
    """One way the model masks the attention scores: "add" a tensor (additive masks, ALiBi,
    position biases; SDPA's attn_mask is one), or "fill" the scores with `value` where `tensor`
    is True (masked_fill; `fill_where=False`: where it is False, as `torch.where(keep, scores,
    value)` writes it). `scores_rank`: 3 when the scores were (B*H, S, S_k) at that step.
    `factor`: a scaling of the scores after this step (CodeGen: (QK^T + mask) / sqrt(d)), folded
    into the step: (s + m) c = s c + m c, and a fill of v becomes a fill of v c."""

    kind: str
    tensor: fx.Node
    value: float = 0.0
    scores_rank: int = 4
    fill_where: bool = True
    factor: float = 1.0


@dataclass
class AttentionMatch:
    block: AttentionBlock
    core: fx.Node
    x: fx.Node  # 3-D input of the q projection, (B, S, E) or (S, B, E)
    q_proj: g.LinearLike  # with `query`: the first projection on the query's path (its input is x)
    q_rows: list[int] | None  # rows of q_proj's weight that make the op's W_q, in order (H * D); None with `query`
    rope: Rope | None
    q_norm: RmsNorm | None  # per-head RMS norm of the query before RoPE (QK-norm); the keys keep theirs
    head_perm: list[int] | None  # head-dim order the op sees (RoPE pairs as rotate-half); None: as is
    rope_seq_major: bool  # RoPE was applied before the head transpose, q as (B, S, H, D)
    k: fx.Node  # (B, Hkv, S, D) or (B*H, S, D)
    v: fx.Node
    mask_steps: list[MaskStep]  # how the model masks the scores, in order; [] = no mask
    mask_probe: fx.Node | None  # values that show which keys each query sees (causality detection)
    is_causal_flag: bool
    o_proj: g.LinearLike
    y: fx.Node  # node whose value the op output replaces, (B, S, E) or (S, B, E)
    sinks: fx.Node | None = None  # per-head sink logits (GPT-OSS), a parameter of H values
    query: fx.Node | None = None  # the core's (B, H, S, D) queries, when the graph keeps computing them
    out_gate: fx.Node | None = None  # what multiplies the heads' contexts before W_o (Qwen3-Next's sigmoid gate)
    out_gate_layout: str = ""  # its layout: "bhsd" (B, H, S, Dv), "bshd" (B, S, H, Dv) or "bsf" (B, S, H * Dv)


@dataclass
class _QuerySide:
    """How the op gets its queries: by projecting x itself (lin, rows, RoPE, norm, pre-scaling),
    or (`from_graph`, the reason it cannot) as the model's graph computed them."""

    lin: g.LinearLike
    x: fx.Node
    layout: str
    num_heads: int
    rows: list[int] | None = None
    rope: Rope | None = None
    scale: float = 1.0
    norm: RmsNorm | None = None
    head_perm: list[int] | None = None
    from_graph: str = ""


@dataclass
class _Core:
    """The attention core found from its anchor, before the walks to the projections."""

    out: fx.Node  # the node whose value is the per-head context (SDPA, or P @ V)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask_steps: list[MaskStep]
    mask_probe: fx.Node | None  # values that show which keys each query sees
    scale: float
    is_causal: bool
    kind: str  # "sdpa", "sdpa_gqa" (K/V already (B, Hkv, S, D)) or "softmax(QK^T)V"
    softcap: float = 0.0
    sinks: fx.Node | None = None  # per-head sink logits (GPT-OSS), a parameter


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[Skipped]]:
    found, skipped = [], []
    for node in list(gm.graph.nodes):
        if g.is_call(node, g.SDPA) or g.is_call(node, g.SOFTMAX):
            try:
                core = _core_from(node)
                if core is None:
                    continue
                found.append(_match_block(gm, core))
            except NoMatch as err:
                skipped.append(Skipped(name=_guess_name(node), kind="attention", reason=str(err)))
            except Exception as err:  # an unforeseen graph must cost one block, not the compile
                skipped.append(Skipped(name=_guess_name(node), kind="attention", reason=g.internal_error(err)))
    return found, skipped


def _guess_name(node: fx.Node) -> str:
    return g.module_path(node) or node.name


# ---------------------------------------------------------------- core
def _core_from(node: fx.Node) -> _Core | None:
    """The core anchored at an SDPA or softmax node, or None if it is not one. The mask probe is
    the tensor whose values show which keys each query sees (SDPA's mask; the masked scores).

    kind "sdpa_gqa": SDPA(enable_gqa=True), whose K/V already have the (B, Hkv, S, D) form the
    op takes (SDPA repeats them itself), so there is no repeat to walk back through."""
    if g.is_call(node, g.SDPA):
        args = list(node.args) + [None] * 8
        kw = node.kwargs
        q, k, v = args[0], args[1], args[2]
        mask = kw.get("attn_mask", args[3])
        dropout = kw.get("dropout_p", args[4] if args[4] is not None else 0.0)
        is_causal = bool(kw.get("is_causal", args[5] if args[5] is not None else False))
        scale = kw.get("scale", args[6])
        gqa = bool(kw.get("enable_gqa", args[7] or False))
        if dropout:
            raise NoMatch("attention dropout is active (capture the model in eval mode)")
        d = g.static_int(g.val(q).shape[-1])
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        steps = [] if mask is None else [MaskStep("add", mask, scores_rank=g.val(q).dim())]
        return _Core(node, q, k, v, steps, mask, scale, is_causal, "sdpa_gqa" if gqa else "sdpa")
    # softmax(scores) @ v
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = g.val(node).dim()
    if dim not in (-1, rank - 1):
        return None
    probs, users = node, g.data_users(node)
    scores_in, sinks = _unshifted(node.args[0]), None
    if g.is_call(scores_in, {aten.cat.default}) and len(users) == 1 and _drops_last_column(users[0]):
        # GPT-OSS: softmax over [scores, per-head sink logit], the sink's probability dropped
        parts, cat_dim = scores_in.args[0], scores_in.args[1] if len(scores_in.args) > 1 else 0
        sinks = _sink_parameter(parts[1]) if len(parts) == 2 and cat_dim in (-1, rank - 1) else None
        if sinks is None:
            raise NoMatch("extra logits concatenated to the scores that are not a per-head parameter")
        scores_in, probs, users = parts[0], users[0], g.data_users(users[0])
    # eval dropout, copies, dtype casts (softmax in float32 for half-precision models, as HF's
    # eager attention does) and views (Bloom: 4-D probabilities, 3-D P @ V) may sit between the
    # probabilities and P @ V
    while len(users) == 1 and (g.is_eval_dropout(users[0]) or g.is_call(users[0], {aten.clone.default})
                               or g.is_call(users[0], g.CASTS) or g.is_call(users[0], _VIEWS)):
        probs, users = users[0], g.data_users(users[0])
    pv = [u for u in users if g.is_call(u, g.MATMUL) and u.args[0] is probs]
    if not pv:
        return None
    if len(users) != 1:
        raise NoMatch("attention probabilities are used outside the block (e.g. returned as weights)")
    v = pv[0].args[1]
    q, kt, scale, mask_steps, softcap = _scores_source(scores_in)
    while (scaled := g.scalar_scaling(kt)) is not None:  # DeBERTa scales K^T before the product
        kt, factor = scaled
        scale *= factor
    k = _untranspose_last(kt)
    if k is None:
        raise NoMatch("keys enter Q K^T without a visible transpose")
    while (scaled := g.scalar_scaling(q)) is not None:
        q, factor = scaled
        scale *= factor
    return _Core(pv[0], q, k, v, mask_steps, scores_in if mask_steps else None, scale, False, "softmax(QK^T)V",
                 softcap, sinks)


def _drops_last_column(node) -> bool:
    """node = x[..., :-1] (the sink column dropped)."""
    if not g.is_call(node, {aten.slice.Tensor}):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    rank = g.val(node.args[0]).dim()
    return args[1] in (-1, rank - 1) and (args[2] or 0) == 0 and args[3] == -1 and (args[4] or 1) == 1


def _sink_parameter(node) -> fx.Node | None:
    """The parameter behind broadcast sink logits (reshape/expand of a weight), or None."""
    while g.is_call(node, g.LAYOUT) or g.is_call(node, g.CASTS):
        node = node.args[0]
    return node if g.is_weight(node) else None


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MASKED_OUT = -1e4  # a fill value at or below this gives probability 0 in float32 (exp underflows)


def _unshifted(s):
    """x for softmax's input x - max(x, -1) (a stabilising shift that changes no probability)."""
    if g.is_call(s, {aten.sub.Tensor}) and g.is_call(s.args[1], {operator.getitem}) and s.args[1].args[1] == 0:
        mx = s.args[1].args[0]
        if g.is_call(mx, {aten.max.dim}) and mx.args[0] is s.args[0] and mx.args[1] in (-1, g.val(s).dim() - 1):
            return s.args[0]
    return s


def _scores_source(s):
    """Walk the softmax input back to Q K^T: (q, k^T, scale, mask steps in forward order,
    softcap). Views and dtype casts on the way are walked through; a fill must be low enough to
    mean "masked" (nanoGPT's masked_fill(mask == 0, -inf), GPT-Neo's where(causal, scores, min));
    softcap > 0 when the scores are soft-capped first (Gemma 2: cap * tanh(QK^T * scale / cap))."""
    scale, steps = 1.0, []
    while True:
        add = (g.is_call(s, {aten.add.Tensor}) or _inplace(s, aten.add_.Tensor)) and g.val(s.args[1]) is not None
        sub = g.is_call(s, {aten.sub.Tensor}) and g.val(s.args[1]) is not None and s.kwargs.get("alpha", 1) == 1
        fill = _fill(s)
        if add or sub:  # a subtracted mask (Funnel: scores - 1e6 (1 - mask)) is added with factor -1
            steps.append(MaskStep("add", s.args[1], scores_rank=g.val(s).dim(), factor=-scale if sub else scale))
            s = s.args[0]
        elif _constant_shift(s):  # softmax(x + c) = softmax(x) (XLNet adds a 0 segment term)
            s = s.args[0]
        elif fill is not None:
            cond, value, where, scores = fill
            if value is None or value * scale > MASKED_OUT:
                raise NoMatch(f"scores are filled with {value}, not a masking value")
            steps.append(MaskStep("fill", cond, value, g.val(s).dim(), fill_where=where, factor=scale))
            s = scores
        else:
            below, factor = _unscaled(s)
            if below is s:
                break
            s, scale = below, scale * factor
    softcap = 0.0
    if g.is_call(s, {aten.tanh.default}):  # Gemma 2: cap * tanh(scores / cap); masks only outside it
        softcap = scale
        s, scale = _unscaled(s.args[0])
        if softcap <= 0 or not g.is_call(s, g.MATMUL):
            raise NoMatch("scores go through tanh, but not as a soft-capping of Q K^T (cap * tanh(Q K^T / cap))")
        scale *= softcap  # the op's scores are softcap * tanh(scale * QK^T / softcap)
    if g.is_call(s, g.BADDBMM):
        if s.kwargs.get("beta", 1.0) != 1.0:
            raise NoMatch("baddbmm scales its input (beta != 1)")
        steps.append(MaskStep("add", s.args[0], scores_rank=g.val(s).dim(), factor=scale))
        q, kt = s.args[1], s.args[2]
        scale *= float(s.kwargs.get("alpha", 1.0))
    elif g.is_call(s, g.MATMUL):
        q, kt = s.args[0], s.args[1]
    else:
        raise NoMatch("softmax input is not a Q K^T product")
    return q, kt, scale, steps[::-1], softcap


def _constant_shift(s) -> bool:
    """s = scores + c or scores - c for a plain number c."""
    return g.is_call(s, {aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar}) \
        and isinstance(s.args[1], (int, float)) and not isinstance(s.args[1], bool) and isinstance(s.args[0], fx.Node)


def _unscaled(s) -> tuple[fx.Node, float]:
    """s walked down through scalar scalings, views and casts: (the node below them, the product
    of the scalings)."""
    factor = 1.0
    while True:
        if (scaled := g.scalar_scaling(s)) is not None:
            s, f = scaled
            factor *= f
        elif g.is_call(s, _VIEWS) or g.is_call(s, g.CASTS):
            s = s.args[0]
        else:
            return s, factor


def _fill(s):
    """(condition, value, fills where the condition is True?, scores) for masked_fill(scores, c, v)
    and torch.where(c, scores, v) (v a number or a constant 0-d tensor); else None."""
    if g.is_call(s, {aten.masked_fill.Scalar}) or _inplace(s, aten.masked_fill_.Scalar):
        return s.args[1], g.scalar_of(s.args[2]), True, s.args[0]
    if g.is_call(s, {aten.where.self, aten.where.ScalarOther}) and isinstance(s.args[1], fx.Node):
        cond, scores, other = s.args[:3]
        if g.val(scores) is not None and g.val(scores).shape == g.val(s).shape:
            return cond, g.constant_scalar(other), False, scores
    return None


def _inplace(node, op) -> bool:
    """`node` is `op`, in place on a temporary only it reads (MPNet's `scores += position_bias`)."""
    return g.is_call(node, {op}) and g.inplace_on_temporary(node)


def _untranspose_last(node):
    if g.is_call(node, {aten.transpose.int}):
        rank = g.val(node).dim()
        dims = {d % rank for d in node.args[1:3]}
        if dims == {rank - 1, rank - 2}:
            return node.args[0]
    if g.is_call(node, {aten.permute.default}):
        perm = list(node.args[1])
        rank = len(perm)
        want = list(range(rank - 2)) + [rank - 1, rank - 2]
        if [p % rank for p in perm] == want:
            return node.args[0]
    return None


# ---------------------------------------------------------------- walks
def _walk_to_projection(node, head_dim: int):
    """From the query at the core back to (projection, rope, extra scale, QK-norm): through layout
    ops, scalar scalings, one rotary embedding and one per-head RMS norm before it."""
    rope = norm = None
    scale = 1.0
    for _ in range(64):
        lin = g.as_linear(node)
        if lin is not None:
            return lin, rope, scale, norm
        found = match_rope(node)
        if found is not None:
            if rope is not None:
                raise NoMatch("two rotary embeddings on one query")
            if norm is not None:
                raise NoMatch("the query is normalised after its rotary embedding")
            rope, node = found, found.src
            continue
        if (scaled := g.scalar_scaling(node)) is not None:
            if norm is not None:  # the norm would undo the scaling except for its eps
                raise NoMatch("the query is scaled before its QK-norm")
            node, factor = scaled
            scale *= factor
            continue
        if (normed := match_rms_norm(node)) is not None:
            if norm is not None:
                raise NoMatch("two norms on one query")
            if normed.width != head_dim:
                raise NoMatch(f"the query is normalised over {normed.width} features, not per head ({head_dim}) "
                              "(QK-norm across all heads, as in OLMo 2)")
            norm, node = normed, normed.src
            continue
        if g.is_passthrough(node):
            node = node.args[0]
            continue
        if _normalised(node):
            raise NoMatch("the query is normalised between its projection and attention by something other than "
                          "a per-head RMS norm (e.g. a LayerNorm QK-norm)")
        raise NoMatch(f"could not trace the query back to a projection (stopped at {_desc(node)})")
    raise NoMatch("query path too long")


_NORMS = {aten.rsqrt.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}


def _normalised(node, depth: int = 6) -> bool:
    """Whether a normalisation (rsqrt, layer/RMS norm) computes `node` within a few ops, not
    looking past a projection (the block's input norm is not the query's)."""
    stack, seen = [(node, 0)], set()
    while stack:
        n, hops = stack.pop()
        if n in seen or hops > depth or g.as_linear(n) is not None:
            continue
        seen.add(n)
        if g.is_call(n, _NORMS):
            return True
        stack.extend((a, hops + 1) for a in n.all_input_nodes)
    return False


def _desc(node) -> str:
    if isinstance(node, fx.Node):
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"
    return repr(node)


def _unexpand_kv(node, num_heads: int):
    """Walk a key/value tensor back through a GQA repeat (unsqueeze/expand/reshape)."""
    shape = g.val(node).shape
    cur = node
    for _ in range(8):
        if not (g.is_call(cur, {aten.reshape.default, aten.view.default, aten.expand.default,
                                aten.unsqueeze.default, aten.slice.Tensor, aten.clone.default,
                                aten.contiguous.default, aten._unsafe_view.default})):
            break
        cur = cur.args[0]
        v = g.val(cur)
        if v.dim() == 4 and g.dim_key(v.shape[0]) == g.dim_key(shape[0]) \
                and g.dim_key(v.shape[2]) == g.dim_key(shape[2]) and g.dim_key(v.shape[3]) == g.dim_key(shape[3]):
            hkv = g.static_int(v.shape[1])
            if hkv and hkv < num_heads and num_heads % hkv == 0:
                return cur, hkv
    return node, num_heads


def _walk_to_out_projection(node):
    """(output projection, gate, the context value the gate multiplies): through layout ops and at
    most one elementwise gate of the context's own shape that does not depend on it (Qwen3-Next's
    `ctx * sigmoid(gate)`); gate None when there is none."""
    cur, gate, gated = node, None, None
    for _ in range(16):
        users = list(cur.users)
        if len(users) != 1:
            raise NoMatch("attention output is used outside the block")
        user = users[0]
        lin = g.as_linear(user)
        if lin is not None and lin.x is cur:
            return lin, gate, gated
        if g.is_passthrough(user) and user.args[0] is cur:
            cur = user
            continue
        other = _gate_factor(user, cur, node)
        if other is not None and gate is None:
            gate, gated, cur = other, cur, user
            continue
        raise NoMatch(f"attention output does not reach an output projection (stopped at {_desc(user)})")
    raise NoMatch("output path too long")


def _gate_factor(user, cur, core_out):
    """The other factor when `user` multiplies `cur` elementwise by a tensor of its shape that is
    computed without the attention output; else None."""
    if not (g.is_call(user, {aten.mul.Tensor}) and len(user.args) == 2 and cur in user.args):
        return None
    other = user.args[1] if user.args[0] is cur else user.args[0]
    if not isinstance(other, fx.Node) or g.shape_keys(other) != g.shape_keys(cur):
        return None
    stack, seen = [other], set()
    while stack:  # the gate must not read the attention output
        n = stack.pop()
        if n is core_out:
            return None
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return other


def _gate_layout(gated, s_key, num_heads: int, dv: int) -> str:
    """How the gated context is laid out where the gate multiplies it (see AttentionMatch.out_gate_layout)."""
    keys = g.shape_keys(gated)
    if keys is not None and len(keys) == 4 and keys[2] == s_key and keys[1] == str(num_heads) and keys[3] == str(dv):
        return "bhsd"
    if keys is not None and len(keys) == 4 and keys[1] == s_key and keys[2] == str(num_heads) and keys[3] == str(dv):
        return "bshd"
    if keys is not None and len(keys) == 3 and keys[1] == s_key and keys[2] == str(num_heads * dv):
        return "bsf"
    raise NoMatch(f"the attention output is gated in a layout moh-compile does not read ({keys})")


def _token_layout(node, b_key: str | None, s_key: str) -> str | None:
    keys = g.shape_keys(node)
    if keys is None or len(keys) != 3:
        return None
    if keys[1] == s_key and keys[0] != s_key and (b_key is None or keys[0] == b_key):
        return "batch_first"
    if keys[0] == s_key and keys[1] != s_key and (b_key is None or keys[1] == b_key):
        return "seq_first"
    if keys[0] == keys[1] == s_key:
        return "batch_first"
    return None


def _walk_back_to_3d(node, s_key, b_key):
    cur = node
    for _ in range(8):
        layout = _token_layout(cur, b_key, s_key)
        if layout is not None:
            return cur, layout
        if g.is_call(cur, {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                           aten.contiguous.default, aten.clone.default}) or g.is_eval_dropout(cur):
            cur = cur.args[0]
            continue
        break
    raise NoMatch("could not find the (batch, seq, features) input of the query projection")


def _walk_forward_to_3d(node, s_key, b_key):
    cur = node
    for _ in range(8):
        layout = _token_layout(cur, b_key, s_key)
        if layout is not None:
            return cur, layout
        users = list(cur.users)
        if len(users) == 1 and g.is_call(users[0], {aten.view.default, aten.reshape.default,
                                                    aten._unsafe_view.default}):
            cur = users[0]
            continue
        break
    raise NoMatch("could not find the (batch, seq, features) output of the output projection")


def _projected_query(q, qv, d: int, num_heads: int | None, s_key, b_key) -> _QuerySide:
    """The query as the op computes it: rows of one projection, then norm and RoPE."""
    lin_q, rope, pre_scale, q_norm = _walk_to_projection(q, d)
    q_rows = _query_rows(q, lin_q, num_heads)
    if num_heads is None:
        num_heads = len(q_rows) // d if len(q_rows) % d == 0 else 0
        if not num_heads:
            raise NoMatch("cannot infer the number of heads")
    if len(q_rows) != num_heads * d:
        raise NoMatch("query projection width is not heads x head_dim")
    head_perm = None
    if rope is not None:
        if rope.head_dim != d:
            raise NoMatch("rotary embedding is not applied over the head dim")
        perm = head_dim_permutation(rope)
        if perm != list(range(d)):
            head_perm = perm
            q_rows = [q_rows[h * d + p] for h in range(num_heads) for p in perm]
    x, layout = _walk_back_to_3d(lin_q.x, s_key, b_key)
    if g.val(x).shape[-1] != lin_q.in_features:
        raise NoMatch("query projection input is not token-wise")
    return _QuerySide(lin_q, x, layout, num_heads, q_rows, rope, pre_scale, q_norm, head_perm)


def _query_from_graph(q, qv, num_heads: int | None, s_key, b_key, why: NoMatch) -> _QuerySide:
    """The fallback when the op cannot project the query itself: the graph keeps computing the
    (B, H, S, D) query, and the op's token input x is the input of the first projection on the
    query's path (the router's input). Raises `why` when even that is not there."""
    if qv.dim() != 4 or not num_heads:
        raise why
    stack, seen = [q], set()
    while stack and len(seen) < 256:  # depth first along first arguments: the query before RoPE tables
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        lin = g.as_linear(node)
        if lin is not None:
            try:
                x, layout = _walk_back_to_3d(lin.x, s_key, b_key)
            except NoMatch:
                raise why from None
            if g.val(x).shape[-1] != lin.in_features:
                raise why
            return _QuerySide(lin, x, layout, num_heads, from_graph=str(why))
        for a in reversed(node.all_input_nodes):
            keys = g.shape_keys(a)
            if (keys and s_key in keys and b_key in keys) or isinstance(a.meta.get("val"), (list, tuple)):
                stack.append(a)  # token-shaped (on the query's path), or a split whose parts may be
    raise why


# ---------------------------------------------------------------- block
def _match_block(gm, core: _Core) -> AttentionMatch:
    core_out, q, k, v, kind = core.out, core.q, core.k, core.v, core.kind
    mask_steps, mask_probe, scale, is_causal = core.mask_steps, core.mask_probe, core.scale, core.is_causal
    qv, kv_ = g.val(q), g.val(k)
    if qv is None or kv_ is None:
        raise NoMatch("missing shape information")
    d = g.static_int(qv.shape[-1])
    if qv.dim() == 4:
        num_heads = g.static_int(qv.shape[1])
        s_key = g.dim_key(qv.shape[2])
        b_key = g.dim_key(qv.shape[0])
    elif qv.dim() == 3:
        num_heads = None
        s_key = g.dim_key(qv.shape[1])
        b_key = None
    else:
        raise NoMatch(f"query has rank {qv.dim()}")
    try:
        qs = _projected_query(q, qv, d, num_heads, s_key, b_key)
    except NoMatch as why:
        qs = _query_from_graph(q, qv, num_heads, s_key, b_key, why)
    lin_q, x, layout, num_heads, rope = qs.lin, qs.x, qs.layout, qs.num_heads, qs.rope
    scale *= qs.scale
    rope_seq_major = rope is not None and _rope_is_seq_major(rope.src, s_key, qv.dim())
    dv = g.static_int(g.val(v).shape[-1])  # the values' head dim: MLA's is narrower than the queries'
    lin_o, out_gate, gated = _walk_to_out_projection(core_out)
    gate_layout = _gate_layout(gated, s_key, num_heads, dv) if out_gate is not None else ""
    if lin_o.in_features != num_heads * dv:
        raise NoMatch(f"output projection expects {lin_o.in_features} features, heads give {num_heads * dv}")
    y, _ = _walk_forward_to_3d(lin_o.node, s_key, b_key or g.shape_keys(x)[0 if layout == "batch_first" else 1])
    k_src, num_kv = (k, num_heads)
    v_src = v
    if kind == "sdpa_gqa":
        num_kv = g.static_int(kv_.shape[1])
        if qv.dim() != 4 or not num_kv or num_heads % num_kv or g.val(v).shape[1] != kv_.shape[1]:
            raise NoMatch("SDPA with enable_gqa=True: query heads are not a multiple of key/value heads")
        kind = "sdpa"
    elif qv.dim() == 4:
        k_src, num_kv = _unexpand_kv(k, num_heads)
        v_src, num_kv_v = _unexpand_kv(v, num_heads)
        if num_kv_v != num_kv:
            k_src, v_src, num_kv = k, v, num_heads
    paths = [g.module_path(n) for n in (lin_q.node, lin_o.node, core_out)]
    name = g.common_prefix([p for p in paths if p]) or core_out.name
    k_lin = _projection_of(k_src)
    v_lin = _projection_of(v_src)
    block = AttentionBlock(
        name=name,
        layer=g.layer_index(name),
        core=kind,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=d,
        d_model=lin_q.in_features,
        d_out=lin_o.out_features,
        scale=scale,
        causal=True if is_causal else None,
        has_mask=bool(mask_steps) or is_causal,
        rope=rope is not None,
        qk_norm=qs.norm is not None,
        layout=layout,
        q=_proj_info(lin_q, qs.rows),
        k=_proj_info(k_lin, None) if k_lin else None,
        v=_proj_info(v_lin, None) if v_lin else None,
        o=_proj_info(lin_o, None),
        cross=g.dim_key(kv_.shape[-2]) != s_key,
        softcap=float(core.softcap),
        sinks=core.sinks is not None,
        query_from_graph=qs.from_graph,
        v_head_dim=dv if dv != d else None,
        output_gate=out_gate is not None,
    )
    if core.sinks is not None and g.val(core.sinks).numel() != num_heads:
        raise NoMatch(f"{g.val(core.sinks).numel()} sink logits for {num_heads} heads")
    return AttentionMatch(block, core_out, x, lin_q, qs.rows, rope, qs.norm, qs.head_perm, rope_seq_major, k_src,
                          v_src, mask_steps, mask_probe, is_causal, lin_o, y, core.sinks,
                          q if qs.from_graph else None, out_gate, gate_layout)


def _rope_is_seq_major(roped: fx.Node, s_key, core_rank: int) -> bool:
    """Whether RoPE was applied to the query as (B, S, H, D) (before the transpose to heads-major,
    so cos/sin broadcast as (.., S, 1, D)) rather than as the core's (B, H, S, D). The op takes
    cos/sin heads-major; the rewrite transposes them for the former."""
    shape = g.val(roped).shape
    if core_rank != 4 or len(shape) != 4:
        return False
    return g.dim_key(shape[-2]) != s_key and g.dim_key(shape[-3]) == s_key


def _query_rows(q, lin, num_heads: int | None) -> list[int]:
    """Rows of the projection that make each query head, heads in order (H * D rows)."""
    try:
        index = feature_index(q, lin.node)
    except NotALayoutPath as err:
        raise NoMatch(f"the query is not a re-layout of its projection (at {err})") from None
    rows = head_rows(index, num_heads)
    if rows is None:
        raise NoMatch("query heads do not map to fixed rows of the projection")
    return rows


def _projection_of(node):
    cur = node
    for _ in range(32):
        lin = g.as_linear(cur)
        if lin is not None:
            return lin
        rope = match_rope(cur)
        if rope is not None:
            cur = rope.src
            continue
        if g.is_passthrough(cur) and cur.args:
            cur = cur.args[0]
            continue
        return None
    return None


def _proj_info(lin, rows: list[int] | None) -> ProjectionInfo:
    """rows: the projection rows used, in order (None: all); recorded as a range when they are one."""
    bias = g.param_name(lin.bias) if lin.bias is not None else None
    fused = rows is not None and len(rows) != lin.out_features
    contiguous = rows is not None and rows == list(range(rows[0], rows[0] + len(rows)))
    return ProjectionInfo(weight=g.param_name(lin.weight), bias=bias,
                          rows=(rows[0], rows[0] + len(rows)) if fused and contiguous else None, fused=fused)
