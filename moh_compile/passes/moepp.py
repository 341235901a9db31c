"""MoE++ FFN pass (arXiv 2410.07348, MoEfication 2110.01786): each dense FFN becomes N FFN experts
(a partition of its hidden neurons) plus zero / copy / constant experts, routed per token.

rewrite:  router (call_module, an ExpertRouter) + `moh_compile::moepp_ffn` + the router's
          compensation. At the identity setting the router picks all N FFN experts at weight 1
          and the compensation is 0, so the block equals the dense FFN (checked by commit_verified).
finalize: layer by layer in graph order, on the FFN inputs of the *converted* model (earlier
          blocks already routed; real tokens only): group neurons (balanced k-means on weight
          rows + co-activation), fit the router (ridge on each group's predicted contribution),
          set the zero expert as a per-token threshold meeting the `ffn_keep` budget, fit the
          skip compensation. Grouping and settings go into the plan, so `--plan` re-applies them.

Zero-computation experts for a converted dense model (training-free):
- zero: its router logit is the threshold below which a slot is not computed (variable work per
  token under a mean budget; exactly MoE++'s "a token routed to the zero expert spends nothing").
- constant: v = the mean FFN output on calibration tokens, W_c = 0; copy: E(x) = x. Their
  router rows are left off (logit -1e4): training-free there is no signal that says a token is
  better served by x or v than by the compensated skip. They are there for fine-tuning /
  training (the heterogeneous load-balance loss reaches them) and are counted in the report.
Without calibration data only ffn_keep = 1 (identity, weight-only grouping) is possible; a lower
budget is a clear error, since a router fitted on nothing would be a guess.
"""
from __future__ import annotations

import io
import operator
import re

import torch
import torch.fx as fx
from torch import nn

from moh_compile.calibrate.data import call_on, real_tokens
from moh_compile.errors import MohCompileError
from moh_compile.match.graph import shape_keys
from moh_compile.flops import ffn_flops
from moh_compile.ops.activations import apply_activation
from moh_compile.ops.moepp import split_ffn_into_experts
from moh_compile.passes.base import Pass
from moh_compile.passes.moepp_router import KMAX_FACTOR, ExpertRouter, MoEPPConfig, router_flops, top_k_for_keep
from moh_compile.plan import BlockPlan
from moh_compile.rewrite import constant_value, drop_unread_attrs, insert_ffn, record_values

aten = torch.ops.aten

DEFAULTS = dict(experts=16, ffn_keep=0.5, top_k=None, zero_experts=1, copy_experts=0, const_experts=0,
                gating_residual=False, seed=0, max_tokens=8192, refit=True, router_rank=None)


