"""Matching: find attention and FFN blocks in a captured graph, by structure only."""
from __future__ import annotations

import torch.fx as fx

from moh_compile.match import graph as g
from moh_compile.match.attention import AttentionMatch, find_attention
from moh_compile.match.blocks import AttentionBlock, FFNBlock, MatchResult, ProjectionInfo, Skipped
from moh_compile.match.ffn import FFNMatch, find_ffn


def _numel(node) -> int:
    v = g.val(node)
    return int(v.numel()) if v is not None else 0


def find_blocks(gm: fx.GraphModule) -> MatchResult:
    attn, skipped = find_attention(gm)
    claimed = set()
    for m in attn:
        claimed.update({m.q_proj.node, m.o_proj.node})
        m.block.params = sum(_numel(n) for n in (m.q_proj.weight, m.q_proj.bias, m.o_proj.weight, m.o_proj.bias)
                             if n is not None)
        for src in (m.k, m.v):
            lin = _kv_linear(src)
            if lin is not None and lin.node is not m.q_proj.node:
                claimed.add(lin.node)
                m.block.params += sum(_numel(n) for n in (lin.weight, lin.bias) if n is not None)
        if m.q_rows is not None and len(m.q_rows) != m.q_proj.out_features:  # fused qkv: count the whole weight once
            m.block.params = sum(_numel(n) for n in (m.q_proj.weight, m.q_proj.bias, m.o_proj.weight,
                                                     m.o_proj.bias) if n is not None)
    ffn, ffn_skipped = find_ffn(gm, claimed)
    for m in ffn:
        nodes = {m.fc_in.weight, m.fc_in.bias, m.fc_out.weight, m.fc_out.bias}
        if m.gate is not None:
            nodes |= {m.gate.weight, m.gate.bias}
        m.block.params = sum(_numel(n) for n in nodes if n is not None)
    return MatchResult(attention=attn, ffn=ffn, skipped=skipped + ffn_skipped)


def _kv_linear(node):
    from moh_compile.match.attention import _projection_of

    return _projection_of(node)


__all__ = ["find_blocks", "AttentionMatch", "FFNMatch", "AttentionBlock", "FFNBlock", "MatchResult",
           "ProjectionInfo", "Skipped"]
