"""End-to-end benchmark: what LongAlign's figure 5 measures, on one device.

    python bench/bench_e2e.py --preset tiny --out DIR [--world-size 8] [--convergence-steps 300]

Trains the same model (same initial weights) on the same data, one epoch (every sequence once),
under naive batching, sorted batching, packing, and packing with LongAlign loss weighting.
Data-parallel idle time is emulated faithfully: each step runs every rank's micro-batch one
after another, times each, and counts the step as its slowest rank's time (what a synchronous
data-parallel step waits for). Writes DIR/e2e.csv and DIR/e2e.png.

Timing that a busy machine cannot flip: torch runs on --threads threads (default 1: two
threads on two shared cores spin against any other process, turning a 100 ms step into
seconds), and every rank's micro-batch is timed as the median of --repeats forward + backward
passes (the extra passes drop their gradients: training is unchanged). Each strategy's
throughput is reported with its range: the epoch timed with every micro-batch's fastest and
with its slowest pass, and each speed-up with the range those give against naive.

With --convergence-steps N it also trains naive and packing+weighting for N steps each and
plots both loss curves against sequences seen, with a common held-out metric (the mean over
sequences of their per-token loss), in DIR/convergence.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
from common import device_name, write_csv  # noqa: E402

import train  # noqa: E402  (train/train.py: main and its public helpers)
import longalign_ops as la  # noqa: E402

STRATEGIES = {
    "naive": ["--strategy", "naive", "--no-loss-weighting"],
    "sorted": ["--strategy", "sorted", "--no-loss-weighting"],
    "packing": ["--strategy", "bfd", "--no-loss-weighting"],
    "packing+weighting": ["--strategy", "bfd", "--loss-weighting"],
}


def median_of(repeats: int):
    """A pass timer for train.main: each emulated rank's micro-batch runs `repeats` times (the
    first trains; the others do the same work and drop their gradients), each pass timed."""
    def timer(run_pass):
        timings, loss = [], None
        for i in range(repeats):
            t = time.perf_counter()
            out = run_pass(i == 0)
            timings.append((time.perf_counter() - t) * 1e3)
            loss = out if i == 0 else loss
        return loss, timings
    return timer


def summarise(name, history, world):
    timed = history[1:] if len(history) > 1 else history  # step 1 carries one-time start-up costs
    slowest = np.array([r["slowest_rank_ms"] for r in timed])
    rank_ms = np.array([r["rank_ms"] for r in timed])
    real = sum(r["real_tokens"] for r in timed)
    slots = sum(r["real_tokens"] / max(1e-9, 1 - r["padding_ratio"]) for r in timed)
    # the epoch with every micro-batch at its fastest / slowest pass: the spread of the median
    fast = sum(max(r["rank_ms_min"]) for r in timed) if "rank_ms_min" in timed[0] else slowest.sum()
    slow = sum(max(r["rank_ms_max"]) for r in timed) if "rank_ms_max" in timed[0] else slowest.sum()
    return dict(strategy=name, tokens_per_s=real / (slowest.sum() / 1e3), tokens_per_s_low=real / (slow / 1e3),
                tokens_per_s_high=real / (fast / 1e3), step_ms=float(slowest.mean()),
                padding_ratio=1 - real / slots, idle_ratio=float((slowest[:, None] - rank_ms).sum() / (world * slowest.sum())),
                steps=len(history), timed_steps=len(timed), real_tokens=real, final_loss=history[-1]["loss"])


def held_out_loss(model, cfg, device) -> float:
    """Mean over held-out sequences of their per-token loss: one metric for every strategy."""
    seqs = train.held_out_sequences(["--preset", cfg.preset, "--num-samples", "64", "--window", str(cfg.window)],
                                    seed=10_000 + cfg.seed)
    model.eval()
    vals = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.from_numpy(s["input_ids"]).to(device)[None]
            hidden = model.model(input_ids=ids).last_hidden_state[0]
            labels = torch.from_numpy(s["labels"]).to(device)
            vals.append(la.fused_linear_cross_entropy(hidden.float(), model.lm_head.weight.float(), labels).item())
    return float(np.mean(vals))


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_bars(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    names = [r["strategy"] for r in rows]
    vals = np.array([float(r["tokens_per_s"]) for r in rows])
    low = np.array([float(r.get("tokens_per_s_low", v)) for r, v in zip(rows, vals)])
    high = np.array([float(r.get("tokens_per_s_high", v)) for r, v in zip(rows, vals)])
    bars = ax.bar(names, vals, yerr=[vals - low, high - vals], capsize=4,
                  color=["#999999", "#6f9fd8", "#2f7f4f", "#1f5f3f"][: len(rows)])
    for b, r, top in zip(bars, rows, high):
        spread = f" ({float(r['speedup_low']):.2f}-{float(r['speedup_high']):.2f})" if "speedup_low" in r else ""
        ax.text(b.get_x() + b.get_width() / 2, top, f"{float(r['tokens_per_s']) / float(rows[0]['tokens_per_s']):.2f}x"
                f"{spread}\npad {float(r['padding_ratio']):.0%}, idle {float(r['idle_ratio']):.0%}", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("real tokens / s (slowest rank per step)")
    timing = f", median of {r.get('repeats')} passes, {r.get('threads')} thread(s)" if "repeats" in rows[0] else ""
    ax.set_title(f"end-to-end training throughput ({rows[0].get('device', '')}, {rows[0]['world_size']} ranks "
                 f"emulated{timing})", fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def convergence(common, steps, out, device):
    """Train naive and packing+weighting for `steps`; rows of held-out losses and the training
    curves (for the plot, drawn separately)."""
    rows, curves = [], {}
    for name in ("naive", "packing+weighting"):
        res = train.main(common + STRATEGIES[name] + ["--max-steps", str(steps), "--out",
                                                     os.path.join(out, f"conv-{name}"), "--warmup-steps", "20"])
        hist = res["history"]
        seen = np.cumsum([r["sequences"] for r in hist])
        curves[name] = (seen, [r["loss"] for r in hist])
        rows.append(dict(strategy=name, steps=steps, sequences_seen=int(seen[-1]),
                         held_out_loss=held_out_loss(res["model"], res["config"], device)))
    return rows, curves


def plot_convergence(rows, curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, (seen, losses) in curves.items():
        ax.plot(seen, losses, label=f"{name} (training objective)", alpha=0.8)
    ax.set_xlabel("sequences seen")
    ax.set_ylabel("loss")
    ax.set_title("held-out loss: " + ", ".join(f"{r['strategy']} {r['held_out_loss']:.3f}" for r in rows), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default="runs/e2e")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="naive/sorted sequences per rank (default: preset)")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per strategy (default: one epoch)")
    ap.add_argument("--convergence-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per micro-batch; the median counts")
    ap.add_argument("--log-every", type=int, default=2, help="a progress line every N steps of each strategy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (4 if args.preset == "tiny" else 1)
    common = ["--preset", args.preset, "--world-size", str(args.world_size), "--batch-size", str(batch),
              "--seed", str(args.seed), "--no-plot", "--log-every", str(args.log_every),
              "--overwrite"]  # each benchmark run replaces its own run directories
    if args.num_samples:
        common += ["--num-samples", str(args.num_samples)]
    rows = []
    for name, extra in STRATEGIES.items():
        steps = train.epoch_steps(common + extra)
        if args.max_steps:
            steps = min(steps, args.max_steps)
        print(f"== {name}: {steps} steps x {args.world_size} ranks, each micro-batch timed {args.repeats}x "
              f"({time.perf_counter() - started:.0f} s so far)", flush=True)
        res = train.main(common + extra + ["--max-steps", str(steps), "--out", os.path.join(args.out, name)],
                         pass_timer=median_of(args.repeats))
        rows.append(dict(summarise(name, res["history"], args.world_size), preset=args.preset,
                         world_size=args.world_size, batch_size=batch, threads=args.threads, repeats=args.repeats))
    base = rows[0]
    for r in rows:
        r["speedup_vs_naive"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["speedup_low"] = r["tokens_per_s_low"] / base["tokens_per_s_high"]
        r["speedup_high"] = r["tokens_per_s_high"] / base["tokens_per_s_low"]
    wall = time.perf_counter() - started
    for r in rows:
        r["run_wall_s"] = round(wall, 1)
    csv_path = write_csv(os.path.join(args.out, "e2e.csv"), rows)
    png = os.path.join(args.out, "e2e.png")
    if have_matplotlib():
        plot_bars([dict(r, device=device_name()) for r in rows], png)
    else:
        png = "(not drawn: matplotlib is not installed; the CSV has every figure)"
    print(f"\n{'strategy':>18} {'tokens/s':>10} {'(range)':>15} {'step ms':>9} {'padding':>8} {'idle':>6} "
          f"{'vs naive':>8} {'(range)':>13}")
    for r in rows:
        print(f"{r['strategy']:>18} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_low']:>7.0f}-{r['tokens_per_s_high']:<7.0f} "
              f"{r['step_ms']:>9.1f} {r['padding_ratio']:>8.3f} {r['idle_ratio']:>6.3f} {r['speedup_vs_naive']:>7.2f}x "
              f"{r['speedup_low']:>5.2f}-{r['speedup_high']:.2f}x")
    print(f"\n{wall:.0f} s, {args.threads} thread(s), median of {args.repeats} timed passes per micro-batch")
    print(f"table: {csv_path}\nplot:  {png}")
    if args.convergence_steps:
        conv, curves = convergence(common, args.convergence_steps, args.out, device)
        write_csv(os.path.join(args.out, "convergence.csv"), conv)
        conv_png = os.path.join(args.out, "convergence.png")
        if have_matplotlib():
            plot_convergence(conv, curves, conv_png)
        else:
            conv_png = "(not drawn: matplotlib is not installed; the CSV has every figure)"
        for r in conv:
            print(f"convergence {r['strategy']:>18}: held-out loss {r['held_out_loss']:.4f} after "
                  f"{r['sequences_seen']} sequences")
        print(f"plot:  {conv_png}")


if __name__ == "__main__":
    main()
