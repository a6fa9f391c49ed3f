"""Shared-prefix packing against one sequence per answer, for long-context preference data: one
long prompt with a chosen and several rejected short answers.

    python bench/bench_shared_prefix.py [--prompt 65536 --answers 512,512,512 --model llama3-8b]

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--answers", default="512,512,512", help="answer lengths: the chosen one, then the rejected")
    ap.add_argument("--model", default="llama3-8b", help=f"one of {', '.join(bm.MODELS)}")
    ap.add_argument("--out", default="runs/bench/shared_prefix.csv")
    args = ap.parse_args(argv)
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
