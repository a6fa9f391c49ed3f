"""Plain Python / PyTorch references: one source of truth for the tests and the benchmarks.

Everything here computes in float64 (or exact integers) and favours clarity over speed.
"""
from __future__ import annotations

import bisect
from typing import List, Sequence


# ---------------------------------------------------------------- packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Plain-Python best-fit decreasing: each sequence, longest first (ties by index), goes to
    the open bin with the least remaining room that still fits it. Returns bins of indices."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms: List[tuple] = []  # sorted (remaining, bin id)
    bins: List[List[int]] = []
    for i in order:
        L = lengths[i]
        k = bisect.bisect_left(rooms, (L, -1))
        if k == len(rooms):
            bins.append([i])
            b, room = len(bins) - 1, capacity - L
        else:
            room, b = rooms.pop(k)
            bins[b].append(i)
            room -= L
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins


# ---------------------------------------------------------------- attention


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=True, softmax_scale=None, window_size=(-1, -1),
                     softcap=None, sinks=None, chunk_size=None, compute_dtype=None):
    """Per-sequence attention in ``compute_dtype`` (default: float64), differentiable.

    Shapes as :func:`longalign_ops.varlen_attention`. The mask is written out from flash-attn 2's
    definition: with ``diag = Lk - Lq``, query i sees key j iff ``j <= i + diag`` (causal),
    ``j >= i + diag - left`` (left >= 0) and ``j <= i + diag + right`` (right >= 0). softcap:
    ``s = softcap * tanh(s / softcap)`` on the scaled scores. sinks ``(Hq,)``: one more column of
    scores per head, ``sinks[h]`` in every row, with a zero value (gpt-oss's eager forward
    written out). chunk_size C: query i sees key j only if ``i // C == j // C``. v may have its
    own head dim. Returns out ``(total_q, Hq, Dv)`` and lse ``(Hq, total_q)`` in
    ``compute_dtype`` (lse is -inf, and out 0, for a row that sees no key and no sink).
    """
    import math

    import torch

    dt = compute_dtype or torch.float64
    total_q, Hq, D = q.shape
    Hk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].to(dt).transpose(0, 1)  # (Hq, Lq, D)
        ki = k[ck[i]:ck[i + 1]].to(dt).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
        vi = v[ck[i]:ck[i + 1]].to(dt).transpose(0, 1).repeat_interleave(Hq // Hk, dim=0)
        Lq, Lk = qi.shape[1], ki.shape[1]
        s = (qi @ ki.transpose(1, 2)) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:
            mask &= j <= i + (Lk - Lq)
        if window_size[0] >= 0:
            mask &= j >= i + (Lk - Lq) - window_size[0]
        if window_size[1] >= 0:
            mask &= j <= i + (Lk - Lq) + window_size[1]
        if chunk_size is not None:
            mask &= (j // chunk_size) == (i // chunk_size)
        if sinks is not None:  # the sink column: always visible, its value zero
            s = torch.cat([s, sinks.to(dt)[:, None, None].expand(Hq, Lq, 1)], -1)
            mask = torch.cat([mask, mask.new_ones(Lq, 1)], -1)
            vi = torch.cat([vi, vi.new_zeros(Hq, 1, vi.shape[-1])], 1)
        has = mask.any(-1)
        # rows that see no key: finite scores for softmax, zeroed after, so gradients stay finite
        scores = s.masked_fill(~mask, float("-inf")).masked_fill(~has[:, None], 0.0)
        p = torch.softmax(scores, dim=-1) * has[:, None]
        outs.append((p @ vi).transpose(0, 1))
        with torch.no_grad():
            lses.append(torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1))
    if not outs:
        return q.new_zeros((*q.shape[:2], v.shape[-1]), dtype=dt), q.new_zeros((Hq, 0), dtype=dt)
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ---------------------------------------------------------------- cross-entropy


def weighted_cross_entropy(logits, labels, *, token_weights=None, ignore_index=-100, reduction="mean",
                           softcap=None, label_smoothing=0.0, lse_square_scale=0.0, compute_dtype=None):
    """Token-weighted cross-entropy in ``compute_dtype`` (default float64), differentiable.
    Mean divides by the sum of weights over non-ignored tokens (0 if that sum is 0).
    label_smoothing e: the target is (1-e) one-hot + e uniform, as ``torch.nn.CrossEntropyLoss``;
    lse_square_scale s adds the z-loss ``s * logsumexp**2`` to each token's loss (Liger)."""
    import torch

    dt = compute_dtype or torch.float64
    x = logits.to(dt)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(x, -1)
    target = torch.nn.functional.one_hot(safe, x.shape[-1]).to(dt) * (1 - label_smoothing) + \
        label_smoothing / x.shape[-1]
    nll = -(target * logp).sum(-1) + lse_square_scale * torch.logsumexp(x, -1) ** 2
    w = torch.ones_like(nll) if token_weights is None else token_weights.to(dt)
    w = w * keep
    loss = w * nll
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denom = w.sum()
    return loss.sum() / denom if denom > 0 else loss.sum() * 0


def linear_cross_entropy(hidden, weight, labels, *, bias=None, compute_dtype=None, **kwargs):
    """lm head then :func:`weighted_cross_entropy`, all in ``compute_dtype`` (default float64)."""
    import torch

    dt = compute_dtype or torch.float64
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    return weighted_cross_entropy(logits, labels, compute_dtype=dt, **kwargs)


def sequence_logprobs(hidden, weight, labels, cu_seqlens, *, bias=None, ignore_index=-100, average=False):
    """Per-sequence sum (or mean) of target log-probs, float64, by a Python loop."""
    import torch

    nll = linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none")
    cu = cu_seqlens.tolist()
    out = []
    for s, e in zip(cu[:-1], cu[1:]):
        n = int((labels[s:e] != ignore_index).sum())
        total = -nll[s:e].sum()
        out.append(total / n if average and n else total)
    return torch.stack(out) if out else nll.new_zeros(0)


# ---------------------------------------------------------------- position synthesis (NumPy)

_MASK64 = (1 << 64) - 1


def _mix64(z):
    import numpy as np

    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mulhi64(a, b):
    import numpy as np

    with np.errstate(over="ignore"):
        m32 = np.uint64(0xFFFFFFFF)
        s32 = np.uint64(32)
        a_lo, a_hi, b_lo, b_hi = a & m32, a >> s32, b & m32, b >> s32
        lo_lo, hi_lo, lo_hi, hi_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
        cross = (lo_lo >> s32) + (hi_lo & m32) + lo_hi
        return hi_hi + (hi_lo >> s32) + (cross >> s32)


def _uniform(seed, seq, chunk, lo, hi):
    """NumPy twin of hash3 + uniform_int in csrc/common/hash.h (vectorised)."""
    import numpy as np

    h = _mix64(_mix64(_mix64(np.uint64(seed & _MASK64)) ^ seq.astype(np.uint64)) ^ chunk.astype(np.uint64))
    span = (hi - lo).astype(np.uint64) + np.uint64(1)
    return lo + _mulhi64(h, span).astype(np.int64)


def synthesize_positions_numpy(lengths, target_len, *, method="logo", chunk_size=512, num_chunks=None,
                               prefix_lens=None, suffix_lens=None, seed=0):
    """An independent NumPy implementation of the placement of docs/api.md (Positions) (vectorised over
    sequences and tokens); the C++ twin must match it bitwise. Returns (T,) int64."""
    import numpy as np

    n = np.asarray(lengths, dtype=np.int64)
    B = len(n)
    T = np.broadcast_to(np.asarray(target_len, dtype=np.int64), (B,))
    s = np.zeros(B, np.int64) if prefix_lens is None else np.broadcast_to(np.asarray(prefix_lens, np.int64), (B,))
    q = np.zeros(B, np.int64) if suffix_lens is None else np.broadcast_to(np.asarray(suffix_lens, np.int64), (B,))
    c = n - s - q
    G = T - n
    if num_chunks:
        N = np.where(c > 0, np.minimum(num_chunks, np.maximum(c, 1)), 0)
    else:
        N = np.where(c > 0, (c + chunk_size - 1) // chunk_size, 0)
    # chunk offsets, one column per chunk index (sequential over j for "pose")
    maxN = int(N.max()) if B else 0
    offsets = np.zeros((B, max(maxN, 1)), np.int64)
    seq = np.arange(B, dtype=np.int64)
    prev = np.zeros(B, np.int64)
    for j in range(maxN):
        live = (N > j) & (G > 0) & (method != "contiguous")
        jj = np.full(B, j, np.int64)
        if method == "logo":
            Ns = np.maximum(N, 1)
            o = _uniform(seed, seq, jj, (j * G) // Ns, ((j + 1) * G) // Ns)
        elif method == "pose":
            o = np.zeros(B, np.int64) if j == 0 else _uniform(seed, seq, jj, prev, np.maximum(G, prev))
        else:
            o = np.zeros(B, np.int64)
        o = np.where(live, o, 0)
        offsets[:, j] = o
        prev = np.where(N > j, o, prev)
    # per token
    tok_seq = np.repeat(seq, n)
    starts = np.repeat(np.cumsum(n) - n, n)
    t = np.arange(int(n.sum()), dtype=np.int64) - starts
    ss, cc, NN = s[tok_seq], c[tok_seq], N[tok_seq]
    m = t - ss
    if num_chunks:
        NNs = np.maximum(NN, 1)
        base, rem = cc // NNs, cc % NNs
        head = rem * (base + 1)
        j = np.where(m < head, m // (base + 1), rem + (m - head) // np.maximum(base, 1))
    else:
        j = m // chunk_size
    j = np.clip(np.where(m < cc, j, NN - 1), 0, None)
    off = offsets[tok_seq, np.minimum(j, max(maxN, 1) - 1)]
    in_middle_or_suffix = (t >= ss) & (cc > 0)
    return t + np.where(in_middle_or_suffix, off, 0)
