"""Variable-length (packed) attention in Triton: forward and backward, causal or not, GQA.

Layout as flash-attn 2's varlen API: q ``(total_q, Hq, D)``, k/v ``(total_k, Hk, D)``, sequences
delimited by int32 ``cu_seqlens``. Masks are flash-attn 2's, aligned bottom-right: with
``diag = seqlen_k - seqlen_q``, query i of a sequence sees keys
``i + diag - window_left <= j <= i + diag + window_right`` (a bound of -1 is no bound; causal is
``window_right = 0``). Optional logit soft-capping ``s = cap * tanh(s / cap)`` (Gemma 2).

Scheduling: each program owns one (sequence, row block) tile and one head. The tile list is
built on the host once per batch (``longalign_ops.PackedBatch``, one list per block size, copied
with the rest of the description), so a row holding one 60K sequence and two hundred 300-token
ones launches exactly the tiles that exist, longest work first, with nothing rebuilt per layer.
Without a list (validation off and no description) the grid is ``B * cdiv(max_seqlen, BLOCK)``
with early exit. Either way every span is clamped into ``[0, total)`` in the kernel.

Backward is two kernels without atomics: dK/dV per key block (summing the GQA group's query
heads in registers; where one program holding both accumulators would spill, dK and dV by two
launches of it) and dQ per query block. Every gradient element is written by exactly one
program in a fixed order, so gradients are bitwise repeatable whatever ``deterministic`` says.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import gpu_capability, on_compiled_gpu
from ._math import precise_tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_coords(pid, tile_seq, tile_block, TILE_LIST: tl.constexpr, BLOCKS_PER_SEQ):
    """(sequence, block index) of this program: from the host-built tile list, or from the
    dense B x cdiv(max_seqlen, BLOCK) grid when validation (and so the list) is off."""
    if TILE_LIST:
        seq = tl.load(tile_seq + pid)
        blk = tl.load(tile_block + pid)
    else:
        seq = pid // BLOCKS_PER_SEQ
        blk = pid % BLOCKS_PER_SEQ
    return seq, blk


@triton.jit
def _clamped_span(cu, seq, total):
    """[start, end) of sequence `seq`, clamped into [0, total): whatever cu_seqlens holds (with
    validation off, or changed behind a cache), no program reads or writes outside the tensors."""
    start = tl.minimum(tl.maximum(tl.load(cu + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu + seq + 1), start), total)
    return start, end - start


@triton.jit
def _sequence_bounds(cu_q, cu_k, seq, total_q, total_k):
    """Start and length of sequence `seq` on the query side and on the key side."""
    q_start, len_q = _clamped_span(cu_q, seq, total_q)
    k_start, len_k = _clamped_span(cu_k, seq, total_k)
    return q_start, len_q, k_start, len_k


@triton.jit
def _head_base(ptr, first_row, stride_t, head, stride_h):
    """Pointer to (first_row, head, 0): one 64-bit scalar per program, so the per-element
    offsets of a tile stay 32-bit (64-bit pointer tiles cost ~64 registers per K tile)."""
    return ptr + first_row.to(tl.int64) * stride_t + head.to(tl.int64) * stride_h


@triton.jit
def _in_elements(stride_t, stride_h, STRIDE_UNIT: tl.constexpr):
    """A tensor's (token, head) strides in elements, from the launch's strides in units of
    STRIDE_UNIT (see stride_unit): the product carries STRIDE_UNIT's divisibility into the
    compiler's alignment analysis."""
    return stride_t * STRIDE_UNIT, stride_h * STRIDE_UNIT


@triton.jit
def _tile_offsets(rows, stride_t, offs_d, WIDE_OFFSETS: tl.constexpr):
    """Offsets of a (rows x head dim) tile from its head base; 64-bit only when a sequence's
    rows times the row stride can pass 2^31 (decided on the host)."""
    if WIDE_OFFSETS:
        rows = rows.to(tl.int64)
    return rows[:, None] * stride_t + offs_d[None, :]


