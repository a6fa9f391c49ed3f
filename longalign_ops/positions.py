"""LOGO / PoSE position synthesis: position ids that let a short physical sequence cover a long
position window (docs/api.md, "Positions", states the placement).

CPU tensors use the C++ twin (``longalign_ops._C``); CUDA tensors use the CUDA library built
beside it when nvcc was found (raw pointers and the current stream, through ctypes). Both
include ``csrc/positions/positions.h``, so they give bitwise the same ids for the same seed.
"""
from __future__ import annotations

import ctypes
import glob
import numbers
import os
import warnings
from typing import Optional, Union

import numpy as np
import torch

from . import _C
from ._validation import check_int
from .batch import check_cu_seqlens
from .batch import PackedBatch

METHODS = {"contiguous": 0, "logo": 1, "pose": 2}
MAX_TARGET_LEN = 2 ** 40
_lib = {"handle": None, "tried": False}


def cuda_library_path() -> Optional[str]:
    """Path of the CUDA position library built with the package, or None (built without nvcc)."""
    here = os.path.dirname(os.path.abspath(_C.__file__))
    for folder in (here, os.path.dirname(os.path.abspath(__file__))):
        hits = glob.glob(os.path.join(folder, "liblongalign_positions_cuda*.so"))
        if hits:
            return hits[0]
    return None


def _cuda_lib():
    if not _lib["tried"]:
        _lib["tried"] = True
        path = cuda_library_path()
        if path is not None:
            lib = ctypes.CDLL(path)
            fn = lib.longalign_synthesize_positions_cuda
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p]
            lib.longalign_cuda_error_string.restype = ctypes.c_char_p
            lib.longalign_cuda_error_string.argtypes = [ctypes.c_int]
            _lib["handle"] = lib
    return _lib["handle"]


def _per_sequence(name: str, value, B: int, allow_none: bool) -> Optional[np.ndarray]:
    if value is None:
        return None if allow_none else np.zeros(B, np.int64)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not -(2 ** 63) <= int(value) < 2 ** 63:
            raise ValueError(f"{name} must fit in int64, got {int(value)}")
        arr = np.full(B, int(value), dtype=np.int64)
    else:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.dtype == torch.bool:
                raise TypeError(f"{name} must hold integers, got {value.dtype}")
            value = value.detach().cpu().numpy()
        if isinstance(value, (list, tuple)):  # numpy would turn ints past int64 into floats or objects
            big = [v for v in value if isinstance(v, numbers.Integral) and not -(2 ** 63) <= int(v) < 2 ** 63]
            if big:
                raise ValueError(f"{name} must fit in int64, got {int(big[0])}")
        arr = np.asarray(value)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        if arr.size and arr.dtype == np.uint64 and int(arr.max()) >= 2 ** 63:
            raise ValueError(f"{name} must fit in int64, got {int(arr.max())}")
        arr = np.ascontiguousarray(arr, dtype=np.int64).reshape(-1) if arr.ndim <= 1 else arr
        if arr.shape != (B,):
            raise ValueError(f"{name} must be an int or have one entry per sequence ({B}), got shape {arr.shape}")
    return arr


