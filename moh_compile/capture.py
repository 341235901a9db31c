"""Capture: (model, example inputs) -> torch.fx GraphModule via torch.export (non-strict), with
einsum contractions lowered to matmuls (`lower_einsum`).

Batch and sequence dimensions are exported dynamic (Dim.AUTO: export keeps them symbolic
where the model allows). A batch of 1 would be specialised to 1 by export, so examples with
batch 1 are repeated to batch 2 for tracing.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch.export import Dim

from moh_compile.errors import MohCompileError
from moh_compile.lower_einsum import lower_einsums
from moh_compile.match.graph import remove_dead_code


@dataclass
class Captured:
    module: fx.GraphModule  # the IR: ep.module(), parameters under their original names
    program: torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    dynamic_shapes: object

    def for_model(self, model: torch.nn.Module) -> "Captured":
        """A fresh copy of this capture's graph bound to `model`'s own parameters and buffers, as a
        new capture of `model` would be: compile several configurations of one model (or of
        identically built models) while paying for torch.export once. `model` must have every
        captured parameter and buffer under the same name, shape and dtype (MohCompileError
        otherwise); the graph is the traced one, so it must also run the same code. `program` stays
        the traced ExportedProgram (nothing reads its weights after capture)."""
        own = dict(model.named_parameters(remove_duplicate=False))
        own.update(model.named_buffers(remove_duplicate=False))
        memo = {}
        for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
            mine = own.get(name)
            if mine is None or mine.shape != tensor.shape or mine.dtype != tensor.dtype:
                found = "missing" if mine is None else f"{tuple(mine.shape)} {mine.dtype}"
                raise MohCompileError(f"this capture is not of this model: {name} is {tuple(tensor.shape)} "
                                      f"{tensor.dtype} in the capture, {found} in the model")
            memo[id(tensor)] = mine
        with warnings.catch_warnings():  # torch's own pytree copying, on every GraphModule deepcopy
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            return replace(self, module=copy.deepcopy(self.module, memo))


def normalize_inputs(example_inputs) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) and isinstance(
                example_inputs[1], dict):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise MohCompileError(f"example inputs must be a tensor, tuple or dict, not {type(example_inputs).__name__}")


def dynamic_spec(x):
    """Every dim may vary; export keeps symbolic what the model allows and pins the rest."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return {i: Dim.AUTO for i in range(x.dim())}


def _example_tensor(x):
    """An example input as export should see it: contiguous (a sliced example would make export
    guard on its strides, and every contiguous input later fail that guard) and with a batch of
    at least 2 (a batch of 1 would be specialised)."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.contiguous()
    if x.dim() >= 2 and x.shape[0] == 1:
        return torch.cat([x, x], dim=0)
    return x


def capture(model: torch.nn.Module, example_inputs, dynamic: bool = True) -> Captured:
    """Export `model` into the IR. Raises MohCompileError with the cause summarised."""
    args, kwargs = normalize_inputs(example_inputs)
    args = tuple(_example_tensor(a) for a in args)
    kwargs = {k: _example_tensor(v) for k, v in kwargs.items()}
    dyn = None
    if dynamic:
        dyn = {"args": tuple(dynamic_spec(a) for a in args), "kwargs": {k: dynamic_spec(v) for k, v in kwargs.items()}}
        dyn = _as_export_spec(model, args, kwargs, dyn)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    except MohCompileError:
        raise
    except Exception as err:  # export failures are user-facing: summarise them
        raise MohCompileError(f"torch.export could not capture the model: {_summarise(err)}. "
                              "Hint: pass example inputs that match forward(), disable caches "
                              "(use_cache=False) and data-dependent Python control flow.") from err
    finally:
        model.train(was_training)
    gm = program.module()
    remove_dead_code(gm)
    lower_einsums(gm)  # einsum-written attention and projections: matmuls the matcher knows
    return Captured(gm, program, args, kwargs, dyn)


def _as_export_spec(model, args, kwargs, dyn):
    """torch.export wants dynamic_shapes keyed like forward()'s parameters."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    if kwargs and not args:
        return {k: dyn["kwargs"][k] for k in kwargs}
    if not kwargs:
        return tuple(dyn["args"])
    spec = {}
    for name, s in zip(params, dyn["args"]):
        spec[name] = s
    spec.update(dyn["kwargs"])
    return spec


def _summarise(err: Exception) -> str:
    text = str(err).strip().splitlines()
    first = next((line for line in text if line.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first[:300]}"