@triton.jit
def _key_range(len_q, len_k, mblk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of the keys row block `mblk` can see; lo rounded down to a key block."""
    diag = len_k - len_q
    lo = 0
    hi = len_k
    if HAS_RIGHT:
        hi = tl.minimum(len_k, tl.maximum((mblk + 1) * BLOCK_M + diag + window_right, 0))
    if HAS_LEFT:
        lo = tl.maximum(mblk * BLOCK_M + diag - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(len_q, len_k, k_first, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of the query rows that see any of the BLOCK_N keys from key index `k_first`; lo
    rounded down to a row block."""
    diag = len_k - len_q
    lo = 0
    hi = len_q
    if HAS_RIGHT:
        lo = tl.maximum(k_first - diag - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(len_q, tl.maximum(k_first + BLOCK_N - diag + window_left, 0))
    return lo, hi


@triton.jit
def _prefix_of(Prefix, seq, HAS_PREFIX: tl.constexpr):
    """(offset of segment `seq`'s prefix keys from its own first key (<= 0), prefix length),
    from the (S, 4) int32 table of a batch with shared prefixes; (0, 0) without one."""
    if HAS_PREFIX:
        row = Prefix + seq.to(tl.int64) * 4
        return tl.load(row), tl.load(row + 1)
    else:
        return 0, 0


@triton.jit
def _branches_of(Prefix, seq):
    """(first segment, count) of the branches that share segment `seq` as their prefix."""
    row = Prefix + seq.to(tl.int64) * 4
    return tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _visible(rows, cols, len_q, len_k, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Mask of the in-range (query, key) pairs that the window lets through, from query indices
    `rows` and key indices `cols` already broadcast against each other: ``rows[:, None]``,
    ``cols[None, :]`` for a (queries x keys) tile, the other way round for its transpose."""
    keep = (rows < len_q) & (cols < len_k)
    diag = len_k - len_q
    if HAS_RIGHT:
        keep = keep & (cols <= rows + diag + window_right)
    if HAS_LEFT:
        keep = keep & (cols >= rows + diag - window_left)
    return keep


@triton.jit
def _scores(q, k, qk_scale_log2, scale_over_cap, cap_log2, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores ``q @ k.T`` in log2 units, and tanh of the capped scores (what the backward needs;
    the raw dot product when there is no cap). ``_scores(k, q, ...)`` gives the transpose."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    t = qk
    if SOFTCAP:
        t = precise_tanh(qk * scale_over_cap)
        s = t * cap_log2
    else:
        s = qk * qk_scale_log2
    return s, t


@triton.jit
def _prefix_blocks(lo, hi, pre_off, pre_len, BLOCK_N: tl.constexpr):
    """The key blocks of a branch: its prefix's keys [lo, min(hi, pre_len)) in BLOCK_N steps from
    lo, then its own from pre_len (so no block straddles the two, and each block's rows are
    affine: key j is row j + pre_off in the prefix, j - pre_len in the branch). Returns (blocks
    in the prefix, blocks in all, own start)."""
    n_pre = tl.cdiv(tl.maximum(tl.minimum(hi, pre_len) - lo, 0), BLOCK_N)
    own_lo = pre_len + (tl.maximum(lo - pre_len, 0) // BLOCK_N) * BLOCK_N
    return n_pre, n_pre + tl.cdiv(tl.maximum(hi - own_lo, 0), BLOCK_N), own_lo


@triton.jit
def _fwd_block(q, m_i, l_i, acc, k_base, v_base, cols, row_shift, key_end, offs_m, len_q, len_k,
               stride_kt, stride_vt, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
               MASK_KEYS: tl.constexpr):
    """One online-softmax step of a query tile over the keys `cols` (key j at row j + row_shift);
    with MASK_KEYS, keys from key_end on are not this block's (a prefix's last partial block)."""
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = cols < key_end
    kv_mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + _tile_offsets(cols + row_shift, stride_kt, offs_d, WIDE_OFFSETS), mask=kv_mask, other=0.0)
    s, _ = _scores(q, k, qk_scale_log2, scale_over_cap, cap_log2, SOFTCAP, DOT_PRECISION)
    keep = _visible(offs_m[:, None], cols[None, :], len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    if MASK_KEYS:
        keep = keep & n_valid[None, :]
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with nothing visible yet keep m = -inf; subtract 0 instead to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + _tile_offsets(cols + row_shift, stride_vt, offs_d, WIDE_OFFSETS), mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _with_sink(m_i, l_i, acc, Sinks, h):
    """Fold head h's learnable sink (gpt-oss: one more logit in every row's softmax denominator,
    with no value) into the online softmax after the last key block. The lse then counts the
    sink, so the backward's P = exp(S - lse) are the sink-normalised probabilities and dQ, dK,
    dV need nothing more; the sink's own gradient, -sum_i exp(sink - lse_i) delta_i, is a
    reduction over the pre-pass's delta (attention.py)."""
    sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, sink)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.math.exp2(sink - m_safe), acc * alpha[:, None]


