"""`moh-compile verify`: run exported artifacts on sample inputs against the PyTorch model.

The reference is model.pt2 in the same directory (the compiled model as saved). Sample
inputs are the saved inputs.pt (written by --export), with tensors optionally replaced by
--input-shape ones, so keyword inputs and flags keep their names and values.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moh_compile.errors import MohCompileError

ARTIFACTS = ("model.custom.onnx", "model.portable.onnx", "model.aoti.pt2")


def _files(path: Path) -> tuple[Path, list[Path]]:
    if not path.exists():
        raise MohCompileError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix != ".onnx" and path.name != "model.aoti.pt2":
            raise MohCompileError(f"{path} is not an exported .onnx file or model.aoti.pt2")
        return path.parent, [path]
    found = [path / n for n in ARTIFACTS if (path / n).exists()]
    if not found:
        raise MohCompileError(f"{path} has no exported files ({', '.join(ARTIFACTS)}); "
                              "write them with: moh-compile MODEL --out DIR --export onnx")
    return path, found


def sample_inputs(directory: Path, program, input_shapes: list[str] | None) -> tuple[tuple, dict]:
    """Saved (args, kwargs), or the program's own example; tensors replaced by --input-shape ones."""
    from moh_compile.loading import inputs_from_program, parse_input_shapes

    saved = directory / "inputs.pt"
    if saved.exists():
        try:
            data = torch.load(saved, weights_only=True)
            args, kwargs = tuple(data["args"]), dict(data["kwargs"])
        except Exception as err:
            raise MohCompileError(f"cannot read sample inputs {saved}: {str(err).splitlines()[0][:200]}") from None
    else:
        args, kwargs = inputs_from_program(program), {}
    new = parse_input_shapes(input_shapes)
    if new is None:
        return args, kwargs
    leaves, spec = torch.utils._pytree.tree_flatten_with_path((args, kwargs))
    slots = [i for i, (_, v) in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if len(new) != len(slots):
        raise MohCompileError(f"the model takes {len(slots)} tensor inputs, --input-shape gave {len(new)}")
    values = [v for _, v in leaves]
    for i, t in zip(slots, new):
        key = torch.utils._pytree.keystr(leaves[i][0])
        if "mask" in key and not t.is_floating_point():  # an attention mask: ones, last row padded
            t = torch.ones_like(t)
            if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 2:
                t[-1, -2:] = 0
        values[i] = t.to(values[i].dtype)
    return torch.utils._pytree.tree_unflatten(values, spec)


def verify_outputs(path: str, tol: float, input_shapes: list[str] | None = None) -> list[dict]:
    """One row per artifact: file, kind, max |difference| vs model.pt2, ok, note."""
    import moh_compile  # noqa: F401  (registers the ops model.pt2 calls)
    from moh_compile.backends.ort_runtime import detect_form, max_difference, run_onnx

    directory, files = _files(Path(path))
    ref_path = directory / "model.pt2"
    if not ref_path.exists():
        raise MohCompileError(f"{directory} has no model.pt2 to compare with")
    try:
        program = torch.export.load(str(ref_path))
    except Exception as err:
        raise MohCompileError(f"{ref_path} is not a readable exported program: {str(err).splitlines()[0][:200]}")
    args, kwargs = sample_inputs(directory, program, input_shapes)
    with torch.no_grad():
        expected = program.module()(*args, **kwargs)
    rows = []
    for f in files:
        if f.suffix == ".onnx":
            form = detect_form(f)
            try:
                got = run_onnx(f, (args, kwargs), form)
            except ImportError as err:
                raise MohCompileError(f"{f.name}: {err}") from None
            cap = _capacity(f)
            note = "" if cap in ("exact", None) else f"capacity {cap}: tokens over capacity are dropped"
        else:
            form, note = "aoti", ""
            runner = torch._inductor.aoti_load_package(str(f))
            with torch.no_grad():
                out = runner(*args, **kwargs)
            got = [t.numpy() for t in torch.utils._pytree.tree_leaves(out) if t is not None]
        diff = max_difference(expected, got)
        rows.append({"file": f.name, "kind": form, "diff": diff, "ok": diff <= tol, "note": note if diff > tol else ""})
    return rows


def _capacity(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == "moh_compile.capacity"), None)
