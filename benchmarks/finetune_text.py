"""Fine-tuning text for the fidelity benchmarks: the bundled calibration lines, optionally plus
varied English prose from Python's own reference text.

Why: distilling on the 4.4k templated calibration sentences plateaus (MoH) or over-fits (MoE++,
15 min read worse than 5 min) on the held-out sentences; more varied wording is the untested
remedy. pydoc_data.topics ships with CPython, so it needs no download and shares nothing with
the held-out set.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from moh_compile.calibrate.data import as_calibration, load_lines

EXTRAS = ("none", "pydoc")


def add_tuning_args(ap) -> None:
    """The fine-tuning data options the fidelity benchmarks share."""
    ap.add_argument("--finetune-lines", type=int, default=None,
                    help="calibration lines to fine-tune on (default: the calibration sample used to compile; "
                         "0 = all bundled lines)")
    ap.add_argument("--finetune-extra", choices=EXTRAS, default="none",
                    help="pydoc: fine-tune on every bundled calibration line plus ~1.9k sentences of Python's "
                         "reference text (overrides --finetune-lines)")


def tuning_data(args, loaded, calib):
    """The fine-tuning Calibration `add_tuning_args`'s options ask for: every bundled line plus the
    pydoc sentences (--finetune-extra pydoc), else the first --finetune-lines bundled lines, else
    `calib`, the data the model was compiled with."""
    if args.finetune_extra == "pydoc":
        path = Path(tempfile.mkdtemp()) / "calib_plus_pydoc.txt"
        path.write_text("\n".join(load_lines("example") + pydoc_sentences()) + "\n")
        return as_calibration(path, loaded, eval_source="example-eval")
    if args.finetune_lines is not None:
        return as_calibration("example", loaded, eval_source="example-eval", limit=args.finetune_lines or None)
    return calib


def pydoc_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of mostly-alphabetic prose from pydoc_data.topics (~1.9k)."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    return [s for s in re.split(r"(?<=[.!?])\s+", text)
            if min_words <= len(s.split()) <= max_words and sum(c.isalpha() or c == " " for c in s) > 0.9 * len(s)]
