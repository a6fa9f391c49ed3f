"""Register longalign_ops' varlen attention with transformers as ``attn_implementation="longalign"``.

    import longalign_ops.integrations.transformers  # registers on import
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longalign")

Packed, padding-free batches work as with transformers' flash-attention path: a batch of one
row whose ``position_ids`` restart at 0 per sequence, or explicit ``cu_seq_lens_q/k`` and
``max_length_q/k`` keyword arguments to the model's forward (needed when positions do not
restart at 0, as with LOGO's synthesised ids). Rows of a padded batch are unpadded through the
2-D attention mask; otherwise each row is one sequence.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..attention import varlen_attention

NAME = "longalign"


def _cu_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=flat.device), starts])
    return torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])


def longalign_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention interface: query ``(B, Hq, S, D)``, key/value ``(B, Hk, S, D)``;
    returns ``((B, S, Hq, D), None)``."""
    if dropout not in (0, 0.0) and module.training:
        raise NotImplementedError("attention dropout is not implemented; set attention_dropout=0.0")
    if sliding_window is not None:
        raise NotImplementedError("sliding-window attention is not implemented")
    if softcap not in (None, 0.0):
        raise NotImplementedError("attention softcapping is not implemented")
    if attention_mask is not None and attention_mask.dim() != 2:
        # our registered mask function gives None or the 2-D padding mask; any other mask would
        # be ignored here, so refuse it rather than attend where it forbids
        raise ValueError(f"attn_implementation='{NAME}' takes no mask or a 2-D padding mask, got a mask of shape "
                         f"{tuple(attention_mask.shape)}; pass packed sequences through position_ids or "
                         f"cu_seq_lens_q/k instead")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    B, Hq, S, D = query.shape
    Sk = key.shape[2]
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sk, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * Sk, value.shape[1], D)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
        max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
    elif attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        # padded batch: attend over the real tokens only, then scatter back
        keep = attention_mask.reshape(-1).bool()
        idx = keep.nonzero().view(-1)
        seqlens = attention_mask.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        out = varlen_attention(q[idx], k[idx], v[idx], cu, cu, int(seqlens.max()), int(seqlens.max()),
                               causal=causal, softmax_scale=scaling)
        full = out.new_zeros(B * S, Hq, D)
        full[idx] = out
        return full.view(B, S, Hq, D), None
    elif B == 1 and position_ids is not None and S == Sk and position_ids.numel() == S and \
            bool((position_ids.reshape(-1)[1:] == 0).any()):
        cu_q = cu_k = _cu_from_position_ids(position_ids)
        max_q = max_k = int(cu_q.diff().max())
    else:
        cu_q = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=q.device)
        max_q, max_k = S, Sk
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scaling)
    return out.view(B, S, Hq, D), None


def register() -> None:
    """Register the attention function and a flash-style mask (None or the 2-D padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, longalign_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()
