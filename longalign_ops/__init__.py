"""longalign_ops: ops for long-context alignment training.

LongAlign packing and loss weighting, LOGO position synthesis and preference losses, and the
Triton kernels under them (variable-length attention, token-weighted fused cross-entropy).
"""
from ._validation import set_validation
from .attention import varlen_attention
from .packing import PackPlan, pack

__version__ = "0.1.0"

__all__ = ["PackPlan", "pack", "set_validation", "varlen_attention"]
