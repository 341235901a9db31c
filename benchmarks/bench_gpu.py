"""GPU benchmarks of the Triton kernels against dense baselines measured in the same run.

Why one script: every ratio is taken side by side on one device in one process (events,
warm-up, median), and the raw timings go to JSON + markdown for the record.

    python benchmarks/bench_gpu.py --out DIR [--quick]

Rows: routed-head attention (core alone vs SDPA flash, and the whole block vs a dense
block), MoE++ FFN vs a cuBLAS dense FFN, sink+window sparse attention vs SDPA flash causal.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(fn, warmup: int = 3, reps: int = 10, rounds: int = 5) -> dict:
    """Three CUDA-event timings in ms, after warm-up (which includes autotuning).

    "stream" (the headline, median_ms): `rounds` times, `reps` calls back to back between two
    events, per-call mean; the CPU launches ahead as it does inside an eager model.
    "sync" (sync_ms): each call alone on an idle GPU, synchronised; adds the Python/launch
    latency of eager mode that a lone call cannot hide.
    "graph" (graph_ms): `reps` calls captured in one CUDA graph, replayed `rounds` times; no
    launch overhead at all, as in a CUDA-graph or AOTInductor deployment (None if capture fails).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = _per_call(fn, 1, reps)  # each call alone, synchronised
    stream = _per_call(lambda: [fn() for _ in range(reps)], reps, rounds)
    return {"median_ms": statistics.median(stream), "min_ms": min(stream), "samples_ms": stream,
            "sync_ms": statistics.median(times), "sync_samples_ms": times, "graph_ms": _graph_ms(fn, reps, rounds)}


def _per_call(run, reps: int, rounds: int) -> list:
    """`rounds` event-timed, synchronised runs of `run` (which makes `reps` calls): ms per call."""
    out = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / reps)
    return out


