"""CPU kernel for `moh_compile::attention` with `head_gates`: skips every (token, head) pair
whose gate is 0 (mixture-of-head attention).

Why this layout: each head is a small dense problem over the tokens that chose it. Per head
we gather those tokens (padded to one capacity so all heads run as single batched calls),
project only their queries with that head's rows of W_q, run SDPA on the gathered queries
against the full K/V, and project with that head's columns of W_o. The per-(token, head)
results are summed back per token, weighted by the gate, by one `embedding_bag` (a parallel
gather-reduce) instead of a serial scatter-add.

Imported for its side effect: `register_fast_kernel(routed_attention_cpu)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moh_compile.kernels.workspace import WORKSPACE, release_workspace  # noqa: F401 (re-exported)
from moh_compile.ops.attention import merge_masks, register_fast_kernel, rotate_half, window_mask


@dataclass
class KernelStats:
    """Counters that let tests prove work was skipped (rows actually computed)."""
    calls: int = 0
    active_pairs: int = 0   # (token, head) pairs with gate != 0 seen so far
    query_rows: int = 0     # query rows projected / attended, capacity padding included

    def reset(self) -> None:
        self.calls = self.active_pairs = self.query_rows = 0


STATS = KernelStats()

MASK_CHUNK_BYTES = 64 << 20   # gathered mask rows are built this many bytes at a time (heads loop)


_WS = WORKSPACE  # shared with the MoE++ kernel (kernels/workspace.py)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _routing_plan(gates: torch.Tensor):
    """Slot layout (H, B, C): which token each padded slot holds, and per-token bags of slots.

    Slots of head h, batch b are h*B*C + b*C + [0, count(b, h)); the rest is padding that
    computes on token 0 and is never read back.
    """
    b, s, h = gates.shape
    dev = gates.device
    active = gates != 0
    counts = active.sum(1)                                                # (B, H)
    cap = int(counts.max()) if counts.numel() else 0
    nz = active.reshape(-1).nonzero().squeeze(1)                             # token-major, heads ascending
    base = (torch.arange(h, device=dev).view(1, 1, h) * b + torch.arange(b, device=dev).view(b, 1, 1)) * cap - 1
    slot = active.cumsum(1).add_(base).reshape(-1).index_select(0, nz)       # flat slot id in (H, B, C)
    tok = torch.zeros(h * b * cap, dtype=torch.long, device=dev)
    tok.index_copy_(0, slot, nz.div(h, rounding_mode="floor").remainder_(s))
    offsets = active.sum(-1).reshape(-1).cumsum(0)
    offsets = torch.cat([offsets.new_zeros(1), offsets[:-1]])             # bag start per token
    return cap, tok.view(h, b, cap), slot, offsets, gates.reshape(-1).index_select(0, nz), nz.numel()


def _mask_rows(mask: torch.Tensor, tok: torch.Tensor, h0: int, h1: int, s: int, s_k: int) -> torch.Tensor:
    """Rows of a broadcastable mask for the gathered queries of heads h0:h1, as (B|1, G|1, C|1, S_k)."""
    m = _as_4d(mask)
    if m.shape[2] == 1:                                      # one row for every query: nothing to gather
        return m.expand(m.shape[0], m.shape[1], 1, s_k)[:, h0:h1] if m.shape[1] > 1 else m.expand(-1, -1, 1, s_k)
    m = m.expand(m.shape[0], m.shape[1], s, s_k)
    mb, mh = m.shape[0], m.shape[1]
    g, b, cap = h1 - h0, tok.shape[1], tok.shape[2]
    rows = tok[h0:h1]                                        # (G, B, C) query positions
    if mb > 1:
        rows = rows + torch.arange(b, device=tok.device).view(1, b, 1) * (mh * s)
    if mh > 1:
        rows = rows + torch.arange(h0, h1, device=tok.device).view(g, 1, 1) * s
    flat = m.reshape(mb * mh * s, s_k)                       # copies only if the mask was expanded
    return flat.index_select(0, rows.reshape(-1)).view(g, b, cap, s_k).transpose(0, 1)


def routed_attention_cpu(
    x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates, scale,
    window_sink=None, window_alpha=None, window_beta=None, window_two_sided=False,
):
    """The op with gate-0 (token, head) pairs skipped; None when it does not apply."""
    if head_gates is None or x.device.type != "cpu":
        return None
    heads = q_weight.shape[0] // k.shape[-1]
    if head_gates.shape != (x.shape[0], x.shape[1], heads):
        raise ValueError(f"head_gates must have shape (B, S, H) = {(x.shape[0], x.shape[1], heads)}, "
                         f"got {tuple(head_gates.shape)}")
    if rope_cos is not None and _as_4d(rope_cos).shape[1] != 1:
        return None
    return _routed(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates,
                   scale, window_sink, window_alpha, window_beta, window_two_sided)


def _routed(x, q_weight, q_bias, k, v, attn_mask, rope_cos, rope_sin, o_weight, o_bias, head_gates, scale,
            window_sink, window_alpha, window_beta, window_two_sided):
    b, s, e = x.shape
    d = k.shape[-1]
    h = q_weight.shape[0] // d
    s_k = k.shape[2]
    e_out = o_weight.shape[0]
    cap, tok, slot, offsets, weights, n_active = _routing_plan(head_gates)
    STATS.calls += 1
    STATS.active_pairs += n_active
    STATS.query_rows += h * b * cap
    if cap == 0:
        out = x.new_zeros(b, s, e_out)
        return out + o_bias if o_bias is not None else out
    n_slots = h * b * cap
    rows = (tok + torch.arange(b, device=x.device).view(1, b, 1) * s).view(-1)     # slot -> row of x (B*S)

    # Q projection of the chosen tokens only: head h uses rows h*D:(h+1)*D of W_q.
    ws = _WS.take(n_slots * max(e, e_out), x.dtype, x.device)
    xg = torch.index_select(x.reshape(b * s, e), 0, rows, out=ws[: n_slots * e].view(n_slots, e))
    xg = xg.view(h, b * cap, e)
    w_q = q_weight.reshape(h, d, e).transpose(1, 2)                                   # (H, E, D)
    q = torch.baddbmm(q_bias.reshape(h, 1, d), xg, w_q) if q_bias is not None else torch.bmm(xg, w_q)
    if rope_cos is not None:
        cos = _as_4d(rope_cos).expand(b, 1, s, d).reshape(b * s, d).index_select(0, rows).view(h, b * cap, d)
        sin = _as_4d(rope_sin).expand(b, 1, s, d).reshape(b * s, d).index_select(0, rows).view(h, b * cap, d)
        q = q * cos + rotate_half(q) * sin
    q = q.view(h, b, cap, d).transpose(0, 1)                                       # (B, H, C, D)

    # Attention core on the gathered queries against every key (GQA: kv head = h // (H / Hkv)).
    mask = attn_mask
    if window_sink is not None:
        mask = merge_masks(attn_mask, window_mask(s, s_k, window_sink, window_alpha, window_beta,
                                                  window_two_sided, x.device))
    gqa = k.shape[1] != h
    if mask is None:
        ctx = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        ctx = torch.empty_like(q)
        row_bytes = b * cap * s_k * mask.element_size()
        step = max(1, min(h, MASK_CHUNK_BYTES // max(1, row_bytes)))
        group = h // k.shape[1]
        for h0 in range(0, h, step):                          # bounded gathered-mask memory
            h1 = min(h, h0 + step)
            kv0, kv1 = h0 // group, (h1 - 1) // group + 1
            kk, vv = k[:, kv0:kv1], v[:, kv0:kv1]
            qq = q[:, h0:h1]
            if gqa and (h0 % group or h1 % group):            # chunk splits a kv group: repeat explicitly
                idx = torch.arange(h0, h1, device=x.device) // group - kv0
                kk, vv = kk.index_select(1, idx), vv.index_select(1, idx)
            ctx[:, h0:h1] = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=_mask_rows(mask, tok, h0, h1, s, s_k), scale=scale,
                enable_gqa=kk.shape[1] != qq.shape[1])
    ctx = ctx.transpose(0, 1).reshape(h, b * cap, d)

    # Output projection per head (columns h*D:(h+1)*D of W_o), then a gate-weighted sum per token.
    w_o = o_weight.reshape(e_out, h, d).permute(1, 2, 0)                               # (H, D, E_out)
    contrib = torch.bmm(ctx, w_o, out=ws[: n_slots * e_out].view(h, b * cap, e_out))
    out = F.embedding_bag(slot, contrib.view(n_slots, e_out), offsets, mode="sum",
                          per_sample_weights=weights.to(contrib.dtype))
    if o_bias is not None:
        out.add_(o_bias)
    return out.view(b, s, e_out)


register_fast_kernel(routed_attention_cpu)
