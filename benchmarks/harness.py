"""Shared helpers for the benchmark scripts: thread control, timing, one table, saved copies.

Why interleaved timing: on a shared machine the load drifts during a run; timing the
candidates round-robin (A, B, A, B, ...) exposes them to the same drift, so the ratios
printed side by side stay meaningful even when absolute times move.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op thread count (None keeps the default); returns the count in use."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int


def _summary(samples: list[float]) -> Timing:
    ms = [t * 1e3 for t in samples]
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms))


def add_run_args(ap, save: str, reps: int = 7) -> None:
    """The options every table benchmark takes: --threads, --reps, --plain, --save (default `save`;
    '' skips writing results/<name>.{md,json})."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--plain", action="store_true", help="plain-text table")
    ap.add_argument("--save", default=save, help="results/<name>.{md,json}; '' to skip")


def emit(args, title: str, columns: list[str], rows: list[list], meta: dict | None = None) -> None:
    """Print the table (plain text with --plain) and save it under results/<--save> unless --save ''
    (the options `add_run_args` adds)."""
    print_table(title, columns, rows, plain=args.plain)
    if args.save:
        save_results(args.save, title, columns, rows, meta)


def time_fn(fn: Callable[[], object], reps: int = 7, warmup: int = 2) -> Timing:
    """Median-of-`reps` wall time of `fn()` after `warmup` untimed calls."""
    return time_interleaved({"fn": fn}, reps, warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 2) -> dict[str, Timing]:
    """Time several callables round-robin (same load drift for all); median-of-`reps` each."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: _summary(s) for name, s in samples.items()}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_table(title: str, columns: list[str], rows: list[list], plain: bool = False) -> None:
    """Print with rich when available (and not `plain`), else as aligned text."""
    cells = [[_fmt(v) for v in row] for row in rows]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if not plain:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def environment() -> dict:
    """What the numbers depend on, saved next to them."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_results(name: str, title: str, columns: list[str], rows: list[list], meta: dict | None = None,
                 out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write `<name>.json` (raw values + environment) and `<name>.md` (the table) under results/."""
    out_dir = RESULTS_DIR if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), **(meta or {})}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    records = [dict(zip(columns, row)) for row in rows]
    json_path.write_text(json.dumps({"title": title, "meta": meta, "rows": records}, indent=2, default=str))
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    lines += ["", "Environment: " + ", ".join(f"{k}={v}" for k, v in meta.items()), ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def held_out_documents(loaded, batch: int, seq: int) -> dict:
    """`batch` documents of exactly `seq` tokens packed from the held-out sentences
    (moh_compile/data/eval.txt): routers route real text differently from random token ids, so
    the work a compiled model skips is only representative on text. Tensors by input name."""
    from moh_compile.calibrate.data import Calibration, load_lines, tokenize_lines, tokenizer_for
    from moh_compile.passes.sparse import pack_batches

    lines = tokenize_lines(load_lines("example-eval"), tokenizer_for(loaded), batch_size=16, max_length=128)
    docs = pack_batches(Calibration(batches=lines, tokenized=True), lines, seq, count=batch, batch_size=batch)
    if not docs or next(iter(docs[0].values())).shape[0] < batch:
        raise SystemExit(f"not enough held-out text for {batch} documents of {seq} tokens")
    return docs[0]


__all__ = ["Timing", "add_run_args", "set_threads", "time_fn", "time_interleaved", "print_table", "save_results", "environment",
           "held_out_documents"]
