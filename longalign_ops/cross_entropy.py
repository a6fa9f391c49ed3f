"""Public token-weighted cross-entropy ops: checks, the ``torch.library`` custom ops
(``longalign::fused_linear_cross_entropy``, ``longalign::cross_entropy`` and their backward ops,
with fake kernels and autograd registered), per-sequence log-probs and the LongAlign loss weights.
Kernels in ``longalign_ops.kernels.weighted_cross_entropy``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._validation import (assert_on_device, check_finite_number, check_int, check_tensor, compiling, faking,
                          validation_enabled)
from .batch import PackedBatch, sequence_map
from .kernels._dispatch import use_triton

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("none", "sum", "mean")
Tensor = torch.Tensor


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast would give a matmul here, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_targets(labels, token_weights, T: int, V: int, ignore_index: int, device, reduction, softcap):
    """Shape / dtype checks always; value checks (one host sync for all of them) only while
    validation is on. Returns int64 labels, fp32 weights (or None) and the ignore index."""
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    if labels.shape[0] != T:
        raise ValueError(f"labels must have {T} entries (one per token), got {labels.shape[0]}")
    if V < 1:
        raise ValueError(f"the vocabulary must have at least one entry, got V={V}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ignore_index = check_int("ignore_index", ignore_index, minimum=-(2 ** 62))
    if softcap is not None:
        check_finite_number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {softcap}")
    weights = None
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, dtypes=_FLOATS + (torch.float64,), device=device)
        if token_weights.shape[0] != T:
            raise ValueError(f"token_weights must have {T} entries (one per token), got {token_weights.shape[0]}")
        weights = token_weights
        if reduction == "mean" and token_weights.dtype == torch.float64:
            # the mean is invariant to the weights' scale: normalise in float64 so that weights
            # far outside float32's range (1e-50, 1e300) still give the right mean
            weights = token_weights / token_weights.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        weights = weights.float().contiguous()
    if validation_enabled() and T and not faking():
        checks = [(((labels != ignore_index) & ((labels < 0) | (labels >= V))).sum(),
                   f"labels: {{}} of {T} are outside [0, {V}) and not ignore_index={ignore_index}")]
        if token_weights is not None:
            for count, what in ((torch.isnan(token_weights).sum(), "NaN"), ((token_weights < 0).sum(), "negative"),
                                (torch.isinf(token_weights).sum(), "infinite"),
                                ((torch.isinf(weights) & torch.isfinite(token_weights)).sum(),
                                 "too large for float32 (they overflow to inf)"),
                                (((weights == 0) & (token_weights != 0)).sum(),
                                 "too small for float32 (they underflow to 0)")):
                checks.append((count, f"token_weights: {{}} of {T} are {what}"))
        if compiling():  # traced, no host read: the count is not known when the message is made
            for count, message in checks:
                assert_on_device(count == 0, message.format("some"))
        else:
            bad = torch.stack([count for count, _ in checks]).tolist()  # the one host sync of the checks
            for count, (_, message) in zip(bad, checks):
                if count:
                    raise ValueError(message.format(count))
    return labels.long().contiguous(), weights, ignore_index


# ----------------------------------------------------------------------------- custom ops


def _kernels():
    from .kernels import weighted_cross_entropy

    return weighted_cross_entropy


def _rows_for(t: torch.Tensor):
    k = _kernels()
    return k.triton_rows if use_triton(t) else k.torch_rows


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # custom ops return tensors, never None: an empty tensor stands for "not computed"
    return t if t is not None else like.new_empty(0)


def _terms(softcap, label_smoothing, lse_square_scale):
    return _kernels().LossTerms(softcap, label_smoothing, lse_square_scale)


def _extras(T: int, like: Tensor, want_z: bool, want_pred: bool):
    """Buffers for the token z-losses and arg-max tokens, or None when not asked for."""
    z = torch.empty(T, dtype=torch.float32, device=like.device) if want_z else None
    pred = torch.empty(T, dtype=torch.int64, device=like.device) if want_pred else None
    return z, pred


def _fake_extras(like: Tensor, T: int, reduction: str, want_z: bool, want_pred: bool):
    z = like.new_empty(() if reduction != "none" else (T,), dtype=torch.float32) if want_z else like.new_empty(0)
    pred = like.new_empty((T,), dtype=torch.int64) if want_pred else like.new_empty(0, dtype=torch.int64)
    return z, pred


@torch.library.custom_op("longalign::fused_linear_cross_entropy", mutates_args=())
def _flce(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, weights: Optional[Tensor],
          ignore_index: int, reduction: str, softcap: Optional[float], label_smoothing: float,
          lse_square_scale: float, accum_fp32: bool, want_z: bool, want_pred: bool, compute_grad: bool,
          need_weight_grad: bool, need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z-loss, arg-max tokens, d hidden, d weight, d bias): the gradients of the scalar
    loss are computed in the forward pass, chunk by chunk, while each chunk's logits exist
    (empty tensors for what was not asked for)."""
    k = _kernels()
    scale = k.grad_scale(labels, weights, ignore_index, reduction, hidden.device)
    z, pred = _extras(hidden.shape[0], hidden, want_z, want_pred)
    loss, gh, gw, gb = k.linear_cross_entropy_pass(
        _rows_for(hidden), hidden, weight, bias, labels, weights, scale, ignore_index,
        _terms(softcap, label_smoothing, lse_square_scale), compute_grad, need_weight_grad, need_bias_grad,
        accum_dtype=torch.float32 if accum_fp32 else None, z_out=z, pred_out=pred)
    z = k.reduce_loss(z, scale, reduction) if want_z else hidden.new_empty(0)
    return (k.reduce_loss(loss, scale, reduction), z, _or_empty(pred, labels), _or_empty(gh, hidden),
            _or_empty(gw, hidden), _or_empty(gb, hidden))


