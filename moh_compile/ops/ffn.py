"""`moh_compile::ffn`: a dense feed-forward block, plain or gated, as one op.

Weights use the nn.Linear convention (out_features, in_features):
    plain:  y = act(x W_in^T + b_in) W_out^T + b_out
    gated:  y = (act(x W_gate^T + b_gate) * (x W_in^T + b_in)) W_out^T + b_out
This is the identity setting of the MoE++ pass: the MoE++ op with every FFN expert active
and no zero-computation expert chosen reduces to exactly this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moh_compile.ops.activations import apply_activation
from moh_compile.ops.recompute import register_recompute_autograd


def ffn_reference(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation: str):
    hidden = F.linear(x, w_in, b_in)
    if w_gate is not None:
        hidden = apply_activation(activation, F.linear(x, w_gate, b_gate)) * hidden
    else:
        hidden = apply_activation(activation, hidden)
    return F.linear(hidden, w_out, b_out)


@torch.library.custom_op("moh_compile::ffn", mutates_args=())
def ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return ffn_reference(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation)


@ffn.register_fake
def _ffn_fake(x, w_in, b_in, w_out, b_out, w_gate, b_gate, activation):
    return x.new_empty((*x.shape[:-1], w_out.shape[0]))


register_recompute_autograd(ffn, ffn_reference)