def _graph_ms(fn, reps: int, rounds: int):
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = _per_call(graph.replay, reps, rounds)
        del graph
        return statistics.median(times)
    except Exception as exc:  # capture needs sync-free code; report, do not fail the row
        print(f"graph capture failed: {exc!r}", flush=True)
        torch.cuda.synchronize()
        return None


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def routed_rows(args, results):
    from moh_compile.kernels.triton.routed_attention import (routed_attention_block, routed_attention_core,
                                                             routing_from_gates)

    b, h, d = 8, 32, 128
    dm = h * d
    dt = torch.bfloat16
    seqs = [1024, 4096] if args.quick else [1024, 4096, 8192]
    for s in seqs:
        g = torch.Generator(device="cuda").manual_seed(s)
        q = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
        k = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
        v = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
        dense = bench(lambda: sdpa_flash(q, k, v))
        ref = sdpa_flash(q, k, v)
        full_gates = torch.ones(b, s, h, device="cuda")
        tok_all, cnt_all = routing_from_gates(full_gates)
        tri_dense = bench(lambda: routed_attention_core(q, k, v, tok_all, cnt_all, True, None, d ** -0.5))
        results.append(dict(kind="routed_core", seq=s, frac=1.0, impl="triton_all_heads", **_t(tri_dense),
                            **_base(dense),
                            baseline="sdpa_flash", speedup=dense["median_ms"] / tri_dense["median_ms"], ideal=1.0,
                            rel_err=rel_err(routed_attention_core(q, k, v, tok_all, cnt_all, True, None, d ** -0.5),
                                            ref)))
        for frac in (0.5, 0.75):
            gates = (torch.rand(b, s, h, device="cuda", generator=g) < frac).to(dt)
            r0 = bench(lambda: routing_from_gates(gates))
            tok, cnt = routing_from_gates(gates)
            idx = tok.long().unsqueeze(-1).expand(-1, -1, -1, d)
            q_sel = torch.gather(q, 2, idx)
            t = bench(lambda: routed_attention_core(q_sel, k, v, tok, cnt, True, None, d ** -0.5))
            out = routed_attention_core(q_sel, k, v, tok, cnt, True, None, d ** -0.5)
            valid = torch.arange(tok.shape[2], device="cuda").view(1, 1, -1) < cnt.unsqueeze(-1)
            err = rel_err(out[valid], torch.gather(ref, 2, idx)[valid])
            actual = float(cnt.sum()) / (b * h * s)
            results.append(dict(kind="routed_core", seq=s, frac=actual, impl="triton_routed", **_t(t),
                                **_base(dense),
                                baseline="sdpa_flash", speedup=dense["median_ms"] / t["median_ms"], ideal=1 / actual,
                                rel_err=err,
                                routing_ms=r0["median_ms"], target_fraction_of_ideal=0.8,
                                config=_best("routed")))
        del q, ref
        # Whole block: q projection + core + output projection (bias, no rope).
        x = torch.randn(b, s, dm, device="cuda", dtype=dt, generator=g)
        wq = torch.randn(dm, dm, device="cuda", dtype=dt, generator=g) / dm ** 0.5
        wo = torch.randn(dm, dm, device="cuda", dtype=dt, generator=g) / dm ** 0.5
        bq = torch.zeros(dm, device="cuda", dtype=dt)
        bo = torch.zeros(dm, device="cuda", dtype=dt)

        def dense_block():
            qq = F.linear(x, wq, bq).view(b, s, h, d).transpose(1, 2)
            ctx = sdpa_flash(qq, k, v)
            return F.linear(ctx.transpose(1, 2).reshape(b, s, dm), wo, bo)

        db_before = bench(dense_block)
        ref_block = dense_block()
        block_rows = []
        for frac in (0.5, 0.75):
            gates = (torch.rand(b, s, h, device="cuda", generator=g) < frac).to(dt)
            routing = routing_from_gates(gates)
            actual = float(routing[1].sum()) / (b * h * s)
            for qm, om in (("gather_gemm", "fused"), ("dense", "fused")):
                fn = lambda: routed_attention_block(x, wq, bq, k, v, wo, bo, gates, d ** -0.5, True, None,  # noqa: E731
                                                    q_mode=qm, o_mode=om, routing=routing)
                t = bench(fn)
                # Dense reference with the same gates, for the error column.
                qq = F.linear(x, wq, bq).view(b, s, h, d).transpose(1, 2)
                ctx = sdpa_flash(qq, k, v) * gates.transpose(1, 2).unsqueeze(-1)
                ref_g = F.linear(ctx.transpose(1, 2).reshape(b, s, dm), wo, bo)
                block_rows.append(dict(kind="routed_block", seq=s, frac=actual, impl=f"q={qm},o={om}", **_t(t),
                                       baseline="dense_block(cuBLAS+sdpa_flash)", ideal=1 / actual,
                                       rel_err=rel_err(fn(), ref_g)))
        # The dense block is timed before and after the routed variants; its median over both runs
        # is the baseline (the two medians are kept to show run-to-run spread).
        db_after = bench(dense_block)
        base = statistics.median(db_before["samples_ms"] + db_after["samples_ms"])
        base_sync = statistics.median(db_before["sync_samples_ms"] + db_after["sync_samples_ms"])
        base_graph = _mean_or_none(db_before["graph_ms"], db_after["graph_ms"])
        for r in block_rows:
            r.update(baseline_ms=base, baseline_sync_ms=base_sync, baseline_graph_ms=base_graph,
                     speedup=base / r["median_ms"],
                     dense_before_ms=db_before["median_ms"],
                     dense_after_ms=db_after["median_ms"])
        results.extend(block_rows)
        del x, wq, wo, k, v, ref_block
        torch.cuda.empty_cache()


