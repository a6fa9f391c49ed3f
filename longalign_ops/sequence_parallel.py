"""Sequence parallelism for packed varlen batches over torch.distributed process groups: Ulysses
(heads), context parallelism (the row), or both on a 2-D mesh.

Each of the P ranks of a sequence-parallel (SP) group holds a contiguous 1/P slice of one packed
row. Attention swaps the split: an all-to-all turns the local slices of all heads into the whole
row for H/P heads, the varlen kernel runs on it with the row's *global* description (explicit
``cu_seqlens`` from the host, never re-derived from position ids, so LOGO's synthesised ids
work), and a second all-to-all turns it back. The per-sequence losses reduce their partial sums
over the group, so a sequence that spans ranks gets one global value on every rank.

    shard = la.sequence_parallel.shard(batch, group)      # pads the row to a multiple of P
    q_local = ...                                         # (shard.local_tokens, Hq, D)
    out_local = la.sequence_parallel.ulysses_attention(q_local, k_local, v_local, shard)
    hidden = model.model(input_ids=shard.local(ids)[None], position_ids=shard.local(pos)[None],
                         packed_batch=shard).last_hidden_state  # "longalign" attention runs Ulysses

Per layer and token, a rank sends and receives (P-1)/P of its q, k, v and output slices: with
Hq query heads, Hk kv heads (after replication to at least P) and head dim D, that is
``2 * (2*Hq + 2*Hk) * D * (P-1)/P`` bytes per token in bf16 for forward, and as much again
for backward (the all-to-alls are each other's adjoints).

Context parallelism (``shard(batch, group, cp_group=cp)``) has no head constraint: the C ranks of
the CP group each hold part of every sequence, split head-and-tail for causal balance (sequence
i is cut into 2C near-equal chunks; CP rank c holds chunks c and 2C-1-c, so every rank gets one
early, cheap chunk and one late, expensive one; no divisibility is asked of any length, the
ranks are evened out with one ignored pad sequence). Attention all-gathers K and V over the CP
group (Llama 3's approach; its backward reduce-scatters dK and dV) and runs the varlen kernel on
this rank's query chunks, each against its sequence's keys up to the chunk's end (bottom-right
causal alignment gives the right mask; a sliding window trims the keys to it). Per layer and
token a rank receives (C-1)/C of the row's k and v at its heads: ``2 * 2*Hk' * D * (C-1)``
bytes per local token in bf16 forward (C times Ulysses' volume per kv head; the price of having
no head limit), and the reduce-scatter sends as much back. With Ulysses as well (``group`` of
size U), each CP piece is split U ways; the all-to-all gathers the piece for Hq/U heads first.

The collectives are torch's functional ones (``torch.distributed._functional_collectives``):
differentiable, and traceable by torch.compile.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .attention import varlen_attention
from .batch import PackedBatch
from .cross_entropy import logprobs_by_sequence, loss_weights_by_sequence

Tensor = torch.Tensor
# the shard set by use(): a plain module attribute, which torch.compile reads (and guards on)
# where it cannot trace a ContextVar
_active = {"shard": None}


class Shard:
    """One rank's view of a packed row split over U Ulysses ranks (``group``) and C context-
    parallel ranks (``cp_group``): the global description ``batch`` (padded with one ignored
    sequence), and this rank's tokens of it. Built by :func:`shard` the same way on every rank.

    ``size`` is the number of ranks sharing the row (U x C), ``rank`` this rank's place among
    them (cp_rank x U + ulysses_rank). Without CP the local tokens are the contiguous range
    ``[start, end)``; with CP they are ``order`` (global indices, head-and-tail chunks)."""

    __slots__ = ("batch", "group", "cp_group", "size", "rank", "ulysses_size", "cp_size", "cp_rank", "start", "end",
                 "pad", "order", "_layout", "_attention", "_local_sequence_ids")

    def __init__(self, batch: PackedBatch, group, pad: int, cp_group=None, layout=None):
        self.batch, self.group, self.cp_group, self.pad = batch, group, cp_group, pad
        self.ulysses_size = dist.get_world_size(group) if group is not None else 1
        self.cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
        self.cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
        u = dist.get_rank(group) if group is not None else 0
        self.size, self.rank = self.ulysses_size * self.cp_size, self.cp_rank * self.ulysses_size + u
        self._layout, self._attention, self._local_sequence_ids = layout, {}, None
        if layout is None:
            per_rank = batch.total // self.size
            self.start, self.end, self.order = u * per_rank, (u + 1) * per_rank, None
        else:
            piece = layout.orders[self.cp_rank]
            n = len(piece) // self.ulysses_size
            self.start = self.end = None
            self.order = torch.from_numpy(piece[u * n:(u + 1) * n]).to(batch.device)

    @property
    def local_tokens(self) -> int:
        return self.end - self.start if self.order is None else len(self.order)

    def local(self, t: Tensor, dim: int = 0) -> Tensor:
        """This rank's tokens of a tensor over the (padded) row's tokens."""
        if t.shape[dim] != self.batch.total:
            raise ValueError(f"a tensor over the row must have {self.batch.total} tokens along dim {dim} (the padded "
                             f"row), got {t.shape[dim]}")
        if self.order is None:
            return t.narrow(dim, self.start, self.local_tokens)
        return t.index_select(dim, self.order.to(t.device))

    @property
    def local_sequence_ids(self) -> Tensor:
        """(local_tokens,) int64: the global sequence of each local token."""
        if self._local_sequence_ids is None:
            self._local_sequence_ids = self.local(self.batch.sequence_ids)
        return self._local_sequence_ids

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over every rank of the row, differentiable (its backward sums the
        gradients too)."""
        for group in (self.group, self.cp_group):
            if group is not None and dist.get_world_size(group) > 1:
                t = _all_reduce_sum(t, group)
        return t

    def __repr__(self) -> str:
        where = f"tokens=[{self.start}, {self.end})" if self.order is None else f"{self.local_tokens} tokens"
        return (f"Shard(rank={self.rank}/{self.size}, ulysses={self.ulysses_size}, cp={self.cp_size}, {where} of "
                f"{self.batch.total}, pad={self.pad})")


