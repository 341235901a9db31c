"""Fidelity of the MoE++ FFN pass on the real all-MiniLM-L6-v2, through `moh_compile.compile`.

For each FFN budget: compile with ffn="moepp" calibrated on the bundled English sentences,
measure on the held-out sentences (moh_compile/data/eval.txt, disjoint from calib.txt) the
mean cosine and top-10 neighbour overlap of mean-pooled embeddings vs the original, and the
ACTUAL mean fraction of FFN work spent per real token on that held-out text. Optionally
distil (`moh_compile.finetune`, train="all") for a wall-time budget and measure again.

    PYTHONPATH=. python benchmarks/fidelity_moepp.py --keep 0.5 0.25 --finetune-minutes 0
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import moh_compile
from moh_compile.calibrate.data import as_calibration
from moh_compile.config import CompileConfig
from moh_compile.finetune import DEFAULT_LR
from moh_compile.loading import load_model
from moh_compile.passes.moepp import expert_usage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_text import add_tuning_args, tuning_data  # noqa: E402


def usage_summary(compiled, batches, calib) -> dict:
    """Means over blocks, on the real tokens of `batches`, of `expert_usage`'s per-token figures."""
    usage = list(expert_usage(compiled.graph_module, batches, calib.token_mask).values())
    return {key: sum(u[key] for u in usage) / len(usage) for key in ("ffn_fraction", "copy_per_token",
                                                                     "const_per_token")}


def router_share(compiled) -> float:
    """The routers' FLOPs per token (logits and compensation) as a fraction of the dense FFNs'."""
    blocks = compiled.report.sections["ffn:moepp"]["blocks"]
    return sum(b["router_flops_per_token"] for b in blocks) / sum(b["flops_per_token_dense"] for b in blocks)


def block_share(compiled) -> float:
    """The MoE++ blocks' FLOPs per token (experts at the calibration work, router, compensation)
    as a fraction of the dense FFNs' (the report's figure)."""
    section = compiled.report.sections["ffn:moepp"]
    return section["flops_moepp"] / section["flops_dense"]


def run(keep: float, calib, loaded, options: dict, finetune_minutes: float, lr: float, tune=None,
        log=print) -> list[dict]:
    t0 = time.perf_counter()
    compiled = moh_compile.compile(loaded.model, loaded.example_inputs,
                                   CompileConfig(attention="keep", ffn="moepp",
                                                 options={"moepp": {"ffn_keep": keep, **options}}),
                                   calibration=calib)
    t_fit = time.perf_counter() - t0
    fid = compiled.report.sections["fidelity"]
    rows = [dict(keep=keep, variant="training-free", cosine=fid["cosine"], knn10=fid["knn10"],
                 **usage_summary(compiled, calib.eval_batches, calib), router=router_share(compiled),
                 block=block_share(compiled), seconds=t_fit)]
    log(rows[-1])
    if finetune_minutes > 0:
        tune = tune or calib
        res = moh_compile.finetune(compiled, loaded.model, tune, train="all", minutes=finetune_minutes, lr=lr,
                                   progress=False)
        kept = f", kept step {res['best_step']}" if res.get("best_step") is not None else ""
        rows.append(dict(keep=keep, variant=f"+ finetune all {finetune_minutes:g} min ({res['steps']} steps, "
                                            f"{tune.num_examples} lines{kept})",
                         cosine=res["fidelity"]["cosine"], knn10=res["fidelity"]["knn10"],
                         **usage_summary(compiled, calib.eval_batches, calib), router=router_share(compiled),
                         block=block_share(compiled), seconds=res["wall_s"]))
        log(rows[-1])
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--finetune-minutes", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR["all"], help="fine-tune lr (finetune's default for train='all')")
    ap.add_argument("--gating-residual", action="store_true")
    ap.add_argument("--copy-experts", type=int, default=0)
    ap.add_argument("--const-experts", type=int, default=0)
    ap.add_argument("--router-rank", type=int, default=None, help="factored routers (default: full rank)")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                    help="least-squares refit of the experts' down projections under the routing (the default)")
    add_tuning_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model("example:minilm")
    calib = as_calibration("example", loaded, eval_source="example-eval", limit=args.calib_samples)
    options = {"experts": args.experts, "gating_residual": args.gating_residual,
               "copy_experts": args.copy_experts, "const_experts": args.const_experts, "refit": args.refit,
               "router_rank": args.router_rank}
    tune = tuning_data(args, loaded, calib)
    rows = []
    for keep in args.keep:
        rows += run(keep, calib, loaded, options, args.finetune_minutes, args.lr, tune)
    print(f"\nall-MiniLM-L6-v2, {calib.num_examples} calibration sentences, {len(calib.eval_batches)} held-out "
          f"batches, {args.experts} FFN + 1 zero + {args.copy_experts} copy + {args.const_experts} constant experts, "
          f"router rank {args.router_rank or 'full'}, "
          f"refit {'on' if args.refit else 'off'}, "
          f"threads={args.threads}, load {os.getloadavg()[0]:.2f}")
    print("| ffn_keep | variant | mean cos | top-10 overlap | actual FFN work (held-out) | "
          "router FLOPs (logits + compensation) / dense FFN | block FLOPs / dense FFN (report) | "
          "copy / const experts per token (held-out) | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep']} | {r['variant']} | {r['cosine']:.4f} | {r['knn10']:.3f} | {r['ffn_fraction']:.3f} | "
              f"{r['router']:.3f} | {r['block']:.3f} | {r['copy_per_token']:.3f} / {r['const_per_token']:.3f} | "
              f"{r['seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
