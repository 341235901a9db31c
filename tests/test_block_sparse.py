"""The block-sparse kernel against the op's masked dense reference (the definition)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moh_compile  # noqa: F401  (registers the op and its kernels)
from moh_compile.calibrate.sparse_profile import pattern_density
from moh_compile.kernels import block_sparse as bs
from moh_compile.kernels.block_sparse import sparse_attention_block, sparse_attention_core, sparse_attention_kernel
from moh_compile.ops.attention import attention_reference, merge_masks, window_mask, window_spans


def _ref(q, k, v, mask, sink, alpha, beta, two_sided, scale):
    pat = window_mask(q.shape[2], k.shape[2], sink, alpha, beta, two_sided)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(mask, pat), scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _qkv(b, h, h_kv, s, d, s_k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_k = s if s_k is None else s_k
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, h_kv, s_k, d, generator=g),
            torch.randn(b, h_kv, s_k, d, generator=g))


def _check(q, k, v, mask, sink, alpha, beta, two_sided, block=32):
    out = sparse_attention_core(q, k, v, mask, sink, alpha, beta, two_sided, 0.25, block=block)
    ref = _ref(q, k, v, mask, sink, alpha, beta, two_sided, 0.25)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_all_dense_heads_equal_sdpa():
    q, k, v = _qkv(2, 4, 4, 70, 16)
    causal = torch.ones(70, 70, dtype=torch.bool).tril()
    out = sparse_attention_core(q, k, v, causal, [0] * 4, [-1] * 4, [0.0] * 4, False, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.25)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "additive"])
def test_mixed_heads_masks(two_sided, mask_kind):
    b, h, h_kv, s = 2, 6, 3, 150  # S not a multiple of the block (32); GQA; batch 2
    q, k, v = _qkv(b, h, h_kv, s, 16)
    mask = None
    if mask_kind == "causal":
        mask = torch.ones(s, s, dtype=torch.bool).tril()
    elif mask_kind == "padding":
        mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
        mask[1, ..., :7] = False
        mask[0, ..., -3:] = False
    elif mask_kind == "additive":
        mask = torch.randn(b, h, s, s, generator=torch.Generator().manual_seed(1))
        mask[..., 5] = float("-inf")
    sink = [0, 1, 4, 2, 0, 3]
    alpha = [-1, 1, 20, 7, 64, 0]
    beta = [0.0, 0.0, 0.1, 0.0, 0.25, 0.5]
    _check(q, k, v, mask, sink, alpha, beta, two_sided)


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("sink", [0, 1, 2, 3, 4])
def test_sinks_and_all_spans(two_sided, sink):
    s = 24
    q, k, v = _qkv(1, s, s, s, 8, seed=sink)  # one head per span 1..S
    alpha = list(range(1, s + 1))
    assert window_spans(alpha, [0.0] * s, s) == alpha
    _check(q, k, v, None, [sink] * s, alpha, [0.0] * s, two_sided, block=10)


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_block_sizes(block):
    q, k, v = _qkv(1, 3, 1, 101, 8)
    causal = torch.ones(101, 101, dtype=torch.bool).tril()
    _check(q, k, v, causal, [2, 0, 64], [5, 30, 3], [0.0, 0.1, 0.0], False, block=block)


def test_more_keys_than_queries():
    q, k, v = _qkv(1, 2, 2, 40, 8, s_k=90)
    _check(q, k, v, None, [2, 0], [10, 4], [0.0, 0.1], False)
    _check(q, k, v, None, [2, 0], [10, 4], [0.0, 0.1], True)


def test_work_scales_with_pattern():
    """Scored (query, key) pairs per head = pattern size up to block rounding, never S x S."""
    s, blk = 1000, 50
    q, k, v = _qkv(1, 3, 3, s, 8)
    sink, alpha, beta = [4, 0, 0], [100, 10, -1], [0.0, 0.0, 0.0]
    stats: dict = {}
    sparse_attention_core(q, k, v, None, sink, alpha, beta, False, 0.25, block=blk, stats=stats)
    pat = window_mask(s, s, sink, alpha, beta, False)
    for hd in range(2):
        visible = int(pat[hd].sum())
        assert visible <= stats["pairs"][hd] <= visible + s * blk
        assert stats["pairs"][hd] < 0.2 * s * s
    assert stats["pairs"][2] == s * s  # dense head
    # the density helper agrees with the mask it summarises
    assert math.isclose(pattern_density(s, 4, 100, 0.0, False, False), pat[0].sum().item() / s**2)


def _op_operands(s: int, b: int = 1, dm: int = 32, h: int = 4, d: int = 8) -> tuple:
    """(x, W_q, b_q, k, v, mask, cos, sin, W_o, b_o) of the op: 4 query heads on 2 KV heads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, dm, generator=g)
    qw, ow = torch.randn(h * d, dm, generator=g), torch.randn(dm, h * d, generator=g)
    k, v = torch.randn(b, 2, s, d, generator=g), torch.randn(b, 2, s, d, generator=g)
    return (x, qw, None, k, v, None, None, None, ow, None)


