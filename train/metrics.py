"""The loss curve of a run (and LOGO's margin and preference accuracy).
"""
from __future__ import annotations

import json
from typing import Optional

from config import Config


def plot_loss(metrics_path: str, png: str, cfg: Config) -> Optional[str]:
    """The loss curve titled with what was trained; for LOGO also the chosen - rejected margin
    and the preference accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path)]
    steps = [r["step"] for r in rows]
    preference = all("margin" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(11 if preference else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    weighting = ", LongAlign weighting" if cfg.loss_weighting else ""
    ax.set_title(f"{cfg.preset} preset, {cfg.strategy} batching, {cfg.objective}{weighting}", fontsize=9)
    if preference:
        ax = axes[0, 1]
        ax.plot(steps, [r["margin"] for r in rows], label="margin (chosen - rejected log-prob)")
        ax.plot(steps, [r["pref_accuracy"] for r in rows], label="preference accuracy")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{cfg.objective} preference metrics", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
