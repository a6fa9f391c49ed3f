"""Public variable-length attention: checks, dispatch (Triton on GPU or under the interpreter,
the PyTorch reference on plain CPU), and the autograd entry point."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._validation import check_cu_seqlens, check_finite_number, check_int, check_tensor, use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     softmax_scale: Optional[float] = None, return_lse: bool = False, deterministic: bool = False):
    """Attention within each packed sequence.

    Args:
        q: ``(total_q, Hq, D)`` fp16/bf16/fp32. k, v: ``(total_k, Hk, D)``, same dtype, ``Hq % Hk == 0``
            (query heads ``[g*Hq/Hk, (g+1)*Hq/Hk)`` share kv head g). D in 8..256, a multiple of 8.
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` int32 cumulative lengths, from 0 to total.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence.
        causal: mask future keys; with ``seqlen_q != seqlen_k`` aligned bottom-right (flash-attn 2).
        softmax_scale: defaults to ``1/sqrt(D)``.
        return_lse: also return the softmax log-sum-exp ``(Hq, total_q)`` fp32 (-inf for a row
            that sees no key).
        deterministic: accepted for flash-attn parity; the backward never uses atomics, so
            gradients are always bitwise repeatable.

    Returns:
        out ``(total_q, Hq, D)`` in q's dtype, and lse if asked for. Differentiable in q, k, v.
    """
    check_tensor("q", q, ndim=3, dtypes=_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=device)
    total_q, Hq, D = q.shape
    total_k, Hk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"q and k must share the head dim, got {D} and {Dk}")
    if D < 8 or D > 256 or D % 8:
        raise ValueError(f"head dim must be a multiple of 8 in [8, 256], got {D}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hk})")
    max_q = check_int("max_seqlen_q", max_seqlen_q)
    max_k = check_int("max_seqlen_k", max_seqlen_k)
    lens_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, device=device, max_seqlen=max_q,
                              max_seqlen_name="max_seqlen_q")
    lens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, device=device, max_seqlen=max_k,
                              max_seqlen_name="max_seqlen_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else check_finite_number("softmax_scale", softmax_scale)

    if use_triton(q):
        from .kernels.varlen_attention import VarlenAttentionFunction

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, lens_q, lens_k, max_q, max_k,
                                                 bool(causal), scale)
    else:
        with torch.autocast(device_type=q.device.type, enabled=False):  # the reference computes in fp32
            out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=bool(causal),
                                                  softmax_scale=scale, compute_dtype=torch.float32)
        out, lse = out.to(q.dtype), lse.float()
    return (out, lse) if return_lse else out