def moepp_rows(args, results):
    from moh_compile.kernels.triton.moe_grouped import (GEMM_BACKENDS, grouped_gemm, grouped_mm_supported,
                                                        moepp_ffn_triton)

    t_tok, d, f, n = 8192, 4096, 16384, 16
    f_e = f // n
    n_zero, n_copy, n_const = 1, 1, 2
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(t_tok, d, device="cuda", dtype=dt, generator=g)
    w1 = torch.randn(f, d, device="cuda", dtype=dt, generator=g) / d ** 0.5
    b1 = torch.randn(f, device="cuda", dtype=dt, generator=g) * 0.1
    w2 = torch.randn(d, f, device="cuda", dtype=dt, generator=g) / f ** 0.5
    b2 = torch.randn(d, device="cuda", dtype=dt, generator=g) * 0.1
    dense = bench(lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
    w_in = w1.view(n, f_e, d)
    b_in = b1.view(n, f_e)
    w_out = w2.view(d, n, f_e).permute(1, 0, 2).contiguous()
    cv = torch.randn(n_const, d, device="cuda", dtype=dt, generator=g)
    cg = torch.randn(n_const, 2, d, device="cuda", dtype=dt, generator=g) / d ** 0.5
    # Identity check: every FFN expert at weight 1 reproduces the dense FFN.
    all_idx = torch.arange(n, device="cuda").expand(t_tok, n).contiguous()
    dense_out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    ident_err = {gemm: rel_err(moepp_ffn_triton(x, w_in, b_in, None, None, w_out, b2, all_idx,
                                                torch.ones(t_tok, n, device="cuda"), cv, cg, n_zero, n_copy, "gelu",
                                                gemm=gemm), dense_out)
                 for gemm in GEMM_BACKENDS if gemm == "triton" or grouped_mm_supported(x, w_in, w_out)}
    for k_ffn in (8, 4):
        frac = k_ffn / n
        ffn_idx = torch.rand(t_tok, n, device="cuda", generator=g).argsort(-1)[:, :k_ffn]
        other = n + torch.rand(t_tok, n_zero + n_copy + n_const, device="cuda", generator=g).argsort(-1)[:, :2]
        idx = torch.cat([ffn_idx, other], -1).contiguous()
        wgt = torch.softmax(torch.randn(t_tok, idx.shape[1], device="cuda", generator=g), -1)
        ref = _moepp_torch(x, w_in, b_in, w_out, b2, idx, wgt, cv, cg, n, n_zero, n_copy)
        # GEMM-only times (sorted layout), to separate dispatch/combine overhead.
        flat = idx.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n + 4)[:n]
        starts = torch.cumsum(counts, 0) - counts
        offs = torch.cumsum(counts, 0).to(torch.int32)
        rows = order // idx.shape[1]
        flops = 2 * 2 * float(counts.sum()) * d * f_e
        hid = grouped_gemm(x, w_in, b_in, starts, counts, rows=rows, total_rows=flat.numel(), activation="gelu")
        sc = wgt.view(-1)[order].float()
        gemm_ms = {"triton": (
            bench(lambda: grouped_gemm(x, w_in, b_in, starts, counts, rows=rows, total_rows=flat.numel(),
                                       activation="gelu", out=hid))["median_ms"],
            bench(lambda: grouped_gemm(hid, w_out, None, starts, counts, total_rows=flat.numel(),
                                       row_scale=sc))["median_ms"])}
        if grouped_mm_supported(x, w_in, w_out):
            xs = x.index_select(0, rows)
            gemm_ms["grouped_mm"] = (
                bench(lambda: torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offs))["median_ms"],
                bench(lambda: torch._grouped_mm(hid, w_out.transpose(1, 2), offs=offs))["median_ms"])
        from moh_compile.kernels.triton.moe_grouped import _grouped_gemm_tuned

        for gemm in GEMM_BACKENDS:
            if gemm != "triton" and not grouped_mm_supported(x, w_in, w_out):
                continue
            fn = lambda: moepp_ffn_triton(x, w_in, b_in, None, None, w_out, b2, idx, wgt, cv, cg,  # noqa: E731
                                          n_zero, n_copy, "gelu", gemm=gemm)
            t = bench(fn)
            out = fn()
            g1, g2 = gemm_ms["grouped_mm" if gemm == "grouped_mm" else "triton"][0], gemm_ms[
                "triton" if gemm == "triton" else "grouped_mm"][1]
            results.append(dict(kind="moepp_ffn", tokens=t_tok, frac=frac, impl=f"gemm={gemm}", **_t(t),
                                gemm_configs={str(k): str(v) for k, v in _grouped_gemm_tuned.cache.items()},
                                **_base(dense),
                                baseline="cublas_dense_ffn",
                                speedup=dense["median_ms"] / t["median_ms"], ideal=1 / frac,
                                rel_err=rel_err(out, ref), gemm1_ms=g1, gemm2_ms=g2,
                                gemm_tflops=flops / ((g1 + g2) * 1e9),
                                dense_tflops=2 * 2 * t_tok * d * f / (dense["median_ms"] * 1e9),
                                identity_rel_err=ident_err[gemm], target_fraction_of_ideal=0.75))


