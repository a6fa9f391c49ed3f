"""longalign_ops: ops for long-context alignment training.

LongAlign packing and loss weighting, LOGO position synthesis and preference losses, and the
Triton kernels under them (variable-length attention, token-weighted fused cross-entropy).
"""
from .packing import PackPlan, pack

__version__ = "0.1.0"

__all__ = ["PackPlan", "pack"]
