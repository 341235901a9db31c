"""FLOP counts (multiply-adds x 2) per block, so every report and benchmark shows the ideal
speedup of a configuration next to the measured one."""
from __future__ import annotations


def attention_flops(
    batch: int,
    seq: int,
    d_in: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    d_out: int | None = None,
    active_heads: float = 1.0,
    kv_len: int | None = None,
    density: float = 1.0,
    q_proj_rows: float | None = None,
    v_head_dim: int | None = None,
) -> dict[str, float]:
    """FLOPs of one attention block (projections + core).

    active_heads: average number of heads a token uses as a fraction of `heads` (MoH);
    density: average fraction of keys each query sees (sparse patterns).
    K and V projections stay dense: every head's keys are needed by some token.
    q_proj_rows: the Q projection computed, as a fraction of its rows (default active_heads; see
    `block_attention_flops` for when it differs).
    v_head_dim: the values' head dim where it differs from the queries' and keys' (DeepSeek's MLA).
    """
    d_out = d_in if d_out is None else d_out
    kv_len = seq if kv_len is None else kv_len
    dv = head_dim if v_head_dim is None else v_head_dim
    tokens = batch * seq
    q_proj = 2 * tokens * d_in * heads * head_dim * (active_heads if q_proj_rows is None else q_proj_rows)
    kv_proj = 2 * tokens * d_in * kv_heads * (head_dim + dv)
    core = 2 * tokens * kv_len * heads * (head_dim + dv) * active_heads * density
    o_proj = 2 * tokens * heads * dv * d_out * active_heads
    return {"q_proj": q_proj, "kv_proj": kv_proj, "core": core, "o_proj": o_proj,
            "total": q_proj + kv_proj + core + o_proj}


def block_attention_flops(block, seq: int, rewritten: bool = False, active_heads: float = 1.0,
                          **kwargs) -> dict[str, float]:
    """`attention_flops` of one matched block (an `AttentionBlock`) for one sequence of `seq` tokens,
    as the model has it or (`rewritten`) as the op runs it. The op's Q projection skips unchosen
    heads, except where the graph computes the queries anyway: all of them when it keeps the
    query path ("query from graph"), and on top of the op's own rows when the query rows are part
    of a fused projection whose K/V (or gate) rows the graph still needs, unless the compile
    narrowed that projection to the rows read (`block.q.narrowed`, the default)."""
    q_rows = active_heads
    if rewritten and block.query_from_graph:
        q_rows = 1.0
    elif rewritten and block.q.fused and not block.q.narrowed:
        q_rows = 1.0 + active_heads
    return attention_flops(1, seq, block.d_model, block.num_heads, block.num_kv_heads, block.head_dim, block.d_out,
                           active_heads=active_heads, q_proj_rows=q_rows, v_head_dim=block.v_head_dim, **kwargs)


def ffn_flops(tokens: int, d_in: int, d_hidden: int, d_out: int | None = None,
              gated: bool = False, keep: float = 1.0) -> dict[str, float]:
    """FLOPs of one FFN block; `keep` is the fraction of hidden neurons computed (MoE++)."""
    d_out = d_in if d_out is None else d_out
    fc_in = 2 * tokens * d_in * d_hidden * keep * (2 if gated else 1)
    fc_out = 2 * tokens * d_hidden * d_out * keep
    return {"fc_in": fc_in, "fc_out": fc_out, "total": fc_in + fc_out}