def _moepp_torch(x, w_in, b_in, w_out, b_out, idx, wgt, cv, cg, n, n_zero, n_copy):
    out = torch.zeros(x.shape[0], w_out.shape[1], device=x.device, dtype=torch.float32) + b_out.float()
    for e in range(n):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        y = F.linear(F.gelu(F.linear(x[tok], w_in[e], b_in[e])), w_out[e])
        out.index_add_(0, tok, y.float() * wgt[tok, slot, None])
    tok, slot = (idx == n + n_zero).nonzero(as_tuple=True)  # copy expert (n_copy == 1)
    out.index_add_(0, tok, x[tok].float() * wgt[tok, slot, None])
    for c in range(cv.shape[0]):
        tok, slot = (idx == n + n_zero + n_copy + c).nonzero(as_tuple=True)
        a = torch.softmax(x[tok].float() @ cg[c].float().t(), -1)
        out.index_add_(0, tok, (a[:, :1] * x[tok].float() + a[:, 1:] * cv[c].float()) * wgt[tok, slot, None])
    return out


def sparse_rows(args, results):
    from moh_compile.kernels.triton.sparse_attention import pattern_density, sparse_attention
    from moh_compile.ops.attention import window_spans

    b, h, d, s = 1, 32, 128, 32768
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=g)
    dense = bench(lambda: sdpa_flash(q, k, v), reps=5)
    sink = [64 if i % 2 == 0 else 16 for i in range(h)]
    shape = [0.5 + i / (h - 1) for i in range(h)]  # spans from 0.5x to 1.5x of a base
    lo, hi = 1.0, float(s)
    for _ in range(60):  # bisect the base span to 10% of the causal pairs
        mid = (lo + hi) / 2
        dens = pattern_density(sink, [int(mid * c) for c in shape], [0.0] * h, s)
        lo, hi = (mid, hi) if dens < 0.10 else (lo, mid)
    alpha = [int(lo * c) for c in shape]
    beta = [0.0] * h
    density = pattern_density(sink, alpha, beta, s)
    t = bench(lambda: sparse_attention(q, k, v, sink, alpha, beta, False, True, None, d ** -0.5), reps=10)
    out = sparse_attention(q, k, v, sink, alpha, beta, False, True, None, d ** -0.5)
    err = _sparse_err(q, k, v, out, sink, window_spans(alpha, beta, s))
    all_dense = bench(lambda: sparse_attention(q, k, v, [0] * h, [-1] * h, [0.0] * h, False, True, None,
                                               d ** -0.5), reps=5)
    results.append(dict(kind="sparse_attention", seq=s, density=density, impl="triton_sink_window", **_t(t),
                        **_base(dense), baseline="sdpa_flash_causal",
                        speedup=dense["median_ms"] / t["median_ms"], ideal=1 / density, rel_err=err,
                        spans=window_spans(alpha, beta, s), sinks=sink, target_speedup=6.0,
                        triton_dense_causal_ms=all_dense["median_ms"], config=_best("sparse")))


