"""The user's JSONL files to token ids: chat records for SFT, preference records (TRL's format)
for the preference objectives. Both go through the tokenizer's chat template.

A bad record stops the run before training with its line number and the field at fault, unless
``skip_bad`` is set: then it is skipped and counted in the log. Nothing is silently dropped.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, List, Optional

import numpy as np

from longalign_ops.preference import RecordError, _common_prefix, tokenize_record


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"no usable tokenizer in {path} (pass --tokenizer DIR): {str(e).splitlines()[0]}") from None


def optional_tokenizer(path: str):
    """The tokenizer in `path`, or None where it holds none (a weights-only checkpoint directory):
    pre-tokenised records need none, and a text record then says it needs --tokenizer."""
    try:
        return load_tokenizer(path)
    except SystemExit:
        return None


def _lines(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def saved_dataset(path: str, split: Optional[str] = None):
    """The rows (dicts) of a directory written by datasets' ``save_to_disk``: a Dataset, or a
    DatasetDict's `split` (default "train"). Anything else is refused in one line."""
    if not any(os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")):
        raise SystemExit(f"--data {path}: a directory, but not one that datasets' save_to_disk wrote (no "
                         f"dataset_info.json or dataset_dict.json); --data takes a JSONL file or such a directory")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise SystemExit(f"--data {path}: reading a saved dataset needs the datasets package (pip install "
                         f"datasets)") from None
    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        split = split or "train"
        if split not in ds:
            raise SystemExit(f"--data-split {split}: {path} holds the splits {', '.join(ds)}")
        return ds[split]
    if split:
        raise SystemExit(f"--data-split {split}: {path} holds one dataset, without splits")
    return ds


def _records(path: str, bad, split: Optional[str] = None):
    """(record number, parsed record) of --data: each non-empty line of a JSONL file (a line that
    is not JSON goes to `bad`), or each row of a saved dataset directory (numbered from 1)."""
    if os.path.isdir(path):
        yield from enumerate(saved_dataset(path, split), 1)
        return
    for lineno, line in _lines(path):
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            bad(lineno, "<record>", f"not JSON ({e.msg})")


class BadRecords:
    """Collects bad records: raises at the first one (the default) or counts and logs them."""

    def __init__(self, path: str, skip: bool, log: Callable[[str], None]):
        self.path, self.skip, self.log, self.count = path, skip, log, 0

    def __call__(self, lineno: int, field: str, message: str):
        text = f"{self.path}:{lineno}: field {field!r}: {message}"
        if not self.skip:
            raise SystemExit(f"data: {text} (fix the record, or pass --skip-bad-records to skip such records)")
        self.count += 1
        if self.count <= 20:
            self.log(f"data: record skipped: {text}")

    def summary(self, kept: int):
        if self.count:
            self.log(f"data: {self.count} bad records skipped, {kept} kept")


def _chat_ids(tok, messages) -> tuple:
    """(ids, is_target) of a conversation: the assistant turns, as the chat template renders
    them (each turn from where the generation prompt ends to the end of the turn), are targets."""
    def render(msgs, gen):
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ids = render(messages, False)
    target = np.zeros(len(ids), bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # the turn starts where the rendering with a generation prompt leaves the whole one
        start = _common_prefix(render(messages[:i], True), ids)
        end = len(render(messages[:i + 1], False))
        target[start:end] = True
    return ids, target


def _plain_chat_ids(tok, messages) -> tuple:
    """No chat template: each turn as "<|role|>\\ncontent\\n" (said in the log)."""
    ids, target = [tok.bos_token_id or 0], [False]
    for m in messages:
        piece = tok.encode(f"<|{m['role']}|>\n{m['content']}\n", add_special_tokens=False)
        ids += piece
        target += [m["role"] == "assistant"] * len(piece)
    return ids, np.array(target)


def read_chat_jsonl(path: str, tok, window: int, skip_bad: bool, log, split: Optional[str] = None) -> List[dict]:
    """{"messages": [{"role", "content"}, ...]} records, or pre-tokenised {"input_ids", "labels"}
    records, as dict(ids, target) arrays. `tok` may be None when every record is pre-tokenised."""
    templated = bool(getattr(tok, "chat_template", None))
    if not templated and tok is not None:
        log("data: the tokenizer has no chat template; turns are written as '<|role|>\\ncontent\\n'")
    bad, samples = BadRecords(path, skip_bad, log), []
    for lineno, rec in _records(path, bad, split):
        pretokenised = isinstance(rec, dict) and "input_ids" in rec  # no tokenizer needed
        ids, target = _pretokenised(rec, lineno, bad) if pretokenised else \
            _chat_record(rec, lineno, bad, tok, templated)
        if ids is None:
            continue
        if len(ids) > window:
            bad(lineno, "messages" if "input_ids" not in rec else "input_ids",
                f"{len(ids)} tokens, longer than --window {window}")
            continue
        samples.append(dict(ids=np.asarray(ids, np.int64), target=np.asarray(target, bool)))
    bad.summary(len(samples))
    if not samples:
        raise SystemExit(f"--data {path}: no usable record")
    return samples


def _pretokenised(rec: dict, lineno: int, bad):
    """(ids, target mask) of a record {"input_ids": [...], "labels": [...]} (labels as in
    transformers, unshifted, -100 where a token is no target; all tokens targets without them)."""
    ids, labels = rec["input_ids"], rec.get("labels")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, int) and x >= 0 for x in ids):
        bad(lineno, "input_ids", "must be a non-empty list of non-negative token ids")
        return None, None
    if labels is None:
        return ids, [True] * len(ids)
    if not isinstance(labels, list) or len(labels) != len(ids) or not all(isinstance(x, int) for x in labels):
        bad(lineno, "labels", f"must be a list of {len(ids)} ints (-100 where a token is no target)")
        return None, None
    if all(x == -100 for x in labels[1:]):
        bad(lineno, "labels", "no target token (every label after the first is -100)")
        return None, None
    return ids, [x != -100 for x in labels]


