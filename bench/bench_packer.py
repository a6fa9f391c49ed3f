"""Packer benchmark: the C++ packer against a plain-Python BFD (and TRL's, if installed).

    python bench/bench_packer.py [--out CSV]

On a LongAlign-like mixture (90% chat lengths, log-normal around 700 tokens; 10% spread evenly
over 8K-64K), at max_tokens = 64K and 8 ranks. Goals (issue 2): >= 50x faster than plain-Python
BFD, 1M sequences under 1 s, efficiency >= 99.5%, imbalance <= 1.05 under the attention cost.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_args, out_path, median_seconds, write_csv  # noqa: E402

import longalign_ops as la  # noqa: E402
from longalign_ops.reference import best_fit_decreasing  # noqa: E402


def longalign_mixture(n: int, seed: int = 0, max_len: int = 65536) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_long = n // 10
    short = np.clip(rng.lognormal(np.log(700), 0.8, n - n_long), 16, max_len).astype(np.int64)
    long = rng.integers(8192, max_len + 1, n_long)
    out = np.concatenate([short, long])
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_out_args(ap, "packer.csv")
    ap.add_argument("--python-n", type=int, default=100_000, help="sequences for the plain-Python comparison")
    ap.add_argument("--big-n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trl-n", type=int, default=2000, help="sequences for the TRL comparison (tokens materialised)")
    args = ap.parse_args()
    cap, world = 65536, 8
    rows = []

    # 1. speed against plain-Python BFD, same input, same run
    L = longalign_mixture(args.python_n)
    lst = L.tolist()
    # interleaved, so both sides see the same machine state (this VM's timings drift run to run)
    la.pack(L, cap, world_size=world)
    t_cpp, t_py = [], []
    for _ in range(args.repeats):
        t_cpp.append(median_seconds(lambda: la.pack(L, cap, world_size=world), repeats=5, warmup=0))
        t_py.append(median_seconds(lambda: best_fit_decreasing(lst, cap), repeats=1, warmup=0))
    t_cpp, t_py = float(np.median(t_cpp)), float(np.median(t_py))
    rows += [dict(bench="bfd_speed", impl="longalign_ops (C++)", n=len(L), seconds=t_cpp),
             dict(bench="bfd_speed", impl="plain-Python BFD", n=len(L), seconds=t_py)]
    # 2. 1M sequences: plan alone, and plan plus the Python step lists
    B = longalign_mixture(args.big_n, seed=1)
    t_big = median_seconds(lambda: la.pack(B, cap, world_size=world), args.repeats)
    t_big_lists = median_seconds(lambda: la.pack(B, cap, world_size=world).steps, repeats=3)
    rows += [dict(bench="pack_1M", impl="longalign_ops (C++)", n=len(B), seconds=t_big),
             dict(bench="pack_1M_with_step_lists", impl="longalign_ops (C++)", n=len(B), seconds=t_big_lists)]

    # 3. plan quality at 64K, 8 ranks, every strategy and balance
    for name, kw in [("naive", dict(strategy="naive", batch_size=8)), ("sorted", dict(strategy="sorted", batch_size=8)),
                     ("bfd tokens", dict(balance="tokens")), ("bfd attention", dict(balance="attention"))]:
        for n, data in [(args.python_n, L), (len(B), B)]:
            s = la.pack(data, cap, world_size=world, **kw).stats
            rows.append(dict(bench="quality", impl=name, n=n, efficiency=s["efficiency"], imbalance=s["imbalance"],
                             est_speedup_vs_naive=s["est_speedup_vs_naive"], steps=s["num_steps"]))

    # 4. TRL's packer, if the user has it: last, because pyarrow's thread pools would share the
    # two cores with the timings above.
    # It packs the token lists themselves (an Arrow table), so it gets a smaller input, and ours
    # is timed on the same lengths beside it.
    try:
        from datasets import Dataset
        from trl import pack_dataset

        n_trl = min(len(L), args.trl_n)
        ds = Dataset.from_dict({"input_ids": [[0] * int(x) for x in L[:n_trl]]})
        t_trl = median_seconds(lambda: pack_dataset(ds, cap, strategy="bfd"), repeats=3, warmup=1)
        t_ours = median_seconds(lambda: la.pack(L[:n_trl], cap, world_size=world), args.repeats)
        rows += [dict(bench="bfd_speed_trl_input", impl="trl.pack_dataset(bfd), token lists", n=n_trl, seconds=t_trl),
                 dict(bench="bfd_speed_trl_input", impl="longalign_ops (C++), lengths", n=n_trl, seconds=t_ours)]
        print(f"bfd, {n_trl} sequences: TRL pack_dataset {t_trl * 1e3:.1f} ms (packs the tokens), "
              f"longalign_ops {t_ours * 1e3:.2f} ms (plans from lengths)")
    except ImportError:
        print("trl/datasets not installed: TRL's pack_dataset left out of the table")

    path = write_csv(out_path(args), rows)
    print(f"wrote {path}")
    print(f"bfd, {len(L)} sequences: C++ {t_cpp*1e3:.1f} ms, plain Python {t_py*1e3:.0f} ms: {t_py/t_cpp:.0f}x")
    print(f"bfd, {len(B)} sequences: {t_big*1e3:.0f} ms (with Python step lists {t_big_lists*1e3:.0f} ms)")
    print(f"{'plan':>14} {'n':>8} {'efficiency':>10} {'imbalance':>9} {'speedup':>8}")
    for r in rows:
        if r["bench"] == "quality":
            print(f"{r['impl']:>14} {r['n']:>8} {r['efficiency']:>10.4f} {r['imbalance']:>9.4f} "
                  f"{r['est_speedup_vs_naive']:>7.2f}x")


if __name__ == "__main__":
    main()
