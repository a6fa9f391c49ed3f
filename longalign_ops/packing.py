"""Length packing: naive batching, LongAlign sorted batching, best-fit-decreasing packing.

The work happens in C++ (``longalign_ops._C``); this module checks inputs, wraps the result in a
:class:`PackPlan`, and provides the command line (``python -m longalign_ops.packing`` or
``longalign-pack``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import cached_property
from typing import Iterable, Optional, Sequence

import numpy as np

from . import _C
from ._validation import check_finite_number, check_int
from .cross_entropy import longalign_factors

STRATEGIES = ("naive", "sorted", "bfd")
BALANCES = ("tokens", "attention")
OVERLONG = ("error", "drop", "truncate")

# `a` in the per-rank cost sum(L^2) + a*sum(L). For a Llama-style block of width H, causal
# attention costs ~2*H*L^2 FLOPs per sequence and the projections + MLP ~24*H^2 per token, so
# a = 12*H; 49152 is H = 4096 (7B/8B models).
DEFAULT_LINEAR_COST = 12 * 4096


def _as_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _lengths_array(lengths) -> np.ndarray:
    if hasattr(lengths, "detach"):  # a torch tensor
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise TypeError(f"lengths must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class PackPlan:
    """The result of :func:`pack`.

    Attributes:
        steps: ``steps[s][r]`` is the list of sequence indices rank ``r`` gets at step ``s``
            (exactly ``world_size`` lists per step; a rank with nothing left in the last step
            gets an empty list).
        stats: dict with ``efficiency``, ``padding_ratio``, ``imbalance``,
            ``est_speedup_vs_naive``, ``dropped``, ``truncated`` and counts.
        lengths: ``(N,)`` int64, each sequence's length after truncation (0 if dropped).
        dropped, truncated: int64 arrays of the affected sequence indices.
    """

    def __init__(self, raw: dict, world_size: int, strategy: str, max_tokens: int):
        self.world_size = world_size
        self.strategy = strategy
        self.max_tokens = max_tokens
        self.num_steps = int(raw["num_steps"])
        self.lengths = raw["effective_lengths"]
        self.dropped = raw["dropped"]
        self.truncated = raw["truncated"]
        self._order = raw["order"]
        self._offsets = raw["offsets"]
        num_packs = len(self._offsets) - 1
        self.stats = {
            "efficiency": float(raw["efficiency"]),
            "padding_ratio": float(raw["padding_ratio"]),
            "imbalance": float(raw["imbalance"]),
            "est_speedup_vs_naive": float(raw["est_speedup_vs_naive"]),
            "num_sequences": int(len(self._order)),
            "num_steps": self.num_steps,
            "num_packs": int(np.count_nonzero(np.diff(self._offsets))) if num_packs else 0,
            "real_tokens": int(raw["real_tokens"]),
            "paid_tokens": int(raw["paid_tokens"]),
            "dropped": int(len(self.dropped)),
            "truncated": int(len(self.truncated)),
        }

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        s = self.stats
        return (f"PackPlan(strategy={self.strategy!r}, steps={self.num_steps}, world_size={self.world_size}, "
                f"efficiency={s['efficiency']:.4f}, imbalance={s['imbalance']:.4f})")

    def _check(self, step: int, rank: int) -> int:
        step = check_int("step", step, minimum=-(2 ** 63))
        rank = check_int("rank", rank, minimum=-(2 ** 63))
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}), got {step}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return step * self.world_size + rank

    def indices(self, step: int, rank: int) -> np.ndarray:
        """``(n,)`` int64 sequence indices of ``steps[step][rank]``, without building ``steps``."""
        p = self._check(step, rank)
        return self._order[self._offsets[p]:self._offsets[p + 1]]

    @cached_property
    def steps(self) -> list:
        # built on first use: at 1M sequences the Python lists cost more than the packing itself
        packs = np.split(self._order, self._offsets[1:-1]) if len(self._offsets) > 1 else []
        W = self.world_size
        return [[packs[s * W + r].tolist() for r in range(W)] for s in range(self.num_steps)]

    def cu_seqlens(self, step: int, rank: int):
        """``(n+1,)`` torch.int32 cumulative lengths of the pack at (step, rank), starting at 0."""
        import torch

        lens = self.lengths[self.indices(step, rank)]
        if int(lens.sum()) > 2 ** 31 - 1:
            raise ValueError(f"the pack at step {step}, rank {rank} holds {int(lens.sum())} tokens: more than int32 "
                             f"cu_seqlens can address (2**31 - 1); use a smaller max_tokens")
        cu = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        return torch.from_numpy(cu)

    def batch(self, step: int, rank: int, *, device="cpu"):
        """The :class:`PackedBatch` of the pack at (step, rank): built from the plan's host
        lengths, so no device sync; reuse it for every layer, op and the backward."""
        from .batch import PackedBatch

        return PackedBatch.from_lengths(self.lengths[self.indices(step, rank)], device=device)

    def loss_weights(self, target_counts) -> np.ndarray:
        """``(N,)`` float64 LongAlign factors ``K / (N_i * M)`` indexed like ``lengths``.

        ``target_counts[i]`` is N_i, the number of loss-bearing tokens of sequence i. K is the
        number of packs per step (``world_size``: data parallelism averages over every rank,
        idle ones too) and M the number of sequences in the step that have targets. Sequences
        without targets, and dropped ones, get 0.
        """
        counts = _lengths_array(target_counts) if np.size(target_counts) else np.zeros(0, np.int64)
        if counts.shape != self.lengths.shape:
            raise ValueError(f"target_counts must have shape {self.lengths.shape}, got {counts.shape}")
        if (counts < 0).any():
            raise ValueError(f"target_counts must be >= 0: {int((counts < 0).sum())} are negative")
        weights = np.zeros(len(counts), dtype=np.float64)
        W = self.world_size
        for s in range(self.num_steps):
            members = self._order[self._offsets[s * W]:self._offsets[(s + 1) * W]]
            n_i = counts[members]
            m = int(np.count_nonzero(n_i))
            if m:
                weights[members] = longalign_factors(n_i, W, m)
        return weights


def pack(lengths, max_tokens: int, *, strategy: str = "bfd", world_size: int = 1,
         batch_size: Optional[int] = None, balance: str = "attention", overlong: str = "error",
         seed: int = 0, linear_cost: float = DEFAULT_LINEAR_COST) -> PackPlan:
    """Plan the micro-batches of one epoch.

    Args:
        lengths: ``(N,)`` integer token counts (list, numpy or torch), each >= 1.
        max_tokens: pack capacity ("bfd") and the longest sequence allowed (all strategies).
        strategy: "naive" (seeded random order, ``batch_size`` sequences per rank per step, padded
            to the batch's longest), "sorted" (LongAlign sorted batching) or "bfd" (best-fit
            decreasing packing, O(N log max_tokens)).
        world_size: data-parallel ranks per step.
        batch_size: sequences per rank per step for "naive" and "sorted" (default 1); for "bfd" it
            only sets the naive baseline of ``est_speedup_vs_naive`` (default: the mean pack size).
        balance: "tokens" or "attention": which cost the "bfd" plan evens out across each step's
            ranks (attention: ``sum(L^2) + linear_cost*sum(L)``).
        overlong: what to do with sequences longer than ``max_tokens``: "error", "drop", "truncate".
        seed: the plan is a pure function of its inputs and seed, identical on every machine.
        linear_cost: ``a`` in the cost model (default 12*4096, a 7B/8B Llama block).
    """
    arr = _lengths_array(lengths)
    cfg = _C.PackConfig()
    cfg.max_tokens = check_int("max_tokens", max_tokens, 1)
    cfg.strategy = _as_choice("strategy", strategy, STRATEGIES)
    cfg.world_size = check_int("world_size", world_size, 1)
    cfg.batch_size_given = batch_size is not None
    cfg.batch_size = 1 if batch_size is None else check_int("batch_size", batch_size, 1)
    cfg.balance = _as_choice("balance", balance, BALANCES)
    cfg.overlong = _as_choice("overlong", overlong, OVERLONG)
    cfg.seed = check_int("seed", seed, minimum=-(2 ** 63)) & 0xFFFFFFFFFFFFFFFF
    cfg.linear_cost = check_finite_number("linear_cost", linear_cost, minimum=0.0)
    raw = _C.pack(arr, cfg)
    return PackPlan(raw, cfg.world_size, cfg.strategy, cfg.max_tokens)


# ---------------------------------------------------------------- command line


def _record_length(line: str, lineno: int) -> int:
    """A JSONL record's token count: a bare int, or an object with length / num_tokens /
    input_ids / tokens."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {lineno}: bad JSON ({e.msg})") from None
    def is_int(v):  # JSON true / false are not lengths
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(rec):
        return rec
    if isinstance(rec, dict):
        for key in ("length", "num_tokens", "len"):
            if key in rec:
                if not is_int(rec[key]):
                    raise ValueError(f"line {lineno}: '{key}' must be an integer, got {json.dumps(rec[key])}")
                return rec[key]
        for key in ("input_ids", "tokens"):
            if isinstance(rec.get(key), list):
                return len(rec[key])
    raise ValueError(f"line {lineno}: expected an int or an object with 'length', 'num_tokens', "
                     f"'input_ids' or 'tokens'")