@_flce.register_fake
def _(hidden, weight, bias, labels, weights, ignore_index, reduction, softcap, label_smoothing, lse_square_scale,
      accum_fp32, want_z, want_pred, compute_grad, need_weight_grad, need_bias_grad):
    T = hidden.shape[0]
    loss = hidden.new_empty(() if reduction != "none" else (T,), dtype=torch.float32)
    z, pred = _fake_extras(hidden, T, reduction, want_z, want_pred)
    gh = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    gw = torch.empty_like(weight) if compute_grad and need_weight_grad else hidden.new_empty(0)
    gb = hidden.new_empty(weight.shape[0], dtype=torch.float32) if compute_grad and bias is not None and \
        need_bias_grad else hidden.new_empty(0)
    return loss, z, pred, gh, gw, gb


@torch.library.custom_op("longalign::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
              weights: Optional[Tensor], ignore_index: int, softcap: Optional[float], label_smoothing: float,
              lse_square_scale: float, accum_fp32: bool, need_weight_grad: bool,
              need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of reduction="none": the per-token output gradient is only known now, so the
    chunks are recomputed (one extra logits matmul per chunk)."""
    _, gh, gw, gb = _kernels().linear_cross_entropy_pass(
        _rows_for(hidden), hidden, weight, bias, labels, weights, grad_loss, ignore_index,
        _terms(softcap, label_smoothing, lse_square_scale), True, need_weight_grad, need_bias_grad,
        accum_dtype=torch.float32 if accum_fp32 else None)
    return gh, _or_empty(gw, hidden), _or_empty(gb, hidden)


@_flce_bwd.register_fake
def _(grad_loss, hidden, weight, bias, labels, weights, ignore_index, softcap, label_smoothing, lse_square_scale,
      accum_fp32, need_weight_grad, need_bias_grad):
    gw = torch.empty_like(weight) if need_weight_grad else hidden.new_empty(0)
    gb = hidden.new_empty(weight.shape[0], dtype=torch.float32) if bias is not None and need_bias_grad else \
        hidden.new_empty(0)
    return torch.empty_like(hidden), gw, gb


def _flce_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, weights, ignore_index, reduction, softcap, label_smoothing, lse_square_scale,
     accum_fp32, _, _, _, need_w, need_b) = inputs
    loss, z, pred, gh, gw, gb = output
    ctx.mark_non_differentiable(z, pred, gh, gw, gb)
    ctx.reduction, ctx.need = reduction, (need_w, need_b)
    ctx.options = (ignore_index, softcap, label_smoothing, lse_square_scale, accum_fp32)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, weights)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _flce_backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        hidden, weight, bias, labels, weights = ctx.saved_tensors
        gh, gw, gb = _flce_bwd(grad_loss.float().contiguous(), hidden, weight, bias, labels, weights, *ctx.options,
                               *ctx.need)
    else:
        gh, gw, gb = ctx.saved_tensors
        # no test for grad == 1 (it would be a device-to-host read in every step). Eager: scaled
        # in place, no second weight-sized buffer (a second backward through the same graph is
        # refused by autograd's saved-tensor version check instead of scaling twice). Traced
        # (torch.compile, opcheck: tensor subclasses): out of place, as graph partitioning needs
        g = grad_loss.reshape(())
        if type(gh) is torch.Tensor:
            gh.mul_(g.to(gh.dtype))
            gw.mul_(g.to(gw.dtype))
            gb.mul_(g)
        else:
            gh, gw, gb = gh * g.to(gh.dtype), gw * g.to(gw.dtype), gb * g
    need = ctx.needs_input_grad
    gb = gb.to(ctx.bias_dtype) if need[2] else None
    return (gh if need[0] else None, gw if need[1] else None, gb) + (None,) * 13


_flce.register_autograd(_flce_backward, setup_context=_flce_setup)


@torch.library.custom_op("longalign::cross_entropy", mutates_args=())
def _ce(logits: Tensor, labels: Tensor, weights: Optional[Tensor], ignore_index: int, reduction: str,
        softcap: Optional[float], label_smoothing: float, lse_square_scale: float, want_z: bool, want_pred: bool,
        compute_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, z-loss, arg-max tokens, d logits of the scalar loss): empty where not asked for.
    The user's logits are never written."""
    k = _kernels()
    scale = k.grad_scale(labels, weights, ignore_index, reduction, logits.device)
    grad = torch.empty_like(logits) if compute_grad else None
    z, pred = _extras(logits.shape[0], logits, want_z, want_pred)
    loss = _rows_for(logits)(logits, grad if compute_grad else logits, labels, weights, scale, ignore_index,
                             _terms(softcap, label_smoothing, lse_square_scale), compute_grad, z, pred)
    z = k.reduce_loss(z, scale, reduction) if want_z else logits.new_empty(0)
    return k.reduce_loss(loss, scale, reduction), z, _or_empty(pred, labels), _or_empty(grad, logits)


@_ce.register_fake
def _(logits, labels, weights, ignore_index, reduction, softcap, label_smoothing, lse_square_scale, want_z,
      want_pred, compute_grad):
    T = logits.shape[0]
    loss = logits.new_empty(() if reduction != "none" else (T,), dtype=torch.float32)
    z, pred = _fake_extras(logits, T, reduction, want_z, want_pred)
    return loss, z, pred, torch.empty_like(logits) if compute_grad else logits.new_empty(0)


@torch.library.custom_op("longalign::cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad_loss: Tensor, logits: Tensor, labels: Tensor, weights: Optional[Tensor], ignore_index: int,
            softcap: Optional[float], label_smoothing: float, lse_square_scale: float) -> Tensor:
    grad = torch.empty_like(logits)
    _rows_for(logits)(logits, grad, labels, weights, grad_loss, ignore_index,
                      _terms(softcap, label_smoothing, lse_square_scale), True)
    return grad


@_ce_bwd.register_fake
def _(grad_loss, logits, labels, weights, ignore_index, softcap, label_smoothing, lse_square_scale):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, labels, weights, ignore_index, reduction, softcap, label_smoothing, lse_square_scale, *_ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.reduction = reduction
    ctx.options = (ignore_index, softcap, label_smoothing, lse_square_scale)
    ctx.save_for_backward(*((logits, labels, weights) if reduction == "none" else (output[3],)))


def _ce_backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        logits, labels, weights = ctx.saved_tensors
        grad = _ce_bwd(grad_loss.float().contiguous(), logits, labels, weights, *ctx.options)
    else:
        (grad,) = ctx.saved_tensors
        grad = grad * grad_loss.reshape(()).to(grad.dtype)
    return (grad,) + (None,) * 10


_ce.register_autograd(_ce_backward, setup_context=_ce_setup)


# ----------------------------------------------------------------------------- public entries


@dataclass
class CrossEntropyOutput:
    """What the losses return when any ``return_*`` flag is set (Liger-Kernel's type and fields;
    the fields not asked for are None). ``loss`` always includes the z-loss."""
    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


def _check_options(label_smoothing, lse_square_scale, accum_dtype=None):
    label_smoothing = check_finite_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    lse_square_scale = check_finite_number("lse_square_scale", lse_square_scale, minimum=0.0)
    if accum_dtype is not None and not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise TypeError(f"accum_dtype must be None or a floating torch.dtype, got {accum_dtype!r}")
    return label_smoothing, lse_square_scale


def _output(loss, z, pred, labels, ignore_index, reduction, return_z_loss, return_token_accuracy,
            return_predicted_tokens):
    """The loss alone, or a CrossEntropyOutput when any return_* flag is set. Token accuracy:
    per token (0/1, 0 where ignored) for reduction="none", else the fraction of non-ignored
    tokens whose arg-max is the label (0 when none counts)."""
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    accuracy = None
    if return_token_accuracy:
        kept = labels != ignore_index
        hits = ((pred == labels) & kept).float()
        accuracy = hits if reduction == "none" else hits.sum() / kept.sum().clamp_min(1)
    return CrossEntropyOutput(loss, z if return_z_loss else None, accuracy,
                              pred if return_predicted_tokens else None)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                               token_weights: Optional[Tensor] = None, ignore_index: int = -100,
                               reduction: str = "mean", softcap: Optional[float] = None,
                               label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                               return_z_loss: bool = False, accum_dtype: Optional[torch.dtype] = None,
                               return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                               packed_batch: Optional[PackedBatch] = None, num_packs: Optional[int] = None,
                               num_sequences: Optional[int] = None):
    """lm head + token-weighted cross-entropy without materialising the ``(T, V)`` logits.

    Args:
        hidden: ``(T, H)`` fp16/bf16/fp32 final hidden states (already aligned with ``labels``).
        weight: ``(V, H)`` lm-head weight, hidden's dtype. bias: optional ``(V,)``.
        labels: ``(T,)`` int64 targets in ``[0, V)`` or ``ignore_index``.
        token_weights: optional ``(T,)`` non-negative weights ``w_t`` (our addition to Liger's API).
        reduction: "none" -> ``(T,)`` fp32 ``w_t * loss_t`` (0 where ignored); "sum"; "mean" ->
            ``sum(w_t loss_t) / sum(w_t)`` over non-ignored tokens (0 when nothing counts).
        softcap: optional logit soft-capping ``c * tanh(z / c)`` (Gemma 2).
        label_smoothing: e in [0, 1): ``loss_t = (1-e) nll_t + e (lse_t - mean_j z_tj)`` (PyTorch's
            and Liger's definition).
        lse_square_scale: z-loss ``s * lse_t**2`` added to every counted token's loss (PaLM);
            ``return_z_loss`` also returns it, reduced like the loss.
        accum_dtype: e.g. ``torch.float32``: sum the lm-head weight gradient across token chunks
            in that dtype (for bf16 weights; one extra weight-sized buffer), as Liger's option.
        return_token_accuracy, return_predicted_tokens: the fraction of non-ignored tokens whose
            arg-max logit is the label, and the arg-max tokens (-1 where ignored).
        packed_batch, num_packs, num_sequences: LongAlign weighting from the batch description:
            ``token_weights = longalign_loss_weights(packed_batch, labels, num_packs=K,
            num_sequences=M)`` (use with ``reduction="sum"``).

    Returns the loss, or a :class:`CrossEntropyOutput` when any ``return_*`` flag is set.
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
    label_smoothing, lse_square_scale = _check_options(label_smoothing, lse_square_scale, accum_dtype)
    if packed_batch is not None:
        if token_weights is not None:
            raise ValueError("pass token_weights or packed_batch (LongAlign weights from the batch), not both")
        if num_packs is None or num_sequences is None:
            raise ValueError("packed_batch needs num_packs and num_sequences (the step's K and M)")
        check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=device)
        token_weights = longalign_loss_weights(packed_batch, labels, num_packs=num_packs, num_sequences=num_sequences,
                                               ignore_index=ignore_index)
    labels, weights, ignore_index = _check_targets(labels, token_weights, T, V, ignore_index, device, reduction,
                                                   softcap)
    # under autocast, the lm head runs in the autocast dtype as nn.Linear would (the casts are
    # differentiable, so fp32 parameters still get fp32 gradients); the loss math stays fp32
    amp = _autocast_dtype(device)
    if amp is not None and hidden.dtype == torch.float32:
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    need = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    # the gradients are made in the forward pass only when a backward can follow
    compute_grad = torch.is_grad_enabled() and reduction != "none" and any(need)
    accum_fp32 = accum_dtype is not None and accum_dtype != weight.dtype
    with torch.autocast(device_type=device.type, enabled=False):
        loss, z, pred, *_ = _flce(hidden.contiguous(), weight.contiguous(), bias, labels, weights, ignore_index,
                                  reduction, softcap, label_smoothing, lse_square_scale, accum_fp32, return_z_loss,
                                  return_token_accuracy or return_predicted_tokens, compute_grad, need[1], need[2])
    return _output(loss, z, pred, labels, ignore_index, reduction, return_z_loss, return_token_accuracy,
                   return_predicted_tokens)


def cross_entropy(logits: Tensor, labels: Tensor, *, token_weights: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", softcap: Optional[float] = None, label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, return_z_loss: bool = False, return_token_accuracy: bool = False,
                  return_predicted_tokens: bool = False):
    """Token-weighted cross-entropy on ``(T, V)`` logits; semantics, options and return types as
    :func:`fused_linear_cross_entropy`. Differentiable in logits (never modified in place)."""
    check_tensor("logits", logits, ndim=2, dtypes=_FLOATS)
    T, V = logits.shape
    label_smoothing, lse_square_scale = _check_options(label_smoothing, lse_square_scale)
    labels, weights, ignore_index = _check_targets(labels, token_weights, T, V, ignore_index, logits.device,
                                                   reduction, softcap)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    compute_grad = torch.is_grad_enabled() and reduction != "none" and logits.requires_grad
    with torch.autocast(device_type=logits.device.type, enabled=False):
        loss, z, pred, _ = _ce(logits, labels, weights, ignore_index, reduction, softcap, label_smoothing,
                               lse_square_scale, return_z_loss, return_token_accuracy or return_predicted_tokens,
                               compute_grad)
    return _output(loss, z, pred, labels, ignore_index, reduction, return_z_loss, return_token_accuracy,
                   return_predicted_tokens)


def _identity(t: Tensor) -> Tensor:
    return t


def longalign_factors(n, num_packs: int, num_sequences: int):
    """LongAlign's per-sequence weight ``K / (N_i M)`` from target counts ``n`` (a tensor or a
    numpy array), 0 where ``N_i = 0``: the one definition the ops, sequence parallelism and the
    packer's plan all use."""
    return (n > 0) * (num_packs / ((n + (n == 0)) * num_sequences))


