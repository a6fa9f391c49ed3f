"""Host-side input checks shared by every public op.

cu_seqlens checks need the values on the host (one sync). For device tensors they are cached per
tensor (keyed by identity and torch's in-place version counter), so the 32 layers of a model pay
one check per batch; a PackedBatch built from host lengths needs none.
``set_validation(False)`` or ``LONGALIGN_VALIDATE=0`` turns the value checks off for
users who want zero host syncs; shape, dtype and device checks always run (they are free).
"""
from __future__ import annotations

import math
import numbers
import os
import weakref
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch

_state = {"validate": os.environ.get("LONGALIGN_VALIDATE", "1") != "0"}
_cache: Dict[int, Tuple[weakref.ref, int, object]] = {}
_CACHE_LIMIT = 256


def set_validation(enabled: bool) -> None:
    """Turn host-side value checks of cu_seqlens on or off (shapes and dtypes are always checked)."""
    _state["validate"] = bool(enabled)


def validation_enabled() -> bool:
    return _state["validate"]


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors too when TRITON_INTERPRET=1 (CI)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_finite_number(name: str, value, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def memo_by_tensor(key: torch.Tensor, build, *extra):
    """build(), remembered per (tensor identity, torch's version counter, extra): the layers of
    a model, which all receive the same tensor object, share one result."""
    ident = (id(key),) + tuple(id(e) if isinstance(e, torch.Tensor) else e for e in extra)
    hit = _cache.get(ident)
    if hit is not None and hit[0]() is key and hit[1] == key._version:
        return hit[2]
    value = build()
    if len(_cache) >= _CACHE_LIMIT:
        for k in [k for k, (ref, _, _) in _cache.items() if ref() is None] or list(_cache)[: _CACHE_LIMIT // 2]:
            _cache.pop(k, None)
    _cache[ident] = (weakref.ref(key), key._version, value)
    return value


def _cacheable(cu: torch.Tensor) -> bool:
    return cu.device.type != "cpu"


def _describe(name: str, cu: torch.Tensor):
    """A validated PackedBatch for a cu_seqlens tensor. Device tensors are remembered per tensor,
    so a model's layers pay one sync per batch. CPU tensors are re-read every time: that costs no
    sync, and a write through ``.numpy()`` or ``.data`` (which torch's version counter does not
    see) can then never make a check stale."""
    from .batch import PackedBatch

    build = lambda: PackedBatch.from_cu_seqlens(cu, name=name)  # noqa: E731
    return memo_by_tensor(cu, build, "cu_seqlens", name) if _cacheable(cu) else build()


def batch_for_cu(name: str, cu, total: Optional[int], *, device: torch.device, max_seqlen: Optional[int] = None,
                 max_seqlen_name: str = "max_seqlen", force: bool = False):
    """Check cu_seqlens (B+1,) int32: starts at 0, non-decreasing, ends at ``total`` (unless
    None: the tensor then defines the total), and no sequence longer than ``max_seqlen``.
    Returns its validated :class:`PackedBatch`, or None when value checks are off (and
    ``force`` is not set)."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if not (force or _state["validate"]):
        return None
    batch = _describe(name, cu)
    if total is not None and batch.total != total:
        raise ValueError(f"{name} must end at the total number of tokens {total}, got {batch.total}")
    if max_seqlen is not None and batch.max_len > max_seqlen:
        raise ValueError(f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence in {name} "
                         f"({batch.max_len})")
    return batch


def check_cu_seqlens(name: str, cu, total: Optional[int], *, device: torch.device, force: bool = False
                     ) -> Optional[np.ndarray]:
    """The checks of :func:`batch_for_cu`, returning only the (B,) int64 host lengths (or None):
    for ops that need no batch description (position synthesis), whose tile lists and token
    maps would cost more than the op itself."""
    from .batch import lengths_from_cu

    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if not (force or _state["validate"]):
        return None
    read = lambda: lengths_from_cu(name, cu.detach().to("cpu", torch.int64).numpy())  # noqa: E731
    lengths = memo_by_tensor(cu, read, "lengths", name) if _cacheable(cu) else read()
    if total is not None and int(lengths.sum()) != total:
        raise ValueError(f"{name} must end at the total number of tokens {total}, got {int(lengths.sum())}")
    return lengths