def pad_lengths(lengths, size: int) -> np.ndarray:
    """The row's lengths plus one pad sequence bringing the total to a multiple of `size` (none
    when it already is): the pad tokens attend only to themselves and carry no target."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pad = (-int(lengths.sum())) % size
    return np.concatenate([lengths, [pad]]) if pad else lengths


class ContextParallelLayout:
    """How a row of sequences is split over C context-parallel ranks (host arrays, the same on
    every rank). Sequence i of length L is cut at ``floor(j L / 2C)``, j = 0..2C, into 2C chunks;
    CP rank c holds chunks c and 2C-1-c of every sequence, in row order, then its share of one
    pad sequence that evens the ranks out at ``piece`` tokens (a multiple of `multiple`, the
    Ulysses size). ``orders[c]``: the global token indices rank c holds; ``chunks[c]``: its
    ``(sequence, start, end)`` chunks (within-sequence offsets); ``lengths``: the padded row."""

    def __init__(self, lengths, cp_size: int, multiple: int = 1):
        lengths = np.asarray(lengths, dtype=np.int64)
        C = int(cp_size)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        cuts = (np.arange(2 * C + 1)[None, :] * lengths[:, None]) // (2 * C)  # (B, 2C+1)
        self.chunks = [[(i, int(cuts[i, j]), int(cuts[i, j + 1])) for i in range(len(lengths))
                        for j in (c, 2 * C - 1 - c) if cuts[i, j + 1] > cuts[i, j]] for c in range(C)]
        held = [sum(e - s for _, s, e in ch) for ch in self.chunks]
        piece = -(-max(held, default=0) // multiple) * multiple
        total = int(starts[-1])
        self.pad = C * piece - total
        self.lengths = np.concatenate([lengths, [self.pad]]) if self.pad else lengths
        self.piece, self.cp_size, self.sequence_starts = piece, C, starts
        self.orders, at = [], total
        for c, ch in enumerate(self.chunks):
            idx = [np.arange(starts[i] + s, starts[i] + e) for i, s, e in ch]
            mine = piece - held[c]
            idx.append(np.arange(at, at + mine))
            at += mine
            self.orders.append(np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64))

    def work(self) -> np.ndarray:
        """(C,) causal attention pairs (query-key) per rank: sum over its chunks [s, e) of
        sum_{t=s}^{e-1} (t + 1). The pad is not counted (it costs a rank at most its own
        diagonal block)."""
        pairs = lambda s, e: (e * (e + 1) - s * (s + 1)) // 2  # noqa: E731
        return np.array([sum(pairs(s, e) for _, s, e in ch) for ch in self.chunks], dtype=np.int64)

    def attention(self, cp_rank: int, causal: bool, left: int):
        """Rank `cp_rank`'s attention problem: query lengths (its chunks, then its pad share),
        key lengths and the key indices into the all-gathered (rank-major) k/v. A chunk
        [s, e) of sequence i sees that sequence's keys [s', e) (s' = 0, or s - left with a
        window; the whole sequence when not causal); bottom-right alignment lines query t of the
        chunk up with key s + t."""
        inverse = np.empty(self.C_total, dtype=np.int64)
        inverse[np.concatenate(self.orders)] = np.arange(self.C_total)
        q_lens, k_lens, keys = [], [], []
        for i, s, e in self.chunks[cp_rank]:
            L, g = int(self.lengths[i]), int(self.sequence_starts[i])
            lo = 0 if not causal or left < 0 else max(0, s - left)
            hi = e if causal else L
            q_lens.append(e - s)
            k_lens.append(hi - lo)
            keys.append(inverse[g + lo:g + hi])
        held = sum(q_lens)
        if self.piece > held:  # the pad share attends to itself
            q_lens.append(self.piece - held)
            k_lens.append(self.piece - held)
            keys.append(inverse[self.orders[cp_rank][held:]])
        keys = np.concatenate(keys).astype(np.int64) if keys else np.zeros(0, np.int64)
        return q_lens, k_lens, keys

    @property
    def C_total(self) -> int:
        return self.cp_size * self.piece


def shard(batch: PackedBatch, group=None, *, cp_group=None) -> Shard:
    """This rank's view of `batch` (the whole row's description, the same on every rank).

    ``group``: the Ulysses group (heads split over it; default the whole world, or no Ulysses
    split when ``cp_group`` is given). ``cp_group``: the context-parallel group (the row split
    over it, no head constraint; see :class:`ContextParallelLayout`). Pads the row with one
    ignored sequence so every rank holds the same number of tokens: build inputs, labels and
    positions over ``shard.batch.total`` tokens (pad labels = ignore index) and give each rank
    ``shard.local(...)`` of them."""
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a longalign_ops.PackedBatch, got {type(batch).__name__}")
    if cp_group is None:
        group = _check_group(group)
        size = dist.get_world_size(group)
        pad = (-batch.total) % size
        if not pad:
            padded = batch
        elif batch.groups is not None:  # shared prefixes: the pad is one more group, without branches
            padded = PackedBatch.from_prefix_groups(batch.groups + [(pad, [])], device=batch.device)
        else:
            padded = PackedBatch.from_lengths(pad_lengths(batch.lengths, size), device=batch.device)
        return Shard(padded, group, int(padded.total - batch.total))
    cp_group = _check_group(cp_group)
    if group is not None:
        group = _check_group(group)
    if batch.groups is not None:
        raise ValueError("context parallelism does not split shared-prefix rows (PackedBatch.from_prefix_groups); "
                         "pack the answers unshared (--no-shared-prefix) or use Ulysses alone")
    U = dist.get_world_size(group) if group is not None else 1
    layout = ContextParallelLayout(batch.lengths, dist.get_world_size(cp_group), U)
    padded = PackedBatch.from_lengths(layout.lengths, device=batch.device) if layout.pad else batch
    return Shard(padded, group, layout.pad, cp_group, layout)


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence parallelism needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    return group if group is not None else dist.group.WORLD


def _check_heads(Hq: int, Hk: int, P: int) -> int:
    """How many times each kv head is repeated so that every rank holds whole kv heads: 1 when
    P divides Hk, P / Hk when Hk < P divides P (GQA with 8 kv heads on SP 16)."""
    if Hq % P:
        raise ValueError(f"sequence parallel size {P} must divide the query heads ({Hq})")
    if Hk % P == 0:
        return 1
    if P % Hk == 0:
        return P // Hk
    raise ValueError(f"sequence parallel size {P} must divide the kv heads ({Hk}) or be a multiple of them "
                     f"(then kv heads are replicated)")


def _wait(t: Tensor) -> Tensor:
    """A functional collective's result, waited for (eager mode hands back an async tensor)."""
    return fc.wait_tensor(t) if isinstance(t, fc.AsyncCollectiveTensor) else t


