"""Package-level checks: imports without a GPU, the kernels (not the fallbacks) run in CI, and
the CUDA library was compiled where nvcc exists."""
import ctypes
import os
import shutil

import pytest
import torch

import longalign_ops
from longalign_ops._validation import use_triton


def test_kernels_subpackage_is_installed_under_the_package():
    import longalign_ops.kernels.varlen_attention as k

    assert k.__name__ == "longalign_ops.kernels.varlen_attention"


def test_ci_runs_the_triton_kernels_on_cpu():
    # conftest sets TRITON_INTERPRET=1: CPU tensors take the Triton path, not the reference
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert use_triton(torch.empty(1))
    from longalign_ops.cross_entropy import _rows_for
    from longalign_ops.kernels.weighted_cross_entropy import triton_rows

    assert _rows_for(torch.empty(1)) is triton_rows


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_library_compiled_with_nvcc():
    """nvcc is present on CI: the build must have produced the CUDA position library and it
    must export the entry point the Python side calls."""
    here = os.path.dirname(longalign_ops.__file__)
    from longalign_ops import positions

    path = positions.cuda_library_path()
    assert path is not None and os.path.exists(path), f"no CUDA library next to {here}"
    lib = ctypes.CDLL(path)
    assert hasattr(lib, "longalign_synthesize_positions_cuda")