def logprobs_by_sequence(hidden: Tensor, weight: Tensor, labels: Tensor, B: int, seq: Tensor, *,
                         bias: Optional[Tensor] = None, ignore_index: int = -100, average: bool = False,
                         softcap: Optional[float] = None, reduce=_identity) -> Tensor:
    """``(B,)`` per-sequence log-prob sums (means with ``average``) of the tokens whose sequence
    is ``seq`` ``(T,)``; ``reduce`` combines partial sums held by several ranks (identity on one)."""
    nll = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none",
                                     softcap=softcap)
    sums = reduce(torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, seq, -nll))
    if not average:
        return sums
    counts = reduce(torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(
        0, seq, (labels != ignore_index).float()))
    return sums / counts.clamp_min(1.0)


def loss_weights_by_sequence(labels: Tensor, B: int, seq: Tensor, *, num_packs: int, num_sequences: int,
                             ignore_index: int = -100, reduce=_identity) -> Tensor:
    """``(T,)`` fp32 LongAlign weights of tokens whose sequence is ``seq``, N_i counted over
    ``reduce`` (every rank holding part of the sequence)."""
    target = labels != ignore_index
    n = reduce(torch.zeros(B, dtype=torch.float64, device=labels.device).index_add(0, seq, target.double()))
    return (longalign_factors(n, num_packs, num_sequences)[seq] * target).float()


def sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, cu_seqlens, *, bias: Optional[Tensor] = None,
                      ignore_index: int = -100, average: bool = False, softcap: Optional[float] = None) -> Tensor:
    """``(B,)`` fp32: per packed sequence, the sum (or, with ``average``, the mean) of
    ``log p(label_t)`` over its non-ignored tokens; 0 for a sequence with none.

    hidden ``(T, H)``, weight ``(V, H)``, labels ``(T,)`` already shifted (label t follows
    position t), cu_seqlens ``(B+1,)`` int32 over the T tokens or a :class:`PackedBatch`
    (then nothing is read back from the device). Differentiable in hidden, weight and bias;
    the logits are never materialised. ``softcap``: the logits soft-capped first (Gemma's
    ``final_logit_softcapping``), as in :func:`fused_linear_cross_entropy`.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=_FLOATS)
    B, seq = sequence_map("cu_seqlens", cu_seqlens, "hidden", hidden.shape[0], hidden.device)
    return logprobs_by_sequence(hidden, weight, labels, B, seq, bias=bias, ignore_index=ignore_index, average=average,
                                softcap=softcap)


def longalign_loss_weights(cu_seqlens, labels: Tensor, *, num_packs: int, num_sequences: int,
                           ignore_index: int = -100) -> Tensor:
    """``(T,)`` fp32 LongAlign weights ``K / (N_i * M)`` on the target tokens of each sequence
    (0 on ignored ones): K packs and M sequences in the whole optimisation step (all ranks),
    N_i the target tokens of sequence i. With ``reduction="sum"``, summing over the step's packs
    and averaging over the K ranks gives ``(1/M) sum_i L_i / N_i``. ``cu_seqlens`` may be a
    :class:`PackedBatch` (no device sync)."""
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
    B, seq = sequence_map("cu_seqlens", cu_seqlens, "labels", labels.shape[0], labels.device)
    K = check_int("num_packs", num_packs, minimum=1)
    M = check_int("num_sequences", num_sequences, minimum=1)
    return loss_weights_by_sequence(labels, B, seq, num_packs=K, num_sequences=M, ignore_index=ignore_index)