def _seq_to_heads(x: Tensor, P: int, group) -> Tensor:
    """(T/P, H, D) local tokens of all heads -> (T, H/P, D) all tokens of this rank's heads."""
    n, H, D = x.shape
    send = x.reshape(n, P, H // P, D).transpose(0, 1).contiguous()  # chunk j goes to rank j
    got = fc.all_to_all_single_autograd(send.reshape(P * n, H // P, D), None, None, group)
    return _wait(got)


def _heads_to_seq(x: Tensor, P: int, group) -> Tensor:
    """(T, H/P, D) -> (T/P, H, D): the inverse all-to-all."""
    T, h, D = x.shape
    got = fc.all_to_all_single_autograd(x.contiguous(), None, None, group)
    got = _wait(got)
    return got.reshape(P, T // P, h, D).transpose(0, 1).reshape(T // P, P * h, D)


def attention(q: Tensor, k: Tensor, v: Tensor, shard: Shard, *, causal: bool = True,
              softmax_scale: Optional[float] = None, window_size=(-1, -1), softcap: Optional[float] = None,
              sinks: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
    """Attention of this rank's tokens of a packed row: q ``(local_tokens, Hq, D)``, k/v
    ``(local_tokens, Hk, D)``; returns ``(local_tokens, Hq, D)``, differentiable in q, k, v.
    Equal to ``shard.local(varlen_attention(q_full, k_full, v_full, shard.batch))``. With a
    Ulysses group of size U, Hq must be a multiple of U and Hk a multiple of U or a divisor of
    it (kv heads are then replicated); context parallelism asks nothing of the heads. `sinks`
    ``(Hq,)``: every head's (this rank takes its heads' share under Ulysses; its gradient holds
    this rank's heads, summed over ranks with the other parameters'). `chunk_size`: chunked
    attention over the row's sequences (Ulysses only: each rank holds whole sequences' heads)."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a longalign_ops.sequence_parallel.Shard, got {type(shard).__name__}")
    U = shard.ulysses_size
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (local_tokens, heads, head_dim)")
        if t.shape[0] != shard.local_tokens:
            raise ValueError(f"{name} holds {t.shape[0]} tokens but this rank's shard of the row has "
                             f"{shard.local_tokens} ({shard})")
    repeat = _check_heads(q.shape[1], k.shape[1], U)
    if shard.cp_size > 1 and not causal and tuple(window_size) != (-1, -1):
        raise ValueError("context parallelism supports a sliding window_size only with causal=True")
    if shard.cp_size > 1 and chunk_size is not None:
        raise NotImplementedError("context parallelism does not support chunked attention (chunk_size, Llama 4's "
                                  "attention_chunk_size); use Ulysses (--sp) alone")
    if sinks is not None:
        if not isinstance(sinks, Tensor) or sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks must be a tensor of shape ({q.shape[1]},) (one logit per query head)")
        if U > 1:  # after the all-to-all this rank holds query heads [u h, (u + 1) h)
            h, u = q.shape[1] // U, shard.rank - shard.cp_rank * U
            sinks = sinks.narrow(0, u * h, h)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if U > 1:
        q, k, v = (_seq_to_heads(t, U, shard.group) for t in (q, k, v))
    options = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, sinks=sinks)
    if shard.cp_size == 1:
        out = varlen_attention(q, k, v, shard.batch, chunk_size=chunk_size, **options)
    else:
        batch_q, batch_k, keys = _cp_attention_problem(shard, causal, int(window_size[0]), q.device)
        k_all, v_all = (_all_gather(t, shard.cp_group) for t in (k, v))  # backward: reduce-scatter
        out = varlen_attention(q, k_all.index_select(0, keys), v_all.index_select(0, keys), batch_q, batch_k, **options)
    return _heads_to_seq(out, U, shard.group) if U > 1 else out


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, shard: Shard, **options) -> Tensor:
    """The same as :func:`attention` (its first name, from before context parallelism)."""
    return attention(q, k, v, shard, **options)


def _cp_attention_problem(shard: Shard, causal: bool, left: int, device):
    """(batch_q, batch_k, key indices) of this CP rank, built on the host once per shard and mask."""
    key = (causal, left, device)
    if key not in shard._attention:
        q_lens, k_lens, keys = shard._layout.attention(shard.cp_rank, causal, left)
        shard._attention[key] = (PackedBatch.from_lengths(q_lens, device=device),
                                 PackedBatch.from_lengths(k_lens, device=device), torch.from_numpy(keys).to(device))
    return shard._attention[key]


def _all_gather(x: Tensor, group) -> Tensor:
    """(n, H, D) on each of the C ranks -> (C n, H, D), rank-major; differentiable."""
    got = fc.all_gather_single_autograd(x.contiguous(), 0, group)
    return _wait(got)


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    out = fc.all_reduce(t, "sum", group)
    return _wait(out)


def sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, shard: Shard, *, bias: Optional[Tensor] = None,
                      ignore_index: int = -100, average: bool = False, softcap: Optional[float] = None) -> Tensor:
    """:func:`longalign_ops.sequence_logprobs` of the whole row from this rank's slice: hidden
    ``(local_tokens, H)`` and labels ``(local_tokens,)`` (already shifted over the whole row).
    Returns the same ``(B,)`` global per-sequence values on every rank of the group (the pad
    sequence included, at 0); differentiable (the partial sums are all-reduced; gradients as
    described in :func:`reduce_loss`)."""
    if hidden.shape[0] != shard.local_tokens or labels.shape[0] != shard.local_tokens:
        raise ValueError(f"hidden and labels must hold this rank's {shard.local_tokens} tokens, got "
                         f"{hidden.shape[0]} and {labels.shape[0]}")
    return logprobs_by_sequence(hidden, weight, labels, shard.batch.num_sequences, shard.local_sequence_ids, bias=bias,
                                ignore_index=ignore_index, average=average, softcap=softcap, reduce=shard.all_reduce)


def longalign_loss_weights(labels: Tensor, shard: Shard, *, num_packs: int, num_sequences: int,
                           ignore_index: int = -100) -> Tensor:
    """``(local_tokens,)`` LongAlign weights ``K / (N_i M)`` of this rank's tokens, with N_i
    counted over the whole sequence (all ranks of the group). K counts the step's packs (data
    parallel ranks x accumulation: one pack per SP group), M its sequences with targets."""
    if labels.shape[0] != shard.local_tokens:
        raise ValueError(f"labels must hold this rank's {shard.local_tokens} tokens, got {labels.shape[0]}")
    return loss_weights_by_sequence(labels, shard.batch.num_sequences, shard.local_sequence_ids, num_packs=num_packs,
                                    num_sequences=num_sequences, ignore_index=ignore_index, reduce=shard.all_reduce)


def reduce_loss(loss: Tensor, shard: Shard) -> Tensor:
    """The row's loss from this rank's partial one (e.g. a token-weighted sum over its slice):
    summed over the group, differentiable, the same value on every rank.

    Gradient convention (as for :func:`sequence_logprobs`): every SP rank back-propagates the
    same global loss and the all-reduce's backward sums over the group, so each rank's
    gradients are P times its slice's share; averaging parameter gradients over the SP ranks,
    as DDP or FSDP over the whole world do, gives the true gradient."""
    return shard.all_reduce(loss)


@contextlib.contextmanager
def use(shard: Shard):
    """Within this block, transformers models with ``attn_implementation="longalign"`` run
    Ulysses attention over `shard` (feed each rank ``shard.local(...)`` of the inputs).

    Sugar for models run without activation checkpointing: a checkpointed layer recomputes in
    the backward, after this block has ended. Passing ``packed_batch=shard`` to the model's
    forward works everywhere (the keyword reaches every layer and is kept for the recompute)."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a longalign_ops.sequence_parallel.Shard, got {type(shard).__name__}")
    previous, _active["shard"] = _active["shard"], shard
    try:
        yield shard
    finally:
        _active["shard"] = previous


def current() -> Optional[Shard]:
    """The shard set by :func:`use`, or None."""
    return _active["shard"]


__all__ = ["ContextParallelLayout", "Shard", "attention", "current", "longalign_loss_weights", "pad_lengths",
           "reduce_loss", "sequence_logprobs", "shard", "ulysses_attention", "use"]
