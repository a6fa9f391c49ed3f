"""flash-attn 2's varlen API on top of :func:`longalign_ops.varlen_attention`.

Code written for flash-attn (LongAlign's and ProLong's modelling code, transformers' padding-free
path) runs unchanged with ``from longalign_ops.flash_attn_compat import flash_attn_varlen_func``.
Features we do not implement (dropout, ALiBi, paged KV) raise NotImplementedError instead of
being ignored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention import varlen_attention


def _unsupported(dropout_p, alibi_slopes, block_table):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p must be 0.0 (attention dropout is not implemented), got {dropout_p}")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes (ALiBi) is not implemented")
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not implemented")


def _softcap(softcap) -> Optional[float]:
    """flash-attn's 0.0 means no soft-capping; a negative cap is an error."""
    if softcap is None or softcap == 0.0:
        return None
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0:
        raise ValueError(f"softcap must be >= 0 (0.0: none), got {softcap!r}")
    return float(softcap)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                           deterministic: bool = False, return_attn_probs: bool = False, block_table=None):
    """flash-attn 2's signature and defaults (note ``causal=False``). With ``return_attn_probs``
    returns ``(out, softmax_lse, None)``: the probabilities themselves are never materialised.
    As flash-attn, ``softmax_lse`` is +inf for a query row that sees no key (its output is 0)."""
    _unsupported(dropout_p, alibi_slopes, block_table)
    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                softmax_scale=softmax_scale, window_size=window_size, softcap=_softcap(softcap),
                                return_lse=True, deterministic=deterministic)
    if not return_attn_probs:
        return out
    return out, lse.masked_fill(lse == float("-inf"), float("inf")), None


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                                     alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False):
    """qkv ``(total, 3, H, D)``."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p: float = 0.0, softmax_scale=None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                                    deterministic: bool = False, return_attn_probs: bool = False):
    """kv ``(total_k, 2, Hk, D)``."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, softmax_scale=None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False):
    """Dense batches: q ``(B, Sq, Hq, D)``, k/v ``(B, Sk, Hk, D)``, every row one sequence.
    With ``return_attn_probs``: ``(out, softmax_lse (B, Hq, Sq), None)``."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=q.device)
    res = flash_attn_varlen_func(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, *k.shape[2:]),
                                 v.reshape(B * Sk, *v.shape[2:]), cu_q, cu_k, Sq, Sk, dropout_p, softmax_scale,
                                 causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    if return_attn_probs:
        out, lse, _ = res
        return out.view(B, Sq, Hq, D), lse.view(Hq, B, Sq).transpose(0, 1), None
    return res.view(B, Sq, Hq, D)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale=None, causal: bool = False,
                              window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """qkv ``(B, S, 3, H, D)``."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0, softmax_scale=None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                             deterministic: bool = False, return_attn_probs: bool = False):
    """q ``(B, Sq, Hq, D)``, kv ``(B, Sk, 2, Hk, D)``."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# flash-attn 1's name, still imported by older long-context code (LongAlign's Llama patch)
flash_attn_unpadded_func = flash_attn_varlen_func
