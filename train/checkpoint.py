"""Checkpoints a kill cannot destroy, a resume that cannot silently train something else, and a
load that never runs code from the file.

- Single file (one process, DDP): serialised to memory, written to ``<path>.tmp``, fsynced, then
  renamed over ``<path>`` (``os.replace``) after the previous checkpoint was renamed to
  ``<path>.prev``. A header holds the SHA-256 of the payload: a truncated or flipped file is
  refused with an error that names it, and the previous one is used instead.
- Sharded (FSDP): a ``torch.distributed.checkpoint`` directory, each rank writing its own
  ``.distcp`` shard, written to ``<dir>.tmp`` and renamed into place, the previous one kept as
  ``<dir>.prev``; a manifest holds the SHA-256 of every file, checked in parallel (each rank reads
  its share) before a resume. The non-tensor state (step, config, scheduler) is JSON beside it.
- Nothing is unpickled beyond tensors and plain Python values: the single file loads with
  ``weights_only=True``; DCP's ``.metadata`` pickle goes through an unpickler that admits only
  DCP's own metadata classes, and its non-tensor items load with ``weights_only=True``. The
  digests cannot help here (whoever writes the file writes them too), so a file that holds
  anything else is refused, naming the file and why, and the previous checkpoint is used.
- Metrics: a torn last line (a kill mid-write) is skipped when the history is reloaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

MAGIC = b"LONGALIGN-CKPT-1\n"
# the settings that decide which data a step sees: a resume under other values would train on
# other batches while its metrics look continuous
DATA_ORDER_KEYS = ("preset", "data", "seed", "strategy", "objective", "world_size", "grad_accum", "batch_size",
                   "window", "num_samples", "num_rejected", "loss_weighting", "sp", "cp", "processes",
                   "shared_prefix", "fill_rows")


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
    return safe_torch_load(io.BytesIO(payload), path, device)


def safe_torch_load(stream, where: str, device=None):
    """``torch.load(weights_only=True)``: tensors and plain Python values only; anything else is a
    CheckpointError naming `where`, raised before any of it is built."""
    try:
        return torch.load(stream, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason
                      else "")
        raise CheckpointError(f"{where}: holds objects other than tensors and plain Python values ({detail.strip()}); "
                              f"refused, since unpickling them could run code") from None


def load_latest(path: str, load_one: Callable[[str], object], log, exists_fn=os.path.exists):
    """(state, file) of the newest checkpoint that verifies: `path`, else `path`.prev; None if
    neither exists; CheckpointError if some exist and none verifies. `load_one(file)` loads one
    (raising CheckpointError); for sharded checkpoints every rank calls this together."""
    errors = []
    for candidate in (path, path + ".prev"):
        if not exists_fn(candidate):
            continue
        try:
            return load_one(candidate), candidate
        except CheckpointError as e:
            log(f"checkpoint: {e}; trying the previous one")
            errors.append(str(e))
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def exists(path: str) -> bool:
    return any(os.path.exists(p) for p in (path, path + ".prev"))


# ----------------------------------------------------------------------------- sharded (FSDP)

MANIFEST, STATE = "manifest.json", "state.json"
# what DCP's .metadata pickle may name (torch 2.4-2.13): its own dataclasses, torch.Size, dtypes,
# layouts and the checkpoint's path; nothing that can run code
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "torch": {"Size"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where = where

    def find_class(self, module, name):
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where}: names {module}.{name}, which DCP metadata never holds; refused, since "
                              f"unpickling it could run code")


def _safe_dcp_classes():
    """(reader, planner) classes that load DCP directories without unpickling arbitrary objects."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f, str(path)).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                    raise CheckpointError(f"{path}: not readable DCP metadata ({type(e).__name__}: {e})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = safe_torch_load(value, f"{read_item.dest_index.fqn} (a non-tensor item of the checkpoint)")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafePlanner


