"""Public token-weighted cross-entropy ops: checks, dispatch, per-sequence log-probs and the
LongAlign loss weights. Kernels in ``longalign_ops.kernels.weighted_cross_entropy``."""
from __future__ import annotations

from typing import Optional

import torch

from ._validation import check_cu_seqlens, check_finite_number, check_int, check_tensor, use_triton

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("none", "sum", "mean")


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast would give a matmul here, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _rows_for(t: torch.Tensor):
    from .kernels import weighted_cross_entropy as k

    return k.triton_rows if use_triton(t) else k.torch_rows


def _check_targets(labels, token_weights, T: int, V: int, ignore_index: int, device, reduction, softcap):
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    if labels.shape[0] != T:
        raise ValueError(f"labels must have {T} entries (one per token), got {labels.shape[0]}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ignore_index = check_int("ignore_index", ignore_index, minimum=-(2 ** 62))
    if softcap is not None:
        check_finite_number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {softcap}")
    flags = [((labels != ignore_index) & ((labels < 0) | (labels >= V))).sum()]
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, dtypes=_FLOATS + (torch.float64,), device=device)
        if token_weights.shape[0] != T:
            raise ValueError(f"token_weights must have {T} entries (one per token), got {token_weights.shape[0]}")
        flags += [torch.isnan(token_weights).sum(), (token_weights < 0).sum(), torch.isinf(token_weights).sum()]
    # one host sync for every value check
    bad = torch.stack(flags).tolist() if T else [0] * len(flags)
    if bad[0]:
        raise ValueError(f"labels: {bad[0]} of {T} are outside [0, {V}) and not ignore_index={ignore_index}")
    if token_weights is not None:
        for count, what in zip(bad[1:], ("NaN", "negative", "infinite")):
            if count:
                raise ValueError(f"token_weights: {count} of {T} are {what}")
    labels = labels.long().contiguous()
    weights = token_weights.float().contiguous() if token_weights is not None else None
    return labels, weights, ignore_index


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean",
                               softcap: Optional[float] = None) -> torch.Tensor:
    """lm head + token-weighted cross-entropy without materialising the ``(T, V)`` logits.

    Args:
        hidden: ``(T, H)`` fp16/bf16/fp32 final hidden states (already aligned with ``labels``).
        weight: ``(V, H)`` lm-head weight, hidden's dtype. bias: optional ``(V,)``.
        labels: ``(T,)`` int64 targets in ``[0, V)`` or ``ignore_index``.
        token_weights: optional ``(T,)`` non-negative weights ``w_t``.
        reduction: "none" -> ``(T,)`` fp32 ``w_t * nll_t`` (0 where ignored); "sum"; "mean" ->
            ``sum(w_t nll_t) / sum(w_t)`` over non-ignored tokens (0 when nothing counts).
        softcap: optional logit soft-capping ``c * tanh(z / c)`` (Gemma 2).

    Works in chunks of tokens whose logits take about the hidden states' memory (see
    ``kernels.weighted_cross_entropy.chunk_tokens``). Differentiable in hidden, weight, bias.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=_FLOATS)
    device = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=device)
    T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be (V, {H}) to match hidden, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=_FLOATS, device=device)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have {V} entries, got {bias.shape[0]}")
    labels, weights, ignore_index = _check_targets(labels, token_weights, T, V, ignore_index, device, reduction,
                                                   softcap)
    from .kernels.weighted_cross_entropy import FusedLinearCrossEntropyFunction

    # under autocast, the lm head runs in the autocast dtype as nn.Linear would (the casts are
    # differentiable, so fp32 parameters still get fp32 gradients); the loss math stays fp32
    grad_enabled = torch.is_grad_enabled()  # read before the Function runs its forward under no_grad
    amp = _autocast_dtype(device)
    if amp is not None and hidden.dtype == torch.float32:
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    with torch.autocast(device_type=device.type, enabled=False):
        hidden = hidden.contiguous()
        return FusedLinearCrossEntropyFunction.apply(hidden, weight.contiguous(), bias, labels, weights,
                                                     ignore_index, reduction, softcap, _rows_for(hidden), grad_enabled)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, token_weights: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", softcap: Optional[float] = None) -> torch.Tensor:
    """Token-weighted cross-entropy on ``(T, V)`` logits; semantics as
    :func:`fused_linear_cross_entropy`. Differentiable in logits (never modified in place)."""
    check_tensor("logits", logits, ndim=2, dtypes=_FLOATS)
    T, V = logits.shape
    labels, weights, ignore_index = _check_targets(labels, token_weights, T, V, ignore_index, logits.device,
                                                   reduction, softcap)
    from .kernels.weighted_cross_entropy import CrossEntropyFunction

    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return CrossEntropyFunction.apply(logits, labels, weights, ignore_index, reduction, softcap,
                                          _rows_for(logits), torch.is_grad_enabled())


def _sequence_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=T)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                      *, bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """``(B,)`` fp32: per packed sequence, the sum (or, with ``average``, the mean) of
    ``log p(label_t)`` over its non-ignored tokens; 0 for a sequence with none.

    hidden ``(T, H)``, weight ``(V, H)``, labels ``(T,)`` already shifted (label t follows
    position t), cu_seqlens ``(B+1,)`` int32 over the T tokens. Differentiable in hidden,
    weight and bias; the logits are never materialised.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=_FLOATS)
    T = hidden.shape[0]
    check_cu_seqlens("cu_seqlens", cu_seqlens, T, device=hidden.device, force=True)
    nll = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none")
    B = cu_seqlens.numel() - 1
    seq = _sequence_ids(cu_seqlens, T)
    sums = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, seq, -nll)
    if not average:
        return sums
    counts = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(
        0, seq, (labels != ignore_index).float())
    return sums / counts.clamp_min(1.0)


def longalign_loss_weights(cu_seqlens: torch.Tensor, labels: torch.Tensor, *, num_packs: int, num_sequences: int,
                           ignore_index: int = -100) -> torch.Tensor:
    """``(T,)`` fp32 LongAlign weights ``K / (N_i * M)`` on the target tokens of each sequence
    (0 on ignored ones): K packs and M sequences in the whole optimisation step (all ranks),
    N_i the target tokens of sequence i. With ``reduction="sum"``, summing over the step's packs
    and averaging over the K ranks gives ``(1/M) sum_i L_i / N_i``."""
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
    T = labels.shape[0]
    check_cu_seqlens("cu_seqlens", cu_seqlens, T, device=labels.device, force=True)
    K = check_int("num_packs", num_packs, minimum=1)
    M = check_int("num_sequences", num_sequences, minimum=1)
    B = cu_seqlens.numel() - 1
    seq = _sequence_ids(cu_seqlens, T)
    target = labels != ignore_index
    n = torch.zeros(B, dtype=torch.float64, device=labels.device).index_add(0, seq, target.double())
    per_seq = torch.where(n > 0, K / (n.clamp_min(1.0) * M), torch.zeros_like(n))
    return (per_seq[seq] * target).float()
