"""The MoE++ op on a compiled MiniLM's own routing vs the dense FFN, per layer, side by side.

Why: `bench_moepp.py` routes tokens uniformly at random, so every expert gets the same load.
Calibrated routers do not: some experts take nearly every token, others few, and per-token
counts vary. A kernel or layout choice tuned on random routing can lose on real routing (a
small-batch row-kernel rule did, docs/moepp.md "Speed"). This script compiles all-MiniLM-L6-v2
with `--ffn moepp` (training-free, 128 calibration lines), runs it on held-out documents, records
each MoE++ block's input and routing, and times per layer the dense FFN (the experts' weights
regrouped into one FFN: same FLOPs) against the op in each layout on exactly that routing.
Ideal = dense FFN FLOPs / FLOPs of the neurons the routing computes.

    PYTHONPATH=. python benchmarks/bench_moepp_routed.py --keeps 0.5,0.25 --docs 8x128,8x256,4x512 \\
        --layouts sorted,rows
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moepp import time_interleaved  # noqa: E402
from harness import held_out_documents  # noqa: E402

import moh_compile  # noqa: E402
from moh_compile.calibrate.data import as_calibration  # noqa: E402
from moh_compile.config import CompileConfig  # noqa: E402
from moh_compile.kernels.moe_dispatch import moepp_dispatch  # noqa: E402
from moh_compile.loading import load_model  # noqa: E402
from moh_compile.ops.ffn import ffn_reference  # noqa: E402
from moh_compile.passes.moepp_router import ExpertRouter  # noqa: E402


@torch.no_grad()
def recorded_blocks(compiled, batch: dict) -> list[dict]:
    """Per MoE++ block, in graph order: its input x (T, d), routing (idx, weight) and expert weights."""
    gm = compiled.graph_module
    routers = [(name, m) for name, m in gm.named_modules() if isinstance(m, ExpertRouter)]
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in routers]
    try:
        gm(**batch)
    finally:
        for h in hooks:
            h.remove()
    blocks = []
    for name, router in routers:
        x, (idx, weight, _, _) = seen[name]
        experts = gm.get_submodule(name.replace("_router", "_experts"))
        d = x.shape[-1]
        blocks.append({"x": x.reshape(-1, d).contiguous(), "idx": idx.reshape(-1, idx.shape[-1]).contiguous(),
                       "weight": weight.reshape(-1, weight.shape[-1]).contiguous(), "n_zero": router.config.n_zero,
                       "w_in": experts.w_in.detach(), "b_in": experts.b_in.detach(), "w_out": experts.w_out.detach()})
    return blocks


def time_block(b: dict, layouts: list[str], seconds: float) -> dict:
    """ms per call of the dense FFN (the experts regrouped: same weights, same FLOPs) and of the op
    in each layout on the block's recorded routing, plus the fraction of FFN neurons it computes."""
    n, f_e, d = b["w_in"].shape
    d_out = b["w_out"].shape[1]
    w_in, b_in = b["w_in"].reshape(n * f_e, d), b["b_in"].reshape(n * f_e)
    w_out = b["w_out"].permute(1, 0, 2).reshape(d_out, n * f_e)
    b_out = torch.zeros(d_out)
    fns = {"dense": lambda: ffn_reference(b["x"], w_in, b_in, w_out, b_out, None, None, "gelu")}
    for layout in layouts:
        fns[layout] = lambda layout=layout: moepp_dispatch(
            b["x"], b["w_in"], b["b_in"], None, None, b["w_out"], b_out, b["idx"], b["weight"], None, None,
            b["n_zero"], 0, "gelu", layout=layout)
    with torch.inference_mode():
        row = time_interleaved(fns, min_time=seconds)
    computed = (b["idx"] < n).sum().item() / (b["idx"].shape[0] * n)  # fraction of FFN neurons computed
    row["work"] = computed
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keeps", default="0.5,0.25")
    p.add_argument("--docs", default="8x128,8x256,4x512", help="comma list of BATCHxSEQ held-out document shapes")
    p.add_argument("--layouts", default="sorted,rows", help="comma list of moepp_dispatch layouts: sorted, rows, capacity")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.5, help="minimum timing time per layer and point")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    layouts = a.layouts.split(",")
    loaded = load_model("example:minilm")
    calib = as_calibration("example", loaded, limit=a.calib_samples)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.docs.split(",")]
    print(f"torch {torch.__version__}, threads {a.threads}, all-MiniLM-L6-v2 --ffn moepp --experts {a.experts}, "
          f"{a.calib_samples} calibration lines; held-out documents; times summed over the 6 layers")
    head = f"{'keep':>5} {'docs':>7} {'tokens':>6} {'work':>5} {'dense ms':>9} {'ideal':>6}"
    for layout in layouts:
        head += f" {layout + ' ms':>12} {'speedup':>8} {'of ideal':>8}"
    print(head)
    for keep in map(float, a.keeps.split(",")):
        compiled = moh_compile.compile(loaded.model, loaded.example_inputs, CompileConfig(
            attention="keep", ffn="moepp", options={"moepp": {"ffn_keep": keep, "experts": a.experts}}),
            calibration=calib)
        for batch, seq in shapes:
            docs = {k: v for k, v in held_out_documents(loaded, batch, seq).items() if k in loaded.example_inputs}
            rows = [time_block(b, layouts, a.seconds) for b in recorded_blocks(compiled, docs)]
            dense = sum(r["dense"] for r in rows)
            work = sum(r["work"] for r in rows) / len(rows)
            ideal = dense / sum(r["dense"] * r["work"] for r in rows)
            line = f"{keep:>5.2f} {f'{batch}x{seq}':>7} {batch * seq:>6} {work:>5.2f} {dense:>9.2f} {ideal:>6.2f}"
            for layout in layouts:
                ms = sum(r[layout] for r in rows)
                line += f" {ms:>12.2f} {dense / ms:>8.2f} {dense / ms / ideal:>8.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