def _rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather(obj) -> list:
    """Every rank's `obj` (small: digests, error strings), in rank order."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_sharded(tensors: dict, extra: dict, path: str) -> None:
    """Write `tensors` (a state dict of DTensors / tensors, e.g. from ``get_state_dict``) as a DCP
    directory at `path`, every rank its own shard, and `extra` (plain JSON values) beside it.
    All ranks call it. Atomic: written to `path`.tmp, then renamed; the previous kept as .prev."""
    import torch.distributed.checkpoint as dcp

    rank, _ = _rank_world()
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):  # a write a kill interrupted
        shutil.rmtree(tmp)
    _barrier()
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    mine = {f: file_sha256(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f.startswith(f"__{rank}_")}
    digests = {}
    for part in _all_gather(mine):
        digests.update(part)
    if rank == 0:
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(extra, f)
        for name in (".metadata", STATE):
            digests[name] = file_sha256(os.path.join(tmp, name))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(dict(files=digests), f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            if os.path.exists(path + ".prev"):
                shutil.rmtree(path + ".prev")
            os.replace(path, path + ".prev")
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _barrier()


def load_sharded(path: str, tensors: dict) -> dict:
    """Verify the DCP directory `path` (every rank checks its share of the manifest's files; all
    ranks agree), load it into `tensors` in place (resharded to this job's ranks by DCP) and
    return the `extra` saved with it. CheckpointError, on every rank, if anything is wrong."""
    import torch.distributed.checkpoint as dcp

    rank, world = _rank_world()
    problem = None
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict) or ".metadata" not in files or STATE not in files:
            raise ValueError("the manifest lists no .metadata or state")
        for i, name in enumerate(sorted(files)):
            if i % world == rank and (not os.path.isfile(os.path.join(path, name)) or
                                      file_sha256(os.path.join(path, name)) != files[name]):
                problem = f"{os.path.join(path, name)}: missing or checksum mismatch, the checkpoint is corrupted"
                break
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{path}: no readable manifest ({type(e).__name__}: {e})"
    problems = [p for p in _all_gather(problem) if p]
    if problems:
        raise CheckpointError(problems[0])
    reader, planner = _safe_dcp_classes()
    try:
        dcp.load(tensors, storage_reader=reader(path), planner=planner())
    except CheckpointError:
        raise
    except (Exception, dcp.api.CheckpointException) as e:  # the latter (a BaseException) wraps each rank's error
        inner = [exc for exc, _ in getattr(e, "failures", {}).values()] or [e]
        ours = [str(exc) for exc in inner if isinstance(exc, CheckpointError)]
        raise CheckpointError(ours[0] if ours else f"{path}: cannot be loaded ({type(inner[0]).__name__}: "
                              f"{inner[0]})") from None
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


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


# ----------------------------------------------------------------------------- a training run's state


def metrics_rows(path: str) -> int:
    """The rows of metrics.jsonl at `path` (0 where there is none)."""
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def run_has_checkpoint(out: str) -> bool:
    """A checkpoint of either kind (TrainingState's file or sharded folder) is in run directory `out`."""
    return any(exists(os.path.join(out, name)) for name in (TrainingState.FILE, TrainingState.FOLDER))


class TrainingState:
    """The checkpoint of a run in `out`: model, optimizer, scheduler, step and config. `sharded`
    (FSDP): a DCP directory ``ckpt.dcp`` written by every rank; otherwise one file ``ckpt.pt``
    written by rank 0. Every rank calls :meth:`save` and :meth:`resume`."""

    FILE, FOLDER = "ckpt.pt", "ckpt.dcp"

    def __init__(self, out: str, model, optimizer, scheduler, config: dict, *, sharded: bool):
        self.model, self.optimizer, self.scheduler, self.config, self.sharded = model, optimizer, scheduler, config, \
            sharded
        self.file, self.folder = os.path.join(out, self.FILE), os.path.join(out, self.FOLDER)
        self.path = self.folder if sharded else self.file

    def exists(self) -> bool:
        return exists(self.file) or exists(self.folder)

    def _tensors(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # this rank's shards (DTensors)
        return dict(model=model_sd, optimizer=optim_sd)

    def save(self, step: int) -> None:
        extra = dict(step=step, config=self.config, scheduler=self.scheduler.state_dict())
        if self.sharded:
            save_sharded(self._tensors(), extra, self.folder)
        elif _rank_world()[0] == 0:
            save(dict(extra, model=self.model.state_dict(), optimizer=self.optimizer.state_dict()), self.file)

    def resume(self, max_steps: int, log) -> Tuple[int, str]:
        """Load the newest checkpoint that verifies into the model, optimizer and scheduler;
        (its step, its path). CheckpointError when none can be used or it belongs to another run."""
        other = self.file if self.sharded else self.folder
        if not exists(self.path) and exists(other):  # the optimizer state is keyed differently
            raise CheckpointError(f"{other} was written {'without' if self.sharded else 'with'} --fsdp; resume it the "
                                  f"same way")
        if self.sharded:
            def load_one(folder):
                tensors = self._tensors()
                extra = load_sharded(folder, tensors)
                return dict(extra, tensors=tensors)
        else:
            def load_one(file):
                return load(file, next(self.model.parameters()).device)
        state, used = load_latest(self.path, load_one, log)
        check_resumable(state["config"], self.config, state["step"], max_steps, used)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["tensors"]["model"],
                           optim_state_dict=state["tensors"]["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["step"], used