@triton.jit
def _varlen_attention_fwd_kernel(
    Q, K, V, Out, Lse, cu_q, cu_k, tile_seq, tile_block, Prefix, Sinks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, total_k, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right, BLOCKS_PER_SEQ,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, STRIDE_UNIT: tl.constexpr, HAS_SINK: tl.constexpr = False,
):
    stride_qt, stride_qh = _in_elements(stride_qt, stride_qh, STRIDE_UNIT)
    stride_kt, stride_kh = _in_elements(stride_kt, stride_kh, STRIDE_UNIT)
    stride_vt, stride_vh = _in_elements(stride_vt, stride_vh, STRIDE_UNIT)
    stride_ot, stride_oh = _in_elements(stride_ot, stride_oh, STRIDE_UNIT)
    seq, mblk = _tile_coords(tl.program_id(0), tile_seq, tile_block, TILE_LIST, BLOCKS_PER_SEQ)
    h = tl.program_id(1)
    kh = h // GROUP
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_q, cu_k, seq, total_q, total_k)
    if mblk * BLOCK_M >= len_q:
        return
    # a branch's keys are its prefix's, then its own: key index j < pre_len is prefix key j
    pre_off, pre_len = _prefix_of(Prefix, seq, HAS_PREFIX)
    len_k = len_k + pre_len

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < len_q
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(_head_base(Q, q_start, stride_qt, h, stride_qh) + _tile_offsets(offs_m, stride_qt, offs_d, WIDE_OFFSETS),
                mask=q_mask, other=0.0)
    k_base = _head_base(K, k_start, stride_kt, kh, stride_kh)
    v_base = _head_base(V, k_start, stride_vt, kh, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(len_q, len_k, mblk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_PREFIX:  # one loop over the prefix's key blocks, then the branch's own
        n_pre, n_all, own_lo = _prefix_blocks(lo, hi, pre_off, pre_len, BLOCK_N)
        for i in range(0, n_all):
            in_prefix = i < n_pre
            start_n = tl.where(in_prefix, lo + i * BLOCK_N, own_lo + (i - n_pre) * BLOCK_N)
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, k_base, v_base, start_n + offs_n,
                                       tl.where(in_prefix, pre_off, -pre_len), tl.where(in_prefix, pre_len, len_k),
                                       offs_m, len_q, len_k, stride_kt, stride_vt, qk_scale_log2, scale_over_cap,
                                       cap_log2, window_left, window_right, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT,
                                       SOFTCAP, DOT_PRECISION, WIDE_OFFSETS, True)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, k_base, v_base, start_n + offs_n, 0, len_k, offs_m, len_q,
                                       len_k, stride_kt, stride_vt, qk_scale_log2, scale_over_cap, cap_log2,
                                       window_left, window_right, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                       DOT_PRECISION, WIDE_OFFSETS, False)

    if HAS_SINK:
        m_i, l_i, acc = _with_sink(m_i, l_i, acc, Sinks, h)
    # a row that sees no key (causal with len_k < len_q, or a window past the keys) outputs 0
    # with lse = -inf (with a sink: 0 with lse = the sink)
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(_head_base(Out, q_start, stride_ot, h, stride_oh) + _tile_offsets(offs_m, stride_ot, offs_d, WIDE_OFFSETS),
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + h.to(tl.int64) * total_q + q_start + offs_m, lse, mask=m_valid)