WINDOW = ([1, 0, 2, 0], [4, -1, 3, 6], [0.0] * 4, False)


def test_kernel_applies_only_to_window_attributes():
    base = _op_operands(20)
    assert sparse_attention_kernel(*base, None, 0.3) is None
    gates = torch.ones(1, 20, 4)
    assert sparse_attention_kernel(*base, gates, 0.3, [1] * 4, [4] * 4, [0.0] * 4, False) is None
    out = sparse_attention_block(*base, None, 0.3, *WINDOW)
    ref = attention_reference(*base, None, 0.3, *WINDOW)
    assert (out - ref).abs().max().item() < 1e-5
    # 20 tokens: the bands cover nearly every key, the cost model leaves the call to the reference
    bs.STATS.update(calls=0, dense_calls=0)
    assert sparse_attention_kernel(*base, None, 0.3, *WINDOW) is None and bs.STATS["dense_calls"] == 1


def test_kernel_runs_where_cheaper_than_the_dense_masked_path():
    """1024 tokens, windows of 4-6 keys: the block kernel runs (through the op) and matches the reference."""
    args = (*_op_operands(1024), None, 0.3, *WINDOW)
    bs.STATS.update(calls=0, dense_calls=0)
    out = torch.ops.moh_compile.attention(*args)
    assert bs.STATS == {"calls": 1, "dense_calls": 0}
    assert (out - attention_reference(*args)).abs().max().item() < 1e-5


