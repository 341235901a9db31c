"""Fidelity of the sparse attention pass on the real all-MiniLM-L6-v2 at long inputs.

Patterns are chosen on the bundled calibration text (moh_compile/data/calib.txt, sentences
concatenated into 256/512-token inputs); fidelity is measured on held-out documents of
256-512 tokens built the same way from moh_compile/data/eval.txt (disjoint line ranges per
length, one document per batch, no padding): mean cosine of the mean-pooled embeddings vs the
original model, and top-1 neighbour agreement (is each document's nearest other document
the same?). "short": the 494 held-out sentences themselves (<= 128 tokens, padded batches), the
report's default fidelity set.

    PYTHONPATH=$PWD python benchmarks/fidelity_sparse.py [--densities 0.5,0.25]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import moh_compile
from moh_compile.calibrate.data import Calibration, as_calibration, load_lines, tokenize_lines, tokenizer_for
from moh_compile.calibrate.metrics import embeddings, fidelity, topk_neighbour_overlap
from moh_compile.loading import load_model
from moh_compile.passes.sparse import pack_batches

LENGTHS = (256, 320, 384, 448, 512)


def eval_documents(loaded) -> list[dict]:
    """Held-out documents of 256-512 tokens: eval.txt split into one disjoint part per length."""
    lines = load_lines("example-eval")
    tok = tokenizer_for(loaded)
    parts = np.array_split(np.arange(len(lines)), len(LENGTHS))
    docs = []
    for n, idx in zip(LENGTHS, parts):
        batches = tokenize_lines([lines[i] for i in idx], tok, batch_size=16, max_length=128)
        holder = Calibration(batches=batches, tokenized=True)
        docs += pack_batches(holder, batches, n, count=1000, batch_size=1)
    keep = set(loaded.example_inputs)
    return [{k: v for k, v in d.items() if k in keep} for d in docs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", default="0.5,0.25")
    ap.add_argument("--calib-samples", type=int, default=512, help="calibration lines (default 512)")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("example:minilm")
    model = loaded.model
    docs = eval_documents(loaded)
    ref = embeddings(model, docs)
    lens = [d["input_ids"].shape[1] for d in docs]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; all-MiniLM-L6-v2; {len(docs)} held-out "
          f"documents of {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f})")
    short = tokenize_lines(load_lines("example-eval"), tokenizer_for(loaded), batch_size=32, max_length=128)
    short = [{k: v for k, v in b.items() if k in loaded.example_inputs} for b in short]
    short_ref = embeddings(model, short)
    print(f"{'budget':>7} {'density@256':>12} {'density@512':>12} {'mean cosine':>12} {'worst':>7} "
          f"{'top-1 agree':>12} {'val cos@384':>12} {'short cos':>10} {'short top10':>12} {'compile s':>10}")
    capture = moh_compile.capture(model, loaded.example_inputs)  # torch.export once for every budget
    for density in [float(x) for x in args.densities.split(",")]:
        calib = as_calibration("example", loaded, limit=args.calib_samples)
        t0 = time.perf_counter()
        cfg = moh_compile.CompileConfig(attention="sparse", ffn="keep", options={"sparse": {"density": density}})
        compiled = moh_compile.compile(model, loaded.example_inputs, cfg, calibration=calib, captured=capture)
        secs = time.perf_counter() - t0
        sec = compiled.report.sections["attention:sparse"]
        out = embeddings(compiled, docs)
        fid = fidelity(ref, out)
        top1 = topk_neighbour_overlap(ref, out, k=1)
        md = sec["mean_density"]
        sfid = fidelity(short_ref, embeddings(compiled, short))
        print(f"{density:>7.2f} {md['256']:>12.3f} {md['512']:>12.3f} {fid['cosine']:>12.4f} {fid['cosine_min']:>7.4f} "
              f"{top1:>12.3f} {sec['validation']['cosine_vs_dense']:>12.4f} {sfid['cosine']:>10.4f} "
              f"{sfid['knn10']:>12.3f} {secs:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