def read_lengths(path: str, progress: bool = True) -> np.ndarray:
    """Token lengths from a JSONL file ('-' for stdin), with a progress bar on large files
    (never on stdin, whose size is unknown, nor when stderr is not a terminal)."""
    from tqdm import tqdm

    stream = sys.stdin if path == "-" else open(path, "r", encoding="utf-8")
    size = None if path == "-" else os.path.getsize(path)
    show = progress and size is not None and size >= (8 << 20) and sys.stderr.isatty()
    lengths = []
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc="reading", disable=not show) as bar:
            for lineno, line in enumerate(stream, 1):
                bar.update(len(line.encode("utf-8")) if size else 0)
                if line.strip():
                    lengths.append(_record_length(line, lineno))
    finally:
        if stream is not sys.stdin:
            stream.close()
    return np.asarray(lengths, dtype=np.int64)


def format_stats(rows: Iterable[tuple]) -> str:
    header = ("strategy", "steps", "efficiency", "padding", "imbalance", "speedup_vs_naive", "dropped", "truncated")
    lines = ["  ".join(f"{h:>16}" for h in header)]
    for name, plan in rows:
        s = plan.stats
        lines.append("  ".join(f"{v:>16}" for v in (
            name, s["num_steps"], f"{s['efficiency']:.4f}", f"{s['padding_ratio']:.4f}", f"{s['imbalance']:.4f}",
            f"{s['est_speedup_vs_naive']:.2f}x", s["dropped"], s["truncated"])))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="longalign-pack", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Plan packed batches for a JSONL of token lengths and print the plan's "
                                 "statistics.")
    ap.add_argument("path", help="JSONL file of ints or records with length/num_tokens/input_ids/tokens ('-': stdin)")
    ap.add_argument("--max-tokens", type=int, default=65536,
                    help="tokens per pack (bfd) and the longest sequence allowed (every strategy)")
    ap.add_argument("--strategy", choices=STRATEGIES + ("all",), default="all",
                    help="naive (random batches, padded), sorted (LongAlign sorted batching), bfd (LongAlign packing, "
                         "best-fit decreasing), or all three side by side")
    ap.add_argument("--world-size", type=int, default=8, help="data-parallel ranks: packs per step")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per rank per step for naive and sorted (default: 1; for bfd only the naive "
                         "baseline of the estimated speed-up, default: the mean pack size)")
    ap.add_argument("--balance", choices=BALANCES, default="attention",
                    help="what bfd evens out across a step's ranks: token counts or attention cost")
    ap.add_argument("--overlong", choices=OVERLONG, default="error",
                    help="a sequence longer than --max-tokens: refuse the input, drop it, or truncate it")
    ap.add_argument("--seed", type=int, default=0, help="order of naive batches and of steps")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (there is none anyway on stdin, on a small file or off a terminal)")
    args = ap.parse_args(argv)
    try:
        lengths = read_lengths(args.path, progress=not args.no_progress)
        if not len(lengths):
            raise ValueError(f"{args.path}: no lengths in the input (empty file or only blank lines)")
        names = STRATEGIES if args.strategy == "all" else (args.strategy,)
        rows = [(name, pack(lengths, args.max_tokens, strategy=name, world_size=args.world_size,
                            batch_size=args.batch_size, balance=args.balance, overlong=args.overlong,
                            seed=args.seed)) for name in names]
    except (ValueError, TypeError, OSError) as e:
        print(f"longalign-pack: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(lengths)} sequences, {int(lengths.sum())} tokens, max_tokens={args.max_tokens}, "
          f"world_size={args.world_size}")
    print(format_stats(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
