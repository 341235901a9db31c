"""What leaving the queries to the model's graph costs MoH: one attention op call, dense vs MoH
with the op projecting its chosen queries vs MoH with the queries computed by the graph (all
heads, as for OLMo 2's all-heads QK-norm), timed side by side.

The "from graph" time includes the graph's full Q projection. Balanced top-k gates; no mask by
default (encoder-style: the routed kernel runs; with --causal the op's cost model may send both
MoH variants to the dense path at these sizes).

    PYTHONPATH=. python benchmarks/bench_query_from_graph.py [--seqs 512,2048] [--active 6]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_args, emit, set_threads, time_interleaved  # noqa: E402

from moh_compile.kernels.routed_attention import STATS  # noqa: E402
from moh_compile.ops.attention import attention, attention_reference  # noqa: E402


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="512,2048", help="tokens per sequence, comma-separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--active", type=int, default=6, help="heads per token")
    ap.add_argument("--causal", action="store_true")
    add_run_args(ap, save="")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    b, h, d = args.batch, args.heads, args.head_dim
    e = h * d
    g = torch.Generator().manual_seed(0)
    wq, wo = torch.randn(e, e, generator=g) * e ** -0.5, torch.randn(e, e, generator=g) * e ** -0.5
    rows = []
    for s in (int(v) for v in args.seqs.split(",")):
        x = torch.randn(b, s, e, generator=g)
        k, v = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
        mask = torch.ones(s, s, dtype=torch.bool).tril() if args.causal else None
        gates = torch.zeros(b, s, h).scatter_(-1, torch.rand(b, s, h, generator=g).topk(args.active, -1).indices, 1.0)

        def from_graph():
            q = F.linear(x, wq).view(b, s, h, d).transpose(1, 2)  # the graph's Q projection, every head
            return attention(x, None, None, k, v, mask, None, None, wo, None, gates, d ** -0.5, query=q)

        fns = {"dense": lambda: attention_reference(x, wq, None, k, v, mask, None, None, wo, None, None, d ** -0.5),
               "projected": lambda: attention(x, wq, None, k, v, mask, None, None, wo, None, gates, d ** -0.5),
               "from_graph": from_graph}
        paths = []
        for name in ("projected", "from_graph"):  # which path the op's cost model picks for each
            STATS.reset()
            fns[name]()
            paths.append("kernel" if STATS.calls else "dense")
        err = (fns["projected"]() - from_graph()).abs().max().item()
        t = {name: timing.median_ms for name, timing in time_interleaved(fns, reps=args.reps).items()}
        rows.append([s, t["dense"], t["projected"], t["dense"] / t["projected"], paths[0], t["from_graph"],
                     t["dense"] / t["from_graph"], paths[1], err])
    columns = ["seq", "dense ms", "MoH, op projects ms", "speedup", "path", "MoH, queries from graph ms",
               "speedup", "path", "max diff"]
    title = (f"MoH {args.active}/{h} heads, {h}x{d}, batch {b}, {'causal' if args.causal else 'no mask'}, "
             f"{args.threads} threads")
    emit(args, title, columns, rows)
    return rows


if __name__ == "__main__":
    main()
