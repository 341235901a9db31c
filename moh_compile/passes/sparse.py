"""Per-head sparse attention (MoA-style): each head keeps a few sink tokens plus a local window
of span = alpha + beta * N keys, chosen on calibration data under an average-density budget.

Why this shape: the rewrite is inserted with every head dense (the identity, verified exact);
`finalize` then profiles, for every head and candidate (alpha, beta), the softmax mass the
pattern would drop (calibrate.sparse_profile) at several lengths, picks one candidate per head
with an integer program (calibrate.milp) under the budget, validates the plan at a length not
used for profiling, and writes the chosen windows into the already-inserted op nodes. The
per-head patterns go into the plan, so `--plan plan.json` re-applies them without calibration.
Encoders get two-sided windows with global sink tokens ([CLS]); decoders causal ones. Heads
sharing a KV head (GQA/MQA) share a pattern.
"""
from __future__ import annotations

import argparse
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from moh_compile.calibrate.data import Calibration
from moh_compile.calibrate.metrics import embeddings, fidelity
from moh_compile.calibrate.milp import choose_patterns
from moh_compile.calibrate.sparse_profile import DENSE, candidate_grid, mass_outside_candidates, pattern_density
from moh_compile.errors import MohCompileError
from moh_compile.flops import block_attention_flops
from moh_compile.ops.attention import project_queries
from moh_compile.passes import head_order
from moh_compile.passes.base import Pass
from moh_compile.plan import BlockPlan
from moh_compile.rewrite import record_values

BETAS = (0.0, 0.0625, 0.125, 0.25, 0.5)
MIN_ALPHA = 32  # smallest window constant: short inputs (sentences) stay (nearly) dense; MoA clips spans at 128
_OP_ARGS = {"x": 0, "q_weight": 1, "q_bias": 2, "k": 3, "attn_mask": 5, "rope_cos": 6, "rope_sin": 7,
            "q_norm_weight": 16, "query": 20}
_Q_NORM_EPS = 17
_WINDOW = slice(12, 16)  # window_sink, window_alpha, window_beta, window_two_sided in the op's arguments


@dataclass
class SparseOptions:
    density: float = 0.5
    sink_tokens: int | None = None  # None: 1 for encoders ([CLS]), 4 for decoders (StreamingLLM)
    profile_lengths: tuple = (256, 512)
    validate_length: int | None = None  # None: between the profile lengths, never one of them
    samples: int = 8  # sequences per profile length
    reorder_heads: bool = True  # make heads with equal patterns adjacent (passes.head_order; exact)

    @classmethod
    def parse(cls, opts: dict) -> "SparseOptions":
        unknown = set(opts) - set(cls.__dataclass_fields__)
        if unknown:
            raise MohCompileError(f"unknown sparse options: {', '.join(sorted(unknown))}")
        o = cls(**opts)
        o.profile_lengths = tuple(int(n) for n in o.profile_lengths)
        if not (isinstance(o.density, (int, float)) and 0 < o.density <= 1):
            raise MohCompileError(f"sparse density must be in (0, 1], got {o.density}")
        if o.sink_tokens is not None and (int(o.sink_tokens) != o.sink_tokens or o.sink_tokens < 0):
            raise MohCompileError(f"sink tokens must be a non-negative integer, got {o.sink_tokens}")
        if not o.profile_lengths or min(o.profile_lengths) < 2:
            raise MohCompileError(f"profile lengths must be integers >= 2, got {list(o.profile_lengths)}")
        if not isinstance(o.reorder_heads, bool):
            raise MohCompileError(f"reorder_heads must be true or false, got {o.reorder_heads!r}")
        if o.samples < 1:
            raise MohCompileError(f"profile samples must be at least 1, got {o.samples}")
        if o.validate_length is None:
            lengths = sorted(set(o.profile_lengths))
            v = (lengths[0] + lengths[-1]) // 2 if len(lengths) > 1 else (3 * lengths[0]) // 4
            while v in lengths and v > 2:
                v -= 1
            o.validate_length = v
        if o.validate_length < 2 or o.validate_length in o.profile_lengths:
            raise MohCompileError(f"validate length must be >= 2 and not a profile length, got {o.validate_length}")
        return o

    def sink_for(self, causal: bool) -> int:
        return int(self.sink_tokens) if self.sink_tokens is not None else (4 if causal else 1)