def resolve_settings(opts: dict) -> dict:
    """Validated per-model settings from pass options (plain data; top_k filled in)."""
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise MohCompileError(f"unknown moepp option(s) {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **opts}
    n, keep = s["experts"], s["ffn_keep"]
    if not isinstance(n, int) or n < 1:
        raise MohCompileError(f"--experts must be a positive integer, got {n}")
    if not 0.0 < float(keep) <= 1.0:
        raise MohCompileError(f"--ffn-keep must be in (0, 1], got {keep}")
    for key in ("zero_experts", "copy_experts", "const_experts"):
        if s[key] < 0:
            raise MohCompileError(f"--{key.replace('_', '-')} must be >= 0, got {s[key]}")
    total = n + s["zero_experts"] + s["copy_experts"] + s["const_experts"]
    rank = s["router_rank"]
    if rank is not None and (not isinstance(rank, int) or not 1 <= rank < total):
        raise MohCompileError(f"--router-rank must be an integer in [1, {total}) (below the {total} experts incl. "
                              f"zero/copy/const; omit it for a full-rank router), got {rank}")
    if s["top_k"] is None:  # with a zero expert, k leaves room above the mean
        s["top_k"] = top_k_for_keep(keep, n, KMAX_FACTOR if s["zero_experts"] else 1.0)
    k = s["top_k"]
    if not 1 <= k <= total:
        raise MohCompileError(f"--top-k must be in [1, {total}] (number of experts incl. zero/copy/const), got {k}")
    if k < keep * n - 1e-9:
        raise MohCompileError(f"--top-k {k} cannot spend --ffn-keep {keep} of {n} experts (needs k >= {keep * n:g})")
    if s["zero_experts"] == 0 and abs(k - keep * n) > 1e-9 and keep < 1.0:
        raise MohCompileError(f"without a zero expert every token computes exactly k experts: --ffn-keep {keep} "
                              f"needs --top-k {keep * n:g} (or --zero-experts 1)")
    return s


def _name(block: str) -> str:
    return "moepp_" + re.sub(r"\W", "_", block)


def _const_value(gm: fx.GraphModule, node):
    try:
        return constant_value(gm, node)
    except ValueError:
        raise MohCompileError(f"FFN weight {node.name} is not a constant of the model") from None


class MoEPPExperts(nn.Module):
    """The expert weights of one block: (N, F_e, d) stacks, plus constant-expert vectors/gates."""

    def __init__(self, experts: dict, d: int, d_out: int, n_const: int):
        super().__init__()
        for key in ("w_in", "b_in", "w_gate", "b_gate", "w_out"):
            t = experts.get(key)
            setattr(self, key, None if t is None else nn.Parameter(t.detach().clone()))
        self.const_vectors = nn.Parameter(torch.zeros(n_const, d_out)) if n_const else None
        self.const_gate_weight = nn.Parameter(torch.zeros(n_const, 2, d)) if n_const else None

    def load(self, experts: dict) -> None:
        with torch.no_grad():
            for key in ("w_in", "b_in", "w_gate", "b_gate", "w_out"):
                if getattr(self, key) is not None:
                    getattr(self, key).copy_(experts[key])

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("w_in", "b_in", "w_gate", "b_gate", "w_out")}


