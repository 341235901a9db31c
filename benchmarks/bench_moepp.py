"""Dense FFN vs the MoE++ op at the same total size, CPU float32, measured side by side.

16 FFN experts (the dense hidden layer split evenly; `--experts N` for other counts) + 4
zero-computation experts (1 zero, 1 copy, 2 constant). Each token picks `keep * N` distinct FFN
experts uniformly at random
plus one zero-computation expert, so the fraction of FFN neurons computed per token is
exactly `keep`. Ideal speedup = dense FFN FLOPs / routed FFN FLOPs (moh_compile.flops).
The `block` layout times what a compiled block runs, router included (logits, top-k over
ceil(1.5 keep N) slots, compensation; its variable per-token counts average `keep`): with many
small experts the router is no longer negligible (2 d N FLOPs per token, 17% of the FFN at
N = 512 and d = 384; `--router-rank R` for the factored one).

    PYTHONPATH=. python benchmarks/bench_moepp.py [--threads 2] [--layouts sorted,capacity]
    PYTHONPATH=. python benchmarks/bench_moepp.py --layouts op,block --experts 512 --router-rank 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moh_compile.flops import ffn_flops
from moh_compile.calibrate.moepp_fit import calibrate_zero_bias
from moh_compile.kernels.moe_dispatch import moepp_dispatch
from moh_compile.ops.ffn import ffn_reference
from moh_compile.ops.moepp import moepp_ffn, split_ffn_into_experts
from moh_compile.passes.moepp_router import ExpertRouter, config_for_keep

N_ZERO, N_COPY, N_CONST = 1, 1, 2


CLOCK = time.perf_counter


def time_interleaved(fns: dict, min_time: float = 1.0, min_reps: int = 5, max_reps: int = 60) -> dict:
    """Median time (ms) of each callable, timed in alternating rounds after a warm-up, so
    that machine noise hits every column alike. CLOCK is wall time, or process CPU time
    (--clock cpu: a fairer proxy on a shared, oversubscribed machine with --threads 1)."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append((CLOCK() - t0) * 1e3)
        reps = len(times[next(iter(fns))])
        if reps >= max_reps or (reps >= min_reps and time.perf_counter() - start > min_time):
            return {name: statistics.median(ts) for name, ts in times.items()}


def make_routing(tokens: int, keep: float, n_ffn: int, gen: torch.Generator):
    k_ffn = round(keep * n_ffn)
    ffn_choice = torch.rand(tokens, n_ffn, generator=gen).argsort(dim=1)[:, :k_ffn]
    zc = n_ffn + torch.randint(0, N_ZERO + N_COPY + N_CONST, (tokens, 1), generator=gen)
    idx = torch.cat([ffn_choice, zc], dim=1)
    weight = torch.softmax(torch.randn(tokens, k_ffn + 1, generator=gen), dim=1)
    return idx, weight


def fitted_router(x: torch.Tensor, keep: float, n_ffn: int, rank: int | None, gen: torch.Generator) -> ExpertRouter:
    """A router as the pass builds it (1 zero expert, k = ceil(1.5 keep n) slots, optionally
    factored) with random weights and its zero-expert threshold set so that x spends `keep`."""
    d = x.shape[-1]
    router = ExpertRouter(d, d, config_for_keep(keep, n_ffn, rank=rank)).eval()
    with torch.no_grad():
        if router.down is not None:
            router.down.weight.copy_(torch.randn(rank, d, generator=gen) / d ** 0.5)
        router.proj.weight[:n_ffn] = torch.randn(n_ffn, router.proj.in_features, generator=gen)
        router.proj.weight[n_ffn:] = 0.0
        router.proj.bias.zero_()
        router.comp_table.copy_(torch.randn(n_ffn, d, generator=gen) * 0.01)
        scores = router.logits(x)[:, :n_ffn]
        router.proj.bias[n_ffn] = calibrate_zero_bias(scores, router.config.top_k, keep * n_ffn)
    return router