def dense_window(num_heads: int, two_sided: bool) -> dict:
    return {"sink": [0] * num_heads, "alpha": [-1] * num_heads, "beta": [0.0] * num_heads, "two_sided": two_sided}


def check_window(w: dict, num_heads: int, where: str) -> dict:
    """A window pattern from a plan (user-editable): validated, in plain types."""
    try:
        sink, alpha, beta = ([int(s) for s in w["sink"]], [int(a) for a in w["alpha"]],
                             [float(b) for b in w["beta"]])
        two_sided = bool(w["two_sided"])
    except (KeyError, TypeError, ValueError) as err:
        raise MohCompileError(f"{where}: sparse pattern needs sink/alpha/beta lists and two_sided ({err})")
    if not (len(sink) == len(alpha) == len(beta) == num_heads):
        raise MohCompileError(f"{where}: sparse pattern needs one sink/alpha/beta per head ({num_heads}), got "
                              f"{len(sink)}/{len(alpha)}/{len(beta)}")
    if min(sink) < 0 or min(beta) < 0 or not all(np.isfinite(beta)):
        raise MohCompileError(f"{where}: sink and beta must be >= 0 (alpha < 0 marks a dense head)")
    if any(a >= 0 and a == 0 and b == 0 for a, b in zip(alpha, beta)):
        raise MohCompileError(f"{where}: alpha = beta = 0 is an empty window; use alpha >= 1 or beta > 0")
    return {"sink": sink, "alpha": alpha, "beta": beta, "two_sided": two_sided}


def _split(batch):
    return (dict(batch), True) if isinstance(batch, dict) else (dict(enumerate(batch if isinstance(
        batch, (tuple, list)) else (batch,))), False)


def pack_batches(calibration: Calibration, batches: list, length: int, count: int, batch_size: int = 2,
                 purpose: str = "sparse profiling", shorter: str = "shorter --profile-lengths") -> list:
    """Batches of up to `count` sequences of exactly `length` real tokens, made by concatenating
    the real tokens of consecutive examples (short sentences -> long inputs). Each sequence
    starts where an example starts. When every example begins with the same token and ends with
    the same token (a tokenizer's [CLS]/[SEP] or <s>/</s>), those are kept only at the start and
    end of each long sequence, as in a real long document."""
    examples, template, is_dict = [], None, True
    for batch in batches:
        items, is_dict = _split(batch)
        template = items
        mask = calibration.token_mask(batch)
        tensors = [t for t in items.values() if isinstance(t, torch.Tensor) and t.dim() >= 2]
        if not tensors:
            continue
        rows, seq = (mask.shape if mask is not None else tensors[0].shape[:2])
        keys = [k for k, t in items.items() if isinstance(t, torch.Tensor) and t.dim() >= 2
                and tuple(t.shape[:2]) == (rows, seq)]
        for r in range(rows):
            real = mask[r] if mask is not None else torch.ones(seq, dtype=torch.bool)
            if real.any():
                examples.append({k: items[k][r][real] for k in keys})
    if not examples:
        raise MohCompileError(f"{purpose} needs token batches (tensors of shape (batch, seq, ...))")
    ids = next((k for k in examples[0] if k == "input_ids"), None)
    ids = ids if ids is not None else next((k for k, t in examples[0].items() if not t.is_floating_point()), None)
    wrap = (ids is not None and len(examples) > 1 and all(len(e[ids]) > 2 for e in examples)
            and len({int(e[ids][0]) for e in examples}) == 1 and len({int(e[ids][-1]) for e in examples}) == 1)
    cut = 1 if wrap else 0
    body = length - 2 * cut
    starts, total = [], 0
    for e in examples:
        starts.append(total)
        total += len(next(iter(e.values()))) - 2 * cut
    stream = {k: torch.cat([e[k][cut:len(e[k]) - cut] for e in examples]) for k in examples[0]}
    chunks, pos = [], 0
    for st in starts:
        if st >= pos and st + body <= total and body > 0:
            chunks.append(st)
            pos = st + body
            if len(chunks) == count:
                break
    if not chunks:
        raise MohCompileError(f"calibration data has {total} tokens; {purpose} at length {length} "
                              f"needs at least {length} (use more --calib-samples or {shorter})")
    first, last = examples[0], examples[0]
    out = []
    for i in range(0, len(chunks), batch_size):
        items = dict(template)
        for k, t in stream.items():
            seqs = [t[c:c + body] for c in chunks[i:i + batch_size]]
            if wrap:
                seqs = [torch.cat([first[k][:1], x, last[k][-1:]]) for x in seqs]
            items[k] = torch.stack(seqs)
        out.append(items if is_dict else tuple(items[j] for j in range(len(items))))
    return out