class MoEPPPass(Pass):
    name, kind = "moepp", "ffn"

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("MoE++ FFN experts (--ffn moepp)")
        g.add_argument("--experts", type=int, default=DEFAULTS["experts"], metavar="N",
                       help="FFN experts per block (hidden neurons split into N equal groups; default 16)")
        g.add_argument("--ffn-keep", type=float, default=DEFAULTS["ffn_keep"], metavar="F",
                       help="mean fraction of FFN work kept per token, in (0, 1] (default 0.5)")
        g.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="routing slots per token (default: ceil(1.5 * ffn-keep * N) with a zero expert)")
        g.add_argument("--zero-experts", type=int, default=DEFAULTS["zero_experts"], metavar="N")
        g.add_argument("--copy-experts", type=int, default=DEFAULTS["copy_experts"], metavar="N")
        g.add_argument("--const-experts", type=int, default=DEFAULTS["const_experts"], metavar="N")
        g.add_argument("--gating-residual", action="store_true",
                       help="router logits get W_g x the previous block's logits (MoE++ gating residual)")
        g.add_argument("--router-rank", type=int, default=None, metavar="R",
                       help="factor each router through R dimensions (reduced-rank fit): cuts its cost from "
                            "2*d*N to 2*R*(d+N) FLOPs per token, for many experts (default: full rank)")

    def options_from_args(self, args) -> dict:
        if getattr(args, "ffn", None) != self.name:
            return {}
        opts = dict(experts=args.experts, ffn_keep=args.ffn_keep, top_k=args.top_k,
                    zero_experts=args.zero_experts, copy_experts=args.copy_experts,
                    const_experts=args.const_experts, gating_residual=args.gating_residual)
        if getattr(args, "router_rank", None) is not None:
            opts["router_rank"] = args.router_rank
        if getattr(args, "refit", None) is not None:
            opts["refit"] = args.refit
        resolve_settings(opts)  # invalid settings fail before the model is loaded
        return opts

    # ------------------------------------------------------------------ plan / rewrite
    def plan(self, match, config) -> BlockPlan:
        s = resolve_settings(self.options(config))
        blk = match.block
        n = s["experts"]
        if n > blk.d_hidden:
            raise MohCompileError(f"{blk.name}: {n} experts but the FFN has only {blk.d_hidden} hidden neurons")
        if blk.d_hidden % n:
            raise MohCompileError(f"{blk.name}: hidden size {blk.d_hidden} is not divisible by {n} experts")
        if (s["copy_experts"] or s["const_experts"]) and blk.d_out != blk.d_model:
            raise MohCompileError(f"{blk.name}: copy/constant experts need d_out == d_model "
                                  f"({blk.d_out} != {blk.d_model})")
        if s["router_rank"] is not None and s["router_rank"] >= blk.d_model:
            raise MohCompileError(f"{blk.name}: --router-rank {s['router_rank']} is not below d_model "
                                  f"{blk.d_model}: a factored router would cost more than a full one")
        settings = {k: s[k] for k in ("experts", "ffn_keep", "top_k", "zero_experts", "copy_experts",
                                      "const_experts", "gating_residual", "seed", "max_tokens", "refit",
                                      "router_rank")}
        return BlockPlan(blk.name, self.kind, self.name, settings)

    def _config(self, st: dict, top_k: int | None = None) -> MoEPPConfig:
        return MoEPPConfig(n_ffn=st["experts"], n_zero=st["zero_experts"], n_copy=st["copy_experts"],
                           n_const=st["const_experts"], top_k=st["experts"] if top_k is None else top_k,
                           gating_residual=st["gating_residual"], rank=st.get("router_rank"))

    def rewrite(self, gm, match, block_plan):
        st = block_plan.settings
        n = st["experts"]
        groups = st.get("groups") or torch.arange(match.block.d_hidden).reshape(n, -1).tolist()
        name = _name(match.block.name)
        # the gating residual links blocks that route the same tokens (not an encoder's to a decoder's)
        tokens = shape_keys(match.x)[:-1]
        prev_logits, prev_tokens = getattr(gm, "_moepp_last_logits", (None, None))
        prev = prev_logits if st["gating_residual"] and prev_tokens == tokens else None

        def emit(b, ops):
            w = {k: _const_value(gm, ops[k]) for k in ("w_in", "b_in", "w_out", "w_gate", "b_gate")}
            try:
                experts = split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], w["w_gate"], w["b_gate"], groups)
            except ValueError as err:
                raise MohCompileError(f"{match.block.name}: plan grouping does not fit this FFN: {err}") from err
            d, d_out = w["w_in"].shape[1], w["w_out"].shape[0]
            experts_mod = MoEPPExperts(experts, d, d_out, st["const_experts"]).eval()
            w["b_out"] = _const_value(gm, ops["b_out"])
            experts_mod.dense = w  # plain attribute: finalize regroups from it, then drops it
            gm.add_submodule(name + "_experts", experts_mod)
            gm.add_submodule(name + "_router", ExpertRouter(d, d_out, self._config(st)).eval())
            r = b.module(name + "_router", ops["x"], *([prev] if prev is not None else []))
            idx, weight, logits, comp = (b.call(operator.getitem, r, i) for i in range(4))
            e = {k: b.attr(f"{name}_experts.{k}") if getattr(gm.get_submodule(name + "_experts"), k) is not None
                 else None for k in ("w_in", "b_in", "w_gate", "b_gate", "w_out", "const_vectors",
                                     "const_gate_weight")}
            out = b.call(torch.ops.moh_compile.moepp_ffn.default, ops["x"], e["w_in"], e["b_in"], e["w_gate"],
                         e["b_gate"], e["w_out"], ops["b_out"], idx, weight, e["const_vectors"],
                         e["const_gate_weight"], st["zero_experts"], st["copy_experts"], match.activation)
            gm._moepp_last_logits = (logits, tokens)
            return b.call(aten.add.Tensor, out, comp)

        return insert_ffn(gm, match, emit)

    # ------------------------------------------------------------------ finalize
    def finalize(self, gm, rewrites, config, calibration=None) -> dict:
        if hasattr(gm, "_moepp_last_logits"):
            del gm._moepp_last_logits
        if not rewrites:
            return {}
        st0 = rewrites[0][1].settings
        if calibration is None and st0["ffn_keep"] < 1.0:
            raise MohCompileError("the moepp pass fits its routers on calibration data: pass --calib DATA "
                                  "(calibration=...) or use --ffn-keep 1 (all experts, exact)")
        for m, bp, rw in rewrites:
            self._fit_block(gm, m, bp, rw, calibration)
        _drop_unused_params(gm, [m for m, _, _ in rewrites])
        usage = expert_usage(gm, calibration.batches, calibration.token_mask) if calibration and \
            calibration.batches else None
        return self._report(gm, rewrites, usage)

    def _fit_block(self, gm, m, bp, rw, calibration) -> None:
        from moh_compile.calibrate.moepp_fit import GroupOutputs, fit_router, group_neurons

        st = bp.settings
        name = _name(m.block.name)
        experts_mod, router = gm.get_submodule(name + "_experts"), gm.get_submodule(name + "_router")
        rnode = next(n for n in rw.inserted if n.op == "call_module" and n.target == name + "_router")
        fresh = "groups" not in st
        w = experts_mod.__dict__.pop("dense")
        if calibration is None:  # ffn_keep == 1: identity with weight-only grouping
            if fresh:
                st["groups"] = group_neurons(w["w_in"], st["experts"], seed=st["seed"], w_gate=w["w_gate"]).tolist()
                experts_mod.load(split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], w["w_gate"], w["b_gate"],
                                                        st["groups"]))
            return
        watch = {"x": m.x}
        if len(rnode.args) > 1:
            watch["prev"] = rnode.args[1]
        rec = record_values(gm, watch, lambda: calibration.run(gm, desc=f"moepp {m.block.name}"))
        masks = [calibration.token_mask(b) for b in calibration.batches] if calibration.batches else []
        x = real_tokens(rec["x"], masks)
        prev = real_tokens(rec["prev"], masks) if "prev" in rec else None
        gen = torch.Generator().manual_seed(st["seed"])
        if x.shape[0] > st["max_tokens"]:
            pick = torch.randperm(x.shape[0], generator=gen)[: st["max_tokens"]]
            x = x[pick]
            prev = prev[pick] if prev is not None else None
        with torch.no_grad():
            if fresh:
                h = x @ w["w_in"].T + (w["b_in"] if w["b_in"] is not None else 0)
                if w["w_gate"] is not None:
                    gt = x @ w["w_gate"].T + (w["b_gate"] if w["b_gate"] is not None else 0)
                    acts = apply_activation(m.activation, gt) * h
                else:
                    acts = apply_activation(m.activation, h)
                st["groups"] = group_neurons(w["w_in"], st["experts"], activations=acts, seed=st["seed"],
                                             w_gate=w["w_gate"]).tolist()
            experts = split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], w["w_gate"], w["b_gate"],
                                             st["groups"])
            experts_mod.load(experts)
            gout = GroupOutputs(x, experts, m.activation)
            dense = gout.dense()
            y = dense + (w["b_out"] if w["b_out"] is not None else 0)
            scale = None
            if y.shape[-1] == x.shape[-1]:  # post-LN residual heuristic: errors relative to the stream
                z = y + x
                scale = (z - z.mean(-1, keepdim=True)).norm(dim=-1).clamp_min(1e-6)
            if experts_mod.const_vectors is not None:
                experts_mod.const_vectors.copy_(dense.mean(0).expand_as(experts_mod.const_vectors))
        router.config = self._config(st, st["top_k"])
        if st["ffn_keep"] >= 1.0 and st["top_k"] >= st["experts"]:
            st["fit"] = {"tokens": int(x.shape[0])}
            return
        info = fit_router(router, x, gout, st["ffn_keep"], scale=scale, prev_logits=prev)
        st["fit"] = {"tokens": int(x.shape[0]), "ridge_r2": round(info["r2"], 4),
                     "calib_ffn_fraction": round(info["mean_groups"] / st["experts"], 4)}
        if st.get("refit", False) and router.config.compensation:
            st["fit"]["refit"] = _refit_block(x, experts, experts_mod, router, prev, m.activation, dense, scale)

    def _report(self, gm, rewrites, usage) -> dict:
        rows, files = [], {}
        dense_total = after_total = 0.0
        for m, bp, _ in rewrites:
            st, blk = bp.settings, m.block
            name = _name(blk.name)
            cfg = gm.get_submodule(name + "_router").config
            u = usage.get(name + "_router") if usage else None
            frac = u["ffn_fraction"] if u else 1.0
            dense = ffn_flops(1, blk.d_model, blk.d_hidden, blk.d_out, blk.gated)["total"]
            routing = router_flops(cfg, blk.d_model, blk.d_out)
            extra = routing + 2 * blk.d_out * cfg.top_k + 4 * blk.d_model * cfg.n_const
            after = dense * frac + extra
            dense_total, after_total = dense_total + dense, after_total + after
            rows.append({"block": blk.name, "experts": cfg.n_ffn, "zero": cfg.n_zero, "copy": cfg.n_copy,
                         "const": cfg.n_const, "top_k": cfg.top_k, "router_rank": cfg.rank, "ffn_fraction": frac,
                         "router_flops_per_token": routing,
                         "choice_rate": u["choice_rate"] if u else None, "flops_per_token_dense": dense,
                         "flops_per_token_moepp": after, **{k: v for k, v in st.get("fit", {}).items()}})
        md = ["MoE++ FFN experts. Work fraction and choice rates measured on the calibration tokens "
              "(real tokens only); FLOPs per token include router and compensation.", "",
              "| block | experts (ffn+zero+copy+const) | k | FFN work fraction | FLOPs/token dense -> MoE++ |",
              "|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['block']} | {r['experts']}+{r['zero']}+{r['copy']}+{r['const']} | {r['top_k']} | "
                      f"{r['ffn_fraction']:.3f} | {r['flops_per_token_dense']:.3g} -> {r['flops_per_token_moepp']:.3g} |")
        mean_frac = sum(r["ffn_fraction"] for r in rows) / len(rows)
        md += ["", f"Mean FFN work fraction {mean_frac:.3f}; FFN FLOPs per token {dense_total:.3g} -> "
               f"{after_total:.3g} ({after_total / dense_total:.3f} of dense)."]
        if usage:
            md += ["", "Choice rate per expert (fraction of tokens choosing it; last columns zero/copy/const):", ""]
            for r in rows:
                md.append(f"- {r['block']}: " + " ".join(f"{c:.2f}" for c in r["choice_rate"]))
            files["moepp_experts.png"] = _usage_png(rows)
            md += ["", "![expert choice rates](moepp_experts.png)"]
        return {"blocks": rows, "mean_ffn_fraction": mean_frac, "flops_dense": dense_total,
                "flops_moepp": after_total, "markdown": "\n".join(md), "files": files}


