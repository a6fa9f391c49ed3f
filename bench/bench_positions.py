"""Position synthesis benchmark.

    python bench/bench_positions.py [--out CSV] [--tokens 16777216]

- CPU: the C++ twin against the NumPy implementation of the same placement
  (longalign_ops.reference.synthesize_positions_numpy), same inputs, same run (goal >= 10x).
- GPU (when present): the CUDA kernel's throughput at 16M tokens as a fraction of the device's
  measured copy bandwidth (a device-to-device copy of the 8-byte output; goal >= 50%), for a
  few 128K sequences and for a hundred thousand short ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_args, out_path, median_seconds, write_csv  # noqa: E402

from longalign_ops import synthesize_positions  # noqa: E402
from longalign_ops.reference import synthesize_positions_numpy  # noqa: E402


def batches(total: int, rng):
    short = rng.integers(16, max(17, 2 * total // 100_000), 100_000)
    short = (short * (total / short.sum())).astype(np.int64).clip(1)
    long = np.full(max(1, total // 131072), 131072, dtype=np.int64)
    return {"100K short sequences": short, f"{len(long)} x 128K sequences": long}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_out_args(ap, "positions.csv")
    ap.add_argument("--tokens", type=int, default=16 * 2 ** 20)
    ap.add_argument("--cpu-tokens", type=int, default=2 * 2 ** 20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    for name, lengths in batches(args.cpu_tokens, rng).items():
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        target = lengths * 8
        for method in ("logo", "pose"):
            t_cpp = median_seconds(lambda: synthesize_positions(cu, torch.from_numpy(target), method=method), 5)
            t_np = median_seconds(lambda: synthesize_positions_numpy(lengths, target, method=method), 3)
            rows += [dict(device_kind="cpu", impl="C++ twin", batch=name, method=method, tokens=int(lengths.sum()),
                          seconds=t_cpp, tokens_per_s=lengths.sum() / t_cpp),
                     dict(device_kind="cpu", impl="NumPy", batch=name, method=method, tokens=int(lengths.sum()),
                          seconds=t_np, tokens_per_s=lengths.sum() / t_np)]
            print(f"CPU {name:>24} {method:>5}: C++ {t_cpp * 1e3:8.1f} ms, NumPy {t_np * 1e3:8.1f} ms "
                  f"-> {t_np / t_cpp:5.1f}x")

    if torch.cuda.is_available():
        from triton.testing import do_bench

        buf = torch.empty(args.tokens, dtype=torch.int64, device="cuda")
        dst = torch.empty_like(buf)
        copy_ms = do_bench(lambda: dst.copy_(buf), return_mode="median")
        copy_bw = 2 * buf.numel() * 8 / copy_ms / 1e6  # GB/s, read + write
        rows.append(dict(device_kind="gpu", impl="torch copy_", tokens=args.tokens, ms=copy_ms, gb_per_s=copy_bw))
        for name, lengths in batches(args.tokens, rng).items():
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
            target = torch.from_numpy(lengths * 8)
            for method in ("logo", "pose"):
                ms = do_bench(lambda: synthesize_positions(cu, target, method=method), return_mode="median")
                # bytes that must move: the int64 ids written (cu_seqlens and per-sequence inputs are small)
                bw = int(lengths.sum()) * 8 / ms / 1e6
                rows.append(dict(device_kind="gpu", impl="CUDA kernel", batch=name, method=method,
                                 tokens=int(lengths.sum()), ms=ms, gb_per_s=bw, frac_of_copy=bw / copy_bw))
                print(f"GPU {name:>24} {method:>5}: {ms:.3f} ms, {bw:.0f} GB/s = {bw / copy_bw:.0%} of copy "
                      f"({copy_bw:.0f} GB/s), host checks and transfers included")
    print(f"wrote {write_csv(out_path(args), rows)}")


if __name__ == "__main__":
    main()