def synthesize_positions(cu_seqlens: torch.Tensor, target_len: Union[int, torch.Tensor], *, method: str = "logo",
                         chunk_size: int = 512, num_chunks: Optional[int] = None,
                         prefix_lens=None, suffix_lens=None, seed: int = 0) -> torch.Tensor:
    """Position ids ``(T,)`` int64 on cu_seqlens' device.

    Args:
        cu_seqlens: ``(B+1,)`` int32 cumulative lengths of the packed sequences, or a
            :class:`PackedBatch` (no device sync; use ``batch.with_positions(ids)`` after).
        target_len: int or ``(B,)``: the position window each sequence should cover (>= its length).
        method: "logo" (chunk offsets spread evenly over the window), "pose" (offsets a random
            non-decreasing walk from 0) or "contiguous" (``0..n-1``, the padding-free reset).
        chunk_size: middle-chunk length; or ``num_chunks`` near-equal chunks instead.
        prefix_lens, suffix_lens: int or ``(B,)`` tokens kept contiguous at each end
            (prefix at ``0..s-1``; the suffix right after the last chunk).
        seed: draws come from a hash of (seed, sequence index, chunk index): CPU and GPU agree
            bitwise.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(cu_seqlens, PackedBatch) and cu_seqlens.groups is not None:
        return _shared_prefix_positions(cu_seqlens, target_len, method=method, chunk_size=chunk_size,
                                        num_chunks=num_chunks, prefix_lens=prefix_lens, suffix_lens=suffix_lens,
                                        seed=seed)
    if isinstance(cu_seqlens, PackedBatch):  # host lengths known: nothing is read back
        lengths, cu_seqlens = cu_seqlens.lengths, cu_seqlens.cu_seqlens
    elif isinstance(cu_seqlens, torch.Tensor):
        lengths = check_cu_seqlens("cu_seqlens", cu_seqlens, None, device=cu_seqlens.device, force=True)
    else:
        raise TypeError(f"cu_seqlens must be a torch.Tensor or a PackedBatch, got {type(cu_seqlens).__name__}")
    B, total = len(lengths), int(lengths.sum())
    if num_chunks is None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        num_chunks = 0
    else:
        num_chunks = check_int("num_chunks", num_chunks, minimum=1)
        chunk_size = 1
    seed = check_int("seed", seed, minimum=-(2 ** 63)) & 0xFFFFFFFFFFFFFFFF
    target = _per_sequence("target_len", target_len, B, allow_none=False)
    prefix = _per_sequence("prefix_lens", prefix_lens, B, allow_none=True)
    suffix = _per_sequence("suffix_lens", suffix_lens, B, allow_none=True)
    for name, arr in (("prefix_lens", prefix), ("suffix_lens", suffix)):
        if arr is not None and (arr < 0).any():
            bad = np.flatnonzero(arr < 0)
            raise ValueError(f"{name} must be >= 0: {bad.size} negative, first at sequence {int(bad[0])}")
    ends = (prefix if prefix is not None else 0) + (suffix if suffix is not None else 0)
    over = np.flatnonzero(np.asarray(ends) > lengths) if B else np.zeros(0, np.int64)
    if over.size:
        i = int(over[0])
        raise ValueError(f"prefix_lens + suffix_lens longer than the sequence for {over.size} of {B} sequences "
                         f"(first: sequence {i}, {int(np.broadcast_to(ends, (B,))[i])} > {int(lengths[i])})")
    # the placement multiplies chunk index by slack in int64: 2^40 (10^12 positions, far past any
    # RoPE window) keeps every intermediate exact
    huge = np.flatnonzero(target > MAX_TARGET_LEN)
    if huge.size:
        raise ValueError(f"target_len must be at most 2**40 = {MAX_TARGET_LEN}: {huge.size} of {B} sequences ask "
                         f"for more (first: sequence {int(huge[0])}, {int(target[huge[0]])})")
    short = np.flatnonzero(target < lengths)
    if short.size:
        i = int(short[0])
        raise ValueError(f"target_len shorter than the sequence for {short.size} of {B} sequences "
                         f"(first: sequence {i}, target_len {int(target[i])} < length {int(lengths[i])})")

    cu_host = np.ascontiguousarray(np.concatenate([[0], np.cumsum(lengths)]), dtype=np.int32)
    code = METHODS[method]
    if cu_seqlens.is_cuda:
        lib = _cuda_lib()
        if lib is not None:
            return _synthesize_cuda(lib, cu_seqlens, cu_host, target, prefix, suffix, code, chunk_size, num_chunks,
                                    seed, total)
        warnings.warn("longalign_ops was built without nvcc: synthesising positions on the CPU and copying",
                      RuntimeWarning, stacklevel=2)
    out = _C.synthesize_positions(cu_host, target, prefix, suffix, code, chunk_size, num_chunks, seed)
    return torch.from_numpy(out).to(cu_seqlens.device)


def _shared_prefix_positions(batch: PackedBatch, target_len, **options) -> torch.Tensor:
    """Positions of a shared-prefix batch: a shared token has one position, so each group's prefix
    is synthesised once, over its window less its longest branch (target_len, prefix_lens and
    suffix_lens are per group and apply to the prefix), and every branch follows its prefix's
    last position contiguously: a group's longest branch ends at most at target_len - 1."""
    groups = batch.groups
    prefixes = np.array([p for p, _ in groups], dtype=np.int64)
    longest = np.array([max(branches, default=0) for _, branches in groups], dtype=np.int64)
    target = _per_sequence("target_len", target_len, len(groups), allow_none=False)
    short = np.flatnonzero(target < prefixes + longest)
    if short.size:
        i = int(short[0])
        raise ValueError(f"target_len shorter than a group's prefix and longest branch for {short.size} of "
                         f"{len(groups)} groups (first: group {i}, target_len {int(target[i])} < "
                         f"{int(prefixes[i] + longest[i])})")
    synthesized = synthesize_positions(PackedBatch.from_lengths(prefixes), target - longest, **options).numpy()
    out, at = [], 0
    for p, branches in groups:
        mine = synthesized[at:at + p]
        at += p
        start = int(mine[-1]) + 1 if p else 0
        out += [mine] + [start + np.arange(b, dtype=np.int64) for b in branches]
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.int64)).to(batch.device)


def _synthesize_cuda(lib, cu_seqlens, cu_host, target, prefix, suffix, method, chunk_size, num_chunks, seed, total):
    device = cu_seqlens.device
    to_dev = lambda a: None if a is None else torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    cu = cu_seqlens.contiguous()
    tgt, pre, suf = to_dev(target), to_dev(prefix), to_dev(suffix)
    base = scratch = None
    if method == METHODS["pose"]:  # only "pose" needs the per-sequence offset table (a chain)
        chunk_base = _C.positions_chunk_base(cu_host, prefix, suffix, chunk_size, num_chunks)
        base = to_dev(chunk_base)
        scratch = torch.empty(max(int(chunk_base[-1]), 1), dtype=torch.int64, device=device)
    out = torch.empty(total, dtype=torch.int64, device=device)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        err = lib.longalign_synthesize_positions_cuda(ptr(cu), ptr(tgt), ptr(pre), ptr(suf), ptr(base), ptr(scratch),
                                                      len(target), total, method, chunk_size, num_chunks, seed,
                                                      ptr(out), stream)
    if err:
        raise RuntimeError(f"CUDA position synthesis failed: {lib.longalign_cuda_error_string(err).decode()}")
    return out
