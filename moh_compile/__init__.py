"""moh-compile: turn a trained transformer into a cheaper one without starting over.

    import moh_compile
    report = moh_compile.inspect(model, example_inputs).report
    compiled = moh_compile.compile(model, example_inputs, moh_compile.CompileConfig(), calibration=data)
    moh_compile.finetune(compiled, model, data, minutes=5)   # optional
"""
from moh_compile import kernels, ops  # noqa: F401  (registers the custom ops and their kernels)
from moh_compile.api import CompiledModel, compile, inspect
from moh_compile.capture import capture
from moh_compile.config import CompileConfig
from moh_compile.errors import MohCompileError
from moh_compile.finetune import finetune, set_ffn_budget
from moh_compile.calibrate.data import Calibration, as_calibration
from moh_compile.loading import load_model
from moh_compile.plan import Plan

__version__ = "0.1.0"
__all__ = ["compile", "inspect", "finetune", "set_ffn_budget", "as_calibration", "Calibration", "capture", "load_model", "CompileConfig", "CompiledModel", "Plan",
           "MohCompileError"]
