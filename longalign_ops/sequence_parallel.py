"""Ulysses sequence parallelism for packed varlen batches, over a torch.distributed process group.

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
    """One SP rank's view of a packed row: the global description ``batch`` (padded with one
    ignored sequence to a multiple of P), the ``group``, and this rank's token range
    ``[start, end)``. Built by :func:`shard` the same way on every rank."""

    __slots__ = ("batch", "group", "size", "rank", "start", "end", "pad", "_local_sequence_ids")

    def __init__(self, batch: PackedBatch, group, pad: int):
        self.batch, self.group, self.pad = batch, group, pad
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        per_rank = batch.total // self.size
        self.start, self.end = self.rank * per_rank, (self.rank + 1) * per_rank
        self._local_sequence_ids = None

    @property
    def local_tokens(self) -> int:
        return self.end - self.start

    def local(self, t: Tensor, dim: int = 0) -> Tensor:
        """This rank's slice of a tensor over the (padded) row's tokens."""
        if t.shape[dim] != self.batch.total:
            raise ValueError(f"a tensor over the row must have {self.batch.total} tokens along dim {dim} (the padded "
                             f"row), got {t.shape[dim]}")
        return t.narrow(dim, self.start, self.local_tokens)

    @property
    def local_sequence_ids(self) -> Tensor:
        """(local_tokens,) int64: the global sequence of each local token."""
        if self._local_sequence_ids is None:
            self._local_sequence_ids = self.batch.sequence_ids.narrow(0, self.start, self.local_tokens)
        return self._local_sequence_ids

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over the group, differentiable (its backward sums the gradients too)."""
        return _all_reduce_sum(t, self.group)

    def __repr__(self) -> str:
        return (f"Shard(rank={self.rank}/{self.size}, tokens=[{self.start}, {self.end}) of {self.batch.total}, "
                f"pad={self.pad})")


def pad_lengths(lengths, size: int) -> np.ndarray:
    """The row's lengths plus one pad sequence bringing the total to a multiple of `size` (none
    when it already is): the pad tokens attend only to themselves and carry no target."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pad = (-int(lengths.sum())) % size
    return np.concatenate([lengths, [pad]]) if pad else lengths


def shard(batch: PackedBatch, group=None) -> Shard:
    """The SP view of `batch` on this rank of `group` (default: the whole world). Pads the row
    to a multiple of the group size (see :func:`pad_lengths`): build inputs, labels and
    positions over ``shard.batch.total`` tokens (pad labels = ignore index) and give each rank
    ``shard.local(...)`` of them."""
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a longalign_ops.PackedBatch, got {type(batch).__name__}")
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


def _seq_to_heads(x: Tensor, P: int, group) -> Tensor:
    """(T/P, H, D) local tokens of all heads -> (T, H/P, D) all tokens of this rank's heads."""
    n, H, D = x.shape
    send = x.reshape(n, P, H // P, D).transpose(0, 1).contiguous()  # chunk j goes to rank j
    got = fc.all_to_all_single_autograd(send.reshape(P * n, H // P, D), None, None, group)
    return fc.wait_tensor(got) if isinstance(got, fc.AsyncCollectiveTensor) else got


def _heads_to_seq(x: Tensor, P: int, group) -> Tensor:
    """(T, H/P, D) -> (T/P, H, D): the inverse all-to-all."""
    T, h, D = x.shape
    got = fc.all_to_all_single_autograd(x.contiguous(), None, None, group)
    got = fc.wait_tensor(got) if isinstance(got, fc.AsyncCollectiveTensor) else got
    return got.reshape(P, T // P, h, D).transpose(0, 1).reshape(T // P, P * h, D)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, shard: Shard, *, causal: bool = True,
                      softmax_scale: Optional[float] = None, window_size=(-1, -1),
                      softcap: Optional[float] = None) -> Tensor:
    """Attention of this rank's slice of a packed row: q ``(local_tokens, Hq, D)``, k/v
    ``(local_tokens, Hk, D)``; returns ``(local_tokens, Hq, D)``, differentiable in q, k, v.
    Equal to ``shard.local(varlen_attention(q_full, k_full, v_full, shard.batch))``. Hq must be
    a multiple of P; Hk a multiple of P or a divisor of it (kv heads are then replicated)."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a longalign_ops.sequence_parallel.Shard, got {type(shard).__name__}")
    P = shard.size
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (local_tokens, heads, head_dim)")
        if t.shape[0] != shard.local_tokens:
            raise ValueError(f"{name} holds {t.shape[0]} tokens but this rank's shard of the row has "
                             f"{shard.local_tokens} ({shard})")
    repeat = _check_heads(q.shape[1], k.shape[1], P)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = (_seq_to_heads(t, P, shard.group) for t in (q, k, v))
    out = varlen_attention(qh, kh, vh, shard.batch, causal=causal, softmax_scale=softmax_scale,
                           window_size=window_size, softcap=softcap)
    return _heads_to_seq(out, P, shard.group)


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    out = fc.all_reduce(t, "sum", group)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, shard: Shard, *, bias: Optional[Tensor] = None,
                      ignore_index: int = -100, average: bool = False) -> Tensor:
    """:func:`longalign_ops.sequence_logprobs` of the whole row from this rank's slice: hidden
    ``(local_tokens, H)`` and labels ``(local_tokens,)`` (already shifted over the whole row).
    Returns the same ``(B,)`` global per-sequence values on every rank of the group (the pad
    sequence included, at 0); differentiable (the partial sums are all-reduced; gradients as
    described in :func:`reduce_loss`)."""
    if hidden.shape[0] != shard.local_tokens or labels.shape[0] != shard.local_tokens:
        raise ValueError(f"hidden and labels must hold this rank's {shard.local_tokens} tokens, got "
                         f"{hidden.shape[0]} and {labels.shape[0]}")
    return logprobs_by_sequence(hidden, weight, labels, shard.batch.num_sequences, shard.local_sequence_ids, bias=bias,
                                ignore_index=ignore_index, average=average, reduce=shard.all_reduce)


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


__all__ = ["Shard", "current", "longalign_loss_weights", "pad_lengths", "reduce_loss", "sequence_logprobs", "shard",
           "ulysses_attention", "use"]
