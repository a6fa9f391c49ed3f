"""Module forms of the ops, for dropping into a trainer."""
from __future__ import annotations

from typing import Optional

import torch

from .cross_entropy import fused_linear_cross_entropy, longalign_loss_weights


class LongAlignLoss(torch.nn.Module):
    """The lm head plus LongAlign's token-weighted loss, in place of ``lm_head`` + the model's loss.

    ``loss = LongAlignLoss(model.lm_head)(hidden, labels, cu_seqlens, num_packs=K, num_sequences=M)``

    hidden ``(..., H)`` (flattened to ``(T, H)``), labels ``(...)`` already shifted. With
    cu_seqlens, K and M it returns this pack's ``sum_t K/(N_i M) * nll_t`` (LongAlign eq. 4:
    under data parallelism the gradient average over K ranks makes every sequence count
    equally); without them, the plain token mean. The logits are never materialised.
    """

    def __init__(self, lm_head: torch.nn.Linear, *, ignore_index: int = -100, softcap: Optional[float] = None):
        super().__init__()
        self.lm_head = lm_head
        self.ignore_index = ignore_index
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *,
                num_packs: Optional[int] = None, num_sequences: Optional[int] = None) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if cu_seqlens is None:
            return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                              reduction="mean", softcap=self.softcap)
        if num_packs is None or num_sequences is None:
            raise ValueError("num_packs and num_sequences (the step's K and M) are needed with cu_seqlens")
        w = longalign_loss_weights(cu_seqlens, labels, num_packs=num_packs, num_sequences=num_sequences,
                                   ignore_index=self.ignore_index)
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, token_weights=w,
                                          ignore_index=self.ignore_index, reduction="sum", softcap=self.softcap)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``, constructed and called the same way:
    ``FusedLinearCrossEntropyLoss(label_smoothing=0.1)(lin_weight, _input, target, bias=None)``,
    so a Liger user swaps one import. Options and return types as
    :func:`longalign_ops.fused_linear_cross_entropy`; ``token_weights=`` is our addition.
    Liger's class weights (``ce_weight``) and ``use_token_scaling`` raise NotImplementedError."""

    def __init__(self, ce_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False,
                 accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        super().__init__()
        if ce_weight is not None:
            raise NotImplementedError("ce_weight (per-class weights) is not implemented; per-token weights are: "
                                      "pass token_weights= to the call")
        if use_token_scaling:
            raise NotImplementedError("use_token_scaling is not implemented")
        self.options = dict(ignore_index=ignore_index, lse_square_scale=lse_square_scale,
                            label_smoothing=label_smoothing, reduction=reduction, softcap=softcap,
                            return_z_loss=return_z_loss, accum_dtype=accum_dtype,
                            return_token_accuracy=return_token_accuracy,
                            return_predicted_tokens=return_predicted_tokens)

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, token_weights: Optional[torch.Tensor] = None):
        return fused_linear_cross_entropy(_input.reshape(-1, _input.shape[-1]), lin_weight, target.reshape(-1),
                                          bias=bias, token_weights=token_weights, **self.options)
