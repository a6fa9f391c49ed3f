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

import numpy as np
import torch

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

    __slots__ = ("lengths", "cu_seqlens", "position_ids", "sequence_ids", "max_len", "total", "device", "_tiles")

    def __init__(self, lengths: np.ndarray, device: torch.device, *, _parts=None):
        # use from_lengths / from_cu_seqlens / PackPlan.batch; this takes checked host lengths
        self.lengths = lengths
        self.lengths.setflags(write=False)  # owned: nobody may change the host copy behind the tensors
        self.total = int(lengths.sum())
        self.max_len = int(lengths.max()) if lengths.size else 0
        self.device = device
        self.cu_seqlens, self.position_ids, self.sequence_ids, self._tiles = _parts

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_lengths(cls, lengths, *, device="cpu") -> "PackedBatch":
        """From host lengths (list, tuple, numpy or a CPU tensor of ints >= 0). No device sync:
        one host-to-device copy of everything the ops will need."""
        return cls._build(_host_lengths("lengths", lengths), torch.device(device))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, *, name: str = "cu_seqlens") -> "PackedBatch":
        """From a ``(B+1,)`` int32 cumulative-length tensor on any device: its values are read
        to the host and checked once (the one sync), then everything else is built there."""
        from ._validation import check_tensor

        check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.numel() < 1:
            raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
        host = cu_seqlens.detach().to("cpu", torch.int64).numpy()
        lengths = lengths_from_cu(name, host)
        return cls._build(lengths, cu_seqlens.device)

    @classmethod
    def _build(cls, lengths: np.ndarray, device: torch.device) -> "PackedBatch":
        total = int(lengths.sum())
        if total > _INT32_LIMIT:
            raise ValueError(f"lengths: {total} tokens in one batch do not fit int32 cu_seqlens (at most {_INT32_LIMIT})")
        B = len(lengths)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        starts = np.repeat(cu[:-1], lengths)
        positions = np.arange(total, dtype=np.int64) - starts
        seq_ids = np.repeat(np.arange(B, dtype=np.int64), lengths)
        tiles = [_tile_list(lengths, b) for b in TILE_BLOCKS]
        # one int64-aligned host buffer: [positions | seq_ids | cu (int32) | tiles (int32)...]
        int32_parts = [cu.astype(np.int32)] + [t.reshape(-1) for t in tiles]
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
        (c0, cn), *tile_spans = offsets
        tile_tensors = {b: d32.narrow(0, o, n).view(2, n // 2) for b, (o, n) in zip(TILE_BLOCKS, tile_spans)}
        parts = (d32.narrow(0, c0, cn), buf.narrow(0, 0, total), buf.narrow(0, total, total), tile_tensors)
        return cls(lengths, device, _parts=parts)  # the views keep the one device buffer alive

    def with_positions(self, position_ids: torch.Tensor) -> "PackedBatch":
        """The same batch with other position ids (e.g. from :func:`synthesize_positions`):
        ``(T,)`` integer on the batch's device. The ids are copied (owned)."""
        from ._validation import check_tensor

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
        device = torch.device(device)
        if device == self.device:
            return self
        moved = PackedBatch._build(self.lengths.copy(), device)
        return moved.with_positions(self.position_ids.to(device))

    # ------------------------------------------------------------------ use by the ops

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    def tiles(self, block: int) -> torch.Tensor:
        """``(2, n)`` int32 device tile list (sequence, row block) for row blocks of ``block``."""
        return self._tiles[block]

    def check(self, name: str, tokens: int, device: torch.device) -> None:
        """A tensor of ``tokens`` rows on ``device`` is described by this batch, or ValueError."""
        if tokens != self.total:
            raise ValueError(f"{name} has {tokens} tokens but the PackedBatch describes {self.total} "
                             f"({self.num_sequences} sequences)")
        if torch.device(device) != self.device:
            raise ValueError(f"{name} is on {device} but the PackedBatch was built for {self.device}; "
                             f"use batch.to({str(device)!r})")

    def __repr__(self) -> str:
        return (f"PackedBatch(sequences={self.num_sequences}, total={self.total}, max_len={self.max_len}, "
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
