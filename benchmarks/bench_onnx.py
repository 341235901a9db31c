"""Time ONNX Runtime sessions on exported models and print a ratio table (one run, side by side).

    # the dense model's own ONNX vs the compiled model's portable and custom forms, with the
    # ideal ratio from FLOP counts; everything after -- goes to `moh-compile MODEL --out DIR`:
    python benchmarks/bench_onnx.py --model example:minilm --seq 128 512 --batch 8
    python benchmarks/bench_onnx.py --model example:minilm -- --attention moh --ffn moepp --calib example
    python benchmarks/bench_onnx.py base=model.onnx moh=moh_custom.onnx port=moh_portable.onnx \
        --batch 1 --seq 128 --repeats 30
    python benchmarks/bench_onnx.py --demo     # builds a MiniLM-sized attention+FFN block itself

--model tables feed held-out text (eval.txt sentences packed into documents of exactly SEQ
tokens) when the model has a tokenizer, else random inputs (--inputs random forces them):
float inputs randn, bool inputs all True, integer inputs in [0, 100); the first symbolic dim
of each input is the batch, the others the sequence. Pass a dict feed to `bench()` from Python
for other inputs. Sessions take turns on the same cores, so ORT thread spinning is off.
--model tables also time the original module and the compiled model.pt2 in PyTorch on the same
inputs, in the same rounds ("pt" columns; --no-torch leaves them out).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moh_compile.backends.ort_runtime import detect_form, make_session  # noqa: E402

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(bool)": np.bool_, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def random_feed(session, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        shape, first = [], True
        for d in inp.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(batch if first else seq)
                first = False
        dtype = _NP[inp.type]
        if dtype == np.bool_ or ("mask" in inp.name and np.issubdtype(dtype, np.integer)):
            feed[inp.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[inp.name] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def median_times(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call; candidates run round-robin so load changes hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def session_runners(models: dict[str, str], feed: dict | None = None, batch: int = 1, seq: int = 128,
                    threads: int = 2) -> dict:
    """{name: zero-arg callable running that ONNX file once}; one feed shared when given."""
    runners = {}
    for name, path in models.items():
        session = make_session(path, detect_form(path), intra_op_threads=threads, spinning=False)
        f = feed if feed is not None else random_feed(session, batch, seq)
        runners[name] = functools.partial(session.run, None, f)
    return runners


def bench(models: dict[str, str], feed: dict | None = None, batch: int = 1, seq: int = 128, repeats: int = 20,
          threads: int = 2) -> dict[str, float]:
    """Median seconds per run for each {name: onnx path}."""
    return median_times(session_runners(models, feed, batch, seq, threads), repeats)


def print_table(results: dict[str, float], baseline: str | None = None, title: str = "") -> None:
    baseline = baseline or next(iter(results))
    if title:
        print(title)
    print(f"{'model':<28}{'median ms':>12}{'vs ' + baseline:>18}")
    for name, t in results.items():
        print(f"{name:<28}{t * 1e3:>12.3f}{t / results[baseline]:>17.2f}x")


def demo(batch: int, seq: int, repeats: int, threads: int) -> None:
    """MiniLM-sized block (E=384, 12 heads, FFN 1536) in both forms vs. the PyTorch module."""
    import torch

    import moh_compile  # noqa: F401
    from moh_compile.backends.onnx_export import export_onnx

    torch.set_num_threads(threads)

    class Demo(torch.nn.Module):
        def __init__(self, routed: bool, e=384, h=12, d=32, top_k=6):
            super().__init__()
            self.h, self.d, self.routed, self.top_k = h, d, routed, top_k
            self.q, self.k, self.v, self.o = (torch.nn.Linear(e, e) for _ in range(4))
            self.r, self.up, self.down = torch.nn.Linear(e, h), torch.nn.Linear(e, 4 * e), torch.nn.Linear(4 * e, e)

        def forward(self, x, mask):
            b, s, _ = x.shape
            k = self.k(x).view(b, s, self.h, self.d).transpose(1, 2)
            v = self.v(x).view(b, s, self.h, self.d).transpose(1, 2)
            gates = None
            if self.routed:
                top = self.r(x).topk(self.top_k, dim=-1)
                gates = torch.zeros(b, s, self.h).scatter(-1, top.indices, top.values.softmax(-1))
            a = torch.ops.moh_compile.attention(x, self.q.weight, self.q.bias, k, v, mask, None, None, self.o.weight,
                                                self.o.bias, gates, self.d ** -0.5)
            y = x + a
            return y + torch.ops.moh_compile.ffn(y, self.up.weight, self.up.bias, self.down.weight, self.down.bias,
                                                 None, None, "gelu")

    bd, sd = torch.export.Dim("batch"), torch.export.Dim("seq")
    ds = ({0: bd, 1: sd}, {0: bd, 3: sd})
    ex = (torch.randn(2, 16, 384), torch.ones(2, 1, 1, 16, dtype=torch.bool))
    feed_t = (torch.randn(batch, seq, 384), torch.ones(batch, 1, 1, seq, dtype=torch.bool))
    feed = {"x": feed_t[0].numpy(), "mask": feed_t[1].numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        for routed in (False, True):
            torch.manual_seed(0)
            m = Demo(routed).eval()
            paths = {}
            for form, cap in (("custom", None), ("portable", 1.25), ("portable", "exact")):
                name = f"{form}" + ("" if cap is None or not routed else f"(capacity={cap})")
                if not routed and cap == "exact":
                    continue
                paths[name] = os.path.join(tmp, f"{routed}_{len(paths)}.onnx")
                export_onnx(m, ex, paths[name], form=form, dynamic_shapes=ds, capacity=cap or 1.25)
            def eager(m=m):
                with torch.no_grad():
                    m(*feed_t)

            runners = {"pytorch eager (same ops)": eager, **session_runners(paths, feed, threads=threads)}
            results = median_times(runners, repeats)
            print_table(results, title=f"\n{'routed 6/12 heads' if routed else 'dense (identity)'} block, "
                                       f"batch={batch} seq={seq} threads={threads}")


def block_flops(program_module, args: tuple, kwargs: dict, batch: int, seq: int) -> tuple[float, float]:
    """(dense, compiled) FLOPs of the project-op blocks of one forward at (batch, seq).

    Every moh_compile op call is recorded on a random batch of that shape: attention with the
    measured fraction of active (token, head) pairs and of visible keys (window patterns);
    MoE++ with the measured fraction of FFN experts chosen per token. Routers, K/V
    projections (dense in both), embeddings and norms are outside the count.
    """
    import torch

    from moh_compile.backends.onnx_export import _RecordCalls
    from moh_compile.flops import attention_flops, ffn_flops
    from moh_compile.ops.attention import window_mask

    ops = [torch.ops.moh_compile.attention.default, torch.ops.moh_compile.ffn.default]
    if hasattr(torch.ops.moh_compile, "moepp_ffn"):
        ops.append(torch.ops.moh_compile.moepp_ffn.default)
    rec = _RecordCalls(ops)
    with torch.no_grad(), rec:
        program_module(*args, **kwargs)
    dense = compiled = 0.0
    for op, a in rec.calls:
        tokens = a["x"].shape[0] * a["x"].shape[1] if a["x"].dim() == 3 else a["x"].numel() // a["x"].shape[-1]
        if op is ops[0]:
            b, s, e = a["x"].shape
            hkv, s_k, d = a["k"].shape[1], a["k"].shape[2], a["k"].shape[3]
            h = a["q_weight"].shape[0] // d
            g = a["head_gates"]
            active = 1.0 if g is None else float((g != 0).float().mean())
            density = 1.0
            if a["window_sink"] is not None:
                density = float(window_mask(s, s_k, a["window_sink"], a["window_alpha"], a["window_beta"],
                                            a["window_two_sided"]).float().mean())
            dense += attention_flops(b, s, e, h, hkv, d, a["o_weight"].shape[0])["total"]
            compiled += attention_flops(b, s, e, h, hkv, d, a["o_weight"].shape[0], active, density=density)["total"]
        elif op is ops[1]:
            f = ffn_flops(tokens, a["x"].shape[-1], a["w_in"].shape[0], a["w_out"].shape[0], a["w_gate"] is not None)
            dense += f["total"]
            compiled += f["total"]
        else:
            n, f_e, d_in = a["w_in"].shape
            idx, w = a["expert_idx"], a["expert_weight"]
            chosen = ((idx < n) & (w != 0)).float().sum(-1).mean() / n
            kw = dict(d_out=a["w_out"].shape[1], gated=a["w_gate"] is not None)
            dense += ffn_flops(tokens, d_in, n * f_e, **kw)["total"]
            compiled += ffn_flops(tokens, d_in, n * f_e, keep=float(chosen), **kw)["total"]
    return dense, compiled


def budget_docs(model: str, seq: int, path: str) -> str:
    """Documents of exactly `seq` tokens packed from all the bundled calibration sentences (not the
    held-out ones text_feed times; the CLI's --ffn-budget-length packs only the --calib-samples
    lines), saved as a .pt of the model's inputs for `--ffn-budget-data`: the MoE++ budget then
    holds at that length (set on short sentences, 512-token documents spend 46-70% of the FFN
    work at --ffn-keep 0.5)."""
    import torch

    from moh_compile.calibrate.data import as_calibration
    from moh_compile.cli import budget_documents
    from moh_compile.loading import load_model

    docs = budget_documents(as_calibration("example", load_model(model)), seq).batches
    keys = ("input_ids", "attention_mask")
    torch.save({k: torch.cat([d[k] for d in docs]) for k in keys}, path)
    return path


def text_feed(loaded, session, batch: int, seq: int) -> dict:
    """`batch` held-out documents of exactly `seq` tokens (harness.held_out_documents), as the
    session's named inputs."""
    from harness import held_out_documents

    names = {i.name for i in session.get_inputs()}
    return {k: v.numpy() for k, v in held_out_documents(loaded, batch, seq).items() if k in names}


