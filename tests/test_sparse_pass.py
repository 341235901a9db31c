"""The sparse attention pass end to end: identity exactness, calibrated patterns under a budget,
GQA sharing, plan re-application, composition, CLI, errors, and the pattern semantics of a
compiled LLaMA-style decoder at 2k-8k tokens against an independent masked dense reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moh_compile
from moh_compile.calibrate.data import Calibration
from moh_compile.calibrate.sparse_profile import mass_outside_candidates, pattern_density
from moh_compile.cli import main
from moh_compile.errors import MohCompileError
from moh_compile.ops.attention import window_mask
from moh_compile.passes.sparse import SparseOptions, check_window, pack_batches
from moh_compile.plan import Plan
from tests.models import build, main_output

LENGTHS = [32, 64]


def tiny_llama(layers: int = 2, max_pos: int = 2048):
    """LLaMA-style decoder from a config (RoPE, GQA 4 query / 2 KV heads); CLI factory too."""
    import transformers as T

    torch.manual_seed(0)
    m = T.LlamaModel(T.LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                   max_position_embeddings=max_pos)).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return m, {"input_ids": ids, "use_cache": False}


def _calib(n=4, seq=48, mask=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, 100, (4, seq), generator=g)}
        if mask:
            b["attention_mask"] = torch.ones(4, seq, dtype=torch.long)
        out.append(b)
    return out


def _config(attention="sparse", **opts):
    return moh_compile.CompileConfig(attention=attention, ffn="keep",
                                     options={"sparse": {"profile_lengths": LENGTHS, **opts}})


def _run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _windows(compiled):
    return [b.settings.get("sparse", b.settings) for b in compiled.plan.blocks if b.kind == "attention"]


@pytest.fixture(scope="module")
def llama_compiled():
    model, inputs = tiny_llama()
    return model, inputs, moh_compile.compile(model, inputs, _config(density=0.5), calibration=_calib())


def test_rewrite_exact_at_dense_setting_and_budget_met(llama_compiled):
    model, inputs, compiled = llama_compiled
    assert all(a["identity_max_abs_diff"] <= 1e-5 for a in compiled.report.actions)  # commit_verified, dense
    sec = compiled.report.sections["attention:sparse"]
    windows = _windows(compiled)
    dens = [np.mean([pattern_density(n, s, a, b, w["two_sided"], True) for n in LENGTHS])
            for w in windows for s, a, b in zip(w["sink"], w["alpha"], w["beta"])]
    assert np.mean(dens) <= 0.5 + 1e-9
    assert any(a >= 0 for w in windows for a in w["alpha"])  # something was made sparse
    for w in windows:  # decoder: causal windows, 4 sinks on sparse heads, GQA pairs (0,1), (2,3) share
        assert w["two_sided"] is False
        assert all(s == (0 if a < 0 else 4) for s, a in zip(w["sink"], w["alpha"]))
        for h in (0, 2):
            assert (w["alpha"][h], w["beta"][h]) == (w["alpha"][h + 1], w["beta"][h + 1])
    val = sec["validation"]
    assert val["length"] == 48 and val["length"] not in LENGTHS and 0 < val["cosine_vs_dense"] <= 1 + 1e-9
    assert sec["files"]["sparse_density.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "density@32" in sec["markdown"] and sec["flops"]["64"]["core_sparse"] < sec["flops"]["64"]["core_dense"]
    # the compiled model now differs from the original (patterns applied)
    x = {"input_ids": torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(5)), "use_cache": False}
    assert (_run(compiled, x) - _run(model, x)).abs().max() > 1e-4


def test_plan_reapplies_patterns_exactly(llama_compiled):
    model, inputs, compiled = llama_compiled
    plan = Plan.from_json(compiled.plan.to_json())
    again = moh_compile.compile(model, inputs, _config(), plan=plan)  # no calibration needed
    assert _windows(again) == _windows(compiled)
    x = {"input_ids": torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(6)), "use_cache": False}
    assert (_run(again, x) - _run(compiled, x)).abs().max() <= 1e-6
    # all-dense patterns in a plan: the original model within 1e-5
    for b in plan.blocks:
        if b.kind == "attention":
            h = len(b.settings["alpha"])
            b.settings.update(sink=[0] * h, alpha=[-1] * h, beta=[0.0] * h)
    dense = moh_compile.compile(model, inputs, _config(), plan=plan)
    assert (_run(dense, x) - _run(model, x)).abs().max() <= 1e-5


def test_composes_after_identity(llama_compiled):
    model, inputs, compiled = llama_compiled
    both = moh_compile.compile(model, inputs, _config("identity+sparse", density=0.5), calibration=_calib())
    assert all(a["identity_max_abs_diff"] <= 1e-5 for a in both.report.actions)
    blk = both.plan.blocks[0]
    assert blk.transform == "identity+sparse" and set(blk.settings) == {"identity", "sparse"}
    assert _windows(both) == _windows(compiled)  # same data, same choice
    x = {"input_ids": torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(7)), "use_cache": False}
    assert (_run(both, x) - _run(compiled, x)).abs().max() <= 1e-6


def test_encoder_two_sided_with_cls_sink():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs, _config(density=0.4), calibration=_calib(mask=True))
    windows = _windows(compiled)
    assert all(w["two_sided"] is True for w in windows)
    assert all(s == (0 if a < 0 else 1) for w in windows for s, a in zip(w["sink"], w["alpha"]))
    assert compiled.report.sections["attention:sparse"]["mean_density"]["64"] < 0.5


def test_invalid_options_and_patterns():
    bad = [({"density": 0}, "density must be in"), ({"density": 1.5}, "density must be in"),
           ({"sink_tokens": -1}, "sink tokens"), ({"profile_lengths": [1]}, "profile lengths"),
           ({"validate_length": 32, "profile_lengths": [32]}, "validate length"), ({"bogus": 1}, "unknown sparse"),
           ({"reorder_heads": "yes"}, "reorder_heads must be"),
           ({"samples": 0}, "samples")]
    for opts, needle in bad:
        with pytest.raises(MohCompileError, match=needle):
            SparseOptions.parse(opts)
    assert SparseOptions.parse({"profile_lengths": [256, 512]}).validate_length == 384
    assert SparseOptions.parse({"profile_lengths": [64]}).validate_length == 48
    for edit, needle in [(dict(alpha=[5]), "one sink/alpha/beta per head"),
                         (dict(alpha=[0] * 4, beta=[0.0] * 4), "empty window"),
                         (dict(beta=[-1.0] * 4), ">= 0"), (dict(sink=None), "needs sink/alpha/beta")]:
        w = {"sink": [1] * 4, "alpha": [8] * 4, "beta": [0.0] * 4, "two_sided": False} | edit
        with pytest.raises(MohCompileError, match=needle):
            check_window(w, 4, "blk")
    with pytest.raises(MohCompileError, match="needs at least 64"):
        pack_batches(Calibration(batches=_calib(n=1, seq=10)), _calib(n=1, seq=10), 64, 4)


def test_compile_errors():
    model, inputs = tiny_llama(layers=1)
    with pytest.raises(MohCompileError, match="density must be in"):
        moh_compile.compile(model, inputs, _config(density=0), calibration=_calib(n=2))
    with pytest.raises(MohCompileError, match="infeasible"):
        moh_compile.compile(model, inputs, _config(density=0.001), calibration=_calib(n=2))
    with pytest.raises(MohCompileError, match="needs calibration"):
        moh_compile.compile(model, inputs, _config())


def test_pack_batches_builds_exact_lengths_and_keeps_cls_sep():
    cls_, sep = 98, 99
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (6, 12), generator=g)
    ids[:, 0] = cls_
    mask = torch.ones(6, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[torch.arange(6), mask.sum(1) - 1] = sep
    batches = [{"input_ids": ids, "attention_mask": mask}]
    holder = Calibration(batches=batches, tokenized=True)
    out = pack_batches(holder, batches, 20, count=5, batch_size=2)
    seqs = torch.cat([b["input_ids"] for b in out])
    assert seqs.shape[1] == 20 and bool((torch.cat([b["attention_mask"] for b in out]) == 1).all())
    assert bool((seqs[:, 0] == cls_).all()) and bool((seqs[:, -1] == sep).all())
    assert not bool((seqs[:, 1:-1] == cls_).any())  # interior [CLS] of joined examples dropped
    assert seqs[0, 1:11].tolist() == ids[0, 1:11].tolist()  # first example's body, then the next one's
    assert seqs[0, 11:18].tolist() == ids[1, 1:7].tolist() + ids[2, 1:2].tolist()


def test_mass_outside_matches_masked_sum():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 37, 8, generator=g), torch.randn(2, 2, 37, 8, generator=g)
    pats = [(2, 5, 0.1), ([0, 1, 3, 0], [3, -1, 7, 1], [0.0, 0.0, 0.2, 0.3]), (40, 2, 0.0)]
    for two_sided in (False, True):
        for mask in (torch.ones(37, 37, dtype=torch.bool).tril(), None):
            got = mass_outside_candidates(q, k, mask, 0.3, pats, two_sided, chunk=7)
            logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
            p = (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).softmax(-1)
            for c, (s, a, b) in enumerate(pats):
                ph = (lambda x: x if isinstance(x, list) else [x] * 4)
                ref = (p * ~window_mask(37, 37, ph(s), ph(a), ph(b), two_sided)).sum(-1).mean((0, 2))
                assert torch.allclose(got[c], ref, atol=1e-5)


def test_cli_sparse_then_plan(tmp_path, capsys):
    torch.save(_calib(n=2), tmp_path / "calib.pt")
    out = tmp_path / "o"
    argv = ["tests.test_sparse_pass:tiny_llama", "--out", str(out), "--attention", "sparse", "--ffn", "keep",
            "--density", "0.5", "--sink-tokens", "2", "--profile-lengths", "32,64", "--validate-length", "40",
            "--profile-samples", "4", "--calib", str(tmp_path / "calib.pt")]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    w = plan["blocks"][0]["settings"]
    assert plan["config"]["options"]["sparse"]["sink_tokens"] == 2
    assert all(s == (0 if a < 0 else 2) for s, a in zip(w["sink"], w["alpha"]))
    report = (out / "report.md").read_text()
    assert "Validation at N=40" in report and (out / "sparse_density.png").exists()
    out2 = tmp_path / "o2"
    assert main(["tests.test_sparse_pass:tiny_llama", "--out", str(out2), "--plan", str(out / "plan.json"),
                 "--attention", "sparse", "--ffn", "keep", "--no-reorder-heads"]) == 0
    plan2 = json.loads((out2 / "plan.json").read_text())
    assert plan2["blocks"][0]["settings"] == w and plan2["config"]["options"]["sparse"]["reorder_heads"] is False
    assert "attention:sparse:layout" not in json.loads((out2 / "report.json").read_text())["sections"]
    for args, needle in [(["--density", "0"], "density must be in"), (["--profile-lengths", "3,x"], "integers"),
                         (["--density", "0.5"], "needs calibration")]:
        capsys.readouterr()
        calib = [] if needle == "needs calibration" else ["--calib", str(tmp_path / "calib.pt")]
        assert main(["tests.test_sparse_pass:tiny_llama", "--out", str(tmp_path / "bad"), "--attention", "sparse",
                     *calib, *args]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err and not (tmp_path / "bad").exists()


# --- pattern semantics at 2k-8k tokens against an independent masked dense reference ------

def _reference_attention(windows):
    """An HF attention function applying each head's pattern from its definition, row chunk by chunk."""
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        w = windows[module.layer_idx]
        b, h, s, d = query.shape
        key, value = (t.repeat_interleave(h // t.shape[1], 1) for t in (key, value))
        out = torch.empty_like(query)
        j = torch.arange(s).view(1, -1)
        for hd in range(h):
            sink, alpha, beta = w["sink"][hd], w["alpha"][hd], w["beta"][hd]
            span = max(1, min(s, int(alpha + beta * s)))
            for r0 in range(0, s, 1024):
                i = torch.arange(r0, min(s, r0 + 1024)).view(-1, 1)
                vis = (j <= i) & ((alpha < 0) | (i - j < span) | (j < sink) | (i < sink))
                scores = (query[:, hd, r0:r0 + 1024] @ key[:, hd].transpose(-1, -2)) * scaling
                out[:, hd, r0:r0 + 1024] = scores.masked_fill(~vis, float("-inf")).softmax(-1) @ value[:, hd]
        return out.transpose(1, 2).contiguous(), None
    return attend


@pytest.mark.parametrize("s", [2048, pytest.param(8192, marks=pytest.mark.slow)])
def test_decoder_pattern_semantics_long(s):
    from transformers import AttentionInterface

    model, inputs = tiny_llama(layers=1, max_pos=8192)
    windows = [{"sink": [4, 4, 0, 0], "alpha": [64, 64, 16, 16], "beta": [0.0, 0.0, 0.05, 0.05], "two_sided": False}]
    compiled = moh_compile.compile(model, inputs, _config(), plan=Plan.from_json(json.dumps(
        {"blocks": [{"name": "layers.0.self_attn", "kind": "attention", "transform": "sparse",
                     "settings": windows[0]}]})))
    assert compiled.report.actions[0]["transform"] == "sparse"
    x = {"input_ids": torch.randint(0, 100, (1, s), generator=torch.Generator().manual_seed(s)), "use_cache": False}
    AttentionInterface.register("sparse_reference", _reference_attention(windows))
    model.set_attn_implementation("sparse_reference")
    try:
        ref = _run(model, x)
        model.set_attn_implementation("sdpa")
        dense = _run(model, x)
    finally:
        model.set_attn_implementation("sdpa")
    out = _run(compiled, x)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert (dense - ref).abs().max().item() > 1e-3  # the pattern really changes the result
