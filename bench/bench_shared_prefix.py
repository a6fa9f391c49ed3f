"""Shared-prefix packing against one sequence per answer, for long-context preference data: one
long prompt with a chosen and several rejected short answers.

    python bench/bench_shared_prefix.py [--prompt 65536 --answers 512,512,512 --model llama3-8b]
    python bench/bench_shared_prefix.py --train [--steps 8 --repeats 3]   (LOGO, tiny preset, this CPU)

Per layout: tokens in the row, causal attention score pairs (the attention FLOPs are
4 * heads * head_dim per pair forward), and the device peak of one training step of the full
model counted on fake tensors by bench_memory (one device, activation checkpointing on, the fused
loss; nothing is allocated). Writes shared_prefix.csv.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "0")

import bench_memory as bm  # noqa: E402
from common import write_csv  # noqa: E402

GIB = 2 ** 30


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def layouts(prompt: int, answers):
    """(name, tokens, attention pairs, groups or None, lengths) of both layouts of one prompt."""
    unshared = [prompt + a for a in answers]
    branches = [1 + a for a in answers]  # the prompt's last token starts each branch
    p = prompt - 1
    shared_pairs = causal_pairs(p) + sum(b * p + causal_pairs(b) for b in branches)
    return [("one sequence per answer", sum(unshared), sum(causal_pairs(n) for n in unshared), None, unshared),
            ("shared prefix", p + sum(branches), shared_pairs, [(p, branches)], None)]


def train_timing(steps: int, repeats: int, threads: int, out: str):
    """LOGO training on the tiny preset, this CPU, with and without shared prefixes (alternating,
    `repeats` runs each): answers and physical tokens per second over the steps after the first
    (which includes one-time work), the median of the runs with their range."""
    import statistics
    import tempfile

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
    import train

    runs = {False: [], True: []}
    for _ in range(repeats):
        for shared in (False, True):
            flag = "--shared-prefix" if shared else "--no-shared-prefix"
            hist = train.main(["--objective", "logo", "--max-steps", str(steps), "--no-plot", "--log-every", "1000",
                               "--out", tempfile.mkdtemp(), flag])["history"][1:]
            seconds = sum(r["ms"] for r in hist) / 1e3
            runs[shared].append(dict(answers_per_s=sum(r["sequences"] for r in hist) / seconds,
                                     tokens_per_s=sum(r["real_tokens"] for r in hist) / seconds))
    rows = []
    for shared, rs in runs.items():
        row = dict(layout="shared prefix" if shared else "one sequence per answer", preset="tiny", objective="logo",
                   threads=threads, steps_timed=steps - 1, runs=repeats)
        for key in ("answers_per_s", "tokens_per_s"):
            values = [r[key] for r in rs]
            row.update({key: statistics.median(values), key + "_min": min(values), key + "_max": max(values)})
        rows.append(row)
        print(f"{row['layout']:24} {row['answers_per_s']:8.1f} answers/s ({row['answers_per_s_min']:.1f}-"
              f"{row['answers_per_s_max']:.1f}), {row['tokens_per_s']:8.0f} tokens/s in the rows", flush=True)
    print(f"shared / unshared answers per second: {rows[1]['answers_per_s'] / rows[0]['answers_per_s']:.2f}x")
    print(f"wrote {write_csv(out, rows)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true",
                    help="instead: time LOGO training on the tiny preset with and without shared prefixes (this CPU)")
    ap.add_argument("--steps", type=int, default=8, help="--train: optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="--train: runs per layout")
    ap.add_argument("--threads", type=int, default=1, help="--train: torch threads")
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--answers", default="512,512,512", help="answer lengths: the chosen one, then the rejected")
    ap.add_argument("--model", default="llama3-8b", help=f"one of {', '.join(bm.MODELS)}")
    ap.add_argument("--out", default="runs/bench/shared_prefix.csv")
    args = ap.parse_args(argv)
    if args.train:
        return train_timing(args.steps, args.repeats, args.threads, args.out)
    answers = [int(a) for a in args.answers.split(",")]
    cfg = bm.model_config(args.model)
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    rows = []
    for name, tokens, pairs, groups, lengths in layouts(args.prompt, answers):
        r = bm.step_peak(args.model, tokens, "longalign", checkpointing=True, groups=groups,
                         sequence_length=None if groups else lengths[0] if len(set(lengths)) == 1 else None)
        rows.append(dict(layout=name, model=args.model, prompt=args.prompt, answers=args.answers, tokens=tokens,
                         attention_pairs=pairs, attention_tflop_fwd=4 * heads * head_dim * pairs * cfg.num_hidden_layers
                         / 1e12, peak_gib=r["peak"] / GIB,
                         peak_without_state_gib=(r["peak"] - r["Parameter"] - r["Optstate"] - r["Buffer"]) / GIB))
        print(f"{name:24} {tokens:8d} tokens, {pairs / 1e9:7.2f} G attention pairs, "
              f"{rows[-1]['attention_tflop_fwd']:7.1f} TFLOP attention forward, peak {rows[-1]['peak_gib']:6.1f} GiB "
              f"({rows[-1]['peak_without_state_gib']:5.1f} GiB beyond weights and optimizer state)", flush=True)
    a, b = rows
    print(f"shared / unshared: tokens {b['tokens'] / a['tokens']:.3f}, attention {b['attention_pairs'] / a['attention_pairs']:.3f}, "
          f"step memory beyond the state {b['peak_without_state_gib'] / a['peak_without_state_gib']:.3f}")
    print(f"wrote {write_csv(args.out, rows)}")


if __name__ == "__main__":
    main()
