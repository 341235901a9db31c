"""Where an ONNX model's time goes in ONNX Runtime: per-op-type kernel time from ORT's own profiler.

Why: the speed tables say how fast a form is, not why; this splits a run into MatMul, Attention,
and the dispatch ops a routed form adds (TopK, Gather, ScatterND, ...). Inputs are held-out text
packed into documents of exactly --seq tokens, as in bench_onnx.py --model.

    python benchmarks/profile_onnx.py dense=out/dense.onnx both=out/both/model.portable.onnx --seq 512 --batch 8
    python benchmarks/profile_onnx.py custom=out/both/model.custom.onnx     # the custom form too
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_onnx import text_feed  # noqa: E402

from moh_compile.backends.ort_runtime import detect_form, make_session  # noqa: E402


def op_times(path: str, feed_for, threads: int, runs: int) -> tuple[collections.Counter, float]:
    """({op type: kernel ms per run}, total kernel ms per run) over `runs` profiled runs after one
    warm-up; either form (a custom-form file gets the project's kernels, and its nodes show as
    their registered variants, e.g. MohMoEppFFN_float32_bool)."""
    session = make_session(path, detect_form(path), intra_op_threads=threads, spinning=False,
                           profile_prefix=os.path.join(tempfile.mkdtemp(), "ort"))
    feed = feed_for(session)
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
    return per_op, sum(per_op.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="name=path.onnx")
    ap.add_argument("--model", default="example:minilm", help="the model whose tokenizer builds the text inputs")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    from moh_compile.loading import load_model

    loaded = load_model(args.model)
    models = dict(m.split("=", 1) for m in args.models)
    for name, path in models.items():
        per_op, total = op_times(path, lambda s: text_feed(loaded, s, args.batch, args.seq), args.threads, args.runs)
        print(f"\n{name} ({path}): {total:.1f} ms of kernel time per run, batch {args.batch} x {args.seq}")
        for op, ms in per_op.most_common(args.top):
            print(f"  {op:<24}{ms:>9.1f} ms{100 * ms / total:>7.1f}%")


if __name__ == "__main__":
    main()