def test_large_window_masks_are_never_built():
    """4 heads x 8 dims at 4096 tokens with half-length windows: the cost model alone would pick the
    dense masked path, but its (B, H, S, S) mask would hold 67M elements, so the block kernel runs
    (memory scales with the pattern); with head gates too, the block-sparse path runs."""
    from moh_compile.kernels import routed_attention as ra

    window = ([1] * 4, [4] * 4, [0.5] * 4, False)
    base = _op_operands(4096)
    o_weight = base[8]
    assert not bs.window_masks_fit(1, 4, 4096, 4096)
    assert bs.sparse_row_cost(32, 32, 8, 4096, *window) > bs.dense_windowed_row_cost(32, 32, 4096)
    bs.STATS.update(calls=0, dense_calls=0)
    out = torch.ops.moh_compile.attention(*base, None, 0.3, *window)
    assert bs.STATS == {"calls": 1, "dense_calls": 0} and out.shape == (1, 4096, o_weight.shape[0])
    ra.STATS.reset()
    gates = (torch.rand(1, 4096, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    torch.ops.moh_compile.attention(*base, gates, 0.3, *window)
    assert (ra.STATS.sparse_calls, ra.STATS.calls, ra.STATS.dense_calls) == (1, 0, 0)


def test_invalid_settings():
    q, k, v = _qkv(1, 3, 2, 10, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sparse_attention_core(q, k, v, None, [0] * 3, [2] * 3, [0.0] * 3, False, 1.0)
    q, k, v = _qkv(1, 2, 2, 10, 8)
    with pytest.raises(ValueError, match="one entry per head"):
        sparse_attention_core(q, k, v, None, [0], [2], [0.0], False, 1.0)


# --- a small LLaMA-style decoder: RMSNorm, RoPE, GQA, SwiGLU, the attention op ------------

def _rope(s, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(s).float(), inv)
    ang = torch.cat([ang, ang], -1)
    return ang.cos()[None, None], ang.sin()[None, None]


def _decoder(x, layers, window, attn, cos, sin, mask):
    from moh_compile.ops.attention import rotate_half
    b, s, dm = x.shape
    for p in layers:
        hn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        d = p["d"]
        k = F.linear(hn, p["wk"]).view(b, s, -1, d).transpose(1, 2)
        v = F.linear(hn, p["wv"]).view(b, s, -1, d).transpose(1, 2)
        k = k * cos + rotate_half(k) * sin
        x = x + attn(hn, p["wq"], None, k, v, mask, cos, sin, p["wo"], None, None, d ** -0.5, *window)
        hn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = x + F.linear(F.silu(F.linear(hn, p["wg"])) * F.linear(hn, p["wu"]), p["wd"])
    return x


@pytest.mark.parametrize("s", [2048, pytest.param(8192, marks=pytest.mark.slow)])
def test_llama_style_decoder_long(s):
    g = torch.Generator().manual_seed(0)
    dm, h, h_kv, d = 64, 2, 1, 32

    def w(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    layers = [dict(d=d, wq=w(h * d, dm), wk=w(h_kv * d, dm), wv=w(h_kv * d, dm), wo=w(dm, h * d),
                   wg=w(128, dm), wu=w(128, dm), wd=w(dm, 128)) for _ in range(2)]
    x = torch.randn(1, s, dm, generator=g)
    cos, sin = _rope(s, d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    window = ([4, 0], [64, 16], [0.0, 0.05], False)  # head 0: 4 sinks + 64 keys; head 1: 16 + 5% of S
    out = _decoder(x, layers, window, torch.ops.moh_compile.attention, cos, sin, causal)
    ref = _decoder(x, layers, window, attention_reference, cos, sin, causal)
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    # and the pattern really changed the result (sparse != dense)
    dense = _decoder(x, layers, ([0, 0], [-1, -1], [0.0, 0.0], False), attention_reference, cos, sin, causal)
    assert (dense - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("two_sided", [False, True])
def test_causal_flag_equals_tril_mask(two_sided):
    s = 200
    q, k, v = _qkv(1, 4, 2, s, 16)
    sink, alpha, beta = [3, 0, 64, 1], [-1, 9, 4, 20], [0.0, 0.1, 0.0, 0.0]
    out = sparse_attention_core(q, k, v, None, sink, alpha, beta, two_sided, 0.25, block=32, causal=True)
    ref = _ref(q, k, v, torch.ones(s, s, dtype=torch.bool).tril(), sink, alpha, beta, two_sided, 0.25)
    assert (out - ref).abs().max().item() < 1e-5


def test_block_with_query_norm_matches_reference():
    """The op's windowed path with QK-norm (each query head RMS-normalised before RoPE)."""
    g = torch.Generator().manual_seed(4)
    b, s, h, h_kv, d, e = 2, 90, 4, 2, 16, 32
    x, wq, wo = torch.randn(b, s, e, generator=g), torch.randn(h * d, e, generator=g) * 0.3, torch.randn(e, h * d)
    k, v = torch.randn(b, h_kv, s, d, generator=g), torch.randn(b, h_kv, s, d, generator=g)
    ang = torch.arange(s).view(s, 1) * torch.linspace(0.05, 1.0, d // 2).repeat(2).view(1, d)
    cos, sin = ang.cos().view(1, 1, s, d), ang.sin().view(1, 1, s, d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    window = ([2, 0, 1, 4], [8, -1, 20, 5], [0.0, 0.0, 0.1, 0.0], False)
    norm = (torch.linspace(0.5, 1.5, d), 1e-6)
    args = (x, wq, None, k, v, causal, cos, sin, wo, None, None, 0.25, *window)
    out = sparse_attention_block(*args, *norm)
    assert (out - attention_reference(*args, *norm)).abs().max().item() < 1e-5
    assert (out - attention_reference(*args)).abs().max().item() > 1e-2
