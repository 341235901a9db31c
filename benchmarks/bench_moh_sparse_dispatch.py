"""moh+sparse: which of the op's three paths is fastest, timed side by side, next to the cost model's pick.

With head gates AND window patterns `moh_compile::attention` can run (same output):
  routed  the routed-head kernel: only the chosen (token, head) rows, every key, the window
          patterns as a gathered per-head mask;
  sparse  the block-sparse path: only the key blocks in each head's pattern; where the C window
          kernel runs (float32, no padding) only the rows the gates keep, else every row, gates
          applied after;
  dense   the masked reference.
`kernels.routed_attention.windowed_path_costs` predicts each; the op runs the cheapest. This
times all three (12 heads, ~4096 tokens per call, two-sided windows of S/8 and S/4 and dense
heads, top-k gates) and prints the pick, the fastest, and how much slower the pick ran; with
--fit it also refits the two windowed core factors (scipy) the constants came from.

    PYTHONPATH=. python benchmarks/bench_moh_sparse_dispatch.py [--dims 32,64] [--seqs 256,512,1024,2048] [--fit]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moh import HEADS, topk_gates  # noqa: E402
from harness import print_table, save_results, set_threads, time_interleaved  # noqa: E402

from moh_compile.kernels import routed_attention as ra  # noqa: E402
from moh_compile.kernels import block_sparse as bs  # noqa: E402
from moh_compile.kernels.block_sparse import sparse_attention_block  # noqa: E402
from moh_compile.ops.attention import attention_reference  # noqa: E402


def case(d: int, s: int, active: float, tokens: int):
    """Op arguments, window attributes and the routing plan of one configuration."""
    b = max(1, tokens // s)
    g = torch.Generator().manual_seed(d * s)
    e = HEADS * d
    x = torch.randn(b, s, e, generator=g)
    wq, wo = torch.randn(e, e, generator=g) / e ** 0.5, torch.randn(e, e, generator=g) / e ** 0.5
    k, v = torch.randn(b, HEADS, s, d, generator=g), torch.randn(b, HEADS, s, d, generator=g)
    gates = topk_gates(b, s, max(1, round(HEADS * active)), g)
    spans = [s // 8, s // 4, -1]
    alpha = [spans[h % 3] for h in range(HEADS)]
    window = ([0 if a < 0 else 1 for a in alpha], alpha, [0.0] * HEADS, True)
    return (x, wq, None, k, v, None, None, None, wo, None, gates, d ** -0.5), window, ra.routing_plan(gates)


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", default="32,64")
    ap.add_argument("--seqs", default="256,512,1024,2048")
    ap.add_argument("--active", default="0.25,0.5,0.75", help="fractions of heads each token uses")
    ap.add_argument("--tokens", type=int, default=4096, help="batch = max(1, tokens // seq)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit", action="store_true", help="refit ROW_COST_CORE_WINDOWED and DENSE_CORE_WINDOWED")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--save", default="bench_moh_sparse_dispatch", help="results/<name>.{md,json}; '' to skip")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows, raw = [], []
    for d in (int(v) for v in args.dims.split(",")):
        for s in (int(v) for v in args.seqs.split(",")):
            for active in (float(v) for v in args.active.split(",")):
                op_args, window, plan = case(d, s, active, args.tokens)
                x, _, _, k, v, _, _, _, wo, _, gates, scale = op_args
                mask = ra._kernel_mask(None, s, s, *window, x.device)
                t = time_interleaved({
                    "routed": lambda: ra._routed(x, op_args[1], None, k, v, mask, None, None, wo, None, scale, plan),
                    "sparse": lambda: sparse_attention_block(*op_args, *window),
                    "dense": lambda: attention_reference(*op_args, *window)}, args.reps, warmup=1)
                ms = {name: t[name].median_ms for name in t}
                fraction = plan.n_slots / gates.numel()
                costs = ra.windowed_path_costs(fraction, x.shape[-1], wo.shape[0], d, s, *window,
                                               native=bs.native_runs(x, k, v, None, scale))
                pick, best = min(costs, key=costs.get), min(ms, key=ms.get)
                raw.append({"d": d, "s": s, "fraction": fraction, "e": x.shape[-1], "ms": ms,
                            "sparse_cost": costs["sparse"]})
                rows.append([d, s, x.shape[0], round(fraction, 2), ms["routed"], ms["sparse"], ms["dense"], pick, best,
                             ms[pick] / ms[best]])
                print(rows[-1], flush=True)
    columns = ["head dim", "seq", "batch", "rows computed (routed)", "routed ms", "sparse ms", "dense ms",
               "model picks", "fastest", "pick / fastest"]
    slow = [r[-1] for r in rows]
    title = (f"moh+sparse op paths, {HEADS} heads, {args.threads} threads: model picks the fastest in "
             f"{sum(r[7] == r[8] for r in rows)} of {len(rows)}; pick/fastest median {statistics.median(slow):.2f}, "
             f"max {max(slow):.2f}")
    print_table(title, columns, rows, plain=args.plain)
    if args.fit:
        fit(raw)
    if args.save:
        save_results(args.save, title, columns, rows, {"core_windowed": ra.ROW_COST_CORE_WINDOWED,
                                                       "dense_core_windowed": bs.DENSE_CORE_WINDOWED})
    return rows


def fit(raw: list[dict]) -> None:
    """Least squares on log(time ratio to the sparse path) for the two windowed core factors."""
    from scipy.optimize import minimize

    def error(p):
        core, dense_core = p
        e = []
        for r in raw:
            routed = ra.routed_row_cost(r["fraction"], r["e"], r["e"], r["d"], r["s"], core)
            dense = 2 * r["e"] + dense_core * 2 * r["s"]
            e.append(math.log(r["ms"]["routed"] / r["ms"]["sparse"]) - math.log(routed / r["sparse_cost"]))
            e.append(math.log(r["ms"]["dense"] / r["ms"]["sparse"]) - math.log(dense / r["sparse_cost"]))
        return sum(x * x for x in e) / len(e)

    res = minimize(error, [ra.ROW_COST_CORE_WINDOWED, bs.DENSE_CORE_WINDOWED], method="Nelder-Mead")
    print(f"fit: ROW_COST_CORE_WINDOWED={res.x[0]:.2f} DENSE_CORE_WINDOWED={res.x[1]:.2f} "
          f"(rms log error {math.sqrt(res.fun):.2f})")


if __name__ == "__main__":
    main()
