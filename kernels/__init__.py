"""Triton kernels of longalign_ops, one op per file (installed as longalign_ops.kernels)."""
