"""The Python API: the pipeline on one screen.

    load -> capture -> match -> plan -> rewrite (verified at identity) -> narrow projections
    -> finalize/calibrate -> optimize (exact layout changes, verified) -> report
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from moh_compile import passes
from moh_compile.calibrate.data import as_calibration
from moh_compile.calibrate.metrics import embeddings, fidelity
from moh_compile.capture import Captured, capture
from moh_compile.config import CompileConfig
from moh_compile.errors import MohCompileError
from moh_compile.match import MatchResult, find_blocks
from moh_compile.match.attention import MASKED_OUT
from moh_compile.passes import narrow_projections
from moh_compile.plan import BlockPlan, Plan
from moh_compile.report import Report, block_rows
from moh_compile.rewrite import commit_verified, probe_values
from moh_compile.backends.dispatch_plan import DEFAULT_CAPACITY

DISPATCH_PLAN_BATCHES = 8  # calibration batches kept to plan the portable ONNX dispatch (~128 texts)


@dataclass
class Inspection:
    captured: Captured
    matches: MatchResult
    report: Report


def _detect_causality(captured: Captured, matches: MatchResult) -> None:
    """Fill block.causal from the mask values on the example inputs (causal: no key after the query)."""
    watch = {f"m{i}": m.mask_probe for i, m in enumerate(matches.attention)
             if m.mask_probe is not None and not m.is_causal_flag}
    values = probe_values(captured.module, watch, captured.args, captured.kwargs) if watch else {}
    for i, m in enumerate(matches.attention):
        if m.is_causal_flag:
            m.block.causal = True
            continue
        mask = values.get(f"m{i}")
        if mask is None:
            m.block.causal = False
            continue
        visible = mask if mask.dtype == torch.bool else mask > MASKED_OUT / 2
        s_q, s_k = visible.shape[-2], visible.shape[-1]
        upper = torch.ones(s_q, s_k, dtype=torch.bool).triu(1)
        m.block.causal = bool(s_q > 1 and not visible[..., upper].any() and visible[..., ~upper].any())


def inspect(model: torch.nn.Module, example_inputs, captured: Captured | None = None) -> Inspection:
    """Capture the model and describe every attention and FFN block found (and skipped).

    captured: an earlier `moh_compile.capture(...)` of this model (or of one built the same way)
    to reuse instead of running torch.export again (`Captured.for_model`); it is not modified.
    """
    captured = captured.for_model(model) if captured is not None else capture(model, example_inputs)
    matches = find_blocks(captured.module)
    _detect_causality(captured, matches)
    if not matches.attention:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in matches.skipped if s.kind == "attention")
        raise MohCompileError("no attention blocks found in this model" + (f" (skipped: {reasons})" if reasons else ""))
    report = Report(model_name=type(model).__name__, blocks=block_rows(matches),
                    skipped=[s.to_dict() for s in matches.skipped])
    return Inspection(captured, matches, report)


class CompiledModel(torch.nn.Module):
    """The rewritten model: run it, keep training it, save it (`.save(dir)`)."""

    def __init__(self, graph_module: fx.GraphModule, plan: Plan, report: Report, captured: Captured):
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.report = report
        self._example = (captured.args, captured.kwargs, captured.dynamic_shapes)
        self.plan_batches: list = []  # inputs that plan the portable ONNX dispatch (export_onnx)

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    def match_inputs(self, calibration):
        """`calibration` with its batches made to carry exactly the inputs this model was captured with."""
        args, kwargs, _ = self._example
        return calibration.match_inputs(kwargs if kwargs else args)

    def export(self) -> torch.export.ExportedProgram:
        """Re-export (the project's ops stay single nodes; importing moh_compile registers them).

        Outputs are made plain (a ModelOutput becomes a dict) so the saved program loads
        without the model's library registering its output classes.
        """
        args, kwargs, dyn = self._example
        gm = self.graph_module
        codegen = gm.graph._codegen  # ep.module() keeps its output tree here (private torch API)
        info = getattr(codegen, "pytree_info", None)
        if info is not None:
            codegen.pytree_info = info._replace(out_spec=_plain_spec(info.out_spec))
            gm.recompile()
        try:
            with torch.no_grad():
                return torch.export.export(gm, args, kwargs, dynamic_shapes=dyn, strict=False)
        finally:
            if info is not None:
                codegen.pytree_info = info
                gm.recompile()

    def export_onnx(self, path: str | os.PathLike, form: str = "custom", capacity: str | float = DEFAULT_CAPACITY,
                    active_fraction: float | None = None, opset: int | None = None, program=None,
                    plan_batches: list | None = None):
        """Write the model as ONNX ("custom": one node per project op; "portable": standard ops only).

        capacity: routed dispatch of the portable form: "dynamic" (exact routing, run-time sizes), a
        capacity factor (static sizes, may drop tokens) or "exact" (static, no saving); docs/deploy.md.
        plan_batches: inputs (dicts or tuples, like calibration batches) whose routing, with the
        example's, plans the portable dispatch; default: the first calibration batches of compile.
        """
        from moh_compile.backends.onnx_export import DEFAULT_OPSET, export_program
        from moh_compile.calibrate.data import split_batch

        args, kwargs, _ = self._example
        batches = self.plan_batches if plan_batches is None else plan_batches
        return export_program(program or self.export(), path, form, args, kwargs, opset or DEFAULT_OPSET,
                              capacity, active_fraction, [split_batch(b) for b in batches])

    def export_aoti(self, path: str | os.PathLike, capacity: str | float = DEFAULT_CAPACITY, program=None) -> str:
        """Write an AOTInductor package (.pt2) that loads with torch._inductor.aoti_load_package alone."""
        from moh_compile.backends.aoti import package_aoti

        args, kwargs, _ = self._example
        return package_aoti(program or self.export(), path, args, kwargs, capacity)

    def save(self, out_dir: str | os.PathLike, force: bool = False, exports=(), onnx_forms=("custom", "portable"),
             capacity: str | float = DEFAULT_CAPACITY) -> Path:
        """Write model.pt2, plan.json, report.md and report.json atomically into out_dir.

        exports: any of "onnx" (model.<form>.onnx per onnx_forms), "aoti" (model.aoti.pt2),
        "tensorrt" (needs TensorRT); with any of them also inputs.pt, the sample inputs
        `moh-compile verify` uses.
        """
        return write_outputs(self, Path(out_dir), force, tuple(exports), tuple(onnx_forms), capacity)


def _plain_spec(spec):
    """The same output tree with dict subclasses (e.g. HF ModelOutput) turned into dicts."""
    from torch.utils._pytree import TreeSpec

    kids = None if spec is None else (list(spec.children()) if hasattr(spec, "children") else spec.children_specs)
    if not kids:
        return spec
    children = [_plain_spec(c) for c in kids]
    kind = dict if (isinstance(spec.type, type) and issubclass(spec.type, dict)) else spec.type
    return TreeSpec(kind, spec.context, children)


_COMPOSED: dict = {}  # one ComposedAttention per name, so finalize sees all its blocks at once


def _pass_for(kind: str, name: str):
    registry = passes.ATTENTION_PASSES if kind == "attention" else passes.FFN_PASSES
    if kind == "attention" and "+" in name:
        from moh_compile.passes.compose import ComposedAttention

        if name not in _COMPOSED:
            _COMPOSED[name] = ComposedAttention([_pass_for(kind, part) for part in name.split("+")])
        return _COMPOSED[name]
    if name not in registry:
        raise MohCompileError(f"no {kind} pass named {name!r} (known: {', '.join(registry)}, keep)")
    return registry[name]


def compile(model: torch.nn.Module, example_inputs, config: CompileConfig | None = None,
            plan: Plan | None = None, calibration=None, tokenizer=None,
            captured: Captured | None = None) -> CompiledModel:  # noqa: A001
    """Rewrite the model's blocks as `config` asks (or as a saved `plan` says).

    captured: reuse an earlier `moh_compile.capture(model, example_inputs)` (e.g. when compiling
    several configurations of one model; torch.export is most of a small model's compile time).

    calibration: data for passes that fit routers, in any form `calibrate.data.as_calibration`
    accepts ("example", a .txt/.pt path, tensors, an iterable of batches, a forward loop, or a
    Calibration); text needs `tokenizer`. When it has held-out batches, the report gets the
    fidelity of the compiled model against the original on them.
    """
    if calibration is not None:
        calibration = as_calibration(calibration, tokenizer).match_inputs(example_inputs)
    config = (config or CompileConfig()).validate(
        tuple(passes.ATTENTION_PASSES) + ("keep",), tuple(passes.FFN_PASSES) + ("keep",))
    insp = inspect(model, example_inputs, captured)
    gm, matches = insp.captured.module, insp.matches
    new_plan = Plan(config=config.to_dict())
    pending, owners = [], []
    for kind, found, choice in (("attention", matches.attention, config.attention), ("ffn", matches.ffn, config.ffn)):
        for m in found:
            saved = plan.for_block(m.block.name, kind) if plan else None
            transform = saved.transform if saved else choice
            if transform == "keep":
                new_plan.blocks.append(BlockPlan(m.block.name, kind, "keep"))
                continue
            p = _pass_for(kind, transform)
            reason = p.check(m, config)
            if reason:
                insp.report.skip(m.block.name, kind, reason)
                new_plan.blocks.append(BlockPlan(m.block.name, kind, "keep", {"reason": reason}))
                continue
            bp = saved if saved else p.plan(m, config)
            new_plan.blocks.append(bp)
            pending.append(p.rewrite(gm, m, bp))
            owners.append((p, m, bp))
    results = commit_verified(gm, pending, insp.captured.args, insp.captured.kwargs, config.verify_rtol)
    if config.narrow_projections and any(not isinstance(r, str) for r in results):
        _narrow_projections(gm, insp, matches.attention, config.verify_rtol)
    done: dict = {}
    for (p, m, bp), rw, res in zip(owners, pending, results):
        if isinstance(res, str):
            insp.report.skip(m.block.name, p.kind, res)
            bp.transform, bp.settings = "keep", {"reason": res}
        else:
            insp.report.applied(m.block.name, p.kind, p.name, res)
            done.setdefault(p, []).append((m, bp, rw))
    for p, items in done.items():
        extra = p.finalize(gm, items, config, calibration)
        if extra:
            insp.report.sections[f"{p.kind}:{p.name}"] = extra
    for p, items in done.items():
        extra = p.optimize(gm, items, config, (insp.captured.args, insp.captured.kwargs))
        if extra:
            insp.report.sections[f"{p.kind}:{p.name}:layout"] = extra
    gm.recompile()
    if calibration is not None and calibration.eval_batches and done:
        insp.report.sections["fidelity"] = measure_fidelity(model, gm, calibration.eval_batches)
    compiled = CompiledModel(gm, new_plan, insp.report, insp.captured)
    if calibration is not None:
        compiled.plan_batches = calibration.batches[:DISPATCH_PLAN_BATCHES]
    return compiled


def _narrow_projections(gm: fx.GraphModule, insp: Inspection, attention: list, rtol: float) -> None:
    """Drop the rows of projections nothing reads after the rewrites (a fused QKV projection's
    query rows); mark the blocks whose Q rows went, so FLOP counts follow; report what changed."""
    result = narrow_projections.narrow_projections(gm, insp.captured.args, insp.captured.kwargs, rtol)
    if not result:
        return
    narrowed = set(result.pop("linears", []))
    rows = {b["name"]: b for b in insp.report.blocks if b["kind"] == "attention"}
    for m in attention:
        if m.q_proj is not None and m.q_proj.node in narrowed:
            m.block.q.narrowed = True
            if m.block.name in rows:
                rows[m.block.name]["q"]["narrowed"] = True
    insp.report.sections["narrowed projections"] = dict(result, markdown=narrow_projections.markdown(result))


def measure_fidelity(original: torch.nn.Module, compiled: torch.nn.Module, batches: list) -> dict:
    """Cosine and top-10 neighbour overlap of mean-pooled outputs, compiled vs original."""
    result = fidelity(embeddings(original, batches), embeddings(compiled, batches))
    result["markdown"] = (f"Held-out examples: {result['n']}. Mean cosine of mean-pooled outputs vs the original: "
                          f"{result['cosine']:.4f} (worst {result['cosine_min']:.4f})"
                          + (f"; top-10 neighbour overlap {result['knn10']:.3f}." if "knn10" in result else "."))
    return result


EXPORTS = ("onnx", "aoti", "tensorrt")


def write_outputs(compiled: CompiledModel, out_dir: Path, force: bool, exports: tuple = (),
                  onnx_forms: tuple = ("custom", "portable"), capacity: str | float = DEFAULT_CAPACITY) -> Path:
    """Atomic: everything is written to a temporary sibling directory, then renamed."""
    if out_dir.exists() and not force:
        raise MohCompileError(f"{out_dir} exists; pass --force (force=True) to replace it")
    check_exports(exports, onnx_forms, capacity)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        program = compiled.export()
        torch.export.save(program, str(tmp / "model.pt2"))
        (tmp / "plan.json").write_text(compiled.plan.to_json())
        compiled.report.write(tmp)
        write_exports(compiled, program, tmp, exports, onnx_forms, capacity)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_exports(exports: tuple, onnx_forms: tuple, capacity) -> None:
    """Reject bad export settings (and a missing TensorRT) before any work is done."""
    from moh_compile.backends.onnx_export import FORMS, check_settings

    for e in exports:
        if e not in EXPORTS:
            raise MohCompileError(f"unknown export {e!r} (known: {', '.join(EXPORTS)})")
    if not onnx_forms or any(f not in FORMS for f in onnx_forms):
        raise MohCompileError(f"ONNX forms must be among {', '.join(FORMS)}, got {', '.join(onnx_forms) or 'none'}")
    try:
        check_settings(onnx_forms[0], capacity=capacity)
    except ValueError as err:
        raise MohCompileError(str(err)) from None
    if "tensorrt" in exports:
        from moh_compile.backends.tensorrt import require_tensorrt

        require_tensorrt()


def write_exports(compiled: CompiledModel, program, out: Path, exports: tuple, onnx_forms: tuple, capacity) -> None:
    """The deployment artifacts asked for, next to model.pt2 (inside the temporary directory)."""
    if exports:
        args, kwargs, _ = compiled._example
        torch.save({"args": args, "kwargs": kwargs}, out / "inputs.pt")
    if "onnx" in exports or "tensorrt" in exports:
        forms = onnx_forms if "onnx" in exports else ("custom",)
        for form in forms if "tensorrt" not in exports or "custom" in forms else (*forms, "custom"):
            compiled.export_onnx(out / f"model.{form}.onnx", form=form, capacity=capacity, program=program)
    if "aoti" in exports:
        compiled.export_aoti(out / "model.aoti.pt2", capacity=capacity, program=program)
    if "tensorrt" in exports:
        from moh_compile.backends.tensorrt import build_engine, default_profile

        build_engine(out / "model.custom.onnx", out / "model.engine", default_profile(out / "model.custom.onnx"))


__all__ = ["inspect", "compile", "CompiledModel", "Inspection"]
