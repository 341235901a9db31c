"""What narrowing fused QKV projections saves (passes/narrow_projections.py): models with a fused
QKV projection (GPT-2's c_attn: Q, K, V as three blocks; GPT-NeoX's query_key_value: per head
[q, k, v], so the kept rows are gathered), compiled with the identity rewrite and with MoH, each
with and without `narrow_projections`, timed side by side against the original (whole forward).

Without narrowing the graph's fused GEMM still computes every query row that the attention op
then projects again (MoH: its chosen heads), so the rewritten model does more Q work than the
original. Random weights and tokens (speed does not depend on them); MoH routers calibrated on
random tokens. The op's cost model picks its path per call (causal masks at these sizes often
go to the dense masked path, which projects every head).

    PYTHONPATH=. python benchmarks/bench_fused_qkv.py [--models gpt2,neox] [--seqs 128,512] [--layers 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_args, emit, set_threads, time_interleaved  # noqa: E402

import moh_compile  # noqa: E402

VOCAB = 1000


def build(name: str, width: int, heads: int, layers: int, positions: int) -> torch.nn.Module:
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=width, n_head=heads, n_layer=layers, vocab_size=VOCAB,
                                      n_positions=positions)
    elif name == "neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
                                         intermediate_size=4 * width, vocab_size=VOCAB,
                                         max_position_embeddings=positions)
    else:
        raise SystemExit(f"unknown model {name!r} (gpt2, neox)")
    cfg.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def compiled_pair(model, inputs, attention: str, active: float, calibration) -> tuple:
    """(narrowed, not narrowed) compiles of the same plan and routers."""
    def cfg(narrow: bool):
        return moh_compile.CompileConfig(attention=attention, ffn="keep", narrow_projections=narrow,
                                         options={"moh": {"active_heads": active}})
    capture = moh_compile.capture(model, inputs)
    narrowed = moh_compile.compile(model, inputs, cfg(True), calibration=calibration, captured=capture)
    whole = moh_compile.compile(model, inputs, cfg(False), plan=narrowed.plan, calibration=calibration,
                                captured=capture)
    return narrowed, whole


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,neox")
    ap.add_argument("--seqs", default="128,512", help="tokens per sequence, comma-separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--active", type=float, default=0.5, help="MoH: fraction of heads per token")
    add_run_args(ap, save="", reps=5)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    seqs = [int(v) for v in args.seqs.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = build(name, args.width, args.heads, args.layers, max(seqs))
        example = {"input_ids": torch.randint(0, VOCAB, (2, 64), generator=g)}
        calibration = [{"input_ids": torch.randint(0, VOCAB, (8, 128), generator=g)} for _ in range(4)]
        for attention in ("identity", "moh"):
            narrowed, whole = compiled_pair(model, example, attention, args.active, calibration)
            for s in seqs:
                x = {"input_ids": torch.randint(0, VOCAB, (args.batch, s), generator=g)}
                fns = {m: (lambda mod=mod: mod(**x)) for m, mod in
                       (("original", model), ("whole", whole), ("narrowed", narrowed))}
                with torch.no_grad():
                    err = (narrowed(**x).logits - whole(**x).logits).abs().max().item()
                    t = {m: tm.median_ms for m, tm in time_interleaved(fns, reps=args.reps).items()}
                rows.append([name, attention, s, t["original"], t["whole"], t["original"] / t["whole"],
                             t["narrowed"], t["original"] / t["narrowed"], t["whole"] / t["narrowed"], err])
    columns = ["model", "attention", "seq", "original ms", "not narrowed ms", "speedup", "narrowed ms", "speedup",
               "narrowed vs not", "max diff"]
    title = (f"fused QKV narrowing: {args.layers} layers, {args.heads}x{args.width // args.heads}, batch "
             f"{args.batch}, MoH {args.active:g} of heads, {args.threads} threads")
    emit(args, title, columns, rows)
    return rows


if __name__ == "__main__":
    main()
