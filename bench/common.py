"""Shared benchmark plumbing: one long CSV per run with device, versions and timestamp."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def run_meta() -> Dict[str, str]:
    meta = {"device": device_name(), "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version()}
    for mod in ("torch", "triton", "numpy"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            meta[mod] = ""
    return meta


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` on the host (CPU benchmarks; GPU ones use do_bench)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_csv(path: str, rows: Iterable[dict]) -> str:
    rows = list(rows)
    meta = run_meta()
    rows = [{**r, **meta} for r in rows]
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def results_dir(tracked: bool = False) -> str:
    """Where a run's files go: ``runs/bench/<device>-<date>/`` (untracked) by default, or the
    tracked ``bench/results/<device>-<date>/`` when asked for (``--results``), so that a
    benchmark run never leaves a clone dirty by accident."""
    tag = f"{device_name().replace(' ', '_').replace('/', '_')}-{_dt.date.today().isoformat()}"
    if tracked:
        return os.path.join(os.path.dirname(__file__), "results", tag)
    return os.path.join("runs", "bench", tag)


def add_out_args(ap, name: str) -> None:
    """--out FILE and --results (write `name` under bench/results/ instead of runs/bench/)."""
    ap.add_argument("--out", default=None, help=f"output file (default: runs/bench/<device>-<date>/{name})")
    ap.add_argument("--results", action="store_true",
                    help=f"write bench/results/<device>-<date>/{name}: the tracked results the README quotes")
    ap.set_defaults(_out_name=name)


def out_path(args) -> str:
    return args.out or os.path.join(results_dir(args.results), args._out_name)
