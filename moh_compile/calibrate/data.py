"""Calibration data: the inputs routers are fitted on, in whatever form the user has them.

Why one type: every pass fits on activations recorded while the model runs on real inputs;
it should not care whether those came from a text file, a tensor file, a Python iterable or
the user's own forward loop. `Calibration.run(module)` is the only thing a pass calls.

Forms accepted by `as_calibration` (and `moh-compile --calib`):
- "example": the bundled English sentences (needs the model's tokenizer);
- a `.txt` file, one example per line (needs a tokenizer: an HF model directory has one);
- a `.pt` tensor file (loaded with weights_only=True): a tensor (batched on dim 0, passed as
  the first positional input), a dict of tensors (keyword inputs), or a list of either
  (each element is one batch);
- a Python iterable of batches (tensor, tuple of tensors, or dict of tensors);
- a callable `loop(model)` that runs the model itself (user-supplied forward loop).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moh_compile.errors import MohCompileError
from moh_compile.progress import progress_bar

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BUNDLED = {"example": "calib.txt", "example-eval": "eval.txt"}


def load_lines(source: str | Path) -> list[str]:
    """Non-empty stripped lines of a bundled name ('example', 'example-eval') or a text file."""
    path = DATA_DIR / BUNDLED[source] if source in BUNDLED else Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MohCompileError(f"cannot read calibration text {path}: {err.strerror or err}")
    except UnicodeDecodeError:
        raise MohCompileError(f"{path} is not UTF-8 text")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise MohCompileError(f"{path} has no non-empty lines")
    return lines


def split_batch(batch) -> tuple[tuple, dict]:
    """(positional, keyword) inputs of a batch: a dict is keywords, a tuple/list positionals."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call_on(module, batch):
    """module applied to one batch in any accepted form (keywords, positionals or one tensor)."""
    args, kwargs = split_batch(batch)
    return module(*args, **kwargs)


@dataclass
class Calibration:
    """Batches to run the model on (or a forward loop), plus an optional held-out set for fidelity.

    batches: each one a dict of keyword inputs or a tuple of positional inputs.
    """

    batches: list = field(default_factory=list)
    eval_batches: list = field(default_factory=list)
    loop: Callable | None = None
    source: str = ""
    tokenized: bool = False  # batches made by a tokenizer from text

    def __post_init__(self):
        if self.loop is None and not self.batches:
            raise MohCompileError(f"calibration data {self.source or ''} is empty".replace("  ", " "))

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_examples(self) -> int:
        return sum(_batch_size(b) for b in self.batches)

    def run(self, module, batches: list | None = None, desc: str = "calibrating", progress: bool = True) -> None:
        """Run `module` over the batches (or hand it to the user's loop), with a progress bar."""
        if self.loop is not None and batches is None:
            with torch.no_grad():
                self.loop(module)
            return
        batches = self.batches if batches is None else batches
        with torch.no_grad(), progress_bar(len(batches), desc, progress) as advance:
            for batch in batches:
                call_on(module, batch)
                advance()

    def match_inputs(self, example_inputs) -> "Calibration":
        """Make keyword batches carry exactly the inputs the captured model takes.

        Tokenizers add inputs the example did not have (e.g. token_type_ids, all zeros for
        single sentences); those are dropped for tokenized text. For user tensors a mismatch
        is an error, since dropping an input would silently change what the model computes.
        """
        if not isinstance(example_inputs, dict):
            return self
        want = set(example_inputs)
        for name in ("batches", "eval_batches"):
            fixed = []
            for batch in getattr(self, name):
                if not isinstance(batch, dict):
                    raise MohCompileError("the model takes keyword inputs "
                                          f"({', '.join(sorted(want))}); calibration batches must be dicts")
                extra, missing = set(batch) - want, {k for k in want - set(batch)
                                                     if isinstance(example_inputs[k], torch.Tensor)}
                if missing or (extra and not self.tokenized):
                    raise MohCompileError(f"calibration inputs {sorted(batch)} do not match the model's inputs "
                                          f"{sorted(want)}")
                fixed.append({k: v for k, v in batch.items() if k in want}
                             | {k: v for k, v in example_inputs.items() if k not in batch})
            setattr(self, name, fixed)
        return self

    def token_mask(self, batch) -> torch.Tensor | None:
        """(B, S) bool of real tokens for a batch with an attention_mask, else None."""
        if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"].bool()
        return None

    def iter_forever(self, seed: int = 0):
        """Shuffled batches, epoch after epoch (for fine-tuning)."""
        if not self.batches:
            raise MohCompileError("fine-tuning needs calibration batches, not a forward loop")
        rng = random.Random(seed)
        while True:
            order = self.batches[:]
            rng.shuffle(order)
            yield from order


def _batch_size(batch) -> int:
    args, kwargs = split_batch(batch)
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return 1 if first is None or first.dim() == 0 else first.shape[0]


def tokenize_lines(lines: list[str], tokenizer, batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Padded token batches (dicts of input_ids, attention_mask, ...) of `batch_size` lines."""
    out = []
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


def tokenizer_for(loaded) -> object:
    """The tokenizer of a loaded HF model directory (example:minilm included), or a clear error.

    `loaded` may also be a tokenizer already (anything callable that is not a LoadedModel).
    """
    if loaded is not None and not hasattr(loaded, "extra") and callable(loaded):
        return loaded
    hf_dir = getattr(loaded, "extra", {}).get("hf_dir") if loaded is not None else None
    if hf_dir is None:
        raise MohCompileError("text calibration needs a tokenizer, and this model is not a Hugging Face "
                              "directory; pass a .pt tensor file of inputs instead")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as err:
        raise MohCompileError(f"could not load a tokenizer from {hf_dir}: {str(err).splitlines()[0]}") from err


def _tensor_batches(path: Path, batch_size: int) -> list:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MohCompileError(f"cannot load calibration tensors from {path} (weights_only): "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    return _batches_of(obj, batch_size, str(path))


def _batches_of(obj, batch_size: int, what: str) -> list:
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise MohCompileError(f"{what}: a scalar is not calibration data")
        return [(chunk,) for chunk in obj.split(batch_size)]
    if isinstance(obj, dict):
        if not obj or not all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in obj.values()):
            raise MohCompileError(f"{what}: a dict must map input names to batched tensors")
        n = {v.shape[0] for v in obj.values()}
        if len(n) != 1:
            raise MohCompileError(f"{what}: tensors disagree on the batch dimension {sorted(n)}")
        total = n.pop()
        return [{k: v[i:i + batch_size] for k, v in obj.items()} for i in range(0, total, batch_size)]
    if isinstance(obj, (list, tuple)):
        out = []
        for item in obj:
            if isinstance(item, torch.Tensor):
                out.append((item,))
            elif isinstance(item, dict) or (isinstance(item, (tuple, list))
                                           and all(isinstance(t, torch.Tensor) for t in item)):
                out.append(item)
            else:
                raise MohCompileError(f"{what}: each batch must be a tensor, a tuple of tensors or a dict")
        return out
    raise MohCompileError(f"{what}: expected a tensor, a dict of tensors or a list of batches, "
                          f"not {type(obj).__name__}")


def _batches_from(source, loaded, batch_size: int, max_length: int, limit: int | None) -> tuple[list, str]:
    if isinstance(source, (str, Path)):
        text = str(source)
        if text in BUNDLED or text.endswith(".txt"):
            lines = load_lines(text)[:limit]
            return tokenize_lines(lines, tokenizer_for(loaded), batch_size, max_length), f"{len(lines)} lines of {text}"
        path = Path(text)
        if not path.exists():
            raise MohCompileError(f"calibration data {text} does not exist")
        if path.suffix not in (".pt", ".pth"):
            raise MohCompileError(f"calibration data must be 'example', a .txt or a .pt file, not {path.name}")
        batches = _tensor_batches(path, batch_size)
        return batches[:limit] if limit else batches, f"tensors in {path.name}"
    if isinstance(source, torch.Tensor) or isinstance(source, dict):
        return _batches_of(source, batch_size, "calibration data"), "tensors"
    if isinstance(source, Iterable):
        return _batches_of(list(source), batch_size, "calibration data"), "iterable"
    raise MohCompileError(f"unsupported calibration data of type {type(source).__name__}")


def as_calibration(source, loaded=None, eval_source=None, batch_size: int = 16, max_length: int = 128,
                   limit: int | None = None) -> Calibration:
    """Build a Calibration from any accepted form (see the module docstring).

    loaded: the LoadedModel (or a tokenizer), for tokenizing text data. eval_source: held-out
    data (same forms) for the fidelity figures in the report.
    """
    if isinstance(source, Calibration):
        return source
    if source is None:
        raise MohCompileError("no calibration data given")
    evals = _batches_from(eval_source, loaded, batch_size, max_length, None)[0] if eval_source is not None else []
    if callable(source) and not isinstance(source, (torch.Tensor, str, Path)):
        return Calibration(loop=source, eval_batches=evals, source="forward loop")
    batches, what = _batches_from(source, loaded, batch_size, max_length, limit)
    text = isinstance(source, (str, Path)) and (str(source) in BUNDLED or str(source).endswith(".txt"))
    return Calibration(batches=batches, eval_batches=evals, source=what, tokenized=text)


def real_tokens(values: list, masks: list) -> torch.Tensor:
    """(T, d) rows of recorded (..., d) values at real tokens: masks[i] is batch i's (B, S) token mask
    (or None), applied when it fits the value's layout, batch-first or sequence-first."""
    out = []
    for i, v in enumerate(values):
        mask = masks[i] if i < len(masks) else None
        if mask is not None and v.dim() == 3 and v.shape[:2] == mask.shape:
            out.append(v[mask])
        elif mask is not None and v.dim() == 3 and v.shape[:2] == mask.T.shape:
            out.append(v[mask.T])
        else:
            out.append(v.reshape(-1, v.shape[-1]))
    return torch.cat(out).float()


__all__ = ["Calibration", "as_calibration", "load_lines", "tokenize_lines", "tokenizer_for", "progress_bar",
           "DATA_DIR", "real_tokens", "split_batch", "call_on"]