def _sparse_err(q, k, v, out, sink, spans, rows: int = 256):
    """Check sampled query rows (start, middle, end) against exact masked attention in fp32."""
    s = q.shape[2]
    picks = torch.cat([torch.arange(rows), torch.arange(s // 2, s // 2 + rows), torch.arange(s - rows, s)]).cuda()
    j = torch.arange(s, device="cuda")
    errs = []
    for hh in (0, q.shape[1] // 2, q.shape[1] - 1):
        i = picks.view(-1, 1)
        vis = (j <= i) & ((j > i - spans[hh]) | (j < sink[hh]))
        sc = (q[0, hh, picks].float() @ k[0, hh].float().t()) * q.shape[-1] ** -0.5
        ref = torch.softmax(sc.masked_fill(~vis, float("-inf")), -1) @ v[0, hh].float()
        errs.append(rel_err(out[0, hh, picks], ref))
    return max(errs)


def _best(which: str) -> str:
    from moh_compile.kernels.triton.routed_attention import _routed_attn_tuned
    from moh_compile.kernels.triton.sparse_attention import _sparse_attn_tuned

    tuned = _routed_attn_tuned if which == "routed" else _sparse_attn_tuned
    return str(getattr(tuned, "best_config", None))


def _base(t: dict) -> dict:
    """A baseline's three timings, under the row keys the table reads."""
    return {"baseline_ms": t["median_ms"], "baseline_sync_ms": t["sync_ms"], "baseline_graph_ms": t["graph_ms"]}


def _mean_or_none(*xs):
    return None if any(x is None for x in xs) else sum(xs) / len(xs)


def _ratio(base, t) -> str:
    return "n/a" if base is None or t is None else f"{base / t:.2f}x"


def _t(t: dict) -> dict:
    return {k: t[k] for k in ("median_ms", "min_ms", "samples_ms", "sync_ms", "sync_samples_ms", "graph_ms")}


def table(results) -> str:
    lines = ["| kind | shape | impl | work | time ms | baseline ms | speedup | ideal | of ideal | rel err "
             "| sync: speedup | graph: speedup | graph: of ideal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        shape = f"S={r['seq']}" if "seq" in r else f"T={r['tokens']}"
        work = f"{r.get('frac', r.get('density')):.3f}"
        g = r["graph_ms"]
        graph_frac = "n/a" if g is None or r["baseline_graph_ms"] is None else \
            f"{r['baseline_graph_ms'] / g / r['ideal']:.0%}"
        lines.append(f"| {r['kind']} | {shape} | {r['impl']} | {work} | {r['median_ms']:.3f} | {r['baseline_ms']:.3f} "
                     f"({r['baseline']}) | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                     f"{r['speedup'] / r['ideal']:.0%} | {r['rel_err']:.1e} | "
                     f"{_ratio(r['baseline_sync_ms'], r['sync_ms'])} | "
                     f"{_ratio(r['baseline_graph_ms'], r['graph_ms'])} | {graph_frac} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--only", default="routed,moepp,sparse")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "timing": "3 warm-up calls (incl. autotune); stream: median over 5 rounds of the per-call mean of 10 "
                      "back-to-back calls (5 for dense 32k); sync: median of 10 single synchronised calls; "
                      "graph: the 10 calls captured in one CUDA graph, median over 5 replays"}
    results: list = []
    parts = args.only.split(",")
    for name, fn in (("routed", routed_rows), ("moepp", moepp_rows), ("sparse", sparse_rows)):
        if name in parts:
            try:
                fn(args, results)
            except Exception as exc:  # keep the other rows' numbers
                results.append(dict(kind=name, error=repr(exc)))
                print(f"{name} failed: {exc!r}", flush=True)
    ok = [r for r in results if "error" not in r]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    n = 1
    while (out / f"gpu_{stamp}.json").exists():  # keep earlier runs of the same day
        n += 1
        stamp = f"{datetime.date.today().isoformat()}-{n}"
    (out / f"gpu_{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = f"# GPU benchmark {stamp}\n\n{json.dumps(meta)}\n\n{table(ok)}\n"
    for r in results:
        if "error" in r:
            md += f"\n{r['kind']} failed: {r['error']}\n"
    (out / f"gpu_{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
