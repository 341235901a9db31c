"""Backward for custom ops by recomputing their differentiable reference implementation.

Why: fast kernels (routing, sparse blocks) are forward-only; fine-tuning still needs
gradients. Recomputing the reference under autograd gives exact gradients of the op's
definition, at the cost of one extra dense forward in training only.
"""
from __future__ import annotations

import torch


def register_recompute_autograd(op, reference) -> None:
    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        tensors = [t if isinstance(t, torch.Tensor) else None for t in inputs]
        ctx.tensor_positions = [i for i, t in enumerate(tensors) if t is not None]
        ctx.save_for_backward(*[tensors[i] for i in ctx.tensor_positions])

    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        args = list(ctx.inputs)
        wants = []
        for pos, t in zip(ctx.tensor_positions, saved):
            needs = ctx.needs_input_grad[pos] and (t.is_floating_point())
            leaf = t.detach().requires_grad_(needs)
            args[pos] = leaf
            if needs:
                wants.append((pos, leaf))
        grads = [None] * len(args)
        if wants:
            with torch.enable_grad():
                out = reference(*args)
                computed = torch.autograd.grad(out, [leaf for _, leaf in wants], grad_out, allow_unused=True)
            for (pos, _), g in zip(wants, computed):
                grads[pos] = g
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
