"""MosaicML Streaming's MDS shards (ProLong's published data: ``index.json`` and ``shard.*.mds``,
each sample one full training row, ``input_ids`` and ``indices``, the (start, end) spans of the
documents packed into it), read without mosaicml-streaming, which pins huggingface-hub < 1 and so
cannot live beside transformers 5.

The layout (streaming's ``MDSWriter``; checked against shards it wrote, tests/test_mds.py):
``index.json`` lists the shards, each with its ``column_names``, ``column_encodings``,
``column_sizes`` (null for variable-size columns), ``samples`` and ``raw_data.basename`` (and
``zip_data`` / ``compression`` where the shard was compressed). A raw shard is: uint32 sample
count n; n + 1 uint32 byte offsets of the samples from the file's start; the samples. A sample
is a uint32 size per variable-size column, then every column's bytes in column order. An
``ndarray[:dtype[:shape]]`` column holds, where not fixed by its encoding, a dtype byte, then a
byte (ndim << 2 | shape dtype code) and the shape, then the values.

Shards are memory-mapped: a row's bytes are read when it is trained on, never a shard into
Python lists. A column encoded as ``pkl`` is refused by name: unpickling runs code from the file.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import numpy as np

# streaming's NDArray codes: a value dtype byte, and the shape's dtype in the low two bits
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
# fixed-size scalar encodings (a span column may be stored so, one sample per document)
_SCALARS = {"int": "int64", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
            "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64"}
COLUMNS = ("input_ids", "indices")


def is_mds_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "index.json"))


def _refuse(path: str, message: str):
    raise SystemExit(f"--data {path}: {message}")


def decode_ndarray(encoding: str, data) -> np.ndarray:
    """An MDS ``ndarray`` column's bytes (any of its four forms) as a numpy array (a view)."""
    args = encoding.split(":")[1:]
    dtype = args[0] if args else None
    shape = tuple(int(x) for x in args[1].split(",")) if len(args) > 1 else None
    at = 0
    if dtype is None:
        dtype = _VALUE_DTYPES[int(data[0])]
        at = 1
    if shape is None:
        code = int(data[at])
        ndim, shape_dtype = code >> 2, np.dtype(_SHAPE_DTYPES[code & 3])
        shape = tuple(int(x) for x in np.frombuffer(data, shape_dtype, ndim, at + 1))
        at += 1 + ndim * shape_dtype.itemsize
    return np.frombuffer(data, np.dtype(dtype), int(np.prod(shape)), at).reshape(shape)


def _decode(encoding: str, data) -> np.ndarray:
    if encoding == "ndarray" or encoding.startswith("ndarray:"):
        return decode_ndarray(encoding, data)
    if encoding == "json":
        return np.asarray(json.loads(bytes(data).decode("utf-8")), dtype=np.int64)
    if encoding in _SCALARS:
        return np.frombuffer(data, np.dtype(_SCALARS[encoding]), 1)
    raise ValueError(encoding)


class Shard:
    """One raw shard, memory-mapped: ``len(shard)`` samples and ``shard.column(i, name)``."""

    def __init__(self, path: str, info: dict):
        self.names, self.encodings = info["column_names"], info["column_encodings"]
        self.sizes = info["column_sizes"]
        self.variable = [j for j, size in enumerate(self.sizes) if size is None]
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        n = int(self.data[:4].view(np.uint32)[0])
        self.offsets = self.data[4:8 + 4 * n].view(np.uint32)
        if n != info["samples"] or int(self.offsets[-1]) != len(self.data):
            raise ValueError(f"{os.path.basename(path)}: {n} samples and {int(self.offsets[-1])} bytes in its header, "
                             f"{info['samples']} samples in index.json and {len(self.data)} bytes on disk")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def column(self, i: int, name: str) -> np.ndarray:
        sample = self.data[int(self.offsets[i]):int(self.offsets[i + 1])]
        sizes = list(self.sizes)
        if self.variable:
            for k, size in zip(self.variable, sample[:4 * len(self.variable)].view(np.uint32)):
                sizes[k] = int(size)
        j = self.names.index(name)
        start = 4 * len(self.variable) + sum(sizes[:j])
        return _decode(self.encodings[j], sample[start:start + sizes[j]])


class MDSRows:
    """--data DIR of MDS shards as --objective pretrain's rows: ``lengths`` (tokens per row, from
    each sample's header, no token read), ``read(i, start, length)`` a row's tokens, and
    ``spans(i)`` its documents' (start, end) (the whole row where a sample has no ``indices``)."""

    def __init__(self, path: str):
        try:
            with open(os.path.join(path, "index.json")) as f:
                index = json.load(f)
            shards = index["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _refuse(path, f"index.json is not an MDS index ({e})")
        self.path, self.shards, where = path, [], []
        for s, info in enumerate(shards):
            if info.get("format") != "mds":
                _refuse(path, f"shard {s} is in format {info.get('format')!r}; --data reads MDS shards (format 'mds')")
            names, encodings = info.get("column_names", []), info.get("column_encodings", [])
            if "input_ids" not in names:
                _refuse(path, f"its shards have no input_ids column (columns: {', '.join(names)})")
            for name, enc in zip(names, encodings):
                if name in COLUMNS and enc == "pkl":
                    _refuse(path, f"column {name!r} is encoded as pkl (pickle): reading it would run code stored in "
                                  f"the file, so it is refused; write the shards with an ndarray encoding")
                if name in COLUMNS and not (enc in ("ndarray", "json") or enc.startswith("ndarray:") or enc in _SCALARS):
                    _refuse(path, f"column {name!r} is encoded as {enc!r}; --data reads ndarray, json or int columns")
            raw = os.path.join(path, info["raw_data"]["basename"])
            if not os.path.exists(raw):
                zipped = (info.get("zip_data") or {}).get("basename")
                _refuse(path, f"shard {info['raw_data']['basename']} is missing" + (
                    f" (only its compressed {zipped} ({info.get('compression')}) is there: decompress the shards "
                    f"first, e.g. zstd -d, as streaming does when it reads them)" if zipped else ""))
            try:
                shard = Shard(raw, info)
            except ValueError as e:
                _refuse(path, str(e))
            self.shards.append(shard)
            where.append(np.stack([np.full(len(shard), s), np.arange(len(shard))], 1))
        self.where = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
        self.lengths = np.array([self._length(s, i) for s, i in self.where], dtype=np.int64)

    def _length(self, s: int, i: int) -> int:
        return int(self.shards[s].column(i, "input_ids").size)

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int, start: int, length: int) -> np.ndarray:
        s, j = self.where[i]
        return np.asarray(self.shards[s].column(int(j), "input_ids").reshape(-1)[start:start + length], np.int64)

    def spans(self, i: int) -> List[Tuple[int, int]]:
        """Row i's documents as (start, end), in order, covering the row: ``indices`` as given
        (ProLong's), any tokens between them their own document; the whole row without it."""
        s, j = self.where[i]
        n = int(self.lengths[i])
        shard = self.shards[s]
        if "indices" not in shard.names:
            return [(0, n)]
        spans = np.asarray(shard.column(int(j), "indices"), np.int64).reshape(-1, 2)
        out, at = [], 0
        for a, b in spans.tolist():
            if not (at <= a < b <= n):
                _refuse(self.path, f"row {i}: indices ({a}, {b}) are not increasing spans inside its {n} tokens")
            if a > at:
                out.append((at, a))
            out.append((a, b))
            at = b
        if at < n:
            out.append((at, n))
        return out
