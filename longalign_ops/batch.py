"""One description of a packed batch, built once on the host and reused by every layer, every op
and the backward without reading anything back from the device.

The data pipeline knows every sequence length before a tensor exists (the packer made them), so
the description is built from host lengths: ``PackedBatch.from_lengths(lengths, device=...)``,
``plan.batch(step, rank, device=...)``, or, when only a device ``cu_seqlens`` is at hand,
``PackedBatch.from_cu_seqlens(cu)`` (validated once: the one host sync).

Everything the ops need is laid out in one host buffer and copied to the device in one
non-blocking transfer (from pinned memory on a GPU): ``cu_seqlens``, the restarting
``position_ids``, the token -> sequence map used by the per-sequence losses, and the attention
tile schedules (one list of (sequence, block) tiles per block size the kernels use, heaviest
first). The description owns these copies, so a caller changing its own buffers afterwards
cannot make it stale, and the kernels take their bounds from it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ._validation import assert_on_device, canonical_device, check_tensor, compiling, faking, memo_by_tensor, validation_enabled

# Row-block sizes of the attention kernels (kernels.varlen_attention.attention_config): a tile
# schedule is laid out for each, so any dtype / head dim / GPU finds its own without a rebuild.
TILE_BLOCKS = (16, 32, 64, 128)
_INT32_LIMIT = 2 ** 31 - 1


def _tile_list(lengths: np.ndarray, block: int) -> np.ndarray:
    """(2, n) int32 (sequence, block) pairs of every real tile, heaviest first for causal
    attention (a later row block sees more keys), ties by sequence order."""
    nblocks = (lengths + block - 1) // block
    n = int(nblocks.sum())
    seq = np.repeat(np.arange(len(lengths), dtype=np.int32), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    blk = (np.arange(n, dtype=np.int64) - first).astype(np.int32)
    order = np.argsort(-blk, kind="stable")
    return np.stack([seq[order], blk[order]])


class PackedBatch:
    """A packed batch of B sequences, T tokens in total, on one device.

    Attributes:
        lengths: host ``(B,)`` numpy int64 sequence lengths (zero-length sequences allowed).
        cu_seqlens: ``(B+1,)`` int32 on ``device``, from 0 to ``total``.
        position_ids: ``(T,)`` int64 on ``device``, restarting at 0 per sequence unless
            replaced by :meth:`with_positions` (LOGO / PoSE ids).
        sequence_ids: ``(T,)`` int64 on ``device``: the sequence each token belongs to.
        max_len, total, num_sequences: host ints.
        device: the device every tensor of the description lives on.
    """

    __slots__ = ("lengths", "cu_seqlens", "position_ids", "sequence_ids", "max_len", "total", "device", "_tiles",
                 "groups", "prefix_table", "max_key_len", "_num_sequences", "_chunked")

    def __init__(self, lengths: np.ndarray, device: torch.device, *, _parts=None, _groups=None):
        # use from_lengths / from_cu_seqlens / from_prefix_groups / PackPlan.batch; this takes
        # checked host lengths
        self.lengths = lengths
        self.lengths.setflags(write=False)  # owned: nobody may change the host copy behind the tensors
        self.total = int(lengths.sum())
        self.max_len = int(lengths.max()) if lengths.size else 0
        self.device = device
        self.cu_seqlens, self.position_ids, self.sequence_ids, self._tiles, self.prefix_table = _parts
        self.groups = _groups
        self.max_key_len, self._num_sequences = self.max_len, len(lengths)
        self._chunked = {}
        if _groups is not None:  # a branch's keys are its prefix's and its own
            self.max_key_len = max([p + b for p, branches in _groups for b in branches] + [self.max_len])
            self._num_sequences = sum(max(1, len(branches)) for _, branches in _groups)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_lengths(cls, lengths, *, device="cpu") -> "PackedBatch":
        """From host lengths (list, tuple, numpy or a CPU tensor of ints >= 0). No device sync:
        one host-to-device copy of everything the ops will need."""
        return cls._build(_host_lengths("lengths", lengths), canonical_device(device))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, *, name: str = "cu_seqlens") -> "PackedBatch":
        """From a ``(B+1,)`` int32 cumulative-length tensor on any device: its values are read
        to the host and checked once (the one sync), then everything else is built there."""
        check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.numel() < 1:
            raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
        host = cu_seqlens.detach().to("cpu", torch.int64).numpy()
        lengths = lengths_from_cu(name, host)
        return cls._build(lengths, cu_seqlens.device)

    @classmethod
    def from_prefix_groups(cls, groups, *, device="cpu") -> "PackedBatch":
        """Shared-prefix packing: ``groups`` is a list of ``(prefix_len, [branch_len, ...])``.
        A group is laid out as its prefix, then each branch in order; groups follow one another.
        A prefix token attends causally within its prefix; a branch token attends to the whole
        prefix and causally within its own branch, never to another branch. Positions: the prefix
        0..p-1, each branch p, p+1, ... The batch's sequences (``num_sequences``, the per-sequence
        log-probs and loss weights) are the branches in order, a group without branches being one
        sequence (its prefix); a prefix's tokens count with its group's first branch. For
        preference data, prefix = the prompt without its last token, which starts each branch
        (it predicts a different first answer token in each). ``(n, [])`` is ``from_lengths([n])``.
        Attention kernels take the segments (each prefix, each branch) as their sequences:
        ``lengths``, ``cu_seqlens`` and the tiles describe those."""
        if not isinstance(groups, (list, tuple)):
            raise TypeError(f"groups must be a list of (prefix_len, [branch_len, ...]), got {type(groups).__name__}")
        checked = []
        for i, group in enumerate(groups):
            if not isinstance(group, (list, tuple)) or len(group) != 2:
                raise TypeError(f"groups[{i}] must be a pair (prefix_len, [branch_len, ...]), got {group!r}")
            prefix, branches = group
            if not isinstance(branches, (list, tuple, np.ndarray)):
                raise TypeError(f"groups[{i}]: the branch lengths must be a list of ints, got {branches!r}")
            lens = _host_lengths(f"groups[{i}]", [prefix] + list(branches))
            checked.append((int(lens[0]), [int(b) for b in lens[1:]]))
        device = canonical_device(device)
        if all(not branches for _, branches in checked):  # no sharing: a plain batch
            return cls.from_lengths([p for p, _ in checked], device=device)
        segments, positions, seq_ids, table = [], [], [], []
        start, sequence = 0, 0
        for prefix, branches in checked:
            first = len(segments)
            segments.append(prefix)
            table.append((0, 0, first + 1 if branches else 0, len(branches)))
            positions.append(np.arange(prefix))
            seq_ids.append(np.full(prefix, sequence))
            branch_start = start + prefix
            for b in branches:
                segments.append(b)
                table.append((start - branch_start, prefix, 0, 0))
                positions.append(prefix + np.arange(b))
                seq_ids.append(np.full(b, sequence))
                sequence += 1
                branch_start += b
            sequence += 0 if branches else 1
            start = branch_start
        lengths = np.array(segments, dtype=np.int64)
        extra = (np.concatenate(positions).astype(np.int64), np.concatenate(seq_ids).astype(np.int64),
                 np.array(table, dtype=np.int32))
        return cls._build(lengths, device, extra, groups=checked)

    @classmethod
    def _build(cls, lengths: np.ndarray, device: torch.device, extra=None, groups=None) -> "PackedBatch":
        """`extra`: (positions, sequence ids, (S, 4) prefix table) of a shared-prefix batch."""
        total = int(lengths.sum())
        if total > _INT32_LIMIT:
            raise ValueError(f"lengths: {total} tokens in one batch do not fit int32 cu_seqlens (at most {_INT32_LIMIT})")
        B = len(lengths)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        if extra is None:
            starts = np.repeat(cu[:-1], lengths)
            positions = np.arange(total, dtype=np.int64) - starts
            seq_ids = np.repeat(np.arange(B, dtype=np.int64), lengths)
            table = np.zeros((0, 4), dtype=np.int32)
        else:
            positions, seq_ids, table = extra
        tiles = [_tile_list(lengths, b) for b in TILE_BLOCKS]
        # one int64-aligned host buffer: [positions | seq_ids | cu (int32) | tiles (int32)... | prefix table]
        int32_parts = [cu.astype(np.int32)] + [t.reshape(-1) for t in tiles] + [table.reshape(-1)]
        n32 = sum(p.size for p in int32_parts)
        host = np.empty(2 * total + (n32 + 1) // 2, dtype=np.int64)
        host[:total] = positions
        host[total:2 * total] = seq_ids
        flat32 = host[2 * total:].view(np.int32)
        offsets, at = [], 0
        for p in int32_parts:
            flat32[at:at + p.size] = p
            offsets.append((at, p.size))
            at += p.size
        buf = _to_device(torch.from_numpy(host), device)
        # narrow, not [a:b]: Python indexing of fake cuda tensors needs a CUDA build of torch
        d32 = buf.narrow(0, 2 * total, buf.numel() - 2 * total).view(torch.int32)
        (c0, cn), *tile_spans, (p0, pn) = offsets
        tile_tensors = {b: d32.narrow(0, o, n).view(2, n // 2) for b, (o, n) in zip(TILE_BLOCKS, tile_spans)}
        prefix_table = d32.narrow(0, p0, pn).view(-1, 4) if extra is not None else None
        parts = (d32.narrow(0, c0, cn), buf.narrow(0, 0, total), buf.narrow(0, total, total), tile_tensors,
                 prefix_table)
        return cls(lengths, device, _parts=parts, _groups=groups)  # the views keep the one device buffer alive

    def with_positions(self, position_ids: torch.Tensor) -> "PackedBatch":
        """The same batch with other position ids (e.g. from :func:`synthesize_positions`):
        ``(T,)`` integer on the batch's device. The ids are copied (owned)."""
        check_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), device=self.device)
        ids = position_ids.reshape(-1) if position_ids.dim() == 2 and position_ids.shape[0] == 1 else position_ids
        if ids.dim() != 1 or ids.shape[0] != self.total:
            raise ValueError(f"position_ids must have shape ({self.total},) (the batch's tokens), got "
                             f"{tuple(position_ids.shape)}")
        other = PackedBatch.__new__(PackedBatch)
        for name in PackedBatch.__slots__:
            setattr(other, name, getattr(self, name))
        other.position_ids = ids.to(torch.int64, copy=True)
        return other

    def to(self, device) -> "PackedBatch":
        """This description on another device (a new host-to-device copy; positions kept)."""
        device = canonical_device(device)
        if device == self.device:
            return self
        moved = PackedBatch._build(self.lengths.copy(), device) if self.groups is None \
            else PackedBatch.from_prefix_groups(self.groups, device=device)
        return moved.with_positions(self.position_ids.to(device))

    # ------------------------------------------------------------------ use by the ops

    @property
    def num_sequences(self) -> int:
        """Sequences of the per-sequence ops: the lengths', or a shared-prefix batch's branches."""
        return self._num_sequences

    def chunked(self, chunk_size: int) -> "PackedBatch":
        """The batch with every sequence cut into sequences of ``chunk_size`` tokens counted from
        its own start (the last one shorter): chunked local attention (Llama 4's
        ``attention_chunk_size``: a query sees only keys in its own chunk) is plain varlen
        attention over these. Built on the host once per size and kept with the batch."""
        if self.groups is not None:
            raise ValueError("chunk_size: chunked attention over a batch with shared prefixes is not supported")
        if chunk_size not in self._chunked:
            full, rest = np.divmod(self.lengths, chunk_size)
            parts = [np.append(np.full(f, chunk_size, dtype=np.int64), [r] if r else []) for f, r in zip(full, rest)]
            lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
            self._chunked[chunk_size] = PackedBatch._build(lengths, self.device)
        return self._chunked[chunk_size]

    def tiles(self, block: int) -> torch.Tensor:
        """``(2, n)`` int32 device tile list (sequence, row block) for row blocks of ``block``."""
        return self._tiles[block]

    def check(self, name: str, tokens: int, device: torch.device) -> None:
        """A tensor of ``tokens`` rows on ``device`` is described by this batch, or ValueError."""
        if tokens != self.total:
            raise ValueError(f"{name} has {tokens} tokens but the PackedBatch describes {self.total} "
                             f"({self.num_sequences} sequences)")
        if canonical_device(device) != self.device:
            raise ValueError(f"{name} is on {device} but the PackedBatch was built for {self.device}; "
                             f"use batch.to({str(device)!r})")

    def __repr__(self) -> str:
        groups = "" if self.groups is None else f", prefix_groups={len(self.groups)}"
        return (f"PackedBatch(sequences={self.num_sequences}, total={self.total}, max_len={self.max_len}{groups}, "
                f"device={self.device})")


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One non-blocking copy (from pinned memory on a GPU). Under FakeTensorMode (memory
    estimates with fake cuda tensors, torch.compile tracing) tensors hold no data, so the
    device buffer is allocated there without a copy (a CPU-only torch cannot copy to cuda)."""
    if torch._guards.detect_fake_mode() is not None:
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    if device.type == "cuda" and torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _host_lengths(name: str, lengths) -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        if lengths.device.type != "cpu":
            raise ValueError(f"{name} must be host data (a list, numpy array or CPU tensor); a {lengths.device} "
                             f"tensor would need a device sync: use PackedBatch.from_cu_seqlens")
        lengths = lengths.detach().numpy()
    elif isinstance(lengths, (list, tuple)) and any(isinstance(n, (bool, np.bool_)) for n in lengths):
        raise TypeError(f"{name} must hold integers, got a boolean")  # numpy would read True as 1
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.int64)  # a copy: the batch owns its lengths
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        raise ValueError(f"{name} must be >= 0: {neg.size} negative, first at index {int(neg[0])} ({int(arr[neg[0]])})")
    return arr


def lengths_from_cu(name: str, host: np.ndarray) -> np.ndarray:
    """(B,) int64 lengths of host cumulative lengths, checked: start at 0, non-decreasing."""
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    lengths = np.diff(host)
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        raise ValueError(f"{name} must be non-decreasing: {bad.size} decrease(s), first at index "
                         f"{int(bad[0]) + 1} ({int(host[bad[0]])} -> {int(host[bad[0] + 1])})")
    return lengths


# ----------------------------------------------------------------------------- cu_seqlens arguments


def _cacheable(cu: torch.Tensor) -> bool:
    return cu.device.type != "cpu"


def _describe(name: str, cu: torch.Tensor) -> PackedBatch:
    """A validated PackedBatch for a cu_seqlens tensor. Device tensors are remembered per tensor
    (identity and torch's in-place version counter), so a model's layers pay one sync per batch.
    CPU tensors are re-read every time: that costs no sync, and a write through ``.numpy()`` or
    ``.data`` (which torch's version counter does not see) can then never make a check stale."""
    build = lambda: PackedBatch.from_cu_seqlens(cu, name=name)  # noqa: E731
    return memo_by_tensor(cu, build, "cu_seqlens", name) if _cacheable(cu) else build()


def _check_cu_on_device(name: str, cu: torch.Tensor, total: Optional[int], max_seqlen: Optional[int],
                        max_seqlen_name: str) -> None:
    """The value checks of :func:`batch_for_cu` as device-side asserts, for torch.compile: the
    same rules, traced into the graph instead of read back to the host."""
    c = cu.long()
    assert_on_device(c[0] == 0, f"{name} must start at 0")
    if cu.numel() > 1:
        lengths = c[1:] - c[:-1]
        assert_on_device((lengths >= 0).all(), f"{name} must be non-decreasing")
        if max_seqlen is not None:
            assert_on_device((lengths <= max_seqlen).all(),
                             f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence in {name}")
    if total is not None:
        assert_on_device(c[-1] == total, f"{name} must end at the total number of tokens {total}")


def batch_for_cu(name: str, cu, total: Optional[int], *, device: torch.device, max_seqlen: Optional[int] = None,
                 max_seqlen_name: str = "max_seqlen", force: bool = False) -> Optional[PackedBatch]:
    """Check cu_seqlens (B+1,) int32: starts at 0, non-decreasing, ends at ``total`` (unless
    None: the tensor then defines the total), and no sequence longer than ``max_seqlen``.
    Returns its validated :class:`PackedBatch`; None when value checks are off (and ``force`` is
    not set), and while torch.compile traces, where the checks run as device-side asserts and
    the caller works from the tensor itself (the kernels' dense grid, :func:`sequence_map`)."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if compiling() or faking():
        if validation_enabled() and not faking():
            _check_cu_on_device(name, cu, total, max_seqlen, max_seqlen_name)
        return None
    if not (force or validation_enabled()):
        return None
    batch = _describe(name, cu)
    if total is not None and batch.total != total:
        raise ValueError(f"{name} must end at the total number of tokens {total}, got {batch.total}")
    if max_seqlen is not None and batch.max_len > max_seqlen:
        raise ValueError(f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence in {name} "
                         f"({batch.max_len})")
    return batch


def sequence_map(name: str, cu_or_batch, tensor_name: str, T: int, device) -> Tuple[int, torch.Tensor]:
    """(B, ``(T,)`` int64 sequence of each token) of a PackedBatch or a cu_seqlens argument over
    the T tokens of `tensor_name`. A cu_seqlens tensor is described on the host (checked, one
    sync); while torch.compile traces, the map is computed on the device instead."""
    if isinstance(cu_or_batch, PackedBatch):
        cu_or_batch.check(tensor_name, T, device)
        return cu_or_batch.num_sequences, cu_or_batch.sequence_ids
    batch = batch_for_cu(name, cu_or_batch, T, device=device, force=True)
    if batch is not None:
        return batch.num_sequences, batch.sequence_ids
    tokens = torch.arange(T, device=device, dtype=cu_or_batch.dtype)
    # token t belongs to the first sequence whose end is past t (zero-length ones are skipped)
    return cu_or_batch.numel() - 1, torch.searchsorted(cu_or_batch[1:], tokens, right=True).long()


def check_cu_seqlens(name: str, cu, total: Optional[int], *, device: torch.device, force: bool = False
                     ) -> Optional[np.ndarray]:
    """The checks of :func:`batch_for_cu`, returning only the (B,) int64 host lengths (or None):
    for ops that need no batch description (position synthesis), whose tile lists and token
    maps would cost more than the op itself."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if not (force or validation_enabled()):
        return None
    read = lambda: lengths_from_cu(name, cu.detach().to("cpu", torch.int64).numpy())  # noqa: E731
    lengths = memo_by_tensor(cu, read, "lengths", name) if _cacheable(cu) else read()
    if total is not None and int(lengths.sum()) != total:
        raise ValueError(f"{name} must end at the total number of tokens {total}, got {int(lengths.sum())}")
    return lengths
