"""benchmarks/profile_onnx.py: per-op-type kernel times read from a real ONNX Runtime profile."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_onnx import op_times  # noqa: E402

sys.path.pop(0)


def test_op_times_splits_a_run_by_op_type(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])
    w = helper.make_tensor("w", TensorProto.FLOAT, [256, 256], np.ones((256, 256), np.float32).ravel().tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [x], [y], [w])
    path = tmp_path / "m.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ORT 1.31 reads (onnx 1.23 writes a newer one by default)
    onnx.save(model, path)
    per_op, total = op_times(str(path), lambda s: {"x": np.ones((64, 256), np.float32)}, threads=1, runs=2)
    assert set(per_op) == {"MatMul", "Relu"}
    assert all(ms > 0 for ms in per_op.values())
    assert abs(total - sum(per_op.values())) < 1e-9
