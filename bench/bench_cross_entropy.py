"""Fused token-weighted cross-entropy benchmark (GPU), side by side in one run:

- ours: longalign_ops.fused_linear_cross_entropy with per-token weights
- baseline: lm-head matmul, then F.cross_entropy(reduction="none") * weights, summed
- Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Apple's cut-cross-entropy, if installed
  (carry them to the GPU machine as wheels in ./.whl; bench/gpu_check.sh installs them)

    python bench/bench_cross_entropy.py [--out CSV] [--tokens 32768 --hidden 4096 --vocab 128256]

bf16; medians of triton.testing.do_bench, forward timed with gradients enabled for every
implementation, backward = (forward + backward) - forward; peak extra memory = max_memory_allocated during the
call minus what was allocated before it (inputs excluded).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_args, out_path, write_csv  # noqa: E402

import longalign_ops as la  # noqa: E402


def implementations(h, W, y, w):
    impls = {
        "longalign_ops": lambda: la.fused_linear_cross_entropy(h, W, y, token_weights=w, reduction="sum"),
        "matmul + F.cross_entropy": lambda: (torch.nn.functional.cross_entropy(
            (h @ W.t()).float(), y, reduction="none") * w).sum(),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        impls["Liger FLCE (unweighted)"] = lambda: liger(W, h, y)
    except ImportError:
        print("liger-kernel not installed: left out")
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cut-cross-entropy (unweighted)"] = lambda: linear_cross_entropy(h, W, y, reduction="sum")
    except ImportError:
        print("cut-cross-entropy not installed: left out")
    return impls


def measure(fn, params):
    from triton.testing import do_bench

    def fwd_bwd():
        torch.autograd.grad(fn(), params)

    # the forward runs with gradients enabled, as in training and as Liger's own harness times
    # it: fused implementations (ours, Liger) make their gradients there, the unfused baseline
    # keeps its graph. The backward is then (forward + backward) - forward for every
    # implementation alike (no retain_graph re-runs: ours refuses a second backward).
    fwd_ms = do_bench(fn, warmup=20, rep=200, return_mode="median")
    both_ms = do_bench(fwd_bwd, warmup=20, rep=200, return_mode="median")
    torch.cuda.synchronize()
    peaks = {}
    for phase, f in (("fwd", lambda: fn()), ("fwd_bwd", fwd_bwd)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = f()
        torch.cuda.synchronize()
        peaks[phase] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        del out
    return fwd_ms, both_ms, peaks


def main() -> None:
    ap = argparse.ArgumentParser()
    add_out_args(ap, "cross_entropy.csv")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_entropy.py needs a CUDA GPU (the kernels are verified on CPU by the tests)")
    T, H, V = args.tokens, args.hidden, args.vocab
    torch.manual_seed(0)
    h = (torch.randn(T, H, device="cuda") / H ** 0.5).bfloat16().requires_grad_()
    W = (torch.randn(V, H, device="cuda") / H ** 0.5).bfloat16().requires_grad_()
    y = torch.randint(0, V, (T,), device="cuda")
    y[: T // 4] = -100
    w = torch.rand(T, device="cuda")
    rows = []
    for name, fn in implementations(h, W, y, w).items():
        try:
            fwd, both, peaks = measure(fn, (h, W))
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of memory")
            torch.cuda.empty_cache()
            continue
        for phase, ms in (("fwd", fwd), ("bwd", both - fwd), ("fwd_bwd", both)):
            rows.append(dict(op="fused_linear_cross_entropy", impl=name, tokens=T, hidden=H, vocab=V, dtype="bf16",
                             phase=phase, ms=ms, peak_extra_mb=peaks.get(phase, float("nan"))))
        print(f"{name:>32}: fwd {fwd:8.2f} ms  bwd {both - fwd:8.2f} ms  both {both:8.2f} ms  "
              f"peak extra {peaks['fwd_bwd']:9.0f} MB")
    print(f"wrote {write_csv(out_path(args), rows)}")


if __name__ == "__main__":
    main()
