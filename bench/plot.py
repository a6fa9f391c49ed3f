"""Draw the PNGs of a results folder from its CSVs (a separate step from measuring).

    python bench/plot.py bench/results/<device>-<date>/
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_attention(rows, out):
    series = defaultdict(list)
    for r in rows:
        if r.get("op") == "varlen_attention":
            series[r["impl"]].append((int(r["total_tokens"]), float(r["fwd_bwd_tflops"])))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per packed row")
    ax.set_ylabel("forward+backward TFLOP/s")
    dev = rows[0].get("device", "")
    ax.set_title(f"varlen attention, bf16, causal ({dev})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_bars(rows, key, out, title, label_key="impl"):
    rows = [r for r in rows if r.get(key) not in (None, "", "nan")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r[label_key] for r in rows], [float(r[key]) for r in rows])
    ax.set_ylabel(key)
    ax.set_title(f"{title} ({rows[0].get('device', '')})")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        rows = read(os.path.join(folder, name))
        stem = os.path.join(folder, name[:-4])
        if name.startswith("varlen_attention"):
            plot_attention(rows, stem + ".png")
        elif name.startswith("cross_entropy"):
            plot_bars([r for r in rows if r.get("phase") == "fwd_bwd"], "ms", stem + ".png",
                      "fused linear cross-entropy, forward+backward")
        elif name.startswith("e2e"):
            plot_bars(rows, "tokens_per_s", stem + ".png", "end-to-end training throughput", "strategy")
    print(f"plots written under {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