def model_table(model: str, compile_args: list[str], seqs: list[int], batch: int, repeats: int, threads: int,
                capacity: str, inputs: str = "text", forms=("portable", "custom"), torch_columns: bool = True) -> None:
    """Compile MODEL with the CLI, export dense / portable / custom ONNX, time them side by side;
    torch_columns adds the original module and the compiled model.pt2 run in PyTorch on the same
    inputs, in the same rounds."""
    import torch

    import moh_compile  # noqa: F401  (registers the ops model.pt2 calls)
    from moh_compile.backends.onnx_export import export_program
    from moh_compile.capture import capture
    from moh_compile.cli import main as cli
    from moh_compile.loading import load_model

    torch.set_num_threads(threads)
    forms = list(forms)
    if "custom" in forms:
        try:
            import onnxruntime_extensions  # noqa: F401
        except ImportError:
            forms.remove("custom")
            print("onnxruntime-extensions is not installed: custom form skipped")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        form_arg = forms[0] if len(forms) == 1 else "both"
        code = cli([model, "--out", out, "--export", "onnx", "--onnx-form", form_arg, "--capacity", capacity,
                    *compile_args])
        if code:
            raise SystemExit(f"moh-compile failed with exit code {code}")
        loaded = load_model(model)
        cap = capture(loaded.model, loaded.example_inputs)
        dense_path = os.path.join(tmp, "dense.onnx")
        export_program(cap.program, dense_path, "portable", cap.args, cap.kwargs)
        paths = {"dense": dense_path, **{f: os.path.join(out, f"model.{f}.onnx") for f in forms}}
        program = torch.export.load(os.path.join(out, "model.pt2")).module()
        if inputs == "text" and "hf_dir" not in loaded.extra:
            print("no tokenizer for this model: random inputs")
            inputs = "random"
        print(f"\n{model} {' '.join(compile_args) or '(identity)'}, capacity={capacity}, batch={batch}, "
              f"threads={threads}, repeats={repeats}, {inputs} inputs (median ms; ratio = dense / form)")
        head = f"{'seq':>5}{'dense ms':>11}" + "".join(f"{f + ' ms':>13}{'speedup':>9}" for f in forms) + f"{'ideal':>8}"
        if torch_columns:
            head += f"{'pt dense ms':>13}{'pt compiled ms':>16}{'speedup':>9}"
        print(head)
        for seq in seqs:
            sessions = {name: make_session(p, detect_form(p), intra_op_threads=threads, spinning=False)
                        for name, p in paths.items()}
            feed = random_feed(sessions["dense"], batch, seq, seed=seq) if inputs == "random" else \
                text_feed(loaded, sessions["dense"], batch, seq)
            runners = {name: functools.partial(sess.run, None, feed) for name, sess in sessions.items()}
            kwargs = {k: torch.from_numpy(v) for k, v in feed.items()}
            if torch_columns:   # the same inputs through PyTorch: the original module and model.pt2
                runners["pt dense"] = functools.partial(_torch_run, loaded.model, kwargs)
                runners["pt compiled"] = functools.partial(_torch_run, program, kwargs)
            t = median_times(runners, repeats)
            d_fl, c_fl = block_flops(program, (), kwargs, batch, seq)
            row = f"{seq:>5}{t['dense'] * 1e3:>11.1f}"
            row += "".join(f"{t[f] * 1e3:>13.1f}{t['dense'] / t[f]:>8.2f}x" for f in forms)
            row += f"{d_fl / c_fl:>7.2f}x"
            if torch_columns:
                row += (f"{t['pt dense'] * 1e3:>13.1f}{t['pt compiled'] * 1e3:>16.1f}"
                        f"{t['pt dense'] / t['pt compiled']:>8.2f}x")
            print(row)