@triton.jit
def _varlen_attention_bwd_preprocess_kernel(
    Out, dOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the softmax-backward row term (flash-attn's D)."""
    stride_ot, stride_oh = _in_elements(stride_ot, stride_oh, STRIDE_UNIT)
    stride_dot, stride_doh = _in_elements(stride_dot, stride_doh, STRIDE_UNIT)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)
    # 64-bit head offsets: a head-major view (an all-to-all's, a (H, T, D) buffer's) of 1M tokens
    # at head dim 128 puts head 16 at 2^31 elements
    head = h.to(tl.int64)
    o = tl.load(Out + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h.to(tl.int64) * total_q + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _dkdv_from_queries(dk, dv, k, v, keys, k_first, key_valid, q_start, len_q, len_k, kh, Q, dOut, Lse, Delta,
                       stride_qt, stride_qh, stride_dot, stride_doh, total_q,
                       qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                       MASK_KEYS: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """dK, dV of one key tile (key indices `keys`, from k_first, of a sequence with len_k keys) accumulated
    over the len_q queries from q_start that can see them, for every query head of kv head kh.
    MASK_KEYS: drop keys past the tile's own (a prefix tile seen by a branch, whose key indices
    run on into the branch's own keys). WANT_DK / WANT_DV: which of the two this program
    accumulates (both, or one where holding both would spill)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    lo, hi = _query_range(len_q, len_k, k_first, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT,
                          HAS_RIGHT)
    for g in range(GROUP):
        h = kh * GROUP + g
        q_base = _head_base(Q, q_start, stride_qt, h, stride_qh)
        do_base = _head_base(dOut, q_start, stride_dot, h, stride_doh)
        stat_base = h.to(tl.int64) * total_q + q_start
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < len_q
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(q_base + _tile_offsets(offs_m, stride_qt, offs_d, WIDE_OFFSETS), mask=q_mask, other=0.0)
            do = tl.load(do_base + _tile_offsets(offs_m, stride_dot, offs_d, WIDE_OFFSETS), mask=q_mask, other=0.0)
            lse = tl.load(Lse + stat_base + offs_m, mask=m_valid, other=0.0)
            # rows that saw no key have lse = -inf and p = 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + stat_base + offs_m, mask=m_valid, other=0.0)
            # the transposed scores, keys x queries: every matmul of this loop then has the
            # tile's BLOCK_N keys as its M dimension, which is what Hopper's wgmma needs (>= 64
            # rows per warpgroup) while the query step BLOCK_M stays small (as Triton's tutorial)
            sT, tT = _scores(k, q, qk_scale_log2, scale_over_cap, cap_log2, SOFTCAP, DOT_PRECISION)
            keep = _visible(offs_m[None, :], keys[:, None], len_q, len_k, window_left, window_right, HAS_LEFT,
                            HAS_RIGHT)
            if MASK_KEYS:
                keep = keep & key_valid[:, None]
            pT = tl.where(keep, tl.math.exp2(sT - lse2[None, :]), 0.0)
            if WANT_DV:
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            if WANT_DK:
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                dsT = pT * (dpT - delta[None, :])
                if SOFTCAP:
                    dsT = dsT * (1.0 - tT * tT)  # d(cap * tanh(x / cap)) / dx
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, cu_q, cu_k, tile_seq, tile_block, Prefix,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, total_k, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right, sm_scale,
    BLOCKS_PER_SEQ,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    stride_qt, stride_qh = _in_elements(stride_qt, stride_qh, STRIDE_UNIT)
    stride_kt, stride_kh = _in_elements(stride_kt, stride_kh, STRIDE_UNIT)
    stride_vt, stride_vh = _in_elements(stride_vt, stride_vh, STRIDE_UNIT)
    stride_dot, stride_doh = _in_elements(stride_dot, stride_doh, STRIDE_UNIT)
    stride_dkt, stride_dkh = _in_elements(stride_dkt, stride_dkh, STRIDE_UNIT)
    stride_dvt, stride_dvh = _in_elements(stride_dvt, stride_dvh, STRIDE_UNIT)
    seq, nblk = _tile_coords(tl.program_id(0), tile_seq, tile_block, TILE_LIST, BLOCKS_PER_SEQ)
    kh = tl.program_id(1)
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_q, cu_k, seq, total_q, total_k)
    if nblk * BLOCK_N >= len_k:
        return

    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < len_k
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(_head_base(K, k_start, stride_kt, kh, stride_kh) + _tile_offsets(offs_n, stride_kt, offs_d, WIDE_OFFSETS),
                mask=kv_mask, other=0.0)
    v = tl.load(_head_base(V, k_start, stride_vt, kh, stride_vh) + _tile_offsets(offs_n, stride_vt, offs_d, WIDE_OFFSETS),
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # this tile's own queries (a branch's keys follow its prefix's: their indices start at pre_len)
    _, pre_len = _prefix_of(Prefix, seq, HAS_PREFIX)
    dk, dv = _dkdv_from_queries(dk, dv, k, v, offs_n + pre_len, nblk * BLOCK_N + pre_len, n_valid, q_start, len_q, len_k + pre_len, kh, Q,
                                dOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, total_q,
                                qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
                                GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                DOT_PRECISION, WIDE_OFFSETS, False, WANT_DK, WANT_DV)
    if HAS_PREFIX:
        # a shared prefix's keys are also every branch's first keys: their gradients sum over all
        # of the branches' queries here, in this one program (no atomics)
        first, count = _branches_of(Prefix, seq)
        for b in range(count):
            branch = first + b
            bq_start, blen_q, _, blen_own = _sequence_bounds(cu_q, cu_k, branch, total_q, total_k)
            dk, dv = _dkdv_from_queries(dk, dv, k, v, offs_n, nblk * BLOCK_N, n_valid, bq_start, blen_q, len_k + blen_own, kh, Q,
                                        dOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, total_q,
                                        qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
                                        GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                        DOT_PRECISION, WIDE_OFFSETS, True, WANT_DK, WANT_DV)
    if WANT_DK:
        dk = dk * sm_scale
        tl.store(_head_base(dK, k_start, stride_dkt, kh, stride_dkh) + _tile_offsets(offs_n, stride_dkt, offs_d, WIDE_OFFSETS),
                 dk.to(dK.dtype.element_ty), mask=kv_mask)
    if WANT_DV:
        tl.store(_head_base(dV, k_start, stride_dvt, kh, stride_dvh) + _tile_offsets(offs_n, stride_dvt, offs_d, WIDE_OFFSETS),
                 dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, cols, row_shift, key_end, offs_m, len_q, len_k,
              stride_kt, stride_vt, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
              MASK_KEYS: tl.constexpr):
    """dQ of a query tile from the keys `cols`, addressed as in _fwd_block."""
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = cols < key_end
    kv_mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + _tile_offsets(cols + row_shift, stride_kt, offs_d, WIDE_OFFSETS), mask=kv_mask, other=0.0)
    v = tl.load(v_base + _tile_offsets(cols + row_shift, stride_vt, offs_d, WIDE_OFFSETS), mask=kv_mask, other=0.0)
    s, t = _scores(q, k, qk_scale_log2, scale_over_cap, cap_log2, SOFTCAP, DOT_PRECISION)
    keep = _visible(offs_m[:, None], cols[None, :], len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    if MASK_KEYS:
        keep = keep & n_valid[None, :]
    p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, cu_q, cu_k, tile_seq, tile_block, Prefix,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_q, total_k, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right, sm_scale,
    BLOCKS_PER_SEQ,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    stride_qt, stride_qh = _in_elements(stride_qt, stride_qh, STRIDE_UNIT)
    stride_kt, stride_kh = _in_elements(stride_kt, stride_kh, STRIDE_UNIT)
    stride_vt, stride_vh = _in_elements(stride_vt, stride_vh, STRIDE_UNIT)
    stride_dot, stride_doh = _in_elements(stride_dot, stride_doh, STRIDE_UNIT)
    stride_dqt, stride_dqh = _in_elements(stride_dqt, stride_dqh, STRIDE_UNIT)
    seq, mblk = _tile_coords(tl.program_id(0), tile_seq, tile_block, TILE_LIST, BLOCKS_PER_SEQ)
    h = tl.program_id(1)
    kh = h // GROUP
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_q, cu_k, seq, total_q, total_k)
    if mblk * BLOCK_M >= len_q:
        return
    pre_off, pre_len = _prefix_of(Prefix, seq, HAS_PREFIX)
    len_k = len_k + pre_len

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < len_q
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(_head_base(Q, q_start, stride_qt, h, stride_qh) + _tile_offsets(offs_m, stride_qt, offs_d, WIDE_OFFSETS),
                mask=q_mask, other=0.0)
    do = tl.load(_head_base(dOut, q_start, stride_dot, h, stride_doh)
                 + _tile_offsets(offs_m, stride_dot, offs_d, WIDE_OFFSETS), mask=q_mask, other=0.0)
    stat_base = h.to(tl.int64) * total_q + q_start
    lse = tl.load(Lse + stat_base + offs_m, mask=m_valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + stat_base + offs_m, mask=m_valid, other=0.0)
    k_base = _head_base(K, k_start, stride_kt, kh, stride_kh)
    v_base = _head_base(V, k_start, stride_vt, kh, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(len_q, len_k, mblk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_PREFIX:  # the prefix's key blocks, then the branch's own (as in the forward)
        n_pre, n_all, own_lo = _prefix_blocks(lo, hi, pre_off, pre_len, BLOCK_N)
        for i in range(0, n_all):
            in_prefix = i < n_pre
            start_n = tl.where(in_prefix, lo + i * BLOCK_N, own_lo + (i - n_pre) * BLOCK_N)
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n + offs_n, tl.where(in_prefix, pre_off, -pre_len),
                           tl.where(in_prefix, pre_len, len_k), offs_m, len_q, len_k, stride_kt, stride_vt,
                           qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right, HEAD_DIM, BLOCK_D,
                           HAS_LEFT, HAS_RIGHT, SOFTCAP, DOT_PRECISION, WIDE_OFFSETS, True)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n + offs_n, 0, len_k, offs_m, len_q, len_k,
                           stride_kt, stride_vt, qk_scale_log2, scale_over_cap, cap_log2, window_left, window_right,
                           HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, SOFTCAP, DOT_PRECISION, WIDE_OFFSETS, False)
    dq = dq * sm_scale
    tl.store(_head_base(dQ, q_start, stride_dqt, h, stride_dqh) + _tile_offsets(offs_m, stride_dqt, offs_d, WIDE_OFFSETS),
             dq.to(dQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers


def attention_config(head_dim: int, dtype: torch.dtype, on_gpu: bool, capability=(9, 0), softcap: bool = False,
                     prefix: bool = False) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, and `dkdv_split`, in one place. The budget behind each
    number (registers, shared memory, wgmma's 64-row slabs) and a reason per entry are in
    docs/design.md, "Tile model"; bench/tile_sweep.py compiles candidates.

    GPU choices are the largest tiles that compile without register spills for the device's
    architecture (bench/compile_check.py reads the cubins; tests/test_compile.py keeps every
    entry spill-free on sm_80 and sm_90).
    fwd: 128 x 64 query x key tiles for D <= 128 (the flash-attn 2 shape), 64 x 64 above.
    dkdv owns BLOCK_N keys and their fp32 dK, dV accumulators while it walks BLOCK_M query
    rows, so it takes the smallest tiles; dq owns BLOCK_M query rows and walks keys.
    sm_80 has the same register file but allocates differently: three entries are narrower.
    fp32 (ieee dots, for accuracy) needs 16-32 wide tiles to stay out of local memory: it is
    the correctness path, bf16 / fp16 the fast one.
    Soft-capping keeps tanh of the scores live through the dq loop: its key tiles are halved
    (and sm_80's forward row tiles).
    Shared prefixes (`prefix`) add the prefix's key blocks to each branch's loop (and a loop over
    the branches to a prefix's dK/dV): narrower tiles keep those spill-free above head dim 64.
    Interpreter: 32 x 32, so small test shapes (97, 1025 tokens) cross several tiles.
    `dkdv_split`: dK and dV by two launches of the dK/dV kernel (one accumulator each, the
    scores computed twice) where one program holding both spills (sm_90, D = 256, soft-capping
    or shared prefixes).
    """
    cfg = _tiles(head_dim, dtype, on_gpu, capability, softcap, prefix)
    return dict(cfg, dkdv_split=cfg.get("dkdv_split", False))


# The most shared memory one program may use (opt-in dynamic shared memory per block), by
# architecture: A100 / Orin; the 99 KB of A10, A40, L4, L40S, RTX 30x0 / 40x0 (sm_86, sm_89) and
# of RTX 50x0 (sm_120, sm_121); H100 / H200 and B200 / B300 (sm_90, sm_100, sm_103).
SHARED_MEMORY = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448,
                 (10, 3): 232448, (12, 0): 101376, (12, 1): 101376}


def shared_memory_limit(capability) -> int:
    """Bytes of shared memory one program may use on `capability` (an unknown one: the least)."""
    return SHARED_MEMORY.get(tuple(capability), min(SHARED_MEMORY.values()))


def _tiles(head_dim, dtype, on_gpu, capability, softcap, prefix) -> dict:
    """attention_config's entries; those that split dK/dV say so."""
    if not on_gpu:
        return dict(fwd=(32, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1))
    # Hopper's tiles are shaped for wgmma (sm_90 only). Every other architecture takes sm_80's
    # mma.sync-sized tiles: on sm_100 Hopper's dK/dV tiles spill (488 B at D = 256) and sm_80's
    # compile spill-free within its shared memory; the 99 KB parts (sm_86/89/120) take them too,
    # with a narrower forward above head dim 128 (64 x 64 over 256 columns needs 104 KB there)
    hopper = tuple(capability)[0] == 9
    if not hopper and head_dim > 128 and shared_memory_limit(capability) < 110_000 and dtype != torch.float32:
        return dict(_tiles(head_dim, dtype, on_gpu, (8, 0), softcap, prefix), fwd=(64, 32, 8, 2))
    if dtype == torch.float32:
        return _fp32_tiles(head_dim, capability, softcap, prefix)
    # sm_90 dK/dV: 64 keys per program (the M dimension of all of its matmuls: wgmma's minimum),
    # 8 warps, and a short query step (32 at D <= 64, 16 at D = 128) so that the fp32 dK, dV
    # accumulators and the K, V tiles fit the register file; its loads pipeline through cp.async
    if head_dim <= 64:
        # below 17 (the 16-wide contraction of block_d) a 16-row query step keeps sm_80/86/100's
        # dK/dV spill-free (32 rows spilled 8 B on some, with and without window + softcap)
        dkdv = (32, 64, 8, 3) if hopper else (16, 32, 4, 2) if head_dim <= 16 else (32, 32, 4, 2)
        return dict(fwd=(128, 64, 8, 3), dkdv=dkdv, dq=(64, 64, 8, 2))
    if head_dim <= 128 and prefix:
        if hopper:
            return dict(fwd=(64, 64, 8, 2) if softcap else (128, 64, 8, 3), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2))
        # (sm_100's 64 x 16 dK/dV spilled 16 B at head dim 96; 32 x 32 is spill-free at 96 and 128)
        return dict(fwd=(64, 64, 8, 2), dkdv=(32, 32, 4, 2) if tuple(capability)[0] == 10 else (64, 16, 4, 2),
                    dq=(32, 32, 4, 2))
    if head_dim <= 128:
        dq = (64, 64, 4, 2) if hopper else (32, 64, 4, 2)
        fwd = (64, 64, 8, 2) if softcap and not hopper else (128, 64, 8, 3)
        return dict(fwd=fwd, dkdv=(16, 64, 8, 2) if hopper else (64, 32, 8, 2), dq=(dq[0], 32, 4, 2) if softcap else dq)
    fwd = (64, 32, 8, 2) if prefix else (64, 64, 8, 2)
    if not hopper:  # sm_80, D = 256: small mma.sync tiles, 2 stages (dQ with softcap and prefixes: 8 warps)
        return dict(fwd=fwd, dkdv=(16, 16, 4, 2), dq=(64, 16, 8, 2) if softcap and prefix else (32, 16, 4, 2))
    # sm_90, D = 256: the D <= 128 shapes with fp32 dK, dV at 256 columns (64 registers each at 8
    # warps). Soft-capping and shared prefixes add live state that makes that dK/dV spill on
    # every wgmma tile: there dK and dV are computed by separate programs (dkdv_split), each
    # holding one 256-column accumulator, which frees the registers for 128 keys per program on
    # a soft-capped row (Gemma 2's long rows) or a 3-stage pipeline over shared prefixes' short
    # branches; dQ takes a 32-key step
    if not (softcap or prefix):
        return dict(fwd=fwd, dkdv=(16, 64, 8, 2), dq=(64, 64, 8, 2))
    return dict(fwd=fwd, dkdv=(16, 64, 8, 3) if prefix else (16, 128, 8, 2), dq=(64, 32, 8, 2), dkdv_split=True)


def _fp32_tiles(head_dim, capability, softcap, prefix) -> dict:
    """fp32's tiles (ieee dots: the operands of every product in registers, so narrow tiles),
    chosen by bench/tile_sweep.py over sm_80/86/89/90/100/120 x head dims 8-256 x the three
    variants, every entry spill-free (the compile matrix in bench/results keeps them so):
    - forward: 32 x 16 at 4 warps up to head dim 64; above, 8 warps (4 spilled 160-5,700 B: the
      32 x BLOCK_D accumulator and Q at 4 warps), with a window + soft-cap 16 x 32 up to 128
      (32 x 16 spilled 8-24 B on sm_80)
    - dQ: the same, 8 warps above 128; shared prefixes on sm_120 above 192 take 16 x 16 (32 x 16
      spilled 32 B there; 16 x 16 spilled 8 B on sm_86 at 192)
    - dK/dV: 16 x 16 at 8 warps up to head dim 16; 16 x 32 keys at 8 warps above (16 x 16
      spilled 8-48 B with prefixes or soft-capping), except sm_80 with shared prefixes above
      head dim 40 (24 B) and the 99 KB parts above 128 (16 x 32 spills there; 16 x 16 does not);
      sm_120 between 64 and 128 takes 2 stages
    """
    small_shared = shared_memory_limit(capability) < 110_000
    if head_dim <= 64:
        fwd = (32, 16, 4, 1)
    else:
        fwd = (16, 32, 8, 1) if softcap and head_dim <= 128 else (32, 16, 8, 1)
    sm_120 = tuple(capability)[0] == 12
    dq = (32, 16, 4, 1) if head_dim <= 128 else (16, 16, 8, 1) if prefix and sm_120 and head_dim > 192 else \
        (32, 16, 8, 1)
    if head_dim <= 16 or (head_dim > 128 and small_shared) or \
            (tuple(capability) == (8, 0) and prefix and head_dim > 40):
        dkdv = (16, 16, 8, 1)
    elif sm_120 and 64 < head_dim < 128:
        dkdv = (16, 32, 8, 2)  # sm_120 over a masked 128-wide tile: 1 stage spilled 16-24 B
    else:
        dkdv = (16, 32, 8, 1)
    return dict(fwd=fwd, dkdv=dkdv, dq=dq)


def config_for(q: torch.Tensor, softcap: float = 0.0, prefix: bool = False) -> dict:
    """The tile config of the device and dtype `q` runs on (the GPU's architecture from
    gpu_capability: cached, never a CUDA call while tracing on a machine without one)."""
    on_gpu = on_compiled_gpu(q)
    cap = gpu_capability(q.device) if on_gpu else (0, 0)
    return attention_config(q.shape[-1], q.dtype, on_gpu, cap, softcap > 0, prefix)


def _grid_args(tiles, num_seqs: int, max_seqlen: int, block: int, device):
    """(programs, tile_seq, tile_block, blocks_per_seq, tile_list) for one launch: a host-built
    (2, n) tile list of the real tiles, or, without one (validation off), the dense grid
    B x cdiv(max_seqlen, block) whose programs past a sequence's end exit at once."""
    if tiles is not None:
        return tiles.shape[1], tiles[0], tiles[1], 1, True
    per_seq = max(1, triton.cdiv(max_seqlen, block))
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    return num_seqs * per_seq, dummy, dummy, per_seq, False


def _wide_offsets(max_q: int, max_k: int, *tensors) -> bool:
    """64-bit in-tile offsets only when a sequence's rows x row stride can reach 2^31."""
    return max(max_q, max_k, 1) * max(t.stride(0) for t in tensors) >= 2 ** 31


def stride_unit(*tensors) -> int:
    """The largest of 16, 8, 4, 2, 1 dividing every token and head stride of `tensors`: the
    launchers pass strides in this unit and the kernels multiply it back (_in_elements), so the
    compiler knows each row of a tile starts 16-byte aligned. Triton's JIT only marks integers
    divisible by 16; with head dim 40 (head stride 40) it would not vectorize or pipeline a
    single load."""
    return math.gcd(16, *(t.stride(i) for t in tensors for i in (0, 1)))


def _strides(unit: int, *tensors) -> list:
    """(token stride, head stride) of each tensor, in `unit`s."""
    return [t.stride(i) // unit for t in tensors for i in (0, 1)]


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of two, and at least 16, the smallest contraction
    tl.dot compiles for NVIDIA (mma and wgmma take K >= 16; the interpreter takes less, so head
    dims 1..15 passed there and failed to compile). Columns past head_dim load as 0 and are
    never stored."""
    return max(16, triton.next_power_of_2(head_dim))


def prepass_rows(block_d: int, element_bytes: int = 2) -> int:
    """Rows per program of the dO.O pre-pass: 8 KB of each of O and dO per program (bf16: 64 rows
    at D = 64, 32 at D = 128, 16 above; fp32 half of that, at least 8). One step more spilled 8-72 B on
    sm_100 (bf16 at 8192 // BLOCK_D rows, fp32 at 4096 // BLOCK_D)."""
    return max(8, 8192 // (block_d * element_bytes))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 (as PyTorch's fp32 attention does); tf32 would cost ~1e-3 accuracy
    return "ieee" if dtype == torch.float32 else "tf32"


def _score_args(scale: float, window_left: int, window_right: int, softcap: float):
    """Runtime scalars and constexpr flags of the scores and masks, shared by every kernel.
    A window bound < 0 is no bound; causal is window_right = 0; softcap 0 is no cap."""
    cap = float(softcap)
    runtime = (scale * LOG2E, scale / cap if cap > 0 else 0.0, cap * LOG2E,
               max(int(window_left), 0), max(int(window_right), 0))
    flags = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=cap > 0)
    return runtime, flags


def _prefix_args(prefix, dummy, max_q, max_k, total_q, total_k):
    """(Prefix pointer, HAS_PREFIX, the lengths that decide 64-bit offsets): a branch reads its
    prefix's rows, up to a whole row away, so with prefixes the offsets are sized on the row."""
    if prefix is None:
        return dummy, False, max_q, max_k
    return prefix, True, max(max_q, total_q), max(max_k, total_k)


def varlen_attention_forward(q, k, v, cu_q, cu_k, tiles, max_q, max_k, scale, window_left=-1, window_right=-1,
                             softcap=0.0, prefix=None, sinks=None):
    """Launch the forward kernel over `tiles` (the (2, n) int32 list for BLOCK_M of
    `config_for(q)["fwd"]`, or None for the dense grid). Window bounds (< 0: none; causal is
    right = 0) must fit in int32. `prefix`: the (S, 4) int32 table of a batch with shared
    prefixes (PackedBatch.prefix_table), or None. `sinks`: (Hq,) learnable sink logits, or None.
    Returns out (total_q, Hq, D) and lse
    (Hq, total_q) fp32. Rows no program reaches (a sequence past an understated max_seqlen,
    validation off) are 0 with lse -inf."""
    total_q, Hq, D = q.shape
    Hk = k.shape[1]
    out = (torch.empty_like if tiles is not None else torch.zeros_like)(q)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    BLOCK_M, BLOCK_N, warps, stages = config_for(q, softcap, prefix is not None)["fwd"]
    programs, tile_seq, tile_block, per_seq, tile_list = _grid_args(tiles, cu_q.numel() - 1, max_q, BLOCK_M, q.device)
    if programs == 0:
        return out, lse
    runtime, flags = _score_args(scale, window_left, window_right, softcap)
    prefix_ptr, has_prefix, span_q, span_k = _prefix_args(prefix, cu_q, max_q, max_k, total_q, k.shape[0])
    unit = stride_unit(q, k, v, out)
    _varlen_attention_fwd_kernel[(programs, Hq)](
        q, k, v, out, lse, cu_q, cu_k, tile_seq, tile_block, prefix_ptr, lse if sinks is None else sinks,
        *_strides(unit, q, k, v, out), total_q, k.shape[0], *runtime, per_seq, HAS_SINK=sinks is not None,
        GROUP=Hq // Hk, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        TILE_LIST=tile_list, DOT_PRECISION=_dot_precision(q.dtype), **flags,
        WIDE_OFFSETS=_wide_offsets(span_q, span_k, q, k, v, out), HAS_PREFIX=has_prefix, STRIDE_UNIT=unit, num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def varlen_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, tiles_dkdv, tiles_dq, max_q, max_k, scale,
                              window_left=-1, window_right=-1, softcap=0.0, prefix=None):
    """Launch the backward kernels. `tiles_dkdv` lists key blocks of BLOCK_N and `tiles_dq` query
    blocks of BLOCK_M (config_for(q)); None for the dense grid. `prefix` as for the forward (with
    sinks the lse counts them, so the kernels are the same). Returns dq, dk, dv and the pre-pass's
    delta (Hq, total_q) fp32, from which the caller takes the sinks' gradient."""
    total_q, Hq, D = q.shape
    total_k, Hk = k.shape[0], k.shape[1]
    do = do.contiguous()
    # with tile lists every row is written by exactly one program; on the dense grid rows past
    # an understated max_seqlen would stay unwritten, so start from 0
    dq = (torch.empty_like if tiles_dq is not None else torch.zeros_like)(q)
    dk, dv = ((torch.empty_like if tiles_dkdv is not None else torch.zeros_like)(t) for t in (k, v))
    if total_q == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(lse)
    cfg = config_for(q, softcap, prefix is not None)
    BLOCK_D = block_d(D)
    delta = torch.empty_like(lse)
    PRE_M = prepass_rows(BLOCK_D, out.element_size())
    unit = stride_unit(q, k, v, out, do, dq, dk, dv)
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(total_q, PRE_M), Hq)](
        out, do, delta, *_strides(unit, out, do), total_q, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=PRE_M,
        STRIDE_UNIT=unit,
    )
    runtime, flags = _score_args(scale, window_left, window_right, softcap)
    prefix_ptr, has_prefix, span_q, span_k = _prefix_args(prefix, cu_q, max_q, max_k, total_q, total_k)
    common = dict(GROUP=Hq // Hk, HEAD_DIM=D, BLOCK_D=BLOCK_D, DOT_PRECISION=_dot_precision(q.dtype), **flags,
                  WIDE_OFFSETS=_wide_offsets(span_q, span_k, q, k, v, do, dq, dk, dv), HAS_PREFIX=has_prefix,
                  STRIDE_UNIT=unit)
    # dK, dV: one program per key block and kv head; every key row is written exactly once
    BLOCK_M, BLOCK_N, warps, stages = cfg["dkdv"]
    programs, tile_seq, tile_block, per_seq, tile_list = _grid_args(tiles_dkdv, cu_k.numel() - 1, max_k, BLOCK_N,
                                                                    q.device)
    # (or, with dkdv_split, one launch for dK and one for dV over the same tiles)
    for want_dk, want_dv in ((True, False), (False, True)) if cfg["dkdv_split"] else ((True, True),):
        if not programs:
            break
        _varlen_attention_bwd_dkdv_kernel[(programs, Hk)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, tile_seq, tile_block, prefix_ptr,
            *_strides(unit, q, k, v, do, dk, dv), total_q, total_k, *runtime, scale, per_seq, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            TILE_LIST=tile_list, WANT_DK=want_dk, WANT_DV=want_dv, num_warps=warps, num_stages=stages, **common,
        )
    BLOCK_M, BLOCK_N, warps, stages = cfg["dq"]
    programs, tile_seq, tile_block, per_seq, tile_list = _grid_args(tiles_dq, cu_q.numel() - 1, max_q, BLOCK_M,
                                                                    q.device)
    if programs:
        _varlen_attention_bwd_dq_kernel[(programs, Hq)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, tile_seq, tile_block, prefix_ptr,
            *_strides(unit, q, k, v, do, dq), total_q, total_k, *runtime, scale, per_seq, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            TILE_LIST=tile_list, num_warps=warps, num_stages=stages, **common,
        )
    return dq, dk, dv, delta
