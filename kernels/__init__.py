"""Triton kernels of longalign_ops, one op per file (installed as longalign_ops.kernels).

This package imports only torch and triton: dispatch, validation and the autograd / custom-op
registration live one layer up, in longalign_ops."""
import os


def on_compiled_gpu(t) -> bool:
    """The kernels run compiled on a GPU (not in the interpreter): GPU tile configs apply."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
