"""A memory-mapped token store for --objective pretrain: each JSONL source tokenised once into a
flat ``tokens.bin`` (uint32) and ``offsets.npy`` (int64, documents + 1), with ``meta.json``
holding the source's SHA-256, the tokenizer's identity and the tokens' checksum. Stores are
cached under a key of (source bytes, tokenizer) and reused by later runs; training reads a
document's tokens by index through ``numpy.memmap`` and the packer needs only the lengths, so
the host memory of a run does not grow with the data (nanoGPT's and Megatron's layout).

A store is written into a temporary directory and renamed into place, so a killed build leaves
nothing half-written; a store whose checksum no longer matches is refused and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, List, Optional

import numpy as np

from checkpoint import file_sha256
from records import BadRecords, _records

FORMAT = 1
DTYPE = np.uint32
_CHUNK = 1 << 20  # tokens buffered before a write


def tokenizer_identity(tok) -> Optional[str]:
    """SHA-256 of what decides the ids: the tokenizer's class, its serialised model (fast
    tokenizers) or vocabulary, and its special tokens. None without a tokenizer."""
    if tok is None:
        return None
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


class TokenStore:
    """One source's documents: ``len(store)`` documents, ``store.lengths`` (int64), and
    ``store[i]`` the i-th document's tokens (int64, read from the memory map)."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        self.tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=DTYPE, mode="r") \
            if self.meta["tokens"] else np.zeros(0, DTYPE)
        self.lengths = np.diff(np.asarray(self.offsets)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i, 0, int(self.lengths[i]))

    def read(self, i: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of document i, as int64 (only those pages are read)."""
        at = int(self.offsets[i]) + start
        return np.asarray(self.tokens[at:at + length], dtype=np.int64)

    def verify(self) -> bool:
        """The tokens and offsets still hash to the checksum written when the store was built."""
        return _store_checksum(self.folder) == self.meta["checksum"]


def _store_checksum(folder: str) -> str:
    h = hashlib.sha256()
    for name in ("offsets.npy", "tokens.bin"):
        h.update(file_sha256(os.path.join(folder, name)).encode())
    return h.hexdigest()


def _document_ids(rec, lineno: int, bad, tokenizer: Callable[[], object], state: dict) -> Optional[List[int]]:
    """A record's token ids, or None (reported to `bad`)."""
    if not isinstance(rec, dict) or not ("text" in rec or "input_ids" in rec):
        bad(lineno, "text", "missing: a document is {\"text\": str} or {\"input_ids\": [int, ...]}")
        return None
    if "input_ids" in rec:
        ids = rec["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < 2 ** 32 for t in ids):
            bad(lineno, "input_ids", "must be a non-empty list of non-negative ints (below 2**32)")
            return None
        return ids
    text = rec["text"]
    if not isinstance(text, str) or not text:
        bad(lineno, "text", "must be a non-empty string")
        return None
    tok = state.get("tok") or state.setdefault("tok", tokenizer())
    ids = list(tok(text)["input_ids"])
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    return ids


def build(path: str, folder: str, tokenizer: Callable[[], object], skip_bad: bool, log, meta: dict) -> None:
    """Tokenise `path` record by record into `folder` (written in a temporary directory beside it
    and renamed into place), never holding more than one chunk of tokens in memory."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        bad, state, offsets, buffer, count = BadRecords(path, skip_bad, log), {}, [0], [], 0
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for lineno, rec in _records(path, bad):
                ids = _document_ids(rec, lineno, bad, tokenizer, state)
                if ids is None:
                    continue
                buffer.append(np.asarray(ids, dtype=DTYPE))
                count += len(ids)
                offsets.append(count)
                if sum(map(len, buffer)) >= _CHUNK:
                    np.concatenate(buffer).tofile(out)
                    buffer = []
            if buffer:
                np.concatenate(buffer).tofile(out)
        bad.summary(len(offsets) - 1)
        if len(offsets) == 1:
            raise SystemExit(f"data: no usable record in {path}")
        np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
        # the tokenizer is part of the store only if a text record needed it
        meta = dict(meta, format=FORMAT, documents=len(offsets) - 1, tokens=count, skipped=bad.count,
                    tokenizer=tokenizer_identity(state.get("tok")), checksum=_store_checksum(tmp))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):  # a refused (corrupt) store: replaced
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def open_store(path: str, cache: str, tokenizer: Callable[[], object], skip_bad: bool, log, is_builder: bool = True,
               wait: Callable[[], None] = lambda: None) -> TokenStore:
    """The store of `path` under `cache` (a folder keyed by the source's bytes): reused when its
    checksum holds and, if text records were tokenised into it, the tokenizer is the same one
    (`tokenizer` is then called to compare; pre-tokenised data never needs one); built
    otherwise. Under torchrun, rank 0 builds (`is_builder`) and every rank opens it after
    `wait` (a barrier)."""
    source = file_sha256(path)
    key = hashlib.sha256(f"{FORMAT}\n{source}\n{skip_bad}".encode()).hexdigest()[:24]
    folder = os.path.join(cache, f"{os.path.basename(path)}-{key}")
    if is_builder:
        why = "tokenising into"
        if os.path.exists(os.path.join(folder, "meta.json")):
            store = TokenStore(folder)
            if not store.verify():
                why = "its token store fails its checksum; tokenised again into"
            elif store.meta["tokenizer"] is not None and store.meta["tokenizer"] != tokenizer_identity(tokenizer()):
                why = "its token store was made by another tokenizer; tokenised again into"
            else:
                why = None
                log(f"data: {path}: token store reused ({folder})")
        if why:
            log(f"data: {path}: {why} {folder}")
            build(path, folder, tokenizer, skip_bad, log, dict(source=os.path.abspath(path), source_sha256=source))
    wait()
    return TokenStore(folder)
