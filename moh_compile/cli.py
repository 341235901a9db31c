"""`moh-compile`: a thin layer over the Python API.

    moh-compile inspect MODEL            table of blocks found (and skipped, with reasons)
    moh-compile MODEL --out DIR          rewrite, write model.pt2 + plan.json + report
    moh-compile MODEL --out DIR --export onnx     ... + model.custom.onnx, model.portable.onnx
    moh-compile verify DIR|FILE.onnx     run exported files in ONNX Runtime vs model.pt2
"""
from __future__ import annotations

import argparse
import sys
import time

from moh_compile.errors import MohCompileError

SUBCOMMANDS = ("inspect", "verify")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory, .pt2, .pt (state dict or --trust-pickle module), "
                                 "or a factory package.module:function")
    p.add_argument("--config", help="HF config.json (or its directory) giving the architecture of a .pt state dict")
    p.add_argument("--factory", help="package.module:function building the architecture of a .pt state dict")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="example input, e.g. 2,16:int64 (token ids) or 2,16,64 (float); repeat for several inputs")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled module from a .pt (unpickling runs code from the file)")


def build_inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moh-compile inspect", description="Show the attention and FFN blocks found.")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def build_compile_parser() -> argparse.ArgumentParser:
    from moh_compile import passes

    p = argparse.ArgumentParser(
        prog="moh-compile",
        description="Compile a trained transformer into a cheaper one. Subcommands: inspect MODEL, verify DIR.",
        epilog="Example: moh-compile example:minilm --out out/minilm")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory (model.pt2, plan.json, report.md, report.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--attention", default="identity", metavar="PASS",
                   help=f"what to do with attention blocks: {', '.join(list(passes.ATTENTION_PASSES) + ['keep'])}, "
                        "or passes joined by '+' (default: identity)")
    p.add_argument("--ffn", default="identity", choices=list(passes.FFN_PASSES) + ["keep"],
                   help="what to do with FFN blocks (default: identity)")
    p.add_argument("--plan", help="re-apply a plan.json written by an earlier run")
    c = p.add_argument_group("calibration (training-free fitting of routers)")
    c.add_argument("--calib", metavar="DATA",
                   help="'example' (bundled English sentences), a .txt file (one example per line; needs an HF "
                        "model directory for its tokenizer) or a .pt tensor file of inputs")
    c.add_argument("--calib-samples", type=int, default=512, metavar="N",
                   help="use at most N lines (text) or N batches (tensor files) (default: 512)")
    c.add_argument("--batch-size", type=int, default=16, help="calibration batch size (default: 16)")
    c.add_argument("--max-length", type=int, default=128, help="token limit per text example (default: 128)")
    c.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="after fitting a router, refit the block's output projection (MoH: W_O; MoE++: each "
                        "expert's down projection) and compensation by least squares under its routing "
                        "(default: on; --no-refit keeps the original weights)")
    c.add_argument("--ffn-budget-data", metavar="DATA",
                   help="after compiling (and fine-tuning), re-set each MoE++ block's zero-expert threshold so "
                        "its FFN work on DATA is --ffn-keep; same forms as --calib. The threshold otherwise "
                        "meets the budget on the calibration text only (docs/moepp.md): give text like your "
                        "deployment text, e.g. long documents")
    c.add_argument("--ffn-budget-length", type=int, metavar="N",
                   help="like --ffn-budget-data, on the calibration text itself packed into documents of N "
                        "tokens: the budget then holds at the length you deploy at (short calibration sentences "
                        "set it for short inputs; longer ones use more experts)")
    c.add_argument("--eval", metavar="DATA",
                   help="held-out data for the report's fidelity figures, same forms as --calib "
                        "(default with --calib example: the bundled held-out sentences)")
    f = p.add_argument_group("fine-tuning (optional distillation against the original model)")
    f.add_argument("--finetune-minutes", type=float, default=0.0, metavar="M",
                   help="distil for M minutes of wall time after calibration (default: 0, off)")
    f.add_argument("--finetune-train", choices=["router", "all"], default="router",
                   help="train the routers only, or every parameter (default: router)")
    f.add_argument("--finetune-lr", type=float, default=None,
                   help="Adam learning rate (default: 1e-3 for routers, 1e-5 for all)")
    f.add_argument("--finetune-pooled-weight", type=float, default=None, metavar="W",
                   help="weight of the mean-pooled output cosine in the distillation loss, next to the "
                        "per-token loss (default: 10; 0 for language models)")
    f.add_argument("--finetune-validation", type=float, default=0.1, metavar="F",
                   help="fraction of the calibration batches held out to keep the best weights seen "
                        "(with >= 10 batches; default: 0.1; 0 = off, train on all and keep the last)")
    x = p.add_argument_group("deployment artifacts (docs/deploy.md)")
    x.add_argument("--export", action="append", default=[], metavar="KIND",
                   help="also write: onnx (model.custom.onnx / model.portable.onnx), aoti (model.aoti.pt2, an "
                        "AOTInductor package), tensorrt (engine; needs TensorRT); repeat or comma-separate")
    x.add_argument("--onnx-form", default="both", choices=["custom", "portable", "both"],
                   help="which ONNX forms --export onnx writes (default: both)")
    x.add_argument("--capacity", default="dynamic", metavar="dynamic|FACTOR|exact",
                   help="routed dispatch in the portable ONNX form and the AOTI package: 'dynamic' (exact "
                        "routing, run-time sizes), a capacity factor such as 1.25 (static sizes; tokens over "
                        "capacity are dropped) or 'exact' (static, no work saved) (default: dynamic; AOTI packages "
                        "use 'exact' for it)")
    for pass_ in passes.all_passes():
        pass_.add_arguments(p)
    return p


