"""The C row kernels for fine-grained MoE++ experts (kernels/moe_fine.py, csrc/moe_rows.c): exact
against the reference over many narrow experts, several token tiles, repeated choices and thread
counts; the layout choice; and how the native build fails (a clear reason, the PyTorch path)."""
from __future__ import annotations

import pytest
import torch

from moh_compile.kernels import moe_fine, native
from moh_compile.kernels.moe_dispatch import ROWS_MAX_WIDTH, choose_layout, moepp_dispatch
from moh_compile.ops.ffn import ffn_reference
from moh_compile.ops.moepp import moepp_ffn, moepp_ffn_reference, split_ffn_into_experts

ATOL = 1e-5
needs_native = pytest.mark.skipif(not moe_fine.available(),
                                  reason=f"C row kernels not built here: {native.why_unavailable('moe_rows')}")


def case(gen, tokens, d, hidden, n, k, gated, d_out=None, n_zero=1):
    """Dense weights split into n experts, and random routing over FFN + zero experts."""
    d_out = d if d_out is None else d_out
    w_in, b_in = torch.randn(hidden, d, generator=gen) / d**0.5, torch.randn(hidden, generator=gen) * 0.1
    w_out, b_out = torch.randn(d_out, hidden, generator=gen) / hidden**0.5, torch.randn(d_out, generator=gen) * 0.1
    w_g = torch.randn(hidden, d, generator=gen) / d**0.5 if gated else None
    b_g = torch.randn(hidden, generator=gen) * 0.1 if gated else None
    ex = split_ffn_into_experts(w_in, b_in, w_out, w_g, b_g, torch.randperm(hidden, generator=gen).view(n, -1))
    x = torch.randn(tokens, d, generator=gen)
    idx = torch.randint(0, n + n_zero, (tokens, k), generator=gen)
    wt = torch.rand(tokens, k, generator=gen)
    args = (x, ex["w_in"], ex["b_in"], ex["w_gate"], ex["b_gate"], ex["w_out"], b_out, idx, wt, None, None,
            n_zero, 0, "gelu")
    return args, (w_in, b_in, w_out, b_out, w_g, b_g)


@needs_native
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden, n", [(192, 64), (160, 32), (224, 32)])
def test_rows_match_reference_over_tiles_and_repeats(gated, threads, hidden, n, monkeypatch):
    """577 tokens (not a multiple of the 4-token step) in tiles of 16 (L2 budget shrunk so there
    are many tiles), experts of 3, 5 and 7 neurons (every neuron block size: 3; 4 + 1; 6 + 1),
    d not a multiple of the 16-float vector; a token may choose an expert in two slots (the
    kernel must not let two accumulators overwrite a row)."""
    monkeypatch.setattr(moe_fine, "L2_TILE_BYTES", 16 * 4 * (37 + 29))
    gen = torch.Generator().manual_seed(threads + 2 * gated + hidden)
    args, _ = case(gen, 577, 37, hidden, n, 12, gated, d_out=29)
    idx = args[7]
    idx[::5, 1] = idx[::5, 0]  # repeated choices in every fifth token
    assert moe_fine.tile_rows(37, 29, 577, threads) == 16
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = moepp_dispatch(*args, layout="rows")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, moepp_ffn_reference(*args), atol=ATOL, rtol=0)
    torch.testing.assert_close(got, moepp_dispatch(*args, layout="sorted"), atol=ATOL, rtol=0)


@needs_native
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n", [256, 512])
def test_rows_at_identity_equal_the_dense_ffn(gated, n):
    """Every token chooses every one of n experts (6 or 3 neurons each, MiniLM's split at 256 and
    512): the dense FFN within 1e-5, through the op's default layout, which picks the row kernels."""
    gen = torch.Generator().manual_seed(11)
    hidden, d = 1536, 384
    args, (w_in, b_in, w_out, b_out, w_g, b_g) = case(gen, 40, d, hidden, n, n, gated)
    assert choose_layout(args[1], args[0]) == "rows"
    idx = torch.arange(n).expand(40, n).contiguous()
    args = args[:7] + (idx, torch.ones(40, n)) + args[9:]
    want = ffn_reference(args[0], w_in, b_in, w_out, b_out, w_g, b_g, "gelu")
    torch.testing.assert_close(moepp_ffn(*args), want, atol=ATOL, rtol=0)


def test_layout_choice(monkeypatch):
    """Narrow float32 CPU experts take the row kernels when they are built; wide experts, other
    dtypes, or no C compiler keep the library-GEMM layout."""
    x = torch.zeros(3, 8)
    narrow, wide = torch.zeros(4, ROWS_MAX_WIDTH, 8), torch.zeros(4, ROWS_MAX_WIDTH + 1, 8)
    monkeypatch.setattr(moe_fine, "available", lambda: True)
    assert choose_layout(narrow, x) == "rows"
    assert choose_layout(wide, x) == "sorted"
    assert choose_layout(narrow.double(), x.double()) == "sorted"
    monkeypatch.setattr(moe_fine, "available", lambda: False)
    assert choose_layout(narrow, x) == "sorted"


def test_unknown_layout_is_a_one_line_error():
    args, _ = case(torch.Generator().manual_seed(0), 4, 8, 16, 4, 2, False)
    with pytest.raises(ValueError, match="unknown layout 'fast'; use one of auto, sorted, capacity, rows"):
        moepp_dispatch(*args, layout="fast")


def test_native_build_is_cached_and_failures_say_why(tmp_path, monkeypatch):
    """A fresh cache builds the library once (a second load reuses the file); a compiler that
    fails, or MOH_COMPILE_NATIVE=0, gives None and a reason instead of an exception."""
    monkeypatch.setenv("MOH_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_errors", {})
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native.load("moe_rows") is not None
    built = list((tmp_path / "kernels").glob("moe_rows-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("moe_rows") is not None and built[0].stat().st_mtime_ns == stamp

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("MOH_COMPILE_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")
    assert native.load("moe_rows") is None
    assert native.why_unavailable("moe_rows").startswith("could not build moe_rows.c: false failed")
    assert not list((tmp_path / "other" / "kernels").glob("*.so"))  # no half-written library left

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("MOH_COMPILE_NATIVE", "0")
    assert native.load("moe_rows") is None
    assert native.why_unavailable("moe_rows") == "disabled by MOH_COMPILE_NATIVE=0"


def test_native_build_key_covers_the_shared_header(tmp_path, monkeypatch):
    """The kernels include csrc/vec.h: editing it must give a new build, not a stale cached one."""
    import shutil

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    src = tmp_path / "csrc"
    shutil.copytree(native.CSRC, src)
    monkeypatch.setattr(native, "CSRC", src)
    monkeypatch.setenv("MOH_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("moe_rows") is not None
    with open(src / "vec.h", "a") as f:
        f.write("\n/* edited */\n")
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("moe_rows") is not None
    assert len(list((tmp_path / "cache" / "kernels").glob("moe_rows-*.so"))) == 2
