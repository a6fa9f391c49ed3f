"""longalign_ops: ops for long-context alignment training.

LongAlign packing and loss weighting, LOGO position synthesis and preference losses, and the
Triton kernels under them (variable-length attention, token-weighted fused cross-entropy).
"""
from ._validation import set_validation
from .attention import varlen_attention
from .batch import PackedBatch
from .cross_entropy import (CrossEntropyOutput, cross_entropy, fused_linear_cross_entropy, longalign_loss_weights,
                            sequence_logprobs)
from . import losses
from .positions import synthesize_positions

__version__ = "0.1.0"


def __getattr__(name):
    # the packer is imported on first use, not with the package: `python -m longalign_ops.packing`
    # then runs the module once, without runpy's "found in sys.modules" warning
    if name in ("PackPlan", "pack"):
        from . import packing

        return getattr(packing, name)
    raise AttributeError(f"module 'longalign_ops' has no attribute {name!r}")

__all__ = [
    "CrossEntropyOutput", "PackPlan", "PackedBatch", "cross_entropy", "fused_linear_cross_entropy", "longalign_loss_weights", "pack",
    "losses", "sequence_logprobs", "set_validation", "synthesize_positions", "varlen_attention",
]