def export_settings(args) -> tuple[tuple, tuple, object]:
    """(exports, onnx forms, capacity) from the CLI options; MohCompileError when invalid."""
    from moh_compile.api import check_exports
    from moh_compile.backends.onnx_export import parse_capacity

    exports = tuple(dict.fromkeys(e.strip() for spec in args.export for e in spec.split(",") if e.strip()))
    forms = ("custom", "portable") if args.onnx_form == "both" else (args.onnx_form,)
    try:
        capacity = parse_capacity(args.capacity)
    except ValueError as err:
        raise MohCompileError(f"--capacity: {err}") from None
    check_exports(exports, forms, capacity)
    return exports, forms, capacity


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moh-compile verify",
        description="Run exported ONNX files (and an AOTI package) on sample inputs and print the max "
                    "difference from the PyTorch model (model.pt2 in the same directory).")
    p.add_argument("path", help="an output directory of `moh-compile MODEL --export ...`, or one .onnx file in it")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed (default: 1e-4)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="sample inputs instead of the saved inputs.pt, one per model input in order "
                        "(e.g. 4,32:int64 for token ids; an int64 input named *mask* gets ones)")
    return p


def run_verify(argv: list[str]) -> int:
    from moh_compile.backends.verify import verify_outputs

    args = build_verify_parser().parse_args(argv)
    if not args.tol >= 0:
        raise MohCompileError("--tol must be >= 0")
    results = verify_outputs(args.path, args.tol, args.input_shape)
    worst = [r for r in results if not r["ok"]]
    for r in results:
        print(f"{r['file']:<22} {r['kind']:<9} max|diff| {r['diff']:.3g}  {'ok' if r['ok'] else 'FAIL'}"
              + (f"  ({r['note']})" if r.get("note") else ""))
    if worst:
        print(f"moh-compile: verify FAILED: {', '.join(r['file'] for r in worst)} differ from model.pt2 by more "
              f"than --tol {args.tol:g}", file=sys.stderr)
        return 1
    print(f"all {len(results)} exported files within {args.tol:g} of model.pt2")
    return 0


