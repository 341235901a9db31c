"""What reordering heads by pattern buys a compiled model: the sparse MiniLM, heads reordered
(the default) vs not, timed side by side.

The sparse pass gives each head its own sink + window pattern; the block-sparse kernel batches
heads with the same pattern, as views when they are adjacent and as copies when not.
`passes.head_order` permutes the weights once so they are adjacent. Both models come from one
calibration: the reordered one is compiled with calibration data, the other from its plan with
`reorder_heads` off (same patterns, original head order). Outputs are compared too.

    PYTHONPATH=. python benchmarks/bench_head_order.py [--density 0.25] [--shapes 8x512,32x128,2x512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_args, emit, set_threads, time_interleaved  # noqa: E402

import moh_compile  # noqa: E402
from moh_compile.calibrate.data import as_calibration  # noqa: E402
from moh_compile.loading import load_model  # noqa: E402


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--shapes", default="8x512,32x128,2x512", help="batch x tokens, comma-separated")
    ap.add_argument("--calib-samples", type=int, default=512)
    add_run_args(ap, save="bench_head_order")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    loaded = load_model("example:minilm")
    cal = as_calibration("example", loaded, limit=args.calib_samples)
    cfg = lambda reorder: moh_compile.CompileConfig(  # noqa: E731
        attention="sparse", ffn="keep", options={"sparse": {"density": args.density, "reorder_heads": reorder}})
    capture = moh_compile.capture(loaded.model, loaded.example_inputs)
    reordered = moh_compile.compile(loaded.model, loaded.example_inputs, cfg(True), calibration=cal, captured=capture)
    plain = moh_compile.compile(loaded.model, loaded.example_inputs, cfg(False), plan=reordered.plan, captured=capture)
    layout = reordered.report.sections.get("attention:sparse:layout", {}).get("head_order", {})
    groups = [len(set(zip(b.settings['sink'], b.settings['alpha'], b.settings['beta']))) for b in reordered.plan.blocks if b.kind == "attention"]
    moved = sum("order" in r for r in layout.values())
    print(f"distinct patterns per layer: {groups}; layers reordered: {moved} of {len(layout)}")
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(batch * seq)
        x = {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        with torch.no_grad():
            diff = (reordered(**x).last_hidden_state - plain(**x).last_hidden_state).abs().max().item()
            t = time_interleaved({"plain": lambda: plain(**x), "reordered": lambda: reordered(**x)}, args.reps)
        rows.append([f"{batch}x{seq}", t["plain"].median_ms, t["reordered"].median_ms,
                     t["plain"].median_ms / t["reordered"].median_ms, diff])
    columns = ["batch x tokens", "original order ms", "reordered ms", "speedup", "max abs diff"]
    title = (f"Sparse MiniLM (density {args.density:g}), heads reordered by pattern vs original order, "
             f"{args.threads} threads, median of {args.reps}")
    emit(args, title, columns, rows, {"distinct_patterns_per_layer": groups, "layers_reordered": moved})
    return rows


if __name__ == "__main__":
    main()
