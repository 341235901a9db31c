"""Per-head sink + window attention core vs dense causal SDPA on CPU (float32, batch 1, 8x64 heads).

Timing: all methods run side by side in this process, interleaved, median of --repeats: dense
causal SDPA, the op's CPU path ("sparse": the C kernel, kernels/window_native.py), the PyTorch block
kernel it replaced for these inputs ("block": sparse_attention_core(..., native=False)), and flex.
Peak memory: one subprocess per (case, method); it builds the inputs, resets the kernel's peak-RSS
counter (echo 5 > /proc/self/clear_refs), runs the method once and reports VmHWM - VmRSS before:
the extra resident peak of the method (tracemalloc does not see torch's allocator, RSS does).
Spans: half the heads get span a, half 3a (64 sink tokens), a solved so that the mean pattern
density (visible pairs / causal pairs, see calibrate.sparse_profile.pattern_density) hits the target.

flex: torch.compile'd flex_attention (torch.nn.attention) with a BlockMask of the same pattern, timed in
the same loop (compile and BlockMask build excluded from the timing; the build time is its own column).

    PYTHONPATH=$PWD python benchmarks/bench_sparse.py [--quick] [--no-flex] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from moh_compile.calibrate.sparse_profile import pattern_density
from moh_compile.kernels.block_sparse import sparse_attention_core

HEADS, DIM, SINK = 8, 64, 64


def spans_for(n: int, density: float) -> list[int]:
    """Half the heads span a, half 3a; bisect a for the target mean causal density."""
    def mean_density(a):
        return (pattern_density(n, SINK, a, 0.0, False, True) + pattern_density(n, SINK, 3 * a, 0.0, False, True)) / 2
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if mean_density(mid) < density else (lo, mid)
    return [lo] * (HEADS // 2) + [3 * lo] * (HEADS - HEADS // 2)


def inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3)]


_FLEX: dict = {}


def flex_setup(n: int, spans: list[int]):
    """torch.compile'd flex_attention with a BlockMask of the same per-head pattern (built once per
    (n, spans); the build time is reported separately, it is paid once per sequence length)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (n, tuple(spans))
    if key not in _FLEX:
        sp = torch.tensor(spans)

        def mask_mod(b, h, qi, kv):
            return (kv <= qi) & ((qi - kv < sp[h]) | (kv < SINK) | (qi < SINK))

        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, 1, HEADS, n, n, device="cpu", BLOCK_SIZE=128)
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX[key] = (bm, time.perf_counter() - t0)
    return _FLEX[key]


def run(method: str, q, k, v, spans):
    if method == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "flex":
        bm, _ = flex_setup(q.shape[2], spans)
        return _FLEX["fn"](q, k, v, block_mask=bm, scale=DIM ** -0.5)
    return sparse_attention_core(q, k, v, None, [SINK] * HEADS, spans, [0.0] * HEADS, False, DIM ** -0.5,
                                 causal=True, native=method == "sparse")


def child(method: str, n: int, density: float) -> None:
    torch.set_num_threads(2)
    small = inputs(256)
    run(method, *small, spans_for(256, density))  # first call pages in library code: not the method's memory
    del small
    q, k, v = inputs(n)
    spans = spans_for(n, density)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    run(method, q, k, v, spans)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(method: str, n: int, density: float) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(density)],
                         capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=2048 only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="2048,8192,16384")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="skip torch.compile'd flex_attention")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), float(args.child[2]))
        return
    torch.set_num_threads(args.threads)
    sizes = [2048] if args.quick else [int(x) for x in args.sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, batch 1, "
          f"{HEADS} heads x {DIM}, {SINK} sinks, causal; sparse = the op's CPU path (the C kernel, "
          f"window_native.py), block = the PyTorch block kernel (native=False)")
    methods = ["sparse", "block"] + ([] if args.no_flex else ["flex"])
    head = f"{'N':>6} {'density':>8} {'spans':>11} {'ideal':>6} {'dense ms':>9}"
    for m in methods:
        head += f" {m + ' ms':>9} {m + ' x':>8} {'of ideal':>8}"
    head += f" {'dense MB':>9}" + "".join(f" {m + ' MB':>9}" for m in methods[:2]) + f" {'max err':>8}"
    print(head + (f" {'mask s':>7}" if "flex" in methods else ""))
    for n in sizes:
        q, k, v = inputs(n)
        for density in (0.25, 0.10):
            spans = spans_for(n, density)
            real = sum(pattern_density(n, SINK, s, 0.0, False, True) for s in spans) / HEADS
            outs = {m: run(m, q, k, v, spans) for m in methods}  # warm-up (flex compiles here)
            err = max(check_error(q, k, v, spans, o) for o in outs.values()) if n <= 2048 else float("nan")
            del outs
            times: dict = {m: [] for m in ["dense"] + methods}
            for _ in range(repeats):
                for name, acc in times.items():
                    t0 = time.perf_counter()
                    run(name, q, k, v, spans)
                    acc.append(time.perf_counter() - t0)
            ms = {m: statistics.median(t) * 1e3 for m, t in times.items()}
            ideal = 1 / real
            row = f"{n:>6} {real:>8.3f} {f'{spans[0]}/{spans[-1]}':>11} {ideal:>5.1f}x {ms['dense']:>9.1f}"
            for m in methods:
                speed = ms["dense"] / ms[m]
                row += f" {ms[m]:>9.1f} {speed:>7.2f}x {speed / ideal:>8.0%}"
            mems = ["dense"] + methods[:2]
            row += "".join(f" {'n/a':>9}" if args.no_memory else f" {peak_mb(m, n, density):>9.1f}" for m in mems)
            row += f" {err:>8.1e}"
            if "flex" in methods:
                row += f" {flex_setup(n, spans)[1]:>7.2f}"
            print(row, flush=True)


def check_error(q, k, v, spans, out) -> float:
    """Max abs difference to the masked dense reference (small N only: it builds S x S masks)."""
    from moh_compile.ops.attention import merge_masks, window_mask
    n = q.shape[2]
    pat = window_mask(n, n, [SINK] * HEADS, spans, [0.0] * HEADS, False)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(torch.ones(n, n, dtype=torch.bool).tril(),
                                                                         pat), scale=DIM ** -0.5)
    return (out - ref).abs().max().item()


if __name__ == "__main__":
    main()
