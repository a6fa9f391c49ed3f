"""Public variable-length attention: checks, the batch description, and the ``torch.library``
custom ops ``longalign::varlen_attention_fwd`` / ``_bwd`` (fake kernels for FakeTensorMode and
torch.compile, autograd registered) that dispatch between the Triton kernels (GPU, or CPU under
TRITON_INTERPRET=1) and a PyTorch path of their own (SDPA per sequence) on a plain CPU."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._validation import check_finite_number, check_int, check_tensor
from .batch import TILE_BLOCKS, PackedBatch, batch_for_cu
from .kernels._dispatch import use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- plain-CPU path


def _clamped_spans(cu: Tensor, total: int):
    """[start, end) per sequence, clamped into [0, total) as the kernels clamp them."""
    host = cu.tolist()  # this path runs on CPU tensors only: no device sync
    spans = []
    for a, b in zip(host[:-1], host[1:]):
        start = min(max(a, 0), total)
        spans.append((start, min(max(b, start), total)))
    return spans


def _visible(Lq: int, Lk: int, window_left: int, window_right: int, device):
    """(Lq, Lk) mask of the keys each query sees (flash-attn 2's bottom-right window; a bound
    < 0 is no bound, causal is right = 0), or None when every key is visible."""
    if window_left < 0 and window_right < 0:
        return None
    rel = torch.arange(Lk, device=device)[None, :] - torch.arange(Lq, device=device)[:, None] - (Lk - Lq)
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if window_right >= 0:
        keep &= rel <= window_right
    if window_left >= 0:
        keep &= rel >= -window_left
    return keep


def _sequences(q, k, cu_q, cu_k, window_left: int, window_right: int, prefix=None):
    """(query span, key rows, visibility mask or None) of every sequence that has both queries
    and keys. Key rows: a slice, or for a branch of a shared prefix (the (S, 4) `prefix` table)
    the index of its prefix's rows, then its own."""
    table = None if prefix is None else prefix.tolist()
    for i, ((qs, qe), (ks, ke)) in enumerate(zip(_clamped_spans(cu_q, q.shape[0]), _clamped_spans(cu_k, k.shape[0]))):
        keys, Lk = slice(ks, ke), ke - ks
        if table is not None and table[i][1] > 0:
            offset, pre_len = table[i][0], table[i][1]
            keys = torch.cat([torch.arange(ks + offset, ks + offset + pre_len), torch.arange(ks, ke)]).to(q.device)
            Lk += pre_len
        if qe > qs and Lk > 0:
            yield (qs, qe), keys, _visible(qe - qs, Lk, window_left, window_right, q.device)


def _add_rows(dst, keys, rows):
    """dst[keys] += rows (keys a slice, or an index whose prefix rows other branches share)."""
    if isinstance(keys, slice):
        dst[keys] += rows
    else:
        dst.index_add_(0, keys, rows)