@dataclass
class _Block:
    match: object
    plan: BlockPlan
    node: fx.Node

    @property
    def heads(self) -> int:
        return self.match.block.num_heads

    @property
    def causal(self) -> bool:
        return bool(self.match.block.causal)

    def groups(self, offset: int) -> list[list[int]]:
        """Heads sharing a KV head, as global head indices."""
        rep = self.heads // self.match.block.num_kv_heads
        return [[offset + kv * rep + r for r in range(rep)] for kv in range(self.match.block.num_kv_heads)]


def _op_node(gm: fx.GraphModule, rewrite) -> fx.Node:
    live = set(gm.graph.nodes)
    for n in rewrite.inserted:
        if n in live and n.target is torch.ops.moh_compile.attention.default:
            return n
    raise MohCompileError(f"{rewrite.name}: the attention op inserted for this block is gone from the graph")


def _set_window(node: fx.Node, w: dict) -> None:
    args = list(node.args)
    args[_WINDOW] = [list(w["sink"]), list(w["alpha"]), [float(b) for b in w["beta"]], bool(w["two_sided"])]
    node.args = tuple(args)


def _record(gm, blocks, calibration, batches, desc) -> dict:
    nodes = {}
    for bi, b in enumerate(blocks):
        for name, idx in _OP_ARGS.items():
            if idx < len(b.node.args) and isinstance(b.node.args[idx], fx.Node):
                nodes[f"{bi}:{name}"] = b.node.args[idx]
    return record_values(gm, nodes, lambda: calibration.run(gm, batches, desc=desc))


def _calls(values, bi, block: _Block):
    """(q, k, mask, scale) of each recorded call of block bi, q as the core sees it (QK-norm, RoPE)."""
    get = lambda name, t: values[f"{bi}:{name}"][t] if f"{bi}:{name}" in values else None  # noqa: E731
    d = block.match.block.head_dim
    eps = block.node.args[_Q_NORM_EPS] if len(block.node.args) > _Q_NORM_EPS else 0.0
    for t in range(len(values[f"{bi}:x"])):
        q = project_queries(get("x", t), get("q_weight", t), get("q_bias", t), get("rope_cos", t), get("rope_sin", t),
                            d, get("q_norm_weight", t), eps, get("query", t))
        yield q, get("k", t), get("attn_mask", t), float(block.node.args[11])


def _mass(values, bi, block, patterns) -> np.ndarray:
    """(C, H) mean attention mass outside each pattern over the recorded calls."""
    out = [mass_outside_candidates(q, k, m, s, patterns, not block.causal) for q, k, m, s in _calls(values, bi, block)]
    return torch.stack(out).double().mean(0).numpy()


