"""MoH fidelity on the real all-MiniLM-L6-v2, through `moh_compile.compile` (the same path as the CLI).

Rows per active-head fraction: the parameter-free baselines (query-norm, random; 0 shared heads),
the training-free learned router, and short distillation fine-tunes of it (router only, all).
Mean cosine and top-10 neighbour overlap of mean-pooled embeddings vs the original on the held-out
bundled sentences (example-eval, unseen in calibration); wall times on this machine.

    PYTHONPATH=. python benchmarks/fidelity_moh.py --active 0.75 0.5 --minutes 10 --threads 2 [--comp-rank 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

import moh_compile
from moh_compile.calibrate.data import as_calibration
from moh_compile.finetune import DEFAULT_LR
from moh_compile.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_text import add_tuning_args, tuning_data  # noqa: E402

# The issue's naive baselines (measured there on an older 340-sentence eval set; not re-run here).
ISSUE_BASELINES = {0.75: {"ridge fitted once (issue)": 0.977, "oracle (issue)": 0.983},
                   0.5: {"ridge fitted once (issue)": 0.918, "oracle (issue)": 0.939}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--shared", type=float, default=0.0, help="shared-head fraction of the learned router")
    ap.add_argument("--calib-lines", type=int, default=512)
    ap.add_argument("--minutes", type=float, default=0.0, help="fine-tune budget per row (0: no fine-tune rows)")
    ap.add_argument("--train", nargs="+", default=["router", "all"])
    ap.add_argument("--comp-rank", type=int, default=0, help="compensation rank of the learned router")
    ap.add_argument("--gate-style", choices=["binary", "weighted"], default="binary",
                    help="gates of the learned router (the baselines stay binary)")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                    help="least-squares refit of W_O under the routing (the compile default)")
    ap.add_argument("--head-allocation", choices=["calibrated", "uniform"], default="calibrated",
                    help="k per block of the learned router: spread by measured sensitivity (the compile default) "
                         "or the same in every block")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate, router-only fine-tune")
    ap.add_argument("--lr-all", type=float, default=DEFAULT_LR["all"], help="learning rate, fine-tune of every weight")
    ap.add_argument("--pooled-weight", type=float, default=None,
                    help="weight of the pooled-output term of the distillation loss (default: finetune's)")
    add_tuning_args(ap)
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("example:minilm")
    teacher = loaded.model.eval()
    cal = as_calibration("example", loaded, eval_source="example-eval", limit=args.calib_lines)
    heads = 12
    tune = tuning_data(args, loaded, cal)
    pooled = {} if args.pooled_weight is None else {"pooled_weight": args.pooled_weight}
    rows = []
    capture = moh_compile.capture(teacher, loaded.example_inputs)  # torch.export once for every row

    def compile_row(name, active, opts):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        cfg = moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": {"active_heads": active, **opts}})
        # a private copy: fine-tuning "all" must not move the teacher's weights
        compiled = moh_compile.compile(copy.deepcopy(teacher), loaded.example_inputs, cfg, calibration=cal,
                                       captured=capture)
        fid = compiled.report.sections["fidelity"]
        rows.append((name, active, fid["cosine"], fid["cosine_min"], fid["knn10"], time.perf_counter() - t0, ""))
        print(rows[-1], flush=True)
        return compiled

    for active in args.active:
        if args.baselines:
            for router in ("query_norm", "random"):
                compile_row(f"{router} router, 0 shared", active, {"router": router})
        base = compile_row(f"learned, training-free, {args.gate_style} gates, {args.shared:g} shared, "
                           f"comp rank {args.comp_rank}{'' if args.refit else ', no refit'}, {args.head_allocation} heads per block",
                           active, {"shared_heads": args.shared, "comp_rank": args.comp_rank, "refit": args.refit,
                                    "gate_style": args.gate_style, "head_allocation": args.head_allocation})
        for train in args.train if args.minutes else []:
            student = copy.deepcopy(base)
            lr = args.lr if train == "router" else args.lr_all
            r = moh_compile.finetune(student, teacher, tune, train=train, minutes=args.minutes, lr=lr, progress=False,
                                     **pooled)
            f = r["fidelity"]
            rows.append((f"  + fine-tune {train}, lr {lr:g}, pooled weight {r['pooled_weight']:g}, "
                         f"{tune.num_examples} lines", active, f["cosine"], f["cosine_min"], f["knn10"],
                         r["wall_s"], f"{r['steps']} steps" + (f", kept step {r['best_step']}"
                                                              if r.get("best_step") is not None else "")))
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    print(f"\nall-MiniLM-L6-v2, {cal.num_examples} calibration lines, {len(cal.eval_batches)} held-out batches "
          f"(example-eval), {args.threads} threads, load average {load:.1f}\n")
    print("| method | active heads | mean cos | min cos | top-10 overlap | wall s | note |")
    print("|---|---|---|---|---|---|---|")
    for name, active, cos, cmin, knn, sec, note in rows:
        print(f"| {name} | {round(active * heads)}/{heads} | {cos:.4f} | {cmin:.4f} | {knn:.3f} | {sec:.0f} | {note} |")
    for active in args.active:
        for name, cos in ISSUE_BASELINES.get(active, {}).items():
            print(f"| {name} | {round(active * heads)}/{heads} | {cos:.3f} | - | - | - | not re-run |")


if __name__ == "__main__":
    main()