def _torch_run(module, kwargs: dict) -> None:
    import torch  # already loaded by model_table; a sys.modules lookup

    with torch.inference_mode():
        module(**kwargs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="name=path.onnx (first one is the baseline)")
    p.add_argument("--model", help="compile this MODEL (as moh-compile takes it) and run the dense/portable/custom table")
    p.add_argument("--capacity", default="dynamic",
                   help="--capacity for the compiled model's export (default dynamic)")
    p.add_argument("--forms", nargs="+", choices=["portable", "custom"], default=["portable", "custom"],
                   help="--model table: which ONNX forms to time next to dense (default both)")
    p.add_argument("--inputs", choices=["text", "random"], default="text",
                   help="--model table: held-out text documents (default; needs the model's tokenizer) or "
                        "random token ids")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, nargs="+", default=[128])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--demo", action="store_true", help="build and time a MiniLM-sized demo block")
    p.add_argument("--no-torch", action="store_true",
                   help="--model tables: leave out the PyTorch columns (original module, compiled model.pt2)")
    p.add_argument("--budget-seq", type=int, metavar="SEQ",
                   help="--model tables with --ffn moepp: re-set the FFN budget on calibration documents of SEQ "
                        "tokens (adds --ffn-budget-data), so the asked work holds at that length")
    argv = list(sys.argv[1:] if argv is None else argv)
    compile_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.model and a.budget_seq:
        compile_args += ["--ffn-budget-data", budget_docs(a.model, a.budget_seq,
                                                          os.path.join(tempfile.mkdtemp(), "budget_docs.pt"))]
    if a.model:
        model_table(a.model, compile_args, a.seq, a.batch, a.repeats, a.threads, a.capacity, a.inputs, a.forms,
                    torch_columns=not a.no_torch)
        return
    if a.demo:
        for seq in a.seq:
            demo(a.batch, seq, a.repeats, a.threads)
        return
    if not a.models:
        p.error("give name=path.onnx models or --demo")
    models = dict(m.split("=", 1) for m in a.models)
    for seq in a.seq:
        print_table(bench(models, batch=a.batch, seq=seq, repeats=a.repeats, threads=a.threads),
                    title=f"batch={a.batch} seq={seq} threads={a.threads}")


if __name__ == "__main__":
    main()