class SparseAttention(Pass):
    name, kind = "sparse", "attention"

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("sparse attention (--attention sparse): per-head sink + local window")
        g.add_argument("--density", type=float, metavar="D",
                       help="average fraction of (query, key) pairs kept over all heads, in (0, 1] (default 0.5)")
        g.add_argument("--sink-tokens", type=int, metavar="N",
                       help="global sink tokens per sparse head (default: 1 for encoders, 4 for decoders)")
        g.add_argument("--profile-lengths", metavar="L1,L2,...",
                       help="sequence lengths to profile heads at, built by concatenating calibration "
                            "examples (default: 256,512)")
        g.add_argument("--validate-length", type=int, metavar="L",
                       help="length the chosen plan is validated at; not a profile length (default: between them)")
        g.add_argument("--profile-samples", type=int, metavar="N", help="sequences per profile length (default: 8)")
        g.add_argument("--reorder-heads", action=argparse.BooleanOptionalAction, default=None,
                       help="permute heads (and their weights) so heads with the same pattern are adjacent, "
                            "which the kernel runs faster; exact (default: on)")

    def options_from_args(self, args) -> dict:
        out = {}
        for key, opt in (("density", "density"), ("sink_tokens", "sink_tokens"),
                         ("validate_length", "validate_length"), ("samples", "profile_samples")):
            if getattr(args, opt, None) is not None:
                out[key] = getattr(args, opt)
        if getattr(args, "reorder_heads", None) is not None:
            out["reorder_heads"] = bool(args.reorder_heads)
        if getattr(args, "profile_lengths", None):
            try:
                out["profile_lengths"] = [int(n) for n in args.profile_lengths.split(",")]
            except ValueError:
                raise MohCompileError(f"--profile-lengths must be integers joined by commas, not "
                                      f"{args.profile_lengths!r}")
        SparseOptions.parse(dict(out))  # bad values fail before the model is loaded
        return out

    def check(self, match, config) -> str | None:
        if match.block.cross:
            return "cross-attention: windows around a query's position do not apply to another sequence's keys"
        if match.block.softcap or match.block.sinks:
            return ("soft-capped scores (Gemma 2) or attention sinks (GPT-OSS): the block-sparse kernel's flash "
                    "attention has neither")
        return None

    def plan(self, match, config) -> BlockPlan:
        SparseOptions.parse(self.options(config))  # reject bad options before any work
        return BlockPlan(match.block.name, self.kind, self.name, {})

    def attention_parts(self, gm, match, block_plan) -> dict:
        return {"window": dense_window(match.block.num_heads, not match.block.causal)}

    def finalize(self, gm, rewrites, config, calibration=None) -> dict:
        opts = SparseOptions.parse(self.options(config))
        blocks = [_Block(m, bp, _op_node(gm, rw)) for m, bp, rw in rewrites]
        saved = [bool(b.plan.settings.get("alpha")) for b in blocks]
        if any(saved):
            if not all(saved):
                raise MohCompileError("the plan has sparse patterns for some blocks but not others")
            windows = [check_window(b.plan.settings, b.heads, b.plan.name) for b in blocks]
            for b, w in zip(blocks, windows):
                _set_window(b.node, w)
            gm.recompile()
            return build_report(blocks, windows, opts, source="plan")
        if calibration is None or not calibration.batches:
            raise MohCompileError("--attention sparse needs calibration batches (--calib) to choose patterns, "
                                  "or a --plan with patterns")
        windows, loss, candidates = choose_windows(gm, blocks, calibration, opts)
        for b, w in zip(blocks, windows):
            _set_window(b.node, w)
            b.plan.settings = dict(w)
        gm.recompile()
        validation = validate(gm, blocks, windows, calibration, opts, loss)
        return build_report(blocks, windows, opts, source="calibration", loss=loss, validation=validation,
                            candidates=candidates)

    def optimize(self, gm, rewrites, config, example) -> dict:
        """Reorder each block's heads by pattern (passes.head_order), unless reorder_heads is off.
        Plans and reports keep the original head numbering."""
        if not SparseOptions.parse(self.options(config)).reorder_heads:
            return {}
        results = head_order.reorder_heads(gm, {_op_node(gm, rw): bp.name for _, bp, rw in rewrites}, *example,
                                           rtol=config.verify_rtol)
        return {"head_order": results, "markdown": head_order.markdown(results)} if results else {}


