"""Triton kernels vs torch references: interpreter on CPU (fp32, 1e-4) and real GPU (halves, 2e-2).

The interpreter checks run in one subprocess with TRITON_INTERPRET=1, so the setting never
reaches triton in this pytest process. Everything skips cleanly without triton / CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_checks as checks  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_checks.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", sorted(checks.INTERPRETER_CHECKS))
def test_interpreter_fp32_matches_reference(interpreter_results, name):
    assert interpreter_results[name] < 1e-4, (name, interpreter_results[name])


def test_triton_available_reports_install():
    from moh_compile.kernels.triton import triton_available

    assert triton_available() == HAS_TRITON


def test_hooks_decline_cpu_tensors_outside_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode accepts CPU tensors by design")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from moh_compile.kernels.triton.register import attention_fast_kernel, moepp_fast_kernel

    args = checks._attention_args("cpu", torch.float32, 1, 4, 2, 16, 16, 0, gates_frac=0.5)
    assert attention_fast_kernel(*args) is None
    assert moepp_fast_kernel(*checks.moepp_args(8, 32, 4, 16, 2, 1, 1, 1, True, 0), "silu") is None


def test_launcher_wraps_only_while_tracing():
    """Eager launches stay direct (wrap_triton's eager path costs ~1 ms per MoE++ call on H100);
    fake tensors, as torch.compile/export trace with, switch to the traceable wrapper."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moh_compile.kernels.triton.traceable import is_tracing, launcher

    real = torch.ones(2)
    kernel = object()
    assert not is_tracing(real) and launcher(kernel, real) is kernel
    with FakeTensorMode():
        fake = torch.ones(2)
    assert is_tracing(fake)


def test_moepp_op_registers_triton_hook():
    """The MoE++ op's fast-kernel list holds the Triton hook exactly when triton is installed."""
    import moh_compile  # noqa: F401
    from moh_compile.ops import moepp

    names = [k.__name__ for k in moepp._FAST_KERNELS]
    assert ("moepp_fast_kernel" in names) == HAS_TRITON


@needs_triton
def test_decompose_mask_recognises_causal_and_padding():
    from moh_compile.kernels.triton.register import decompose_mask

    s = 6
    kpm = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    causal, pad = decompose_mask(tril & kpm[:, None, None, :], 2, s, s)
    assert causal and torch.equal(pad, kpm)
    assert decompose_mask(tril, 2, s, s) == (True, None)
    additive = torch.zeros(2, 1, 1, s).masked_fill(~kpm[:, None, None, :], float("-inf"))
    causal, pad = decompose_mask(additive, 2, s, s)
    assert not causal and torch.equal(pad, kpm)
    banded = tril & ~torch.ones(s, s, dtype=torch.bool).tril(-3)
    assert decompose_mask(banded, 2, s, s) is None


def test_pattern_density_matches_window_mask():
    from moh_compile.ops.attention import window_mask

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from moh_compile.kernels.triton.sparse_attention import pattern_density

    s, sink, alpha, beta = 50, [3, 0, 1], [4, -1, 2], [0.1, 0.0, 0.2]
    pat = window_mask(s, s, sink, alpha, beta, False) & torch.ones(s, s, dtype=torch.bool).tril()
    expect = float(pat.sum()) / (len(sink) * s * (s + 1) / 2)
    assert abs(pattern_density(sink, alpha, beta, s) - expect) < 1e-12


def test_sparse_pattern_tables_are_cached_but_never_fake():
    """One device table per pattern (so a CUDA graph captured after a warm-up replays without a
    host-to-device copy); while tracing a fresh tensor is made and the cache is left alone."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from moh_compile.kernels.triton.sparse_attention import pattern_table

    probe = torch.zeros(1)
    first = pattern_table([5, 7, 9], probe)
    assert first is pattern_table((5, 7, 9), probe) and first.dtype == torch.int32
    assert first.tolist() == [5, 7, 9] and pattern_table([5, 7, 8], probe) is not first
    with FakeTensorMode() as mode:
        fake = pattern_table([5, 7, 9], mode.from_tensor(probe))
    assert isinstance(fake, FakeTensor)
    assert not isinstance(pattern_table([5, 7, 9], probe), FakeTensor)


def test_gpu_sparse_replays_from_a_cuda_graph():
    """After one warm-up call the sparse kernel captures into a CUDA graph; replays on new inputs
    match eager calls."""
    _gpu_guard()
    from moh_compile.kernels.triton.sparse_attention import sparse_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pattern = ([4] * 8, [16, 32, -1, 64] * 2, [0.0] * 8)
    run = lambda: sparse_attention(q, k, v, *pattern, False, True)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=g.manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, run())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frac", [0.25, 0.75])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_routed_core(dtype, frac, d):
    _gpu_guard()
    err = checks.check_routed_core("cuda", dtype, b=2, h=8, hkv=4, s=300, d=d, frac=frac, rel=True)
    assert err < 2e-2


@pytest.mark.parametrize("mode", ["routed", "window"])
def test_gpu_attention_op(mode):
    _gpu_guard()
    err = checks.check_attention_op("cuda", torch.bfloat16, mode, b=2, h=8, hkv=2, s=257, d=64, rel=True)
    assert err < 2e-2


@pytest.mark.parametrize("q_mode,o_mode", [("dense", "fused"), ("gather_gemm", "fused"), ("gather_gemm", "per_head"),
                                           ("dense", "scatter_dense")])
def test_gpu_routed_block(q_mode, o_mode):
    _gpu_guard()
    err = checks.check_routed_block("cuda", torch.bfloat16, q_mode, o_mode, b=2, h=8, hkv=4, s=260, d=64, rel=True)
    assert err < 2e-2


@pytest.mark.parametrize("causal,two_sided", [(True, False), (True, True), (False, False), (False, True)])
def test_gpu_sparse(causal, two_sided):
    _gpu_guard()
    err = checks.check_sparse("cuda", torch.bfloat16, causal, two_sided, b=2, h=8, hkv=4, s=700, d=128, rel=True)
    assert err < 2e-2


@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu"), (False, "relu"), (True, "gelu_tanh")])
@pytest.mark.parametrize("gemm", ["triton", "grouped_mm", "mixed"])
def test_gpu_moepp(gated, act, gemm):
    _gpu_guard()
    if gemm != "triton" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90+")
    err = checks.check_moepp("cuda", torch.bfloat16, gated, act, t=200, d=256, n=6, f_e=192, k=4, rel=True, gemm=gemm)
    assert err < 2e-2


def test_gpu_moepp_triton_op_is_compiled_into_inductor_code():
    """torch.compile traces into the triton_op: the generated code holds the kernels themselves."""
    _gpu_guard()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the default gemm backend here needs sm90+")
    from torch._inductor.utils import run_and_get_code

    import moh_compile.kernels.triton.moe_grouped  # noqa: F401  (registers the op)

    args = [a.to("cuda", torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else
            (a.to("cuda") if isinstance(a, torch.Tensor) else a)
            for a in checks.moepp_args(200, 256, 6, 192, 4, 1, 1, 2, True, 0)]
    fn = lambda *a: torch.ops.moh_compile.moepp_ffn_triton(*a, "silu", "mixed")  # noqa: E731
    eager = fn(*args)
    out, codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    assert any("_combine_kernel" in c and "_grouped_gemm_kernel" in c for c in codes)
    assert float((out.float() - eager.float()).norm() / eager.float().norm()) < 1e-2


@pytest.mark.parametrize("which", ["routed", "sparse"])
def test_gpu_attention_triton_ops_compile_into_inductor_code(which):
    """Same for the attention triton_ops (the routed one runs sync-free while traced: C = S)."""
    _gpu_guard()
    from torch._inductor.utils import run_and_get_code

    import moh_compile.kernels.triton.routed_attention  # noqa: F401  (registers the ops)
    import moh_compile.kernels.triton.sparse_attention  # noqa: F401

    x, wq, bq, k, v, mask, cos, sin, wo, bo, gates, scale, *win = checks._attention_args(
        "cuda", torch.bfloat16, 2, 8, 4, 256, 64, 0, gates_frac=0.5, window=which == "sparse")
    kpm = mask[:, 0, -1].contiguous()  # the causal mask's last row is the key padding
    if which == "routed":
        fn = lambda: torch.ops.moh_compile.routed_attention_triton(  # noqa: E731
            x, wq, bq, k, v, wo, bo, gates, scale, True, kpm, cos, sin)
        name = "_routed_attn_fwd"
    else:
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
        sink, alpha, beta, _ = win
        fn = lambda: torch.ops.moh_compile.sparse_attention_triton(  # noqa: E731
            q, k, v, sink, alpha, beta, False, True, kpm, scale)
        name = "_sparse_attn_fwd"
    eager = fn()
    out, codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False))
    assert any(name in c for c in codes)
    assert float((out.float() - eager.float()).norm() / eager.float().norm()) < 1e-2


def test_gpu_grouped_gemm_fp32_exact_enough():
    _gpu_guard()
    assert checks.check_grouped_gemm("cuda", torch.float32) < 1e-4


def _gpu_guard():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


for _name, _obj in list(globals().items()):
    if _name.startswith("test_gpu_"):
        globals()[_name] = pytest.mark.gpu(_obj)