@torch.no_grad()
def _refit_block(x, experts, experts_mod, router, prev, activation, target, scale) -> dict:
    """Refit the experts' down projections and the compensation table under the fitted routing
    (calibrate/refit.py), in place; copy/constant experts are never chosen training-free, so the
    routed output is FFN groups + compensation only. Returns the penalty and the relative
    (stream-weighted) error on the fit tokens before and after."""
    from moh_compile.calibrate.moepp_fit import chosen_groups, group_hidden
    from moh_compile.calibrate.refit import refit_routed_output

    n, d_out, fe = experts["w_out"].shape
    res = refit_routed_output(group_hidden(x, experts, activation), chosen_groups(router, x, prev), target,
                              experts["w_out"].permute(1, 0, 2).reshape(d_out, n * fe), router.comp_table,
                              None if scale is None else 1.0 / scale)
    experts_mod.w_out.copy_(res["weight"].reshape(d_out, n, fe).permute(1, 0, 2))
    router.comp_table.copy_(res["comp"])
    return {"penalty": res["penalty"], "rel_error_before": round(res["error_before"], 4),
            "rel_error_after": round(res["error_after"], 4)}


def router_budgets(plan, module: nn.Module) -> dict[str, float]:
    """{router module name: the plan's ffn_keep} for every MoE++ block of a compiled model."""
    names = {n for n, m in module.named_modules() if isinstance(m, ExpertRouter)}
    out = {}
    for bp in plan.blocks:
        name = _name(bp.name) + "_router"
        if bp.transform == "moepp" and name in names:
            out[name] = float(bp.settings["ffn_keep"])
    return out


