"""Test configuration: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
A GPU run (bench/gpu_check.sh) sets TRITON_INTERPRET=0 and selects `-m gpu`.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# triton decides at decoration time whether a @triton.jit function is interpreted; the ops import
# their kernel modules lazily, so a test that runs the PyTorch path with TRITON_INTERPRET=0 set
# (the training loop's in-process tests) would otherwise fix them as GPU-compiled functions for
# every later test of the session. Import them here, once, under the interpreter.
import longalign_ops.kernels.varlen_attention  # noqa: E402,F401
import longalign_ops.kernels.weighted_cross_entropy  # noqa: E402,F401


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
