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


def default_out(name: str) -> str:
    tag = device_name().replace(" ", "_").replace("/", "_")
    return os.path.join(os.path.dirname(__file__), "results", f"{tag}-{_dt.date.today().isoformat()}", name)
