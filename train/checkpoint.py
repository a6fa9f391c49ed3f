"""Checkpoints a kill cannot destroy, and a resume that cannot silently train something else.

- Written atomically: serialised to memory, written to ``<path>.tmp``, fsynced, then renamed over
  ``<path>`` (``os.replace``) after the previous checkpoint was renamed to ``<path>.prev``. At any
  moment of a kill, one complete checkpoint exists: ``<path>``, else ``<path>.prev``.
- Verified on load: a header holds the SHA-256 of the payload; a truncated or flipped file is
  refused with an error that names it, and the previous one is used instead.
- Metrics: a torn last line (a kill mid-write) is skipped when the history is reloaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import List, Optional, Tuple

import torch

MAGIC = b"LONGALIGN-CKPT-1\n"
# the settings that decide which data a step sees: a resume under other values would train on
# other batches while its metrics look continuous
DATA_ORDER_KEYS = ("preset", "data", "seed", "strategy", "objective", "world_size", "grad_accum", "batch_size",
                   "window", "num_samples", "num_rejected", "loss_weighting", "sp")


class CheckpointError(RuntimeError):
    pass


def save(state: dict, path: str) -> None:
    """Atomically replace `path` with `state`; the replaced checkpoint stays as `path`.prev."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the renames themselves reach the disk
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str, device) -> dict:
    """The verified state in `path`, or CheckpointError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    head = len(MAGIC) + 65
    if not data.startswith(MAGIC) or len(data) < head:
        raise CheckpointError(f"{path}: not a complete longalign checkpoint ({len(data)} bytes; truncated or another "
                              f"format)")
    digest, payload = data[len(MAGIC):head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted")
    return torch.load(io.BytesIO(payload), map_location=device, weights_only=False)


def load_latest(path: str, device, log) -> Optional[Tuple[dict, str]]:
    """(state, file) of the newest checkpoint that verifies: `path`, else `path`.prev; None if
    neither exists; CheckpointError if files exist and none verifies."""
    errors = []
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            continue
        try:
            return load(candidate, device), candidate
        except CheckpointError as e:
            log(f"checkpoint: {e}; trying the previous one")
            errors.append(str(e))
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def exists(path: str) -> bool:
    return any(os.path.exists(p) for p in (path, path + ".prev"))


def check_resumable(saved: dict, current: dict, step: int, max_steps: int, file: str) -> None:
    """Refuse a resume that would see other data than the run it continues, or that starts
    past the end."""
    if saved.get("strategy") == "packing":  # the old name of "bfd" (runs before the vocabulary was unified)
        saved = dict(saved, strategy="bfd")
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in DATA_ORDER_KEYS
               if k in saved and saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(f"{file} was written by a run with other data-order settings ({', '.join(changed)}); "
                              f"resuming would train on other batches. Use the same settings, or --overwrite to "
                              f"start afresh")
    if step > max_steps:
        raise CheckpointError(f"{file} is at step {step}, past --max-steps {max_steps}; raise --max-steps to go on "
                              f"(a checkpoint is never relabelled)")


def read_metrics(path: str, up_to: int, log) -> List[str]:
    """The metrics lines of steps <= `up_to`; a torn (unparsable) line, as a kill mid-write
    leaves at the end, is skipped with a note."""
    kept = []
    if not os.path.exists(path):
        return kept
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log(f"metrics: line {lineno} of {path} is torn, skipped")
                continue
            if row.get("step", 0) <= up_to:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept
