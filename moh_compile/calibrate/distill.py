"""Short output-matching distillation of a converted model (student) against the original (teacher).

Why: training-free calibration fits each block in isolation; a few minutes of end-to-end
gradient steps on the routers (and their compensation) fix the errors that compound across
blocks. Binary gates pass gradients through their straight-through estimator (see HeadRouter).
Generic: any pair of nn.Modules whose forward returns a tensor or an HF-style output.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from moh_compile.calibrate.data import call_on
from moh_compile.calibrate.metrics import last_hidden
from moh_compile.progress import progress_bar
from moh_compile.passes.routing import find_routers

TRAIN_MODES = ("router", "all")


DEFAULT_POOLED_WEIGHT = 10.0


def default_loss(student_out, teacher_out, batch, pooled_weight: float = DEFAULT_POOLED_WEIGHT) -> torch.Tensor:
    """Per-token (1 - cosine) + MSE / mean teacher energy on the last hidden state, over real tokens,
    plus pooled_weight * (1 - cosine) of the mean-pooled outputs (per sequence).

    Why the pooled term: it is what the fidelity figures (and sentence-embedding users) measure;
    on MiniLM at 9/12 heads it lifted the held-out cosine after 2 minutes from 0.9887 to 0.9903
    (docs/moh.md). pooled_weight=0 gives the token-level loss alone (e.g. for language models).
    """
    s, t = last_hidden(student_out), last_hidden(teacher_out)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    mask = torch.ones(s.shape[:-1], dtype=s.dtype) if mask is None else mask.to(s.dtype)
    cos = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    mse = (s - t).pow(2).mean(-1) / t.pow(2).mean().clamp_min(1e-12)
    loss = ((cos + mse) * mask).sum() / mask.sum().clamp_min(1.0)
    if pooled_weight and s.dim() == 3 and mask.shape == s.shape[:2]:
        m = mask.unsqueeze(-1)
        denom = m.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.cosine_similarity((s * m).sum(1) / denom, (t * m).sum(1) / denom, dim=-1)
        loss = loss + pooled_weight * (1.0 - pooled).mean()
    return loss


def _cycle(batches: Iterable):
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            return


class _Progress:
    """Fine-tuning progress (moh_compile.progress): steps, or the time budget when that ends first."""

    RESOLUTION = 1000

    def __init__(self, total: int, enabled: bool, budget_s: float | None = None):
        self.total, self.budget_s = total, budget_s
        self.bar = progress_bar(self.RESOLUTION, "distill", enabled)
        self.advance = self.bar.start()

    def update(self, step: int, loss: float, elapsed: float) -> None:
        done = step / self.total
        if self.budget_s:
            done = max(done, min(1.0, elapsed / self.budget_s))
        self.advance(max(0, int(self.RESOLUTION * done) - self.bar.done),
                     description=f"distill step {step} loss {loss:.5f}")

    def close(self) -> None:
        self.bar.close()


def _eval(module: nn.Module) -> None:
    """module.eval(), also for torch.export's unlifted modules, which refuse eval() (their graph is
    already captured in eval form; only inserted submodules such as routers have a mode)."""
    try:
        module.eval()
    except NotImplementedError:
        for child in module.children():
            child.eval()


def unshare_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Give `student` its own copy of every parameter/buffer whose storage the teacher also holds.

    Why: a compiled model keeps the original's unchanged weights without copying (torch.export
    shares them), so training it in place would move the teacher along with the student (the
    target drifts, and fidelity is then measured against a modified original) and change the
    user's model. Tied weights stay tied (one copy per shared tensor). Returns how many
    tensors were copied.
    """
    theirs = {t.untyped_storage().data_ptr() for t in (*teacher.parameters(), *teacher.buffers())}
    copies: dict = {}
    with torch.no_grad():
        for module in student.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.untyped_storage().data_ptr() in theirs:
                    if id(p) not in copies:
                        copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    setattr(module, name, copies[id(p)])
            for name, b in list(module.named_buffers(recurse=False)):
                if b.untyped_storage().data_ptr() in theirs:
                    if id(b) not in copies:
                        copies[id(b)] = b.clone()
                    persistent = name not in module._non_persistent_buffers_set
                    module.register_buffer(name, copies[id(b)], persistent=persistent)
    return len(copies)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int = 1000,
    lr: float = 1e-3,
    train: str = "router",
    load_balance_beta: float = 0.01,
    time_budget_s: float | None = None,
    progress: bool = True,
    loss_fn: Callable | None = None,
    val_batches: list | None = None,
    val_every: int = 50,
) -> dict:
    """Adam on the student's routers (train="router") or all its parameters (train="all") to match
    the teacher's outputs. Stops after `steps` or `time_budget_s`. Returns a small history dict.

    With `val_batches` (held out from `batches`), the loss on them is measured before training,
    every `val_every` steps and at the end, and the student ends at the best-measured weights:
    a longer budget then cannot end worse than a shorter one (on a few hundred sentences, 15
    minutes of training "all" ended below 5 minutes), and training that never helps is undone.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if val_every < 1:
        raise ValueError(f"val_every must be >= 1, got {val_every}")
    loss_fn = loss_fn or default_loss
    unshared = unshare_weights(student, teacher) if train == "all" else 0  # routers are never shared
    routers = find_routers(student)
    if train == "router":
        params = [p for r in routers for p in r.parameters()]
    else:
        params = [p for p in student.parameters()]
    if not params:
        raise ValueError("no trainable parameters (train='router' but the student has no router)")
    trainable = {id(p) for p in params}
    saved = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.Adam(params, lr=lr)
    _eval(student)      # no dropout: match the deterministic teacher
    _eval(teacher)
    for r in routers:
        r.track_load_balance = True
    bar = _Progress(steps, progress, time_budget_s)
    best = _BestWeights(student, teacher, params, val_batches, loss_fn) if val_batches else None
    start, step, losses = time.time(), 0, []
    try:
        if best:
            best.check(0)
        for batch in _cycle(batches):
            if step >= steps or (time_budget_s is not None and time.time() - start >= time_budget_s):
                break
            with torch.no_grad():
                t_out = call_on(teacher, batch)
            loss = loss_fn(call_on(student, batch), t_out, batch)
            lb = sum((r.last_load_balance_loss for r in routers if r.last_load_balance_loss is not None),
                     torch.zeros(()))
            total = loss + load_balance_beta * lb
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.update(step, losses[-1], time.time() - start)
            if best and step % val_every == 0:
                best.check(step)
        if best:
            if step % val_every:
                best.check(step)
            best.restore()
    finally:
        bar.close()
        for r in routers:
            r.track_load_balance = False
            r.last_load_balance_loss = None
        for p, g in saved.items():
            p.requires_grad_(g)
    return {"steps": step, "seconds": time.time() - start, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
            "unshared_tensors": unshared, **(best.summary() if best else {})}


class _BestWeights:
    """Validation loss of the student at chosen steps, and a copy of the trainable weights at
    the best one (teacher outputs on the validation batches computed once)."""

    def __init__(self, student, teacher, params, batches, loss_fn):
        self.student, self.params, self.batches, self.loss_fn = student, params, list(batches), loss_fn
        with torch.no_grad():
            self.targets = [call_on(teacher, b) for b in self.batches]
        self.history: list = []
        self.best_step, self.best_loss, self.saved = None, math.inf, None

    def check(self, step: int) -> None:
        with torch.no_grad():
            loss = sum(float(self.loss_fn(call_on(self.student, b), t, b)) for b, t in zip(self.batches, self.targets))
        loss /= len(self.batches)
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.saved = [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        if self.saved is not None and self.best_step != self.history[-1][0]:
            with torch.no_grad():
                for p, v in zip(self.params, self.saved):
                    p.copy_(v)

    def summary(self) -> dict:
        return {"val_losses": self.history, "best_step": self.best_step, "best_val_loss": self.best_loss}


__all__ = ["distill", "default_loss", "unshare_weights", "DEFAULT_POOLED_WEIGHT"]
