"""When does the routed-head CPU kernel beat the dense masked path? Both timed side by side.

The MoH op (`moh_compile::attention` with head gates) can run two ways with the same output:
the routed kernel (computes only the chosen (token, head) rows, padded per head group) or the
dense masked reference (every head, then gates). The op picks by
`kernels.routed_attention.routing_speedup`, a cost model fitted to this table. Per configuration
this prints the fraction of head rows the kernel would compute, both timings, the measured and
predicted dense/kernel ratio, which path the op chose and the op's own time.

The attention core only (K/V given): x (B, S, 12*D), padding mask (B, 1, 1, S), B*S ~ 2048 tokens.

    PYTHONPATH=. python benchmarks/bench_moh_dispatch.py [--dims 32,64] [--seqs 32,128,512,1024]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moh import HEADS, topk_gates, uneven_gates  # noqa: E402
from harness import print_table, save_results, set_threads, time_interleaved  # noqa: E402

import moh_compile  # noqa: E402,F401  (registers the op)
from moh_compile.kernels import routed_attention as ra  # noqa: E402
from moh_compile.ops.attention import attention_reference  # noqa: E402

OP = torch.ops.moh_compile.attention


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", default="32,64", help="head dims (12 heads each)")
    ap.add_argument("--seqs", default="32,128,512,1024")
    ap.add_argument("--tokens", type=int, default=2048, help="batch = max(2, tokens // seq)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    columns = ["D", "seq", "batch", "gates", "rows computed", "kernel ms", "dense ms", "dense/kernel",
               "predicted", "op path", "op ms", "op vs best"]
    rows, wrong = [], 0
    for d in (int(x) for x in args.dims.split(",")):
        e = HEADS * d
        for s in (int(x) for x in args.seqs.split(",")):
            b = max(2, args.tokens // s)
            r = lambda *shape: torch.randn(*shape, generator=gen) * 0.03  # noqa: E731
            x, wq, bq, wo, bo = torch.randn(b, s, e, generator=gen), r(e, e), r(e), r(e, e), r(e)
            k, v = torch.randn(b, HEADS, s, d, generator=gen), torch.randn(b, HEADS, s, d, generator=gen)
            mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
            mask[0, ..., -3:] = False
            for kind, active in (("topk", 3), ("topk", 6), ("uneven", 6), ("topk", 9), ("uneven", 9)):
                g = (topk_gates if kind == "topk" else uneven_gates)(b, s, active, gen)
                call = (x, wq, bq, k, v, mask, None, None, wo, bo, g, d ** -0.5)
                with torch.inference_mode():
                    t = time_interleaved({"kernel": lambda: ra.routed_attention_cpu(*call),
                                          "dense": lambda: attention_reference(*call),
                                          "op": lambda: OP(*call)}, reps=args.reps, warmup=1)
                    ra.STATS.reset()
                    OP(*call)
                path = "kernel" if ra.STATS.calls else "dense"
                fraction = ra.routing_plan(g).n_slots / g.numel()
                measured = t["dense"].median_ms / t["kernel"].median_ms
                predicted = ra.routing_speedup(fraction, e, e, d, s, causal=False)
                wrong += (measured > 1) != (predicted > 1)
                best = min(t["dense"].median_ms, t["kernel"].median_ms)
                rows.append([d, s, b, f"{kind} {active}/{HEADS}", round(fraction, 2), round(t["kernel"].median_ms, 1),
                             round(t["dense"].median_ms, 1), round(measured, 2), round(predicted, 2), path,
                             round(t["op"].median_ms, 1), round(t["op"].median_ms / best, 2)])
    title = (f"MoH op dispatch: routed kernel vs dense masked path (CPU float32, {threads} threads, "
             f"{HEADS} heads, ~{args.tokens} tokens; median ms)")
    print_table(title, columns, rows, plain=args.plain)
    print(f"cost model picked the slower path in {wrong} of {len(rows)} configurations "
          f"(ROW_COST_PROJ_D={ra.ROW_COST_PROJ_D}, ROW_COST_CORE={ra.ROW_COST_CORE})")
    if not args.no_save:
        paths = save_results("bench_moh_dispatch", title, columns, rows,
                             {"command": " ".join(sys.argv), "load_avg": os.getloadavg()[0]})
        print("saved " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