def candidate_alphas(lengths: list[int]) -> list[int]:
    """MIN_ALPHA (or N/8 for short profile lengths), then 64, 128, ... below the longest length."""
    floor = max(1, min(MIN_ALPHA, min(lengths) // 8))
    out, a = [floor], 64
    while a < max(lengths):
        out += [a] if a > floor else []
        a *= 2
    return out + ([min(lengths) // 4] if min(lengths) < 256 else [])


def choose_windows(gm, blocks: list[_Block], calibration: Calibration, opts: SparseOptions):
    """Profile every head at each length; one MILP over all heads under the density budget."""
    lengths = sorted(set(opts.profile_lengths))
    candidates = candidate_grid(lengths, alphas=candidate_alphas(lengths), betas=BETAS)
    loss = [np.zeros((b.heads, len(candidates))) for b in blocks]
    for n in lengths:
        batches = pack_batches(calibration, calibration.batches, n, opts.samples)
        values = _record(gm, blocks, calibration, batches, f"sparse: profiling heads at {n} tokens")
        for bi, b in enumerate(blocks):
            sink = opts.sink_for(b.causal)
            pats = [(0 if a < 0 else sink, a, be) for a, be in candidates]
            loss[bi] += _mass(values, bi, b, pats).T / len(lengths)
        del values
    density = [np.tile([np.mean([pattern_density(n, 0 if a < 0 else opts.sink_for(b.causal), a, be,
                                                 not b.causal, b.causal) for n in lengths])
                        for a, be in candidates], (b.heads, 1)) for b in blocks]
    groups, off = [], 0
    for b in blocks:
        groups += b.groups(off)
        off += b.heads
    try:
        choice = choose_patterns(np.concatenate(loss), np.concatenate(density), opts.density, groups)
    except ValueError as err:
        raise MohCompileError(f"sparse density {opts.density}: {err}")
    windows, off = [], 0
    for bi, b in enumerate(blocks):
        pick = [candidates[c] for c in choice[off:off + b.heads]]
        sink = opts.sink_for(b.causal)
        windows.append({"sink": [0 if a < 0 else sink for a, _ in pick], "alpha": [int(a) for a, _ in pick],
                        "beta": [float(be) for _, be in pick], "two_sided": not b.causal})
        loss[bi] = loss[bi][np.arange(b.heads), choice[off:off + b.heads]]
        off += b.heads
    return windows, [lb.tolist() for lb in loss], candidates


def validate(gm, blocks, windows, calibration: Calibration, opts: SparseOptions, loss) -> dict:
    """At an unprofiled length: attention mass the chosen patterns drop (vs the profiled estimate),
    and the model output's cosine to the same model with every head dense."""
    n = opts.validate_length
    source = calibration.eval_batches or calibration.batches
    batches = pack_batches(calibration, source, n, max(2, opts.samples // 2))
    values = _record(gm, blocks, calibration, batches, f"sparse: validating at {n} tokens")
    val = [_mass(values, bi, b, [(w["sink"], w["alpha"], w["beta"])])[0].tolist()
           for bi, (b, w) in enumerate(zip(blocks, windows))]
    del values
    sparse_emb = embeddings(gm, batches)
    for b in blocks:
        _set_window(b.node, dense_window(b.heads, not b.causal))
    gm.recompile()
    dense_emb = embeddings(gm, batches)
    for b, w in zip(blocks, windows):
        _set_window(b.node, w)
    gm.recompile()
    profiled, measured = float(np.mean(np.concatenate(loss))), float(np.mean(np.concatenate(val)))
    fid = fidelity(dense_emb, sparse_emb)
    return {"length": n, "sequences": int(sparse_emb.shape[0]), "held_out": bool(calibration.eval_batches),
            "mass_outside": measured, "mass_outside_profiled": profiled, "mass_outside_per_head": val,
            "cosine_vs_dense": fid["cosine"], "cosine_min_vs_dense": fid["cosine_min"],
            "ok": bool(measured <= 1.5 * profiled + 0.02)}


def _flops(blocks, windows, n: int) -> tuple[float, float, float, float]:
    """Attention FLOPs of one sequence of n tokens, (total dense, total sparse, core dense, core sparse)."""
    td = ts = cd = cs = 0.0
    for b, w in zip(blocks, windows):
        blk = b.match.block
        dens = float(np.mean([pattern_density(n, s, a, be, w["two_sided"], b.causal)
                              for s, a, be in zip(w["sink"], w["alpha"], w["beta"])]))
        dense, sparse = block_attention_flops(blk, n), block_attention_flops(blk, n, rewritten=True, density=dens)
        td, ts, cd, cs = td + dense["total"], ts + sparse["total"], cd + dense["core"], cs + sparse["core"]
    return td, ts, cd, cs


def build_report(blocks, windows, opts: SparseOptions, source: str, loss=None, validation=None,
                 candidates=None) -> dict:
    """Per-head patterns and densities, validation, FLOPs, and a PNG of density per head."""
    lengths = sorted(set(opts.profile_lengths))
    rows = []
    for bi, (b, w) in enumerate(zip(blocks, windows)):
        for h in range(b.heads):
            rows.append({"block": b.plan.name, "head": h, "sink": w["sink"][h], "alpha": w["alpha"][h],
                         "beta": w["beta"][h],
                         "density": {str(n): pattern_density(n, w["sink"][h], w["alpha"][h], w["beta"][h],
                                                             w["two_sided"], b.causal) for n in lengths},
                         "est_loss": None if loss is None else float(loss[bi][h])})
    mean_density = {str(n): float(np.mean([r["density"][str(n)] for r in rows])) for n in lengths}
    flops = {}
    for n in lengths + ([validation["length"]] if validation else []):
        td, ts, cd, cs = _flops(blocks, windows, n)
        flops[str(n)] = {"attention_dense": td, "attention_sparse": ts, "core_dense": cd, "core_sparse": cs}
    md = [f"### Sparse attention (per-head sink + window), patterns from {source}",
          f"Budget: average density <= {opts.density:g}; achieved "
          + ", ".join(f"{v:.3f} at N={k}" for k, v in mean_density.items())
          + (f"; {len(candidates)} candidates per head, chosen by MILP." if candidates else "."), ""]
    if validation:
        md.append(f"Validation at N={validation['length']} (not profiled; {validation['sequences']} "
                  f"{'held-out' if validation['held_out'] else 'calibration'} sequences): attention mass dropped "
                  f"{validation['mass_outside']:.4f} vs {validation['mass_outside_profiled']:.4f} estimated at the "
                  f"profile lengths ({'ok' if validation['ok'] else 'WORSE than estimated'}); output cosine vs "
                  f"dense {validation['cosine_vs_dense']:.4f} (worst {validation['cosine_min_vs_dense']:.4f}).")
        md.append("")
    md += ["| N | attention GFLOPs dense | sparse | core dense | core sparse | core speedup (ideal) |",
           "|---|---|---|---|---|---|"]
    for n, f in flops.items():
        md.append(f"| {n} | {f['attention_dense'] / 1e9:.3f} | {f['attention_sparse'] / 1e9:.3f} | "
                  f"{f['core_dense'] / 1e9:.3f} | {f['core_sparse'] / 1e9:.3f} | "
                  f"{f['core_dense'] / max(f['core_sparse'], 1e-30):.2f}x |")
    md += ["", "| block | head | sink | alpha | beta | " + " | ".join(f"density@{n}" for n in lengths)
           + " | est. loss (mass dropped) |", "|---" * (6 + len(lengths)) + "|"]
    for r in rows:
        pat = ("dense", "", "") if r["alpha"] < 0 else (r["sink"], r["alpha"], f"{r['beta']:g}")
        md.append(f"| {r['block']} | {r['head']} | {pat[0]} | {pat[1]} | {pat[2]} | "
                  + " | ".join(f"{r['density'][str(n)]:.3f}" for n in lengths)
                  + f" | {'' if r['est_loss'] is None else format(r['est_loss'], '.4f')} |")
    md.append("\n![density per head](sparse_density.png)")
    return {"source": source, "budget": opts.density, "mean_density": mean_density, "heads": rows,
            "flops": flops, "validation": validation, "markdown": "\n".join(md),
            "files": {"sparse_density.png": density_png(blocks, rows, max(lengths))}}


def density_png(blocks, rows, n: int) -> bytes:
    """Heat map of pattern density per (block, head) at length n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(b.heads for b in blocks)
    grid = np.full((len(blocks), width), np.nan)
    names = [b.plan.name for b in blocks]
    for r in rows:
        grid[names.index(r["block"]), r["head"]] = r["density"][str(n)]
    fig, ax = plt.subplots(figsize=(1 + 0.45 * width, 1 + 0.4 * len(blocks)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_yticks(range(len(blocks)), [str(b.match.block.layer if b.match.block.layer is not None else i)
                                       for i, b in enumerate(blocks)])
    ax.set_ylabel("layer")
    ax.set_title(f"attention density per head at N={n}")
    fig.colorbar(im, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


__all__ = ["SparseAttention", "SparseOptions", "pack_batches", "dense_window", "check_window", "DENSE"]
