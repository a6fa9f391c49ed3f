"""Test configuration: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
A GPU run (bench/gpu_check.sh) sets TRITON_INTERPRET=0 and selects `-m gpu`.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
