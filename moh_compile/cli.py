"""`moh-compile`: a thin layer over the Python API.

    moh-compile inspect MODEL            table of blocks found (and skipped, with reasons)
    moh-compile MODEL --out DIR          rewrite, write model.pt2 + plan.json + report
"""
from __future__ import annotations

import argparse
import sys
import time

from moh_compile.errors import MohCompileError

SUBCOMMANDS = ("inspect",)


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
        description="Compile a trained transformer into a cheaper one. Subcommands: inspect MODEL.",
        epilog="Example: moh-compile example:minilm --out out/minilm")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory (model.pt2, plan.json, report.md, report.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--attention", default="identity", choices=list(passes.ATTENTION_PASSES) + ["keep"],
                   help="what to do with attention blocks (default: identity)")
    p.add_argument("--ffn", default="identity", choices=list(passes.FFN_PASSES) + ["keep"],
                   help="what to do with FFN blocks (default: identity)")
    p.add_argument("--plan", help="re-apply a plan.json written by an earlier run")
    for add_options in getattr(passes, "CLI_OPTIONS", []):
        add_options(p)
    return p


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
    options = {}
    for collect in getattr(passes, "CLI_COLLECT", []):
        options.update(collect(args))
    config = CompileConfig(attention=args.attention, ffn=args.ffn, options=options)
    plan = None
    if args.plan:
        try:
            plan = Plan.from_json(Path(args.plan).read_text())
        except (OSError, ValueError, TypeError) as err:
            raise MohCompileError(f"cannot read plan {args.plan}: {err}")
    t0 = time.perf_counter()
    loaded = _load(args)
    print(f"loaded: {loaded.source}", file=sys.stderr)
    calibration = None
    for make in getattr(passes, "CLI_CALIBRATION", []):
        calibration = make(args, loaded) or calibration
    compiled = compile_model(loaded.model, loaded.example_inputs, config, plan=plan, calibration=calibration)
    compiled.save(out, force=args.force)
    n_done = len(compiled.report.actions)
    print(f"rewrote {n_done} blocks, skipped {len(compiled.report.skipped)}; wrote {out}/model.pt2, plan.json, "
          f"report.md, report.json in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "inspect":
            return run_inspect(argv[1:])
        return run_compile(argv)
    except MohCompileError as err:
        print(f"moh-compile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moh-compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