def _load(args):
    from moh_compile.loading import load_model

    return load_model(args.model, trust_pickle=args.trust_pickle, config=args.config, factory=args.factory,
                      input_shapes=args.input_shape)


def run_inspect(argv: list[str]) -> int:
    args = build_inspect_parser().parse_args(argv)
    import json

    from moh_compile.api import inspect
    from moh_compile.report import print_tables

    loaded = _load(args)
    print(f"loaded: {loaded.source}", file=sys.stderr)
    insp = inspect(loaded.model, loaded.example_inputs)
    if args.json:
        print(json.dumps(insp.report.to_dict(), indent=2, default=str))
    else:
        print_tables(insp.report)
    return 0


def run_compile(argv: list[str]) -> int:
    args = build_compile_parser().parse_args(argv)
    from pathlib import Path

    from moh_compile import passes
    from moh_compile.api import compile as compile_model
    from moh_compile.config import CompileConfig
    from moh_compile.plan import Plan

    out = Path(args.out)
    if out.exists() and not args.force:
        raise MohCompileError(f"{out} exists; pass --force to replace it")
    for name in ("calib_samples", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise MohCompileError(f"--{name.replace('_', '-')} must be at least 1")
    if args.finetune_minutes < 0:
        raise MohCompileError("--finetune-minutes must not be negative")
    if args.finetune_pooled_weight is not None and args.finetune_pooled_weight < 0:
        raise MohCompileError("--finetune-pooled-weight must not be negative")
    if not 0 <= args.finetune_validation < 1:
        raise MohCompileError("--finetune-validation must be a fraction in [0, 1)")
    if args.finetune_minutes and not args.calib:
        raise MohCompileError("--finetune-minutes needs --calib data to train on")
    if (args.ffn_budget_data or args.ffn_budget_length) and args.ffn != "moepp" and not args.plan:
        raise MohCompileError("--ffn-budget-data / --ffn-budget-length need --ffn moepp (they re-set the MoE++ "
                              "FFN budget)")
    if args.ffn_budget_data and args.ffn_budget_length:
        raise MohCompileError("give --ffn-budget-data or --ffn-budget-length, not both")
    if args.ffn_budget_length is not None and (args.ffn_budget_length < 2 or not args.calib):
        raise MohCompileError("--ffn-budget-length needs a length of at least 2 and --calib text to pack")
    options = {}
    for pass_ in passes.all_passes():
        opts = pass_.options_from_args(args)
        if opts:
            options[pass_.name] = opts
    config = CompileConfig(attention=args.attention, ffn=args.ffn, options=options).validate(
        tuple(passes.ATTENTION_PASSES) + ("keep",), tuple(passes.FFN_PASSES) + ("keep",))
    plan = None
    if args.plan:
        try:
            plan = Plan.from_json(Path(args.plan).read_text())
        except (OSError, ValueError, TypeError) as err:
            raise MohCompileError(f"cannot read plan {args.plan}: {err}")
    t0 = time.perf_counter()
    export_settings(args)  # fail on bad export options before loading anything
    loaded = _load(args)
    print(f"loaded: {loaded.source}", file=sys.stderr)
    calibration = None
    if args.calib:
        from moh_compile.calibrate.data import as_calibration

        eval_source = args.eval or ("example-eval" if args.calib == "example" else None)
        calibration = as_calibration(args.calib, loaded, eval_source=eval_source, batch_size=args.batch_size,
                                     max_length=args.max_length, limit=args.calib_samples)
        print(f"calibration: {calibration.source} ({calibration.num_examples} examples)", file=sys.stderr)
    exports, forms, capacity = export_settings(args)
    compiled = compile_model(loaded.model, loaded.example_inputs, config, plan=plan, calibration=calibration)
    if args.finetune_minutes:
        from moh_compile.finetune import finetune

        pooled = {} if args.finetune_pooled_weight is None else {"pooled_weight": args.finetune_pooled_weight}
        result = finetune(compiled, loaded.model, calibration, train=args.finetune_train,
                          minutes=args.finetune_minutes, lr=args.finetune_lr, validation=args.finetune_validation,
                          **pooled)
        kept = f", kept the weights of step {result['best_step']}" if result.get("best_step") is not None else ""
        print(f"fine-tuned {result['steps']} steps in {result['wall_s']:.0f}s{kept}", file=sys.stderr)
    if args.ffn_budget_data or args.ffn_budget_length:
        _reset_ffn_budget(compiled, loaded, args, calibration)
    sections = compiled.report.sections
    fid = (sections.get("ffn_budget", {}).get("fidelity") or sections.get("finetune", {}).get("fidelity")
           or sections.get("fidelity"))
    if fid:
        print(f"fidelity on {fid['n']} held-out examples: mean cosine {fid['cosine']:.4f}"
              + (f", top-10 overlap {fid['knn10']:.3f}" if "knn10" in fid else ""), file=sys.stderr)
    compiled.save(out, force=args.force, exports=exports, onnx_forms=forms, capacity=capacity)
    n_done = len(compiled.report.actions)
    extra = "".join(f", {p.name}" for p in sorted(out.iterdir()) if p.name.startswith("model.") and p.name != "model.pt2")
    print(f"rewrote {n_done} blocks, skipped {len(compiled.report.skipped)}; wrote {out}/model.pt2, plan.json, "
          f"report.md, report.json{extra} in {time.perf_counter() - t0:.1f}s")
    return 0


def _reset_ffn_budget(compiled, loaded, args, calibration) -> None:
    """--ffn-budget-data / --ffn-budget-length: set_ffn_budget on that data (or on the calibration
    text packed into documents of that length); fidelity re-measured on the held-out data."""
    from moh_compile.api import measure_fidelity
    from moh_compile.calibrate.data import as_calibration
    from moh_compile.finetune import set_ffn_budget

    if args.ffn_budget_length:
        data = budget_documents(as_calibration(calibration, loaded), args.ffn_budget_length)
    else:
        data = as_calibration(args.ffn_budget_data, loaded, batch_size=args.batch_size, max_length=args.max_length,
                              limit=args.calib_samples)
    result = set_ffn_budget(compiled, data)
    work = ", ".join(f"{r['before']:.3f} -> {r['after']:.3f}" for r in result.values())
    print(f"FFN budget re-set on {data.source}: work per block {work}", file=sys.stderr)
    held_out = compiled.match_inputs(calibration).eval_batches if calibration is not None else []
    if held_out:
        compiled.report.sections["ffn_budget"]["fidelity"] = measure_fidelity(loaded.model, compiled.graph_module,
                                                                              held_out)


BUDGET_DOCUMENTS = 32  # at most this many packed documents set an FFN budget (--ffn-budget-length)


def budget_documents(calibration, length: int):
    """The calibration examples concatenated into documents of exactly `length` real tokens (as
    many as the text gives, at most BUDGET_DOCUMENTS), as calibration data."""
    from moh_compile.calibrate.data import Calibration
    from moh_compile.passes.sparse import pack_batches

    batches = pack_batches(calibration, calibration.batches, length, count=BUDGET_DOCUMENTS, batch_size=8,
                           purpose="--ffn-budget-length", shorter="a shorter length")
    n = sum(next(iter(b.values())).shape[0] if isinstance(b, dict) else b[0].shape[0] for b in batches)
    return Calibration(batches=batches, source=f"{n} calibration documents of {length} tokens",
                       tokenized=calibration.tokenized)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "inspect":
            return run_inspect(argv[1:])
        if argv and argv[0] == "verify":
            return run_verify(argv[1:])
        return run_compile(argv)
    except MohCompileError as err:
        print(f"moh-compile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moh-compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
