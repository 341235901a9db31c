"""The routed (MoH) CPU kernel against the dense masked reference of `moh_compile::attention`."""
from __future__ import annotations

import pytest
import torch
import torch.utils.flop_counter as flop_counter

import moh_compile  # noqa: F401
from moh_compile.flops import attention_flops
from moh_compile.kernels import routed_attention as ra
from moh_compile.ops.attention import attention_reference, simplify_mask

OP = torch.ops.moh_compile.attention


def make_gates(kind: str, b: int, s: int, h: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "topk":
        idx = torch.rand(b, s, h, generator=gen).topk(max(1, h // 3), -1).indices
        return torch.zeros(b, s, h).scatter_(-1, idx, 1.0)
    if kind == "random":
        return (torch.rand(b, s, h, generator=gen) < 0.4).float()
    if kind == "fractional":
        keep = torch.rand(b, s, h, generator=gen) < 0.6
        return torch.rand(b, s, h, generator=gen) * keep
    if kind == "all_on":
        return torch.ones(b, s, h)
    if kind == "all_off":
        return torch.zeros(b, s, h)
    if kind == "one_head":
        g = torch.zeros(b, s, h)
        g[..., h // 2] = 1.0
        return g
    raise AssertionError(kind)


def make_mask(kind: str, b: int, h: int, s: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(s, s, dtype=torch.bool).tril()
    if kind == "padding":      # (B, 1, 1, S_k), key 0 always visible so no row is fully masked
        m = torch.rand(b, 1, 1, s, generator=gen) < 0.7
        m[..., 0] = True
        return m
    if kind == "additive":     # (B, 1, S, S_k) float
        return torch.randn(b, 1, s, s, generator=gen)
    if kind == "per_head":     # (B, H, S, S_k) bool, diagonal kept
        m = torch.rand(b, h, s, s, generator=gen) < 0.5
        return m | torch.eye(s, dtype=torch.bool)
    raise AssertionError(kind)


def make_args(b=2, s=9, h=4, hkv=4, d=8, e=20, e_out=None, bias=True, rope=False, mask="none", gates="topk",
              seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    e_out = e if e_out is None else e_out
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x, wq, k, v, wo = r(b, s, e), r(h * d, e) * 0.3, r(b, hkv, s, d), r(b, hkv, s, d), r(e_out, h * d) * 0.3
    bq, bo = (r(h * d), r(e_out)) if bias else (None, None)
    cos = sin = None
    if rope:
        ang = torch.arange(s).view(s, 1) * torch.linspace(0.05, 1.0, d // 2).repeat(2).view(1, d)
        cos, sin = ang.cos().view(1, 1, s, d), ang.sin().view(1, 1, s, d)
    m = make_mask(mask, b, h, s, gen)
    g = make_gates(gates, b, s, h, gen)
    args = [x, wq, bq, k, v, m, cos, sin, wo, bo, g, d ** -0.5]
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def max_diff(args, **window):
    ref = attention_reference(*args, **window)
    out = ra.routed_attention_cpu(*args, **window)
    assert out is not None and out.shape == ref.shape and out.dtype == ref.dtype
    return (out.float() - ref.float()).abs().max().item()


@pytest.mark.parametrize("gates", ["topk", "random", "fractional", "all_on", "all_off", "one_head"])
@pytest.mark.parametrize("mask", ["none", "causal", "padding", "additive", "per_head"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
def test_matches_reference_masks_gates_gqa(gates, mask, heads):
    args = make_args(b=3, s=13, h=heads[0], hkv=heads[1], mask=mask, gates=gates, seed=len(gates) + len(mask))
    assert max_diff(args) <= 1e-5


@pytest.mark.parametrize("tile", [1, 4, 5, 64])
@pytest.mark.parametrize("gates", ["topk", "random", "all_on", "one_head"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_causal_tiles_match_the_reference(tile, gates, heads, monkeypatch):
    """Causal masks run tile by tile of positions (keys before the tile unmasked, the tile's own
    masked, merged by log-sum-exp): exact for any tile width, including tiles no token of a head
    chose and a last tile shorter than the others; keys after a row's tile are never computed."""
    monkeypatch.setattr(ra, "CAUSAL_TILE", tile)
    args = make_args(b=3, s=13, h=heads[0], hkv=heads[1], mask="causal", gates=gates, rope=True, seed=tile)
    plan = ra.routing_plan(args[10], ra.causal_tile(ra.is_causal_mask(args[5], 13, 13), args[3], args[4], 0.0, None))
    assert plan.tile == tile and all(len(c) == -(-13 // tile) for c in plan.tile_caps)
    calls = []  # (keys, mask given) of every flash call
    real = ra.flash_with_lse
    monkeypatch.setattr(ra, "flash_with_lse", lambda q, k, *a, **kw: calls.append((k.shape[2], a[1] is not None))
                        or real(q, k, *a, **kw))
    assert max_diff(args) <= 1e-5
    if tile < 13:  # no call reads every key; only a tile's own keys carry a mask
        assert max(n for n, _ in calls) < 13 and all(n <= tile for n, masked in calls if masked)
    assert ra.causal_keys_per_row(13, tile) <= 13


def test_causal_tiles_make_the_kernel_worth_running_on_long_causal_inputs():
    """The cost model with tiles: 6 of 12 heads at 2048 causal tokens go to the kernel (measured
    1.12-1.17x over dense, bench_moh.py --causal); with the gathered full-width mask they did not
    (measured 0.71x); 9 of 12 heads stay dense (measured 0.90-0.98x)."""
    assert ra.routing_speedup(0.58, 768, 768, 64, 2048, True, ra.CAUSAL_TILE) > 1.1
    assert ra.routing_speedup(0.58, 768, 768, 64, 2048, True) < 1.0
    assert ra.routing_speedup(0.81, 768, 768, 64, 2048, True, ra.CAUSAL_TILE) < 1.0


def test_causal_tiles_are_not_used_for_other_masks():
    args = make_args(b=2, s=9, mask="padding")
    assert not ra.is_causal_mask(args[5], 9, 9)
    assert ra.causal_tile(False, args[3], args[4], 0.0, None) is None
    args = make_args(b=2, s=9, mask="causal")
    assert ra.is_causal_mask(args[5], 9, 9)
    assert ra.causal_tile(True, args[3], args[4], 0.0, None) == ra.CAUSAL_TILE
    assert ra.causal_tile(True, args[3], args[4], 30.0, None) is None  # soft-capped scores


@pytest.mark.parametrize("s", [1, 2, 7, 33, 70])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("bias,rope", [(True, True), (False, True), (False, False)])
def test_matches_reference_shapes_bias_rope(s, b, bias, rope):
    args = make_args(b=b, s=s, h=8, hkv=2, d=16, e=40, e_out=24, bias=bias, rope=rope, mask="causal",
                     gates="random", seed=s * 10 + b)
    assert max_diff(args) <= 1e-5


def test_rope_per_batch_cos_sin():
    args = make_args(b=3, s=11, rope=True, gates="fractional")
    gen = torch.Generator().manual_seed(5)
    args[6] = torch.rand(3, 1, 11, 8, generator=gen)
    args[7] = torch.rand(3, 1, 11, 8, generator=gen)
    assert max_diff(args) <= 1e-5


@pytest.mark.parametrize("two_sided", [False, True])
def test_window_attributes_with_gates(two_sided):
    args = make_args(b=2, s=24, h=4, hkv=2, mask="padding", gates="random")
    window = dict(window_sink=[0, 2, 1, 0], window_alpha=[-1, 3, 2, 4], window_beta=[0.0, 0.1, 0.0, 0.2],
                  window_two_sided=two_sided)
    assert max_diff(args, **window) <= 1e-5


def test_tokens_without_heads_give_output_bias():
    args = make_args(b=2, s=6, gates="random")
    args[10][1, 2] = 0.0
    args[10][0, :] = 0.0
    out = ra.routed_attention_cpu(*args)
    assert torch.equal(out[1, 2], args[9])
    assert torch.equal(out[0], args[9].expand(6, -1))
    args[9] = None
    assert torch.equal(ra.routed_attention_cpu(*args)[0], torch.zeros(6, 20))


def test_bfloat16_error_is_within_reference_rounding():
    args = make_args(b=2, s=40, h=8, hkv=2, d=16, e=64, rope=True, mask="causal", gates="fractional",
                     dtype=torch.bfloat16)
    exact = attention_reference(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                  for a in args])
    ref_err = (attention_reference(*args).float() - exact).abs().max().item()
    out = ra.routed_attention_cpu(*args)
    assert out.dtype == torch.bfloat16
    err = (out.float() - exact).abs().max().item()
    assert 0 < ref_err and err <= 2 * ref_err


def test_not_applicable_returns_none():
    args = make_args()
    args[10] = None
    assert ra.routed_attention_cpu(*args) is None


def test_bad_gate_shape_raises():
    args = make_args(b=2, s=5, h=4)
    args[10] = torch.ones(2, 5, 3)
    with pytest.raises(ValueError, match="head_gates"):
        ra.routed_attention_cpu(*args)


@pytest.fixture
def always_route(monkeypatch):
    """Make the op's cost model pick the kernel whatever the shapes (tiny test shapes would
    rightly go to the dense path)."""
    monkeypatch.setattr(ra, "ROW_COST_PROJ_D", 0.0)
    monkeypatch.setattr(ra, "ROW_COST_CORE", 0.0)


def test_op_dispatches_to_kernel_where_predicted_faster():
    # 4 heads x 64 dims, one head per token: the kernel computes ~1/4 of the rows
    args = make_args(b=2, s=64, h=4, hkv=2, d=64, e=256, rope=True, mask="causal", gates="all_off")
    args[10] = torch.nn.functional.one_hot(torch.arange(2 * 64).view(2, 64) % 4, 4).float()
    ra.STATS.reset()
    out = OP(*args)
    assert (ra.STATS.calls, ra.STATS.dense_calls) == (1, 0)
    assert torch.equal(out, ra.routed_attention_cpu(*args))
    assert (out - attention_reference(*args)).abs().max().item() <= 1e-5
    args[10] = None
    ra.STATS.reset()
    OP(*args)
    assert (ra.STATS.calls, ra.STATS.dense_calls) == (0, 0)      # head_gates=None: the reference


@pytest.mark.parametrize("gates", ["all_on", "topk"])
def test_op_takes_the_dense_path_where_the_kernel_would_be_slower(gates):
    """Every row active (nothing to skip), or 8-dim heads (per-head GEMMs far below dense speed):
    the op runs the dense masked reference, whose output it returns unchanged."""
    args = make_args(b=2, s=10, h=8, hkv=2, d=8, rope=True, mask="causal", gates=gates)
    ra.STATS.reset()
    out = OP(*args)
    assert (ra.STATS.calls, ra.STATS.dense_calls) == (0, 1)
    assert torch.equal(out, attention_reference(*args))


def test_windows_with_gates_pick_the_cheapest_of_three_paths():
    """moh+sparse: at 2048 tokens with local windows the block-sparse kernel over every row (gates
    applied after) is predicted cheapest and runs; at 16 tokens it is not. Same output either way."""
    window = dict(window_sink=[1, 0, 1, 1], window_alpha=[64, -1, 32, 64], window_beta=[0.0, 0.0, 0.0, 0.0],
                  window_two_sided=True)
    for s, sparse_calls in ((2048, 1), (16, 0)):
        args = make_args(b=1, s=s, h=4, d=32, e=128, gates="random", mask="padding")
        ra.STATS.reset()
        out = OP(*args, **window)
        assert ra.STATS.sparse_calls == sparse_calls
        assert ra.STATS.calls + ra.STATS.dense_calls + ra.STATS.sparse_calls == 1
        assert (out - attention_reference(*args, **window)).abs().max().item() <= 1e-5


def test_sparse_row_cost():
    from moh_compile.kernels.block_sparse import sparse_row_cost
    dense = sparse_row_cost(384, 384, 32, 512, [0] * 4, [-1] * 4, [0.0] * 4, True)
    assert dense == 384 + 384 + 2 * 512
    narrow = sparse_row_cost(384, 384, 32, 8192, [1] * 4, [64] * 4, [0.0] * 4, True)
    assert narrow < 384 + 384 + 2 * 8192 and narrow == 768 + 2 * (1 + 64 + 64) * (1 + 80 / 32)
    assert sparse_row_cost(384, 384, 64, 8192, [1] * 4, [64] * 4, [0.0] * 4, True) < narrow  # wider heads
    assert sparse_row_cost(384, 384, 32, 64, [1] * 4, [64] * 4, [0.0] * 4, True) == 768 + 2 * 64 * (1 + 80 / 32)


def test_routing_speedup_cost_model():
    """The model's shape (monotone in the work kept, narrow heads and causal masks favour the dense
    path) and two anchors measured side by side on 2 threads (bench_moh_dispatch.py): MiniLM-like
    12x32 heads at 128 tokens with 60% of the rows left ran 0.70x; 12x64 heads at 1024 tokens with
    28% of the rows ran 2.25x."""
    speed = ra.routing_speedup
    assert speed(0.3, 768, 768, 64, 512, False) > speed(0.6, 768, 768, 64, 512, False) > 1
    assert speed(0.5, 384, 384, 32, 512, False) < speed(0.5, 768, 768, 64, 512, False)
    assert speed(0.5, 768, 768, 64, 512, True) < speed(0.5, 768, 768, 64, 512, False)
    assert speed(0.6, 384, 384, 32, 128, False) < 1
    assert speed(0.28, 768, 768, 64, 1024, False) > 2
    assert speed(0.0, 384, 384, 32, 128, False) == float("inf")


class _Tiny(torch.nn.Module):
    def __init__(self, e=16, h=4, d=4):
        super().__init__()
        self.h, self.d = h, d
        self.q, self.k, self.v, self.o = (torch.nn.Linear(e, h * d) for _ in range(4))
        self.router = torch.nn.Linear(e, h)

    def forward(self, x):
        b, s, _ = x.shape
        k = self.k(x).view(b, s, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, self.h, self.d).transpose(1, 2)
        scores = self.router(x)
        gates = (scores >= scores.topk(2, -1).values[..., -1:]).to(x.dtype)
        return OP(x, self.q.weight, self.q.bias, k, v, None, None, None, self.o.weight, self.o.bias, gates,
                  self.d ** -0.5)


def test_torch_export_still_works(always_route):
    torch.manual_seed(0)
    m, x = _Tiny().eval(), torch.randn(2, 7, 16)
    ep = torch.export.export(m, (x,))
    assert any(n.target is OP.default for n in ep.graph.nodes)
    ra.STATS.reset()
    out = ep.module()(x)
    assert ra.STATS.calls == 1
    assert torch.allclose(out, m(x), atol=1e-6, rtol=0)


def test_gradients_match_reference_autograd():
    args = make_args(b=2, s=9, h=4, hkv=2, rope=True, mask="additive", gates="fractional", seed=3)
    tensors = {i: a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()}
    grads = []
    for fn in (OP, attention_reference):
        leaves = {i: t.detach().clone().requires_grad_(True) for i, t in tensors.items()}
        call = [leaves.get(i, a) for i, a in enumerate(args)]
        out = fn(*call)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({i: t.grad for i, t in leaves.items()})
    for i in tensors:
        assert grads[0][i] is not None, i
        assert (grads[0][i] - grads[1][i]).abs().max().item() <= 1e-5, i


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch counts FLOPs of the CUDA SDPA kernels only; the CPU one has the same formula."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_work_skipped_rows_and_flops():
    b, s, h, d, e, k = 2, 24, 6, 8, 48, 2
    args = make_args(b=b, s=s, h=h, hkv=h, d=d, e=e, gates="all_off")
    gates = torch.zeros(b, s, h)
    for t in range(s):                      # token t uses heads t, t+1 (mod H): every head gets S*k/H tokens
        gates[:, t, [t % h, (t + 1) % h]] = 1.0
    args[10] = gates
    ra.STATS.reset()
    flops = count_flops(ra.routed_attention_cpu, *args)
    assert ra.STATS.active_pairs == b * s * k
    assert ra.STATS.query_rows == b * s * k             # balanced: capacity padding is zero
    model = attention_flops(b, s, e, h, h, d, active_heads=k / h)
    assert flops == model["total"] - model["kv_proj"]
    dense = attention_flops(b, s, e, h, h, d)
    args[10] = None
    assert count_flops(attention_reference, *args) == dense["total"] - dense["kv_proj"]

    args[10] = make_gates("random", b, s, h, torch.Generator().manual_seed(1))   # uneven batch rows: padded
    ra.STATS.reset()
    ra.routed_attention_cpu(*args)
    counts = (args[10] != 0).sum(1)                                               # (B, H)
    head_caps = counts.amax(0)
    assert ra.STATS.active_pairs == int(counts.sum())
    assert b * int(head_caps.sum()) <= ra.STATS.query_rows <= (1 + ra.GROUP_SLACK) * b * int(head_caps.sum())
    assert ra.STATS.query_rows < b * h * s


def test_uneven_heads_are_not_padded_to_the_busiest():
    """Calibrated routers use heads very unevenly; one head taking every token must not make
    the others compute every token too."""
    b, s, h = 2, 40, 6
    args = make_args(b=b, s=s, h=h, hkv=h, mask="padding", gates="all_off")
    gates = torch.zeros(b, s, h)
    gates[:, :, 0] = 1.0                                  # head 0: every token
    gates[:, :: 10, 1:] = 1.0                             # heads 1-5: 4 tokens each
    args[10] = gates
    ra.STATS.reset()
    assert max_diff(args) <= 1e-5
    assert ra.STATS.query_rows == b * (s + 5 * 4)         # exact: no padding at all here
    assert ra.STATS.query_rows < b * h * s / 2


@pytest.mark.parametrize("caps,groups", [
    ([10, 10, 10, 10], [[0, 1, 2, 3]]),
    ([100, 5, 90, 0, 6], [[0, 2], [4, 1]]),               # 2 x 100 <= 1.125 x 190; 5 and 6 pad by 1
    ([0, 0], []),
    ([8, 1], [[0], [1]]),
])
def test_head_groups(caps, groups):
    assert ra.head_groups(caps) == groups


def test_masks_are_simplified_before_gathering():
    pad = torch.rand(3, 1, 1, 9, generator=torch.Generator().manual_seed(0)) < 0.7
    assert not pad.all()
    assert torch.equal(simplify_mask(pad.expand(3, 1, 9, 9).contiguous()), pad)    # rows not gathered
    assert torch.equal(simplify_mask(pad.expand(3, 1, 9, 9)), pad)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert simplify_mask(causal).shape == (1, 1, 9, 9)
    assert simplify_mask(torch.ones(3, 1, 9, 9, dtype=torch.bool)) is None          # masks nothing
    assert simplify_mask(torch.zeros(3, 1, 1, 9)) is None                           # additive zeros
    assert simplify_mask(torch.full((3, 1, 1, 9), -1.0)) is not None
    bias = torch.zeros(1, 4, 9, 9, requires_grad=True)                                 # learned: kept as is
    assert simplify_mask(bias) is bias


def test_causal_masks_run_as_is_causal():
    from moh_compile.ops.attention import head_contexts, is_causal_mask, rotate_half

    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert is_causal_mask(causal.expand(3, 1, 7, 7).contiguous(), 7, 7)
    padded = causal.expand(3, 1, 7, 7).clone()
    padded[1, :, :, 0] = False                                                    # padding on top: not causal
    assert not is_causal_mask(padded, 7, 7) and not is_causal_mask(causal[:5], 5, 7)
    assert not is_causal_mask(torch.zeros(7, 7).masked_fill(~causal, float("-inf")), 7, 7)   # additive: as given
    args = make_args(b=3, s=7, h=4, hkv=2, rope=True, mask="none", gates="all_on", seed=6)
    x, wq, bq, k, v, _, cos, sin = args[:8]
    via_is_causal = head_contexts(x, wq, bq, k, v, causal.expand(3, 1, 7, 7).contiguous(), cos, sin, 8 ** -0.5)
    q = (torch.nn.functional.linear(x, wq, bq).view(3, 7, 4, 8).transpose(1, 2))
    q = q * cos + rotate_half(q) * sin
    explicit = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=8 ** -0.5,
                                                                enable_gqa=True)
    assert (via_is_causal - explicit).abs().max().item() <= 1e-6


def test_all_true_padding_mask_matches_reference():
    args = make_args(b=3, s=13, h=4, hkv=2, gates="random", mask="none", seed=2)
    args[5] = torch.ones(3, 1, 13, 13, dtype=torch.bool)
    assert max_diff(args) <= 1e-5


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 13 * 13 * 3])
@pytest.mark.parametrize("mask", ["causal", "per_head", "additive"])
def test_mask_gathered_in_head_chunks(monkeypatch, chunk_bytes, mask):
    """Large masks are gathered a few heads at a time; chunks may split a GQA group."""
    monkeypatch.setattr(ra, "MASK_CHUNK_BYTES", chunk_bytes)
    args = make_args(b=3, s=13, h=8, hkv=2, mask=mask, gates="random", rope=True, seed=11)
    assert max_diff(args) <= 1e-5


def test_release_workspace_then_reuse():
    args = make_args(b=2, s=17, h=4, gates="topk")
    first = ra.routed_attention_cpu(*args)
    ra.release_workspace()
    assert ra._WS.buf is None
    assert torch.equal(ra.routed_attention_cpu(*args), first)
    assert ra._WS.buf is not None


def test_non_contiguous_inputs():
    args = make_args(b=2, s=10, h=4, hkv=2, rope=True, mask="causal", gates="fractional", seed=4)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)          # x (B, S, E) with S-major storage
    args[1] = args[1].t().contiguous().t()                                  # W_q stored transposed
    args[8] = args[8].t().contiguous().t()                                  # W_o stored transposed
    args[10] = args[10].permute(2, 0, 1).contiguous().permute(1, 2, 0)      # gates head-major
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or args[10].is_contiguous())
    assert max_diff(args) <= 1e-5


@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_query_norm_then_rope_matches_reference_and_model_order(mask):
    """QK-norm models (Qwen3): each query head is RMS-normalised, then rotated. The kernel
    normalises only the rows it projects, and agrees with the reference; the reference agrees
    with the model's own order of operations, written out here."""
    b, s, h, d = 3, 11, 8, 16
    args = make_args(b=b, s=s, h=h, hkv=2, d=d, e=40, rope=True, mask=mask, gates="random", seed=3)
    w = torch.linspace(0.5, 1.5, d)
    norm = dict(q_norm_weight=w, q_norm_eps=1e-6)
    assert max_diff(args, **norm) <= 1e-5
    x, wq, bq, k, v, m, cos, sin, wo, bo, g, scale = args
    q = (x @ wq.T + bq).view(b, s, h, d)
    q = (w * (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))).transpose(1, 2)
    q = q * cos + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin
    kk, vv = (t.repeat_interleave(h // 2, 1) for t in (k, v))
    ctx = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scale)
    want = (ctx * g.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(b, s, h * d) @ wo.T + bo
    assert (attention_reference(*args, **norm) - want).abs().max().item() <= 1e-5
    assert (attention_reference(*args) - want).abs().max().item() > 1e-2  # the norm matters
