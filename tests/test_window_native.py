"""The C sink + window attention kernel (kernels/window_native.py) against the masked dense
reference (the definition), the choice between it and the PyTorch block kernel, and its work."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moh_compile  # noqa: F401  (registers the op and its kernels)
from moh_compile.kernels import block_sparse as bs
from moh_compile.kernels import window_native
from moh_compile.ops.attention import merge_masks, window_mask, window_spans

pytestmark = pytest.mark.skipif(not window_native.available(), reason="no C compiler here: the block kernel runs")


def _qkv(b, h, h_kv, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, h_kv, s, d, generator=g),
            torch.randn(b, h_kv, s, d, generator=g))


def _ref(q, k, v, sink, alpha, beta, two_sided, causal, scale=0.25):
    s = q.shape[2]
    pat = window_mask(s, s, sink, alpha, beta, two_sided)
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(mask, pat), scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 48, 64])
def test_matches_the_masked_reference(two_sided, causal, d):
    b, h, h_kv, s = 2, 6, 3, 123  # S not a multiple of the 8-row tile; GQA; batch 2
    q, k, v = _qkv(b, h, h_kv, s, d)
    sink, alpha, beta = [0, 1, 13, 2, 0, 200], [1, 9, 20, 7, 64, 3], [0.0, 0.0, 0.1, 0.0, 0.25, 0.5]
    spans = window_spans(alpha, beta, s)
    out = torch.full_like(q, float("nan"))
    window_native.window_attention(q, k, v, out, spans, sink, two_sided, causal, 0.25)
    assert (out - _ref(q, k, v, sink, alpha, beta, two_sided, causal)).abs().max().item() < 1e-5


@pytest.mark.parametrize("two_sided", [False, True])
def test_every_span_and_sink_count(two_sided):
    s = 40
    q, k, v = _qkv(1, s, 1, s, 16, seed=3)  # one head per span 1..S, sinks 0..39, one shared KV head
    alpha, sink = list(range(1, s + 1)), [(7 * i) % s for i in range(s)]
    out = torch.empty_like(q)
    window_native.window_attention(q, k, v, out, alpha, sink, two_sided, True, 0.25)
    assert (out - _ref(q, k, v, sink, alpha, [0.0] * s, two_sided, True)).abs().max().item() < 1e-5


def test_dense_heads_are_left_to_the_caller_and_the_core_fills_them():
    q, k, v = _qkv(1, 4, 2, 70, 32)
    sink, alpha, beta = [2, 0, 0, 5], [-1, 10, -1, 3], [0.0] * 4
    out = torch.zeros_like(q)
    pairs = window_native.window_attention(q, k, v, out, window_spans(alpha, beta, 70), sink, False, True, 0.25)
    assert pairs[0] == pairs[2] == 0 and out[:, [0, 2]].abs().max() == 0
    core = bs.sparse_attention_core(q, k, v, None, sink, alpha, beta, False, 0.25, causal=True)
    assert (core - _ref(q, k, v, sink, alpha, beta, False, True)).abs().max().item() < 1e-5


def test_core_takes_the_c_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = window_native.window_attention
    monkeypatch.setattr(window_native, "window_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2, 4, 2, 90, 16)
    sink, alpha, beta = [3, 0, 1, 0], [5, 30, 12, 2], [0.0] * 4
    causal = torch.ones(90, 90, dtype=torch.bool).tril()
    ref = _ref(q, k, v, sink, alpha, beta, False, True)
    # an exact causal mask tensor (what captured decoders carry) is turned into the causal flag
    assert (bs.sparse_attention_core(q, k, v, causal, sink, alpha, beta, False, 0.25) - ref).abs().max() < 1e-5
    assert len(calls) == 1
    # padding AND causal (one (S, S) mask per batch row), float64 or an 8-wide head: the block kernel
    pad = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    pad[1, ..., :5] = False
    out = bs.sparse_attention_core(q, k, v, pad & causal, sink, alpha, beta, False, 0.25)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=merge_masks(
        pad & causal, window_mask(90, 90, sink, alpha, beta, False)), scale=0.25, enable_gqa=True)).abs().max() < 1e-5
    bs.sparse_attention_core(q.double(), k.double(), v.double(), None, sink, alpha, beta, False, 0.25, causal=True)
    bs.sparse_attention_core(q[..., :8], k[..., :8], v[..., :8], None, sink, alpha, beta, False, 0.25, causal=True)
    assert len(calls) == 1


def test_without_the_library_the_block_kernel_gives_the_same_result(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 150, 64)
    sink, alpha, beta = [4, 0, 2, 0], [20, 7, 64, -1], [0.0, 0.1, 0.0, 0.0]
    native = bs.sparse_attention_core(q, k, v, None, sink, alpha, beta, True, 0.25)
    monkeypatch.setattr(window_native, "_library", lambda: None)
    assert not window_native.available()
    block = bs.sparse_attention_core(q, k, v, None, sink, alpha, beta, True, 0.25)
    assert (native - block).abs().max().item() < 1e-5


def test_work_follows_the_pattern():
    """Scores computed per head = the pattern plus at most 7 keys per row (the tile's union of
    windows), never S x S."""
    s = 1000
    q, k, v = _qkv(1, 3, 3, s, 16)
    sink, alpha, beta = [4, 0, 0], [100, 10, -1], [0.0] * 3
    stats: dict = {}
    bs.sparse_attention_core(q, k, v, None, sink, alpha, beta, False, 0.25, stats=stats, causal=True)
    pat = window_mask(s, s, sink, alpha, beta, False) & torch.ones(s, s, dtype=torch.bool).tril()
    for hd in range(2):
        visible = int(pat[hd].sum())
        assert visible <= stats["pairs"][hd] <= visible + 7 * s + 8 * sink[hd]
    assert stats["pairs"][2] == s * s  # the dense head (SDPA, counted as the full square)


def test_cost_model_sends_short_inputs_to_the_c_kernel_where_it_wins():
    """32 x 128 tokens, 32-dim heads, two-sided spans of 32 (MiniLM-like): the block kernel's cost
    predicts it slower than the dense masked path (measured 1.38x slower), the C kernel's predicts
    it faster (measured 0.65x of dense; docs/sparse.md), so the op now takes the sparse path."""
    from moh_compile.ops.attention import attention_reference

    g = torch.Generator().manual_seed(0)
    b, s, dm, h, d = 4, 128, 64, 4, 32
    x = torch.randn(b, s, dm, generator=g)
    qw, ow = torch.randn(h * d, dm, generator=g) * 0.2, torch.randn(dm, h * d, generator=g) * 0.2
    k, v = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    window = ([1] * h, [32] * h, [0.0] * h, True)
    assert bs.sparse_row_cost(dm, dm, d, s, *window) > bs.dense_windowed_row_cost(dm, dm, s)
    assert bs.sparse_row_cost(dm, dm, d, s, *window, native=True) < bs.dense_windowed_row_cost(dm, dm, s)
    args = (x, qw, None, k, v, None, None, None, ow, None, None, d ** -0.5, *window)
    bs.STATS.update(calls=0, dense_calls=0)
    out = torch.ops.moh_compile.attention(*args)
    assert bs.STATS == {"calls": 1, "dense_calls": 0}
    assert (out - attention_reference(*args)).abs().max().item() < 1e-4
    # padding keys: the C kernel takes them too; an additive mask goes to the block kernel, whose
    # cost keeps the dense path here
    pad = torch.ones(b, 1, 1, s, dtype=torch.bool)
    pad[0, ..., -9:] = False
    assert bs.native_runs(x, k, v, pad, d ** -0.5)
    assert bs.native_runs(x, k, v, torch.ones(s, s, dtype=torch.bool).tril(), d ** -0.5)
    padded = (x, qw, None, k, v, pad, None, None, ow, None, None, d ** -0.5, *window)
    bs.STATS.update(calls=0, dense_calls=0)
    assert (torch.ops.moh_compile.attention(*padded) - attention_reference(*padded)).abs().max().item() < 1e-4
    assert bs.STATS == {"calls": 1, "dense_calls": 0}
    additive = torch.zeros(b, 1, s, s).masked_fill(torch.rand(b, 1, s, s, generator=g) < 0.1, float("-inf"))
    assert not bs.native_runs(x, k, v, additive, d ** -0.5)
    bs.STATS.update(calls=0, dense_calls=0)
    torch.ops.moh_compile.attention(x, qw, None, k, v, additive, None, None, ow, None, None, d ** -0.5, *window)
    assert bs.STATS == {"calls": 0, "dense_calls": 1}


def test_routed_rows_only_the_chosen_rows_are_computed():
    """MoH + windows: with a (B, H, S) row selection the kernel computes those rows exactly, leaves
    the others untouched, and scores about the chosen fraction of the pairs."""
    b, h, h_kv, s, d = 2, 4, 2, 301, 32
    q, k, v = _qkv(b, h, h_kv, s, d, seed=5)
    sink, alpha, beta = [3, 0, 1, 9], [40, 7, 100, 12], [0.0] * 4
    spans = window_spans(alpha, beta, s)
    rows = torch.rand(b, h, s, generator=torch.Generator().manual_seed(1)) < 0.5
    rows[1, 2] = False  # a (b, h) with no row chosen
    out = torch.full_like(q, 7.0)
    pairs = window_native.window_attention(q, k, v, out, spans, sink, False, True, 0.25, rows)
    ref = _ref(q, k, v, sink, alpha, beta, False, True)
    m = rows.unsqueeze(-1)
    assert (torch.where(m, out - ref, 0.0)).abs().max().item() < 1e-5
    assert bool((out[~rows] == 7.0).all())
    full = window_native.window_attention(q, k, v, torch.empty_like(q), spans, sink, False, True, 0.25)
    for x in range(h):
        assert pairs[x] < 0.75 * full[x]
    assert window_native.window_attention(q, k, v, out, spans, sink, False, True, 0.25,
                                          torch.zeros_like(rows)) == [0] * h


def test_gated_block_skips_gate0_rows_and_matches_the_reference():
    from moh_compile.kernels.block_sparse import sparse_attention_block
    from moh_compile.ops.attention import attention_reference

    g = torch.Generator().manual_seed(2)
    b, s, dm, h, d = 2, 200, 64, 4, 16
    x = torch.randn(b, s, dm, generator=g)
    qw, ow = torch.randn(h * d, dm, generator=g) * 0.2, torch.randn(dm, h * d, generator=g) * 0.2
    k, v = torch.randn(b, 2, s, d, generator=g), torch.randn(b, 2, s, d, generator=g)
    gates = (torch.rand(b, s, h, generator=g) < 0.5).float() * torch.rand(b, s, h, generator=g)
    window = ([2, 0, 1, 0], [30, 8, 50, -1], [0.0] * 4, False)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    args = (x, qw, None, k, v, causal, None, None, ow, None, gates, d ** -0.5, *window)
    assert (sparse_attention_block(*args) - attention_reference(*args)).abs().max().item() < 1e-5
    # the cost model counts only the kept rows where the C kernel runs
    full = bs.sparse_row_cost(dm, dm, d, s, *window, native=True)
    half = bs.sparse_row_cost(dm, dm, d, s, *window, native=True, row_fraction=0.5)
    assert half < full and bs.sparse_row_cost(dm, dm, d, s, *window, row_fraction=0.5) == bs.sparse_row_cost(
        dm, dm, d, s, *window)


@pytest.mark.parametrize("heads_in_mask", [1, 4])
@pytest.mark.parametrize("two_sided", [False, True])
def test_padding_keys(heads_in_mask, two_sided):
    """A key-padding mask (B or 1, H or 1, 1, S), as simplify_mask leaves HF's padding masks: no row
    attends a padding key; a row whose visible keys are all padding gets 0, as in the core's
    block path; the routed-row selection composes with it."""
    b, h, s, d = 3, 4, 70, 32
    q, k, v = _qkv(b, h, 2, s, d, seed=9)
    sink, alpha, beta = [2, 0, 1, 0], [9, 4, 30, 1], [0.0] * 4
    pad = torch.ones(b, heads_in_mask, 1, s, dtype=torch.bool)
    pad[1, ..., 50:] = False          # right padding
    pad[2, ..., :11] = False          # left padding: the sinks and the first windows see only padding
    if heads_in_mask > 1:
        pad[0, 2, :, 30:40] = False   # one head's own key mask
    out = torch.empty_like(q)
    window_native.window_attention(q, k, v, out, window_spans(alpha, beta, s), sink, two_sided, False, 0.25,
                                   key_mask=pad)
    block = bs.sparse_attention_core(q, k, v, pad, sink, alpha, beta, two_sided, 0.25, native=False)
    assert (out - block).abs().max().item() < 1e-5
    assert (bs.sparse_attention_core(q, k, v, pad, sink, alpha, beta, two_sided, 0.25) - block).abs().max() < 1e-5
    visible = window_mask(s, s, sink, alpha, beta, two_sided) & pad
    keyless = ~visible.any(-1)  # (B, H, S) rows with no key left
    assert bool(keyless.any()) and out[keyless.expand(b, h, s)].abs().max() == 0
    seen = ~keyless.expand(b, h, s)
    ref = _ref(q, k, v, sink, alpha, beta, two_sided, False)  # unpadded: must differ where padding bites
    assert (out - ref)[seen].abs().max() > 1e-3
    rows = torch.rand(b, h, s, generator=torch.Generator().manual_seed(3)) < 0.5
    routed = torch.zeros_like(q)
    window_native.window_attention(q, k, v, routed, window_spans(alpha, beta, s), sink, two_sided, False, 0.25,
                                   rows, pad)
    assert (torch.where(rows.unsqueeze(-1), routed - out, 0.0)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="key_mask must be bool"):
        window_native.window_attention(q, k, v, out, window_spans(alpha, beta, s), sink, False, False, 0.25,
                                       key_mask=pad.float())


def test_scratch_allocation_failure_raises(monkeypatch):
    """A thread that cannot allocate its scratch makes the call fail loudly, not return unwritten
    rows. Mocked library (an allocation failure cannot be provoked safely here)."""
    class NoMemory:
        @staticmethod
        def window_attention(*args):
            return 1

    monkeypatch.setattr(window_native, "_library", lambda: NoMemory)
    q, k, v = _qkv(1, 2, 2, 20, 16)
    with pytest.raises(MemoryError, match="scratch"):
        window_native.window_attention(q, k, v, torch.empty_like(q), [4, 4], [0, 0], False, True, 0.25)