def _chat_record(rec, lineno: int, bad, tok, templated: bool):
    """(ids, target mask) of a chat record {"messages": [...]}, through the tokenizer."""
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        bad(lineno, "messages", "missing or empty (a list of {role, content})")
        return None, None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in msgs):
        bad(lineno, "messages", "every message needs a string 'role' and 'content'")
        return None, None
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        bad(lineno, "messages", "no assistant message with content")
        return None, None
    if tok is None:
        bad(lineno, "messages", "text records need a tokenizer (pass --tokenizer DIR, or --model DIR with one)")
        return None, None
    return (_chat_ids if templated else _plain_chat_ids)(tok, msgs)


def _int_array(field: str, value, length: int = None) -> np.ndarray:
    """`value` (a list, or a saved dataset's list) as a 1-D int64 array; RecordError naming
    `field` where it is not one, or not `length` long."""
    arr = np.asarray(value) if isinstance(value, (list, np.ndarray)) else None
    if arr is None or arr.ndim != 1 or not len(arr) or not (np.issubdtype(arr.dtype, np.integer)
                                                            or arr.dtype == bool):
        raise RecordError(field, "must be a non-empty list of ints")
    if length is not None and len(arr) != length:
        raise RecordError(field, f"has {len(arr)} entries where the input_ids have {length}")
    return arr.astype(np.int64)


def labelled_sequence(rec: dict, name: str, turn: Optional[int] = None) -> dict:
    """One sequence of the seeds' tokenised records: ``<name>_input_ids`` with its
    ``_attention_mask`` (tokens at 0 are padding and dropped), ``_labels`` (transformers'
    unshifted labels, -100 where a token is no target) and optional ``_position_ids`` (used as
    given). `turn`: the entry of list-of-lists columns (LongPO's reference, one padded
    sequence a turn). Returns dict(input_ids, labels (shifted: label t is token t+1's),
    answer_len, [position_ids])."""
    def column(suffix, required=False):
        field = f"{name}_{suffix}"
        value = rec.get(field)
        if value is None:
            if required:
                raise RecordError(field, "missing (the tokenised format needs input_ids and labels per answer)")
            return field, None
        if turn is not None:
            value = value[turn] if isinstance(value, (list, np.ndarray)) and turn < len(value) else None
        return (f"{field}[{turn}]" if turn is not None else field), value

    field, ids = column("input_ids", True)
    ids = _int_array(field, ids)
    if ids.min() < 0:
        raise RecordError(field, "token ids must be >= 0")
    field, labels = column("labels", True)
    labels = _int_array(field, labels, len(ids))
    if ((labels < 0) & (labels != -100)).any():
        raise RecordError(field, "labels are token ids, or -100 where a token is no target")
    keep = np.ones(len(ids), bool)
    field, mask = column("attention_mask")
    if mask is not None:
        keep = _int_array(field, mask, len(ids)) != 0
    field, pos = column("position_ids")
    if pos is not None:
        pos = _int_array(field, pos, len(ids))
        if pos.min() < 0:
            raise RecordError(field, "position ids must be >= 0")
    ids, labels = ids[keep], labels[keep]
    if not (labels[1:] != -100).any():
        raise RecordError(f"{name}_labels", "no target token (every label after the first is -100)")
    shifted = np.full(len(ids), -100, np.int64)
    shifted[:-1] = labels[1:]
    first = int(np.flatnonzero(labels != -100)[0]) if (labels != -100).any() else len(ids)
    seq = dict(input_ids=ids, labels=shifted, answer_len=len(ids) - max(first, 1))
    if pos is not None:
        seq["position_ids"] = pos[keep]
    return seq


