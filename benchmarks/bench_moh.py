"""Attention block (K/V + Q projections, core, output projection): dense vs MoH routed heads.

Dense: the op `torch.ops.moh_compile.attention` with head_gates=None (the reference: full
projections + SDPA). MoH: the routed CPU kernel itself (`routed_attention_cpu`), and the op with
the gates ("op" columns), which runs that kernel or the dense masked path, whichever its cost
model (`routing_speedup`, see bench_moh_dispatch.py) predicts is faster.
K and V projections are timed on both sides because MoH keeps them dense, as the FLOP model
in moh_compile.flops does; "ideal" is the FLOP ratio, "of ideal" = speedup / ideal.

    PYTHONPATH=. python benchmarks/bench_moh.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table, save_results, set_threads, time_interleaved  # noqa: E402

import moh_compile  # noqa: E402,F401  (registers the op)
from moh_compile.flops import attention_flops  # noqa: E402
from moh_compile.ops.attention import attention_reference  # noqa: E402
from moh_compile.kernels import routed_attention as ra  # noqa: E402  (registers the kernel)

HEADS, HEAD_DIM = 12, 64
EMBED = HEADS * HEAD_DIM


def topk_gates(batch: int, seq: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each token picks k distinct heads uniformly at random: balanced in expectation."""
    scores = torch.rand(batch, seq, HEADS, generator=gen)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(batch, seq, HEADS).scatter_(-1, idx, 1.0)


def uneven_gates(batch: int, seq: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each head h is chosen by a fraction u_h of the tokens, independently per token, u spread
    evenly and scaled to mean k/H (6/12: 0.02-0.98; 9/12: 0.5-1.0): calibrated routers use heads
    this unevenly (MiniLM at 6/12 heads: 0.04-0.95 on held-out text)."""
    usage = torch.linspace(max(0.02, 2 * k / HEADS - 1), 1.0, HEADS)
    usage = usage * (k / HEADS) / usage.mean()
    return (torch.rand(batch, seq, HEADS, generator=gen) < usage.clamp(max=1.0)).float()


def make_block(batch: int, seq: int, gen: torch.Generator, causal: bool):
    r = lambda *shape, s=0.03: torch.randn(*shape, generator=gen) * s  # noqa: E731
    x = torch.randn(batch, seq, EMBED, generator=gen)
    w = {"q": r(EMBED, EMBED), "qb": r(EMBED), "k": r(EMBED, EMBED), "kb": r(EMBED), "v": r(EMBED, EMBED),
         "vb": r(EMBED), "o": r(EMBED, EMBED), "ob": r(EMBED)}
    mask = torch.ones(seq, seq, dtype=torch.bool).tril() if causal else None

    def block(gates, op=torch.ops.moh_compile.attention):
        k = F.linear(x, w["k"], w["kb"]).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        v = F.linear(x, w["v"], w["vb"]).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        return op(x, w["q"], w["qb"], k, v, mask, None, None, w["o"], w["ob"],
                                               gates, HEAD_DIM ** -0.5)
    return block


def one_capacity(block, gates):
    """The routed kernel with every head in one group (padded to the busiest head)."""
    saved, ra.GROUP_SLACK = ra.GROUP_SLACK, float("inf")
    try:
        return block(gates, ra.routed_attention_cpu)
    finally:
        ra.GROUP_SLACK = saved


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="seq 128 and 512 only, fewer repetitions")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqs", type=str, default=None, help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--causal", action="store_true", help="add a causal bool mask (gathered per head by MoH)")
    ap.add_argument("--gates", choices=["balanced", "uneven"], default="balanced",
                    help="balanced: top-k of uniform scores; uneven: per-head usage spread like calibrated "
                         "routers, also timed with one capacity for all heads (the kernel before head groups)")
    ap.add_argument("--plain", action="store_true", help="plain-text table instead of rich")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    load_before = os.getloadavg()[0]
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([128, 512] if args.quick else [128, 512, 2048])
    gen = torch.Generator().manual_seed(0)
    columns = ["seq", "active", "dense ms", "moh ms", "speedup", "ideal", "of ideal", "op ms", "op speedup"]
    uneven = args.gates == "uneven"
    if uneven:
        columns[4:4] = ["one-capacity ms", "speedup (one capacity)"]
    make_gates = uneven_gates if uneven else topk_gates
    rows, checks, minima = [], [], []
    for seq in seqs:
        block = make_block(args.batch, seq, gen, args.causal)
        reps = args.reps or (3 if args.quick else (5 if seq >= 2048 else 9))
        gates = {k: make_gates(args.batch, seq, k, gen) for k in (9, 6)}
        with torch.inference_mode():
            for k, g in gates.items():   # correctness of the timed path: routed kernel vs dense reference
                diff = block(g, ra.routed_attention_cpu) - block(g, attention_reference)
                checks.append((seq, k, diff.abs().max().item()))
            fns = {"dense": lambda: block(None)}
            fns.update({f"moh{k}": (lambda g=g: block(g, ra.routed_attention_cpu)) for k, g in gates.items()})
            fns.update({f"op{k}": (lambda g=g: block(g)) for k, g in gates.items()})
            if uneven:
                fns.update({f"one{k}": (lambda g=g: one_capacity(block, g)) for k, g in gates.items()})
            t = time_interleaved(fns, reps=reps, warmup=1)
        dense_flops = attention_flops(args.batch, seq, EMBED, HEADS, HEADS, HEAD_DIM)["total"]
        for k in gates:
            ideal = dense_flops / attention_flops(args.batch, seq, EMBED, HEADS, HEADS, HEAD_DIM,
                                                  active_heads=k / HEADS)["total"]
            speed = t["dense"].median_ms / t[f"moh{k}"].median_ms
            minima.append({"seq": seq, "active": k, "dense_min_ms": round(t["dense"].min_ms, 1),
                           "moh_min_ms": round(t[f"moh{k}"].min_ms, 1), "reps": reps})
            row = [seq, f"{k}/{HEADS}", round(t["dense"].median_ms, 1), round(t[f"moh{k}"].median_ms, 1),
                   round(speed, 2), round(ideal, 2), round(speed / ideal, 2), round(t[f"op{k}"].median_ms, 1),
                   round(t["dense"].median_ms / t[f"op{k}"].median_ms, 2)]
            if uneven:
                row[4:4] = [round(t[f"one{k}"].median_ms, 1), round(t["dense"].median_ms / t[f"one{k}"].median_ms, 2)]
            rows.append(row)
    title = (f"Attention block, dense vs MoH (CPU float32, batch {args.batch}, {HEADS}x{HEAD_DIM} heads, "
             f"{threads} threads{', causal' if args.causal else ''}, {args.gates} gates; median ms)")
    print_table(title, columns, rows, plain=args.plain)
    print(f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (machine has {os.cpu_count()} CPUs)")
    print("max |moh - masked dense reference|: " + ", ".join(f"seq {s} k={k}: {d:.2e}" for s, k, d in checks))
    if not args.no_save:
        name = "bench_moh" + ("_quick" if args.quick else "") + ("_causal" if args.causal else "") + \
            ("_uneven" if uneven else "")
        paths = save_results(name, title, columns, rows, {"batch": args.batch, "seqs": seqs, "minima": minima,
                                                          "load_avg_before": load_before,
                                                          "command": " ".join(sys.argv)})
        print("saved " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
