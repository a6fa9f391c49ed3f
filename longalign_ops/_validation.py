"""Host-side input checks shared by every public op.

cu_seqlens checks need the values on the host (one sync). They are cached per tensor (keyed by
identity and torch's in-place version counter), so the 32 layers of a model pay one check per
batch. ``set_validation(False)`` or ``LONGALIGN_VALIDATE=0`` turns the value checks off for
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
_cache: Dict[int, Tuple[weakref.ref, int, np.ndarray]] = {}
_CACHE_LIMIT = 256


def set_validation(enabled: bool) -> None:
    """Turn host-side value checks of cu_seqlens on or off (shapes and dtypes are always checked)."""
    _state["validate"] = bool(enabled)


def validation_enabled() -> bool:
    return _state["validate"]


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors too when TRITON_INTERPRET=1 (CI)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_compiled_gpu(t: torch.Tensor) -> bool:
    """The kernels run compiled on a GPU (not in the interpreter): GPU tile configs apply."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


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


def _copy_to_host(cu: torch.Tensor) -> np.ndarray:
    """The one host sync of validation (counted by the tests)."""
    return cu.detach().to("cpu", torch.int64).numpy()


def _host_lengths(cu: torch.Tensor) -> np.ndarray:
    key = id(cu)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    host = _copy_to_host(cu)
    if len(_cache) >= _CACHE_LIMIT:
        for k in [k for k, (ref, _, _) in _cache.items() if ref() is None] or list(_cache)[: _CACHE_LIMIT // 2]:
            _cache.pop(k, None)
    _cache[key] = (weakref.ref(cu), cu._version, host)
    return host


def check_cu_seqlens(name: str, cu, total: Optional[int], *, device: torch.device, max_seqlen: Optional[int] = None,
                     max_seqlen_name: str = "max_seqlen", force: bool = False) -> Optional[np.ndarray]:
    """Check cu_seqlens (B+1,) int32: starts at 0, non-decreasing, ends at ``total`` (unless
    None: the tensor then defines the total), and no sequence longer than ``max_seqlen``.
    Returns the (B,) int64 host lengths, or None when value checks are off (and ``force`` is
    not set)."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 with B >= 0)")
    if not (force or _state["validate"]):
        return None
    host = _host_lengths(cu)
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    lengths = np.diff(host)
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        raise ValueError(f"{name} must be non-decreasing: {bad.size} decrease(s), first at index {int(bad[0]) + 1} "
                         f"({int(host[bad[0]])} -> {int(host[bad[0] + 1])})")
    if total is not None and host[-1] != total:
        raise ValueError(f"{name} must end at the total number of tokens {total}, got {int(host[-1])}")
    if max_seqlen is not None and lengths.size and lengths.max() > max_seqlen:
        raise ValueError(f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence in {name} "
                         f"({int(lengths.max())})")
    return lengths
