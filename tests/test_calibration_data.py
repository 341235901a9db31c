"""Calibration inputs in every accepted form, and clear errors for bad ones."""
import pytest
import torch

from moh_compile.calibrate.data import Calibration, as_calibration, load_lines
from moh_compile.calibrate.metrics import fidelity, mean_pooled_embeddings, topk_neighbour_overlap
from moh_compile.calibrate.ridge import ridge
from moh_compile.errors import MohCompileError
from moh_compile.rewrite import record_values


def test_tensor_forms_are_batched(tmp_path):
    x = torch.randn(10, 4, 8)
    assert [b[0].shape[0] for b in as_calibration(x, batch_size=4).batches] == [4, 4, 2]
    d = {"input_ids": torch.zeros(5, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)}
    batches = as_calibration(d, batch_size=2).batches
    assert len(batches) == 3 and set(batches[0]) == set(d)
    torch.save([x[:3], x[3:]], tmp_path / "c.pt")
    assert [b[0].shape[0] for b in as_calibration(str(tmp_path / "c.pt")).batches] == [3, 7]
    assert len(as_calibration(iter([x[:2], (x[2:4],)])).batches) == 2


def test_forward_loop_is_handed_the_module():
    seen = []
    calib = as_calibration(lambda model: seen.append(model(torch.ones(2))))
    calib.run(lambda t: t * 3)
    assert torch.equal(seen[0], torch.full((2,), 3.0))


def test_bad_calibration_inputs_fail_clearly(tmp_path):
    with pytest.raises(MohCompileError, match="does not exist"):
        as_calibration(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(MohCompileError, match="cannot load calibration tensors"):
        as_calibration(str(tmp_path / "bad.pt"))
    torch.save({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, tmp_path / "mismatch.pt")
    with pytest.raises(MohCompileError, match="disagree on the batch"):
        as_calibration(str(tmp_path / "mismatch.pt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(MohCompileError, match="no non-empty lines"):
        load_lines(tmp_path / "empty.txt")
    with pytest.raises(MohCompileError, match="needs a tokenizer"):
        as_calibration("example")
    with pytest.raises(MohCompileError, match="must be 'example'"):
        (tmp_path / "data.csv").write_text("1,2")
        as_calibration(str(tmp_path / "data.csv"))


def test_keyword_batches_are_matched_to_the_model_inputs():
    ids = torch.zeros(2, 3, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    text_like = Calibration(batches=[{"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}], tokenized=True)
    batch = text_like.match_inputs(example).batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "use_cache"}
    user = Calibration(batches=[{"input_ids": ids, "extra": ids}])
    with pytest.raises(MohCompileError, match="do not match"):
        user.match_inputs(example)


def test_bundled_text_has_no_eval_line_in_calibration():
    calib, held_out = set(load_lines("example")), set(load_lines("example-eval"))
    assert len(calib) > 1000 and len(held_out) > 300 and not calib & held_out


def test_metrics_and_ridge_are_exact_where_the_math_is():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    e = mean_pooled_embeddings(h, mask)
    torch.testing.assert_close(e[0], torch.nn.functional.normalize(h[0, :2].mean(0), dim=0))
    a = torch.randn(30, 6, generator=g)
    res = fidelity(a, 2 * a)
    assert res["cosine"] == pytest.approx(1.0) and res["knn10"] == 1.0
    assert topk_neighbour_overlap(a, torch.randn(30, 6, generator=g), 5) < 0.7
    w_true = torch.randn(6, 2, generator=g)
    w, b = ridge(a, a @ w_true + 1.5, lam=1e-10)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, torch.full((2,), 1.5), atol=1e-4, rtol=1e-4)


def test_record_values_collects_one_value_per_call():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    inputs = [torch.randn(2, 3), torch.randn(4, 3)]
    values = record_values(gm, {"relu": node}, lambda: [gm(x) for x in inputs])
    assert [v.shape[0] for v in values["relu"]] == [2, 4]
    torch.testing.assert_close(values["relu"][1], gm(inputs[1]))
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function") == 0  # probes removed