def _drop_unused_params(gm, matches) -> None:
    """Delete the dense FFN weights no node reads any more (the experts hold copies)."""
    drop_unread_attrs(gm, [p for m in matches for info in (m.block.fc_in, m.block.fc_out, m.block.gate)
                           if info is not None for p in (info.weight, info.bias)])


@torch.no_grad()
def expert_usage(module: nn.Module, batches: list, token_mask=None) -> dict:
    """Per ExpertRouter (by name): choice rate of every expert, mean FFN work fraction and mean
    number of copy / constant experts chosen per token, over the real tokens of `batches`. A slot
    counts for an FFN expert when it computes it."""
    routers = {n: r for n, r in module.named_modules() if isinstance(r, ExpertRouter)}
    seen: dict = {n: [] for n in routers}
    hooks = [r.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append((out[0], out[1])))
             for n, r in routers.items()]
    counts = {n: [] for n in routers}
    try:
        for batch in batches:
            for n in routers:
                seen[n].clear()
            call_on(module, batch)
            mask = token_mask(batch) if token_mask else None
            for n, r in routers.items():
                for idx, _w in seen[n]:
                    idx = real_tokens([idx.float()], [mask]).long()
                    counts[n].append(idx)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, r in routers.items():
        if not counts[n]:
            continue
        idx = torch.cat(counts[n])
        cfg = r.config
        hit = torch.zeros(idx.shape[0], cfg.n_total, dtype=torch.bool).scatter_(1, idx, True)
        per_token = hit.float().sum(0) / idx.shape[0]
        kinds = torch.tensor([cfg.n_ffn, cfg.n_zero, cfg.n_copy, cfg.n_const]).cumsum(0).tolist()
        out[n] = {"choice_rate": per_token.tolist(),
                  "ffn_fraction": float(per_token[:kinds[0]].sum() / cfg.n_ffn),
                  "copy_per_token": float(per_token[kinds[1]:kinds[2]].sum()),
                  "const_per_token": float(per_token[kinds[2]:kinds[3]].sum()),
                  "tokens": int(idx.shape[0])}
    return out


def _usage_png(rows: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        rate = r["choice_rate"]
        colors = ["tab:blue"] * r["experts"] + ["tab:gray"] * r["zero"] + ["tab:green"] * r["copy"] + \
            ["tab:orange"] * r["const"]
        ax.bar(range(len(rate)), rate, color=colors)
        ax.set_title(f"{r['block']} (work {r['ffn_fraction']:.2f})", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("expert (blue FFN, gray zero, green copy, orange const)", fontsize=8)
    fig.supylabel("fraction of tokens", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["MoEPPPass", "MoEPPExperts", "expert_usage", "resolve_settings", "DEFAULTS"]
