"""Which path a tensor takes: the two questions every op asks of a tensor, answered from one
reading of the environment.

`kernels/` (installed as longalign_ops.kernels) has no `__init__.py` on purpose: it is a
namespace package, so a Python started in a clone's root (pytest, a notebook) never takes it for
the unrelated top-level `kernels` package from the hub that transformers imports; an installed
regular package always wins over a namespace portion. The kernels import only torch and triton:
dispatch, validation and the autograd / custom-op registration live one layer up, in
longalign_ops."""
import os


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