def run(d_model: int, tokens: int, keep: float, layouts: list[str], gen: torch.Generator,
        seconds: float = 1.0, n_ffn: int = 16, router_rank: int | None = None) -> dict:
    hidden = 4 * d_model
    x = torch.randn(tokens, d_model, generator=gen)
    w_in = torch.randn(hidden, d_model, generator=gen) / d_model**0.5
    b_in = torch.randn(hidden, generator=gen) * 0.1
    w_out = torch.randn(d_model, hidden, generator=gen) / hidden**0.5
    b_out = torch.randn(d_model, generator=gen) * 0.1
    groups = torch.arange(hidden).view(n_ffn, -1)
    ex = split_ffn_into_experts(w_in, b_in, w_out, groups=groups)
    cv = torch.randn(N_CONST, d_model, generator=gen)
    cg = torch.randn(N_CONST, 2, d_model, generator=gen) / d_model**0.5
    idx, weight = make_routing(tokens, keep, n_ffn, gen)
    args = (x, ex["w_in"], ex["b_in"], None, None, ex["w_out"], b_out, idx, weight, cv, cg, N_ZERO, N_COPY, "gelu")
    fns = {"dense": lambda: ffn_reference(x, w_in, b_in, w_out, b_out, None, None, "gelu")}
    for layout in layouts:
        if layout == "op":
            fns[layout] = lambda: moepp_ffn(*args)
        elif layout == "block":  # what a compiled block runs: its router, then the op on the router's choice
            router = fitted_router(x, keep, n_ffn, router_rank, gen)

            def block(router=router):
                idx, w, _, comp = router(x)
                return moepp_ffn(x, ex["w_in"], ex["b_in"], None, None, ex["w_out"], b_out, idx, w, None, None,
                                 1, 0, "gelu") + comp

            fns[layout] = block
        else:
            fns[layout] = lambda layout=layout: moepp_dispatch(*args, layout=layout)
    with torch.inference_mode():
        row = time_interleaved(fns, min_time=seconds, max_reps=max(60, int(60 * seconds)))
    ideal = ffn_flops(tokens, d_model, hidden)["total"] / ffn_flops(tokens, d_model, hidden, keep=keep)["total"]
    row["ideal"] = ideal
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layouts", default="op,capacity",
                   help="comma list of: op (the custom op = sorted kernel), sorted, capacity, block (router + op, "
                        "the router's own choices: a random linear router whose zero-expert threshold spends keep)")
    p.add_argument("--router-rank", type=int, default=None, help="block layout: factored router of this rank")
    p.add_argument("--d-models", default="384,1024")
    p.add_argument("--tokens", default="512,2048,8192")
    p.add_argument("--keeps", default="0.5,0.25")
    p.add_argument("--experts", type=int, default=16,
                   help="FFN experts per block (4 * d_model must be divisible by it; more: finer routing, "
                        "narrower GEMMs)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing time per point (more: less noise)")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if a.clock == "wall" else time.process_time
    torch.set_num_threads(a.threads)
    layouts = a.layouts.split(",")
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.clock} clock, float32, "
          f"{a.experts} FFN experts + {N_ZERO} zero + {N_COPY} copy + {N_CONST} const, GELU"
          + (f"; block: router rank {a.router_rank or 'full'}, 1 zero expert" if "block" in layouts else ""))
    head = f"{'d_model':>7} {'tokens':>6} {'keep':>5} {'dense ms':>9}"
    head += f" {'ideal':>6}"
    for layout in layouts:
        head += f" {layout + ' ms':>12} {'speedup':>8} {'of ideal':>8}"
    print(head)
    for d_model in map(int, a.d_models.split(",")):
        for tokens in map(int, a.tokens.split(",")):
            for keep in map(float, a.keeps.split(",")):
                r = run(d_model, tokens, keep, layouts, gen, a.seconds, a.experts, a.router_rank)
                line = f"{d_model:>7} {tokens:>6} {keep:>5.2f} {r['dense']:>9.2f} {r['ideal']:>6.2f}"
                for layout in layouts:
                    speedup = r["dense"] / r[layout]
                    line += f" {r[layout]:>12.2f} {speedup:>8.2f} {speedup / r['ideal']:>8.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
