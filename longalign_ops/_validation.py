"""Input checks shared by every public op (those of cu_seqlens live beside the batch description,
in ``batch``).

Value checks need the values on the host (one sync). ``set_validation(False)`` or
``LONGALIGN_VALIDATE=0`` turns them off for users who want zero host syncs; shape, dtype and
device checks always run (they are free). While torch.compile traces, a host read would break the
graph, so the value checks become device-side asserts (:func:`assert_on_device`): traced into the
graph, raising RuntimeError with the same message on CPU, a device assert on CUDA.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import weakref
from typing import Dict, Iterable, Optional, Tuple

import torch

_state = {"validate": os.environ.get("LONGALIGN_VALIDATE", "1") != "0"}
_cache: Dict[int, Tuple[weakref.ref, int, object]] = {}
_CACHE_LIMIT = 256


def set_validation(enabled: bool) -> None:
    """Turn host-side value checks of cu_seqlens on or off (shapes and dtypes are always checked)."""
    _state["validate"] = bool(enabled)


def validation_enabled() -> bool:
    return _state["validate"]


@contextlib.contextmanager
def validation(enabled: bool):
    """``set_validation(enabled)`` for a block, the previous setting restored after it."""
    previous = _state["validate"]
    _state["validate"] = bool(enabled)
    try:
        yield
    finally:
        _state["validate"] = previous


def canonical_device(device) -> torch.device:
    """``device`` as a tensor made there reports it: a device type with no index (``"cuda"``)
    means that type's current device (0 where torch has no runtime for it, as under
    FakeTensorMode on a CPU-only torch, whose fake tensors made on ``"cuda"`` report ``cuda:0``).
    Every stored or compared device goes through here, so ``"cuda"`` and ``"cuda:0"`` are one."""
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    module = getattr(torch, device.type, None)
    available = module is not None and getattr(module, "is_available", lambda: False)()
    return torch.device(device.type, module.current_device() if available else 0)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != canonical_device(device):
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


def compiling() -> bool:
    """True while torch.compile traces: value checks must not read tensors back to the host."""
    return torch.compiler.is_compiling()


def faking() -> bool:
    """Under FakeTensorMode outside a compile (memory counts, a trace by hand): tensors hold no
    values, so there is nothing for a value check to check (and on a CPU-only torch, fake CUDA
    tensors cannot even run one)."""
    # is_compiling first: dynamo must not trace detect_fake_mode (it returns no tensor)
    return not torch.compiler.is_compiling() and torch._guards.detect_fake_mode() is not None


def assert_on_device(ok: torch.Tensor, message: str) -> None:
    """A value check torch.compile can trace: RuntimeError(message) where `ok` (a 0-d bool
    tensor) is False, raised when the compiled graph runs (on CUDA, a device-side assert)."""
    torch._assert_async(ok, message)
