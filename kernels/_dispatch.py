"""Which path a tensor takes: the two questions every op asks of a tensor, answered from one
reading of the environment.

`kernels/` (installed as longalign_ops.kernels) has no `__init__.py` on purpose: it is a
namespace package, so a Python started in a clone's root (pytest, a notebook) never takes it for
the unrelated top-level `kernels` package from the hub that transformers imports; an installed
regular package always wins over a namespace portion. The kernels import only torch and triton:
dispatch, validation and the autograd / custom-op registration live one layer up, in
longalign_ops."""
import functools
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t) -> bool:
    """Run the Triton kernel for `t`: CUDA tensors always, CPU tensors under the interpreter;
    otherwise the op takes its PyTorch path."""
    return t.is_cuda or interpreting()


def on_compiled_gpu(t) -> bool:
    """The kernel runs compiled on a GPU (not in the interpreter): the GPU tile configs apply."""
    return t.is_cuda and not interpreting()


# the architecture compiled-GPU launches are configured for when no CUDA runtime can say:
# FakeTensorMode on a CPU-only torch (memory counts, torch.compile's tracing of fake CUDA
# tensors), where only the tiles' row blocks matter (the schedules the batch lays out)
TRACE_CAPABILITY = (9, 0)


@functools.lru_cache(maxsize=None)
def _runtime_capability(index: int):
    return tuple(torch.cuda.get_device_capability(index))


def gpu_capability(device) -> tuple:
    """(major, minor) of the GPU `device` names, which the launch configuration (tiles, warps,
    stages) is a pure function of. LONGALIGN_GPU_ARCH ("90", "8.6", "sm_120") overrides it, e.g.
    to trace or count memory for another GPU than the one at hand. Otherwise the runtime's answer,
    asked once per device and cached; with no CUDA runtime (a CPU-only torch tracing fake CUDA
    tensors) TRACE_CAPABILITY: a trace never calls into a CUDA runtime that is not there."""
    override = os.environ.get("LONGALIGN_GPU_ARCH", "").strip().lower().removeprefix("sm_")
    if override:
        major, _, minor = override.partition(".") if "." in override else (override[:-1], "", override[-1])
        if not (major.isdigit() and minor.isdigit()):
            raise ValueError(f"LONGALIGN_GPU_ARCH must name an architecture such as 90, 8.6 or sm_120, got "
                             f"{os.environ['LONGALIGN_GPU_ARCH']!r}")
        return int(major), int(minor)
    if not torch.cuda.is_available():
        return TRACE_CAPABILITY
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _runtime_capability(index)