def _scores(qi, ki, scale: float, softcap: float, keep):
    """Masked fp32 scores of one sequence ``(Hq, Lq, Lk)``, and tanh of the capped scores (for
    the backward) or None."""
    s = (qi @ ki.transpose(1, 2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s, t


def _probabilities(s, lse):
    """exp(S - lse), 0 where masked and on rows that see no key (lse = -inf)."""
    return torch.exp(s - torch.where(torch.isinf(lse), float("inf"), lse)[..., None])


def _torch_attention(q, k, v, cu_q, cu_k, scale: float, window_left: int, window_right: int, softcap: float,
                     prefix=None, sinks=None):
    """The CPU path when Triton cannot run: per sequence in fp32, the masks and soft-capping of
    the kernels and their bounds rule (spans clamped into [0, total)), shared prefixes read by
    each of their branches, each head's sink logit in every denominator."""
    total_q, Hq, D = q.shape
    Hk = k.shape[1]
    out = torch.zeros(total_q, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if sinks is not None:  # a query that sees no key still has the sink: lse = sink, out = 0
        lse[:] = sinks.float()[:, None]
    with torch.autocast(device_type=q.device.type, enabled=False):
        for (qs, qe), keys, keep in _sequences(q, k, cu_q, cu_k, window_left, window_right, prefix):
            qi, ki, vi = (t.float().transpose(0, 1) for t in (q[qs:qe], k[keys], v[keys]))
            ki, vi = ki.repeat_interleave(Hq // Hk, 0), vi.repeat_interleave(Hq // Hk, 0)
            s, _ = _scores(qi, ki, scale, softcap, keep)
            row_lse = torch.logsumexp(s, -1)
            if sinks is not None:
                row_lse = torch.logaddexp(row_lse, sinks.float()[:, None])
            out[qs:qe] = (_probabilities(s, row_lse) @ vi).transpose(0, 1)
            lse[:, qs:qe] = row_lse
    return out.to(q.dtype), lse


def _torch_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale: float, window_left: int,
                              window_right: int, softcap: float, prefix=None):
    """Gradients of :func:`_torch_attention` per sequence in fp32, from the saved LSE (autograd
    does not run inside a custom op): P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - delta)
    (times 1 - tanh^2 under a soft cap), dQ = dS K * scale, dK = dS^T Q * scale, with
    delta = rowsum(dO * O). Returns dq, dk, dv and delta (Hq, total_q), as the kernels'
    launcher (with sinks the lse counts them, so nothing else changes)."""
    total_q, Hq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    delta_all = torch.zeros(lse.shape, dtype=torch.float32, device=q.device)
    with torch.autocast(device_type=q.device.type, enabled=False):
        for (qs, qe), keys, keep in _sequences(q, k, cu_q, cu_k, window_left, window_right, prefix):
            Lk = keep.shape[1] if keep is not None else keys.stop - keys.start
            qi, doi, oi = (t[qs:qe].float().transpose(0, 1) for t in (q, dout, out))  # (Hq, Lq, D)
            ki, vi = (t[keys].float().transpose(0, 1).repeat_interleave(G, 0) for t in (k, v))
            s, t = _scores(qi, ki, scale, softcap, keep)
            p = _probabilities(s, lse[:, qs:qe])
            delta = (doi * oi).sum(-1, keepdim=True)
            delta_all[:, qs:qe] = delta[..., 0]
            ds = p * (doi @ vi.transpose(1, 2) - delta)
            if t is not None:
                ds = ds * (1 - t * t)
            dq[qs:qe] = ((ds @ ki) * scale).transpose(0, 1)
            _add_rows(dk, keys, ((ds.transpose(1, 2) @ qi) * scale).view(Hk, G, Lk, D).sum(1).transpose(0, 1))
            _add_rows(dv, keys, (p.transpose(1, 2) @ doi).view(Hk, G, Lk, D).sum(1).transpose(0, 1))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), delta_all


def sink_gradient(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """d loss / d sink_h = -sum_i exp(sink_h - lse_hi) delta_hi (fp32): a sink is one more softmax
    column with no value, so its dP is 0 and its dS is P_sink (0 - delta). `lse` (Hq, total_q)
    counts the sinks; rows nothing wrote (lse -inf, delta 0) add 0."""
    p_sink = torch.exp(sinks.float()[:, None] - lse)
    return -(torch.where(torch.isinf(lse), 0.0, p_sink) * delta).sum(1)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("longalign::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, tiles_fwd: Optional[Tensor],
                          tiles_dkdv: Optional[Tensor], tiles_dq: Optional[Tensor], prefix: Optional[Tensor],
                          sinks: Optional[Tensor], max_q: int, max_k: int, scale: float, window_left: int,
                          window_right: int, softcap: float) -> Tuple[Tensor, Tensor]:
    """out (total_q, Hq, D) in q's dtype, lse (Hq, total_q) fp32. The backward's tile lists ride
    along so that the autograd context holds them. `prefix`: the (S, 4) int32 table of a
    shared-prefix batch, or None. `sinks`: (Hq,) learnable sink logits, or None. Window bounds < 0 are no bound (causal is window_right = 0);
    softcap 0 is no cap."""
    if use_triton(q):
        from .kernels.varlen_attention import varlen_attention_forward

        return varlen_attention_forward(q, k, v, cu_q, cu_k, tiles_fwd, max_q, max_k, scale, window_left,
                                        window_right, softcap, prefix, sinks)
    return _torch_attention(q, k, v, cu_q, cu_k, scale, window_left, window_right, softcap, prefix, sinks)


@_varlen_attention_fwd.register_fake
def _(q, k, v, cu_q, cu_k, tiles_fwd, tiles_dkdv, tiles_dq, prefix, sinks, max_q, max_k, scale, window_left,
      window_right, softcap):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longalign::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                          cu_k: Tensor, tiles_dkdv: Optional[Tensor], tiles_dq: Optional[Tensor],
                          prefix: Optional[Tensor], sinks: Optional[Tensor], max_q: int, max_k: int, scale: float,
                          window_left: int, window_right: int, softcap: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and the sinks' gradient in their dtype ((0,) without sinks)."""
    if use_triton(q):
        from .kernels.varlen_attention import varlen_attention_backward

        dq, dk, dv, delta = varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, tiles_dkdv, tiles_dq,
                                                      max_q, max_k, scale, window_left, window_right, softcap, prefix)
    else:
        dq, dk, dv, delta = _torch_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, window_left,
                                                      window_right, softcap, prefix)
    dsinks = q.new_empty(0) if sinks is None else sink_gradient(sinks, lse, delta).to(sinks.dtype)
    return dq, dk, dv, dsinks


@_varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, tiles_dkdv, tiles_dq, prefix, sinks, max_q, max_k, scale, window_left,
      window_right, softcap):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _, tiles_dkdv, tiles_dq, prefix, sinks, *flags = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, tiles_dkdv, tiles_dq, prefix, sinks)
    ctx.flags = flags  # max_q, max_k, scale, window_left, window_right, softcap


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, tiles_dkdv, tiles_dq, prefix, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _varlen_attention_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, tiles_dkdv,
                                               tiles_dq, prefix, sinks, *ctx.flags)
    return (dq, dk, dv) + (None,) * 6 + (dsinks if sinks is not None else None,) + (None,) * 6


_varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def _tile_lists(q: Tensor, batch_q: Optional[PackedBatch], batch_k: Optional[PackedBatch], softcap: float):
    """The three tile lists the kernels of q's device and dtype launch over, or Nones (dense
    grid) when no description is known, or on the plain-CPU path (which needs none)."""
    if batch_q is None or batch_k is None or not use_triton(q):
        return None, None, None
    from .kernels.varlen_attention import config_for

    cfg = config_for(q, softcap, batch_q.groups is not None)
    blocks = (cfg["fwd"][0], cfg["dkdv"][1], cfg["dq"][0])
    if not set(blocks) <= set(TILE_BLOCKS):  # a tile config the description lays out no schedule for
        raise RuntimeError(f"attention tile blocks {blocks} for head dim {q.shape[-1]}, {q.dtype} are not all in "
                           f"PackedBatch's TILE_BLOCKS {TILE_BLOCKS}")
    return batch_q.tiles(blocks[0]), batch_k.tiles(blocks[1]), batch_q.tiles(blocks[2])


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k: Optional[Tensor] = None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *, causal: bool = True,
                     softmax_scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
                     softcap: Optional[float] = None, sinks: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                     return_lse: bool = False, deterministic: bool = False):
    """Attention within each packed sequence.

    ``varlen_attention(q, k, v, batch)`` with a :class:`PackedBatch` (the same sequences for
    queries and keys; nothing is read back from the device; ``(q, k, v, batch_q, batch_k)``
    when their lengths differ), or flash-attn's form
    ``varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``.

    Args:
        q: ``(total_q, Hq, D)`` fp16/bf16/fp32. k: ``(total_k, Hk, D)``, v: ``(total_k, Hk, Dv)``,
            same dtype, ``Hq % Hk == 0`` (query heads ``[g*Hq/Hk, (g+1)*Hq/Hk)`` share kv head g).
            Any D and Dv in 1..256 (DeepSeek's MLA: D = 192, Dv = 128); both are padded inside to
            the larger, rounded up to a multiple of 8, as flash-attn does (zero columns change no
            score and no output); out ``(total_q, Hq, Dv)`` and gradients unpadded.
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` int32 cumulative lengths, from 0 to total.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence.
        causal: mask future keys; with ``seqlen_q != seqlen_k`` aligned bottom-right (flash-attn 2).
        softmax_scale: defaults to ``1/sqrt(D)``.
        window_size: ``(left, right)`` sliding window as flash-attn 2: query i sees keys
            ``i + diag - left <= j <= i + diag + right`` (``diag = seqlen_k - seqlen_q``), -1 for
            no bound; ``causal`` sets right to 0 (Mistral / Qwen2 / Gemma 2 local layers).
        softcap: logit soft-capping ``s = softcap * tanh(s / softcap)`` of the scaled scores
            (Gemma 2), > 0; None for none.
        sinks: ``(Hq,)`` learnable sink logits (gpt-oss's ``sinks``; flash-attn 3's
            ``learnable_sink``): head h's sink joins every softmax denominator of that head,
            ``p_ij = exp(s_ij) / (exp(sink_h) + sum_j' exp(s_ij'))``, with no value; differentiable
            (the gradient in sinks' dtype). lse then counts the sink.
        chunk_size: chunked local attention (Llama 4's ``attention_chunk_size``): query i sees key
            j only when ``i // chunk_size == j // chunk_size``, counted from each sequence's own
            start (and the other masks still apply). Self-attention only (the same sequences for
            queries and keys) and with a known description (a PackedBatch, or validation on).
        return_lse: also return the softmax log-sum-exp ``(Hq, total_q)`` fp32 (-inf for a row
            that sees no key).
        deterministic: accepted for flash-attn parity; the backward never uses atomics, so
            gradients are always bitwise repeatable.

    Returns:
        out ``(total_q, Hq, Dv)`` in q's dtype, and lse if asked for. Differentiable in q, k, v
        (and sinks).
    """
    check_tensor("q", q, ndim=3, dtypes=_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=device)
    total_q, Hq, D = q.shape
    total_k, Hk, Dk = k.shape
    Dv = v.shape[2]
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"v must have k's tokens and heads {tuple(k.shape[:2])}, got {tuple(v.shape[:2])}")
    if Dk != D:
        raise ValueError(f"q and k must share the head dim, got {D} and {Dk}")
    if D < 1 or D > 256:
        raise ValueError(f"head dim must be in [1, 256], got {D}")
    if Dv < 1 or Dv > 256:
        raise ValueError(f"v's head dim must be in [1, 256], got {Dv}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hk})")
    if isinstance(cu_seqlens_q, PackedBatch):
        batch_q = cu_seqlens_q
        batch_k = batch_q if cu_seqlens_k is None else cu_seqlens_k
        if not isinstance(batch_k, PackedBatch) or max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("with a PackedBatch, pass no cu_seqlens_k / max_seqlen_q / max_seqlen_k: the batch "
                             "describes queries and keys (or pass a second PackedBatch for the keys)")
        if len(batch_k.lengths) != len(batch_q.lengths):
            raise ValueError(f"the query and key PackedBatch must describe the same number of sequences, got "
                             f"{len(batch_q.lengths)} and {len(batch_k.lengths)}")
        if (batch_q.groups is not None or batch_k.groups is not None) and batch_k is not batch_q:
            raise ValueError("a PackedBatch with shared prefixes describes self-attention: pass it alone "
                             "(varlen_attention(q, k, v, batch))")
        batch_q.check("q", total_q, device)
        batch_k.check("k", total_k, device)
        cu_q, cu_k = batch_q.cu_seqlens, batch_k.cu_seqlens
        max_q, max_k = batch_q.max_len, batch_k.max_len
        prefix = batch_q.prefix_table
    else:
        if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
            raise TypeError("varlen_attention takes a PackedBatch, or cu_seqlens_q, cu_seqlens_k, max_seqlen_q "
                            "and max_seqlen_k")
        max_q = check_int("max_seqlen_q", max_seqlen_q)
        max_k = check_int("max_seqlen_k", max_seqlen_k)
        batch_q = batch_for_cu("cu_seqlens_q", cu_seqlens_q, total_q, device=device, max_seqlen=max_q,
                               max_seqlen_name="max_seqlen_q")
        batch_k = batch_q if cu_seqlens_k is cu_seqlens_q else batch_for_cu(
            "cu_seqlens_k", cu_seqlens_k, total_k, device=device, max_seqlen=max_k, max_seqlen_name="max_seqlen_k")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                             f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
        # a validated description carries its own copy of cu_seqlens, consistent with its tiles
        cu_q = batch_q.cu_seqlens if batch_q is not None else cu_seqlens_q
        cu_k = batch_k.cu_seqlens if batch_k is not None else cu_seqlens_k
        prefix = None
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else check_finite_number("softmax_scale", softmax_scale)
    # a branch's keys run on past its own: the window is judged on its prefix and its own keys
    key_len = batch_k.max_key_len if isinstance(cu_seqlens_q, PackedBatch) else max_k
    window_left, window_right = _window_bounds(window_size, bool(causal), key_len)
    cap = 0.0
    if softcap is not None:
        cap = check_finite_number("softcap", softcap)
        if cap <= 0:
            raise ValueError(f"softcap must be > 0 (or None for no soft-capping), got {softcap}")
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, dtypes=_DTYPES, device=device)
        if sinks.shape[0] != Hq:
            raise ValueError(f"sinks must have one logit per query head, shape ({Hq},), got {tuple(sinks.shape)}")
        sinks = sinks.contiguous()
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        if batch_q is None or batch_k is not batch_q:
            raise ValueError("chunk_size: chunked attention needs the same sequences for queries and keys, described "
                             "(a PackedBatch, or cu_seqlens_q is cu_seqlens_k with validation on)")
        if torch.compiler.is_compiling() and chunk_size not in batch_q._chunked:
            raise ValueError(f"chunk_size={chunk_size} under torch.compile: describe the chunks before the compiled "
                             f"region (batch.chunked({chunk_size}) once, eagerly), as the batch itself is")
        # chunks counted from each sequence's start are sequences of their own: the same kernels
        batch_q = batch_k = batch_q.chunked(chunk_size)
        cu_q = cu_k = batch_q.cu_seqlens
        max_q = max_k = batch_q.max_len

    width = max(D, Dv)
    width += -width % 8
    if (D, Dv) != (width, width):
        # as flash-attn: zero columns change no score and no output (and, to the larger of the
        # two head dims, let MLA's values share the kernels); 16-byte rows keep loads vectorised
        q, k = (F.pad(t, (0, width - D)) for t in (q, k))
        v = F.pad(v, (0, width - Dv))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tiles = _tile_lists(q, batch_q, batch_k, cap)
    out, lse = _varlen_attention_fwd(q, k, v, cu_q, cu_k, *tiles, prefix, sinks, max_q, max_k, float(scale),
                                     window_left, window_right, cap)
    if Dv != width:
        out = out.narrow(-1, 0, Dv)  # (narrow: indexing a fake cuda tensor needs a CUDA build of torch)
    return (out, lse) if return_lse else out


def _window_bounds(window_size, causal: bool, max_k: int) -> Tuple[int, int]:
    """(left, right) for the kernels, flash-attn 2's rules: -1 is no bound, causal sets right
    to 0, and a bound that reaches past the longest key sequence is no bound."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    left, right = check_int("window_size[0]", left, minimum=-1), check_int("window_size[1]", right, minimum=-1)
    if causal:
        right = 0
    return (-1 if left >= max_k else left), (-1 if right >= max(max_k, 1) else right)