def _turns(rec: dict, name: str) -> int:
    """How many sequences a reference column holds: LongPO's list of lists (a turn each), or one."""
    ids = rec.get(f"{name}_input_ids")
    if isinstance(ids, (list, np.ndarray)) and len(ids) and isinstance(ids[0], (list, np.ndarray)):
        return len(ids)
    return 0


def is_labelled_record(rec) -> bool:
    """The seeds' tokenised preference records (LongPO's and LOGO's saved datasets): whole
    sequences with labels, no separate prompt (TRL's tokenised records have prompt_input_ids)."""
    return isinstance(rec, dict) and "chosen_input_ids" in rec and "prompt_input_ids" not in rec


def labelled_record(rec: dict) -> dict:
    """A LongPO or LOGO record as dict(sequences, ref_sequences). The answers: ``chosen``, then
    ``rejected`` (LongPO, TRL) or ``reject_1``, ``reject_2``, ... (LOGO, any count). The
    reference's sequences (LongPO: ``ref_chosen_*``, ``ref_rejected_*``, one per turn, each turn
    over its own short context) carry the answer they score (``answer``); their log-probs are
    summed per answer, as LongPO's trainer does. None where the record has no reference columns."""
    rejected = ["rejected"] if "rejected_input_ids" in rec else \
        sorted((k[:-len("_input_ids")] for k in rec if re.fullmatch(r"reject_\d+_input_ids", k)),
               key=lambda k: int(k.split("_")[1]))
    if not rejected:
        raise RecordError("rejected_input_ids", "missing (the tokenised format needs rejected_* or reject_1_*, "
                                                "reject_2_*, ... beside chosen_*)")
    names = ["chosen"] + rejected
    sequences = [labelled_sequence(rec, n) for n in names]
    ref = None
    if any(f"ref_{n}_input_ids" in rec for n in names):
        ref = []
        for a, n in enumerate(names):
            turns = _turns(rec, f"ref_{n}")
            for t in range(turns) if turns else [None]:
                ref.append(dict(labelled_sequence(rec, f"ref_{n}", t), answer=a))
    return dict(sequences=sequences, ref_sequences=ref)


def read_preference_jsonl(path: str, tok, skip_bad: bool, log, num_rejected: Optional[int] = None,
                          split: Optional[str] = None) -> List[dict]:
    """TRL-format preference records (see longalign_ops.preference) as dict(prompt, answers,
    short_prompt) arrays, and the seeds' tokenised records (LongPO's, LOGO's: labelled_record) as
    dict(sequences, ref_sequences), from JSONL or a saved dataset directory. Every record needs the same
    number of rejected answers (the run's `num_rejected`, or the first record's)."""
    bad, samples, templated = BadRecords(path, skip_bad, log), [], None
    for lineno, rec in _records(path, bad, split):
        try:
            if not isinstance(rec, dict):
                raise RecordError("<record>", "must be a JSON object")
            ex = labelled_record(rec) if is_labelled_record(rec) else tokenize_record(rec, tok)
        except RecordError as e:
            bad(lineno, e.field, str(e).split(": ", 1)[1])
            continue
        if "sequences" in ex:  # the seeds' tokenised records: their sequences as given
            ex["answers"] = ex["sequences"]
        rejected = len(ex["answers"]) - 1
        if num_rejected is None:
            num_rejected = rejected
        if rejected != num_rejected:
            bad(lineno, "rejected", f"{rejected} rejected answers where the run uses {num_rejected} "
                                    f"(every record of a run needs the same number; see --num-rejected)")
            continue
        if "sequences" in ex:
            samples.append(dict(sequences=ex["sequences"], ref_sequences=ex["ref_sequences"]))
            continue
        templated = ex["uses_chat_template"] if templated is None else templated
        samples.append(dict(prompt=np.asarray(ex["prompt_ids"], np.int64),
                            answers=[np.asarray(a, np.int64) for a in ex["answers"]],
                            short_prompt=None if ex["short_prompt_ids"] is None
                            else np.asarray(ex["short_prompt_ids"], np.int64)))
    if templated is False:
        log("data: the tokenizer has no chat template; text records are tokenised as prompt, then prompt + "
            "answer + EOS (TRL's rule)")
    bad.summary(len(samples))
    if not samples:
        raise SystemExit(f"--data {path}: no usable record")
    return samples

