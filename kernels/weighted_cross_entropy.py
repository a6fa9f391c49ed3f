"""Token-weighted cross-entropy in Triton, plain and fused with the lm head.

One row kernel serves both paths. For each token row it runs an online log-sum-exp over the
vocabulary in blocks (fp32 whatever the input dtype), takes the target logit, writes
``loss_t = w_t * (lse_t - z_t[label_t])`` (0 for ignored tokens; with label smoothing and
z-loss as in :class:`LossTerms`), optionally the z-loss and the arg-max token, and, when asked,
the gradient ``scale_t * w_t * (softmax(z_t) - onehot(label_t))`` (likewise extended) into a
gradient buffer (the logits buffer itself in the fused path).

The fused path (``fused_linear_cross_entropy``) never holds the ``(T, V)`` logits: it walks the
tokens in chunks, computes a chunk of logits with one matmul, runs the row kernel on it with
gradients written in place, and turns the chunk's logit gradients into gradients of hidden,
weight and bias with three more matmuls. For scalar reductions all of this happens in the
forward pass, so backward only scales the stored gradients by the incoming scalar; for
``reduction="none"`` the per-token output gradient is only known in backward, which then
recomputes the chunks (one extra logits matmul per chunk).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._dispatch import on_compiled_gpu
from ._math import precise_tanh


# ----------------------------------------------------------------------------- kernels


class LossTerms(NamedTuple):
    """What the per-token loss is made of, Liger-Kernel's names and meaning:
    ``(1 - e) * (lse - z_y) + e * (lse - mean_j z_j) + lse_square_scale * lse**2`` on logits
    soft-capped as ``softcap * tanh(z / softcap)`` (e = label_smoothing), times the token weight."""
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * precise_tanh(x / softcap)
    return x


@triton.jit
def _weighted_cross_entropy_fwd_kernel(
    Logits, stride_lt, Grad, stride_gt, Labels, Weights, Scale, scale_stride, Loss, ZLoss, Pred,
    V, ignore_index, softcap, label_smoothing, lse_square_scale,
    HAS_WEIGHTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, WANT_Z: tl.constexpr,
    WANT_PRED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_lt
    grad = Grad + row * stride_gt
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(Labels + row).to(tl.int64)
    ignored = label == ignore_index
    w = 1.0
    if HAS_WEIGHTS:
        w = tl.load(Weights + row).to(tl.float32)
    # a select, not a runtime branch: w's type must not depend on a run-time value
    w = tl.where(ignored, 0.0, w)

    # pass 1: online max and sum of exp over the vocabulary, the sum of the logits (label
    # smoothing's uniform target) and, when asked, the first index of the maximum
    m = float("-inf")
    s = 0.0
    total = 0.0
    arg = 0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(logits + offs, mask=offs < V, other=0.0).to(tl.float32)
        # mask after capping: a capped -inf would be -softcap and add mass past V
        x = tl.where(offs < V, _softcapped(x, softcap, HAS_SOFTCAP), float("-inf"))
        block_max = tl.max(x, 0)
        if WANT_PRED:
            block_arg = tl.min(tl.where(x == block_max, offs, V), 0)
            arg = tl.where(block_max > m, block_arg, arg)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        total += tl.sum(tl.where(offs < V, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    # labels are checked on the host; the mask keeps a bad one from reading out of bounds
    in_vocab = (label >= 0) & (label < V)
    z = tl.load(logits + tl.where(in_vocab, label, 0)).to(tl.float32)
    z = _softcapped(z, softcap, HAS_SOFTCAP)
    z_loss = lse_square_scale * lse * lse
    nll = (1.0 - label_smoothing) * (lse - z) + label_smoothing * (lse - total / V)
    tl.store(Loss + row, tl.where(ignored, 0.0, w * (nll + z_loss)))
    if WANT_Z:
        tl.store(ZLoss + row, tl.where(ignored, 0.0, w * z_loss))
    if WANT_PRED:
        tl.store(Pred + row, tl.where(ignored, -1, arg.to(tl.int64)))

    if COMPUTE_GRAD:
        g = w * tl.load(Scale + row * scale_stride).to(tl.float32)
        p_scale = 1.0 + 2.0 * lse_square_scale * lse  # d(lse^2 z-loss) adds to the softmax
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(logits + offs, mask=offs < V, other=0.0).to(tl.float32)
            xc = _softcapped(x, softcap, HAS_SOFTCAP)
            d = tl.exp(xc - lse) * p_scale - (1.0 - label_smoothing) * tl.where(offs == label, 1.0, 0.0) \
                - label_smoothing / V
            if HAS_SOFTCAP:
                d = d * (1.0 - (xc / softcap) * (xc / softcap))  # d tanh
            # a select: an ignored row's logits may be NaN, its gradient is exactly 0
            tl.store(grad + offs, tl.where(ignored, 0.0, d * g).to(Grad.dtype.element_ty), mask=offs < V)


# ----------------------------------------------------------------------------- row functions


def _block_v(V: int, on_gpu: bool) -> int:
    # GPU: 4096-wide blocks (16 KB fp32 per row block) keep enough loads in flight to stream the
    # row at memory speed; the interpreter: 1024, so V = 1000 / 333 still exercise the masks
    return min(4096 if on_gpu else 1024, triton.next_power_of_2(max(V, 16)))



def triton_rows(logits, grad, labels, weights, scale, ignore_index, terms: LossTerms, compute_grad, z_out=None,
                pred_out=None):
    """Row kernel launch: returns the token losses (T,) fp32; writes gradients into `grad`
    (which may be `logits` itself) when `compute_grad`, the token z-losses into `z_out` (T,)
    fp32 and the arg-max tokens into `pred_out` (T,) int64 (-1 where ignored) when given."""
    T, V = logits.shape
    loss = torch.empty(T, dtype=torch.float32, device=logits.device)
    if T == 0:
        return loss
    on_gpu = on_compiled_gpu(logits)
    grad = logits if grad is None else grad
    _weighted_cross_entropy_fwd_kernel[(T,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, weights if weights is not None else labels,
        scale, 0 if scale.numel() == 1 else 1, loss, loss if z_out is None else z_out,
        labels if pred_out is None else pred_out, V, ignore_index, terms.softcap or 1.0, terms.label_smoothing,
        terms.lse_square_scale,
        HAS_WEIGHTS=weights is not None, HAS_SOFTCAP=terms.softcap is not None, COMPUTE_GRAD=compute_grad,
        WANT_Z=z_out is not None, WANT_PRED=pred_out is not None,
        BLOCK_V=_block_v(V, on_gpu), num_warps=16 if on_gpu and V >= 32768 else 4,
    )
    return loss


def torch_rows(logits, grad, labels, weights, scale, ignore_index, terms: LossTerms, compute_grad, z_out=None,
               pred_out=None):
    """The same contract as `triton_rows` in PyTorch (fp32 math): the CPU path without the
    interpreter."""
    x = logits.float()
    cap, eps, zs = terms
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    V = x.shape[1]
    lse = torch.logsumexp(x, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    z = x.gather(1, safe[:, None])[:, 0]
    w = torch.ones_like(lse) if weights is None else weights.float()
    z_loss = zs * lse * lse
    nll = (1.0 - eps) * (lse - z) + eps * (lse - x.sum(-1) / V)
    # selects, not products with w = 0: an ignored row's logits may be NaN (a padded or masked
    # hidden state), and it must contribute exactly 0, as in the Triton kernel
    loss = torch.where(ignored, 0.0, w * (nll + z_loss))
    if z_out is not None:
        z_out.copy_(torch.where(ignored, 0.0, w * z_loss))
    if pred_out is not None:
        pred_out.copy_(torch.where(ignored, -1, x.argmax(-1)))
    if compute_grad:
        d = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * zs * lse)[:, None] - eps / V
        d[torch.arange(len(safe)), safe] -= 1.0 - eps
        if cap is not None:
            d *= 1.0 - (x / cap) ** 2
        d = torch.where(ignored[:, None], 0.0, d * (w * scale.float().expand_as(w))[:, None])
        (logits if grad is None else grad).copy_(d)
    return loss


# ----------------------------------------------------------------------------- host passes


def chunk_tokens(T: int, H: int, V: int) -> int:
    """Tokens per chunk: the chunk's logits (chunk x V) take about as much memory as the hidden
    states (T x H) themselves, so the extra memory is set by the inputs, never by T*V; at
    T=32K, H=4096, V=128256 that is 1024 tokens (256 MB of bf16 logits)."""
    if T == 0:
        return 1
    per = triton.next_power_of_2(triton.cdiv(T * H, V))
    return max(1, min(T, per, 32768))


def linear_cross_entropy_pass(rows, hidden, weight, bias, labels, weights, scale, ignore_index, terms: LossTerms,
                              compute_grad, need_weight_grad=True, need_bias_grad=True, chunk=None, accum_dtype=None,
                              z_out=None, pred_out=None):
    """Chunked lm-head + cross-entropy. Returns loss (T,) fp32 and, when `compute_grad`, the
    gradients of hidden, weight and bias for per-token output scale `scale`. `z_out` /
    `pred_out`: (T,) buffers for the token z-losses / arg-max tokens, or None."""
    T, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk or chunk_tokens(T, H, V)
    loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(hidden) if compute_grad else None
    # accumulated across chunks in the weight's dtype by default, as the matmul peers do (an
    # fp32 copy of a 128K x 4K lm head costs 2 GB); accum_dtype=torch.float32 sums each chunk's
    # product into an fp32 buffer instead (Liger's accum_dtype), cast back at the end
    gw = torch.zeros_like(weight, dtype=accum_dtype or weight.dtype) if compute_grad and need_weight_grad else None
    gb = torch.zeros(V, dtype=torch.float32, device=hidden.device) if compute_grad and bias is not None \
        and need_bias_grad else None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        h = hidden[s:e]
        logits = torch.addmm(bias.to(h.dtype), h, weight.t()) if bias is not None else h @ weight.t()
        sc = scale if scale.numel() == 1 else scale[s:e]
        loss[s:e] = rows(logits, None, labels[s:e], None if weights is None else weights[s:e], sc, ignore_index,
                         terms, compute_grad, None if z_out is None else z_out[s:e],
                         None if pred_out is None else pred_out[s:e])
        if compute_grad:  # logits now hold d loss / d logits
            torch.mm(logits, weight, out=gh[s:e])
            if gw is not None and gw.dtype == logits.dtype:
                gw.addmm_(logits.t(), h)
            elif gw is not None:
                gw += logits.t() @ h
            if gb is not None:
                gb += logits.sum(0, dtype=torch.float32)
        del logits
    if gw is not None and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    return loss, gh, gw, gb


def grad_scale(labels, weights, ignore_index, reduction, device):
    """Per-token factor turning the token losses into the reduced loss: 1 for sum, 1/sum(w)
    over non-ignored tokens for mean (0 when that sum is 0: an all-ignored batch gives loss 0
    and zero gradients, not NaN)."""
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=device)
    kept = labels != ignore_index
    denom = kept.sum(dtype=torch.float32) if weights is None else (weights.float() * kept).sum()
    return torch.where(denom > 0, 1.0 / denom.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros_like(denom)).reshape(1)


def reduce_loss(loss, scale, reduction):
    return loss if reduction == "none" else (loss.sum() * scale[0] if reduction == "mean" else loss.sum())
