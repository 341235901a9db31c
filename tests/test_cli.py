"""The CLI end to end (real MiniLM) and every bad-input case: one line, non-zero exit, no output left."""
import json
import subprocess
import sys

import pytest
import torch

from moh_compile.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "moh_compile.cli", *args], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("moh-compile: error:") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_cli_compiles_real_minilm(tmp_path):
    out = tmp_path / "minilm"
    code, stdout, stderr = run_cli("example:minilm", "--out", str(out))
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == {"model.pt2", "plan.json", "report.md", "report.json"}
    report = json.loads((out / "report.json").read_text())
    attn = [b for b in report["blocks"] if b["kind"] == "attention"]
    assert len(attn) == 6 and all(b["num_heads"] == 12 and b["head_dim"] == 32 for b in attn)
    assert len(report["actions"]) == 12
    assert max(a["identity_max_abs_diff"] for a in report["actions"]) <= 1e-5
    import moh_compile  # noqa: F401  (registers the ops needed to load the program)
    from moh_compile.loading import minilm_path
    import transformers

    program = torch.export.load(str(out / "model.pt2"))
    ref = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    ids = torch.randint(0, 1000, (3, 21))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = program.module()(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert (got - want).abs().max().item() <= 1e-5
    # a second run refuses to overwrite without --force
    code, _, stderr = run_cli("example:minilm", "--out", str(out))
    assert code == 2 and "--force" in stderr


@pytest.mark.slow
def test_cli_inspect_real_minilm():
    code, stdout, stderr = run_cli("inspect", "example:minilm", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert sum(b["kind"] == "ffn" for b in report["blocks"]) == 6
    assert "Hugging Face directory" in stderr


def test_cli_inspects_hugging_face_encoder_decoder_directory(tmp_path, capsys):
    """A saved transformers directory (tiny BART): example inputs derived from its config, with a
    decoder length of their own; the decoder's cross-attention is found as such."""
    transformers = pytest.importorskip("transformers")
    model = transformers.BartModel(transformers.BartConfig(
        encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "bart")
    assert main(["inspect", str(tmp_path / "bart"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    attn = [b for b in report["blocks"] if b["kind"] == "attention"]
    assert sorted((b["cross"], b["causal"]) for b in attn) == [(False, False), (False, True), (True, False)]


def test_cli_compiles_olmo2_directory_with_moh_and_verifies_onnx(tmp_path, capsys):
    """A saved OLMo 2 directory (tiny config: its query norm spans all heads, so its queries stay in
    the graph) through the CLI: MoH calibrated on a .pt file of token ids, both ONNX forms
    exported, then `moh-compile verify` runs them in ONNX Runtime against model.pt2."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.Olmo2Model(transformers.Olmo2Config(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=100)).save_pretrained(tmp_path / "olmo2")
    ids = torch.randint(0, 100, (16, 24), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "calib.pt")
    out = tmp_path / "out"
    assert main([str(tmp_path / "olmo2"), "--out", str(out), "--attention", "moh", "--active-heads", "0.5",
                 "--ffn", "keep", "--calib", str(tmp_path / "calib.pt"), "--export", "onnx"]) == 0
    report = (out / "report.md").read_text()
    assert "GQA (query from graph)" in report and "Queries left to the model's graph" in report
    assert {p.name for p in out.glob("model.*.onnx")} == {"model.custom.onnx", "model.portable.onnx"}
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0


def test_missing_file(capsys, tmp_path):
    _one_line_error(capsys, main(["inspect", str(tmp_path / "nope.pt")]), "no such file")


def test_corrupt_file(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    _one_line_error(capsys, main([str(bad), "--out", str(tmp_path / "o")]), "not a PyTorch file")
    assert not (tmp_path / "o").exists()


def test_corrupt_pt2(capsys, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04garbage")
    _one_line_error(capsys, main(["inspect", str(bad)]), "not a readable exported program")


def test_pickled_module_needs_trust_pickle(capsys, tmp_path):
    from tests.models import SDPABlock

    path = tmp_path / "whole.pt"
    torch.save(SDPABlock(), path)
    _one_line_error(capsys, main(["inspect", str(path), "--input-shape", "2,8,64"]), "--trust-pickle")
    assert main(["inspect", str(path), "--input-shape", "2,8,64", "--trust-pickle"]) == 0


def test_state_dict_needs_architecture(capsys, tmp_path):
    from tests.models import SDPABlock

    path = tmp_path / "sd.pt"
    torch.save(SDPABlock().state_dict(), path)
    _one_line_error(capsys, main(["inspect", str(path)]), "needs an architecture")
    assert main(["inspect", str(path), "--factory", "tests.models:SDPABlock", "--input-shape", "2,8,64"]) == 0


def test_model_without_attention(capsys, tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)), path)
    _one_line_error(capsys, main(["inspect", str(path), "--trust-pickle", "--input-shape", "2,8"]),
                    "no attention blocks")


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return x
        return -x


def data_dependent():
    return DataDependent()


def test_uncapturable_model(capsys):
    code = main(["inspect", "tests.test_cli:data_dependent", "--input-shape", "2,4"])
    _one_line_error(capsys, code, "torch.export could not capture")


@pytest.mark.parametrize("args,needle", [
    (["--input-shape", "2,y"], "bad --input-shape"),
    (["--input-shape", "2,0"], "positive"),
    (["--input-shape", "2,3:complex"], "dtype"),
])
def test_bad_option_values(capsys, args, needle):
    _one_line_error(capsys, main(["inspect", "tests.models:SDPABlock", *args]), needle)


def test_bad_pass_name_is_one_line_error(capsys, tmp_path):
    _one_line_error(capsys, main(["tests.models:SDPABlock", "--out", str(tmp_path / "x"), "--attention", "bogus"]),
                    "attention must be one of")
    _one_line_error(capsys, main(["tests.models:SDPABlock", "--out", str(tmp_path / "x"), "--attention",
                                  "identity+keep"]), "attention must be one of")
    assert not (tmp_path / "x").exists()


def test_composed_attention_passes_stay_exact_at_identity():
    import moh_compile
    from tests.models import build, main_output

    model, inputs, _, _ = build("llama")
    compiled = moh_compile.compile(model, inputs, moh_compile.CompileConfig(attention="identity+identity"))
    plan = compiled.plan.blocks[0]
    assert plan.transform == "identity+identity" and plan.settings == {"identity": {}}
    with torch.no_grad():
        diff = (main_output(compiled(**inputs) if isinstance(inputs, dict) else compiled(*inputs))
                - main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))).abs().max()
    assert diff <= 1e-5


def test_bad_factory(capsys):
    _one_line_error(capsys, main(["inspect", "no_such_module_xyz:build"]), "could not import")


def test_compile_via_factory_writes_outputs(tmp_path):
    out = tmp_path / "o"
    assert main(["tests.models:ManualBlock", "--input-shape", "2,8,64", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert [b["transform"] for b in plan["blocks"]] == ["identity", "identity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
