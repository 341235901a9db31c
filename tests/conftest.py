"""Settings for parallel runs (pytest -n N, pytest-xdist).

Each worker uses one torch thread: the workers already share the cores, and two workers with two
threads each on a 2-core machine made the calibration tests 4-6x slower. Modules whose
module-scoped fixture is expensive (ONNX exports, calibrated compiles, the Triton interpreter run)
stay on one worker (--dist loadgroup), so that fixture is built once.
"""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ONE_WORKER_MODULES = {"test_onnx_backend", "test_triton_kernels", "test_moepp_pass", "test_sparse_pass"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.stem in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
