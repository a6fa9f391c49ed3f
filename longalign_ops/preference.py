"""Preference data for packed training: TRL's record format to token ids, and a collator that
packs each prompt with all of its answers into one row.

Records (one JSON object per line), with TRL's names:
- text: ``prompt``, ``chosen``, ``rejected``, each a string or a list of chat messages;
  ``rejected`` may be a list of several (LOGO's negatives); LongPO adds ``short_prompt``, the short
  context the answers were generated from, which the reference model reads.
- pre-tokenised: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (a list of
  lists for several) and ``short_prompt_input_ids``, used as they are.

Text goes through the tokenizer's chat template, as TRL's DPOTrainer does: the prompt rendered
with the generation prompt, prompt + answer rendered whole, the answer taken from where the two
diverge. A tokenizer without a chat template gets TRL's plain-text rule (prompt, then prompt +
answer + EOS), which :func:`tokenize_record` reports through ``uses_chat_template``.

    ex = tokenize_record(record, tokenizer)          # prompt_ids, answers (chosen first), short_prompt_ids
    inputs = PreferenceCollator(device="cuda")([ex, ...])
    logps = la.sequence_logprobs(hidden[0], lm_head.weight, inputs["shift_labels"][0], inputs["packed_batch"])
    logps.view(-1, 1 + M)                            # chosen, then the M rejected answers of each prompt
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .data import PackedCollator


class RecordError(ValueError):
    """A bad preference record: `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _token_list(field: str, value) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RecordError(field, "must be a list of token ids (ints)")
    if any(t < 0 for t in value):
        raise RecordError(field, "token ids must be >= 0")
    return list(value)


def _several(field: str, value, is_one) -> list:
    """`value` as a list of answers: one answer, or a list of several."""
    if is_one(value):
        return [value]
    if isinstance(value, list) and value and all(is_one(v) for v in value):
        return list(value)
    raise RecordError(field, "must be one answer or a non-empty list of answers")


def _check_messages(field: str, messages) -> list:
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(field, "every message needs a string 'role' and 'content'")
    return messages


def _encode(tokenizer, **kwargs) -> List[int]:
    out = tokenizer.apply_chat_template(tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _render(tokenizer, prompt, answers: list, field: str):
    """(prompt ids, [answer ids]) of a text prompt and its text / message answers."""
    if getattr(tokenizer, "chat_template", None):
        prompt_msgs = [dict(role="user", content=prompt)] if isinstance(prompt, str) else _check_messages(field, prompt)
        prompt_ids = _encode(tokenizer, conversation=prompt_msgs, add_generation_prompt=True)
        fulls = [_encode(tokenizer, conversation=prompt_msgs + (
            [dict(role="assistant", content=a)] if isinstance(a, str) else _check_messages("chosen/rejected", a)))
            for a in answers]
    else:
        if not isinstance(prompt, str) or not all(isinstance(a, str) for a in answers):
            raise RecordError(field, "message lists need a tokenizer with a chat template")
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        eos = tokenizer.eos_token or ""
        fulls = [list(tokenizer(prompt + a + ("" if a.endswith(eos) else eos))["input_ids"]) for a in answers]
    # the answer starts where the prompt alone and prompt + answer diverge (as TRL: templates may
    # render a prompt's end differently once an answer follows)
    cut = min([len(prompt_ids)] + [_common_prefix(prompt_ids, f) for f in fulls])
    return prompt_ids[:cut], [f[cut:] for f in fulls]


def tokenize_record(record: dict, tokenizer=None) -> dict:
    """One preference record to ids: ``prompt_ids`` (list), ``answers`` (chosen first, then
    each rejected; lists of ids), ``short_prompt_ids`` (LongPO's, or None) and
    ``uses_chat_template``. Raises :class:`RecordError` naming the field at fault."""
    if not isinstance(record, dict):
        raise RecordError("<record>", f"must be a JSON object, got {type(record).__name__}")
    if "prompt_input_ids" in record or "chosen_input_ids" in record:
        for field in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            if field not in record:
                raise RecordError(field, "missing (pre-tokenised records need prompt, chosen and rejected ids)")
        prompt = _token_list("prompt_input_ids", record["prompt_input_ids"])
        chosen = _token_list("chosen_input_ids", record["chosen_input_ids"])
        rejected = [_token_list("rejected_input_ids", r) for r in _several(
            "rejected_input_ids", record["rejected_input_ids"],
            lambda v: isinstance(v, list) and all(isinstance(t, int) for t in v))]
        answers = [chosen] + rejected
        short = record.get("short_prompt_input_ids")
        short = None if short is None else _token_list("short_prompt_input_ids", short)
        uses_template = None
    else:
        for field in ("prompt", "chosen", "rejected"):
            if field not in record:
                raise RecordError(field, "missing")
        if tokenizer is None:
            raise RecordError("prompt", "text records need a tokenizer (pass --tokenizer, or --model with one)")
        prompt = record["prompt"]
        if not (isinstance(prompt, str) or _is_messages(prompt)):
            raise RecordError("prompt", "must be a string or a list of chat messages")
        is_answer = lambda v: isinstance(v, str) or _is_messages(v)  # noqa: E731
        if not is_answer(record["chosen"]):
            raise RecordError("chosen", "must be a string or a list of chat messages")
        rejected = _several("rejected", record["rejected"], is_answer)
        prompt_ids, answers = _render(tokenizer, prompt, [record["chosen"]] + rejected, "prompt")
        short = record.get("short_prompt")
        if short is not None:
            if not (isinstance(short, str) or _is_messages(short)):
                raise RecordError("short_prompt", "must be a string or a list of chat messages")
            short_ids, short_answers = _render(tokenizer, short, [record["chosen"]] + rejected, "short_prompt")
            if short_answers != answers:  # the reference must score the very tokens the policy scores
                raise RecordError("short_prompt", "its answers tokenise differently than after the long prompt")
            short = short_ids
        prompt, uses_template = prompt_ids, bool(getattr(tokenizer, "chat_template", None))
    for i, a in enumerate(answers):
        if not a:
            raise RecordError("chosen" if i == 0 else "rejected", "an answer has no tokens")
    return dict(prompt_ids=prompt, answers=answers, short_prompt_ids=short, uses_chat_template=uses_template)


def shared_prefix_tokens(prompt_len: int) -> int:
    """How many of a prompt's tokens a shared-prefix row stores once: all but the last, which
    starts each answer's branch (there it predicts that answer's first token)."""
    return max(int(prompt_len) - 1, 0)


def _answers_of(example: dict) -> List[list]:
    """An example's answers, chosen first: ``answers``, or TRL's tokenised columns ``chosen_ids``
    / ``rejected_ids`` (a list, or a list of lists for several)."""
    if "answers" in example:
        return list(example["answers"])
    rejected = example["rejected_ids"]
    rejected = rejected if rejected and isinstance(rejected[0], (list, tuple, np.ndarray)) else [rejected]
    return [example["chosen_ids"]] + list(rejected)


class PreferenceCollator:
    """Pack a batch of preference examples into one row: for each example, prompt + chosen, then
    prompt + each rejected answer, back to back; the answer tokens are the targets.

    Examples are dicts with ``prompt_ids`` and ``answers`` (from :func:`tokenize_record`) or
    TRL's ``chosen_ids`` / ``rejected_ids``; optional ``ref_logps`` (one per answer). Every
    example of a batch needs the same number of answers. ``reference=True`` packs the
    ``short_prompt_ids`` instead of the prompt (LongPO's reference). ``shared_prefix=True``
    (needs ``device``: only the batch description can express it) stores each prompt once, its
    answers as branches (:meth:`PackedBatch.from_prefix_groups`; the prompt's last token starts
    each branch); the log-probs are the same. Returns :class:`~longalign_ops.data.PackedCollator`'s
    keys (without ``cu_seq_lens_*`` for a shared-prefix row) plus ``num_answers`` (int),
    ``answer_tokens`` ``(B * num_answers,)`` and, when given, ``ref_logps`` ``(B, num_answers)``."""

    def __init__(self, device=None, *, reference: bool = False, shared_prefix: bool = False,
                 ignore_index: int = -100):
        if shared_prefix and device is None:
            raise ValueError("shared_prefix=True needs a device: a shared-prefix row is described by a PackedBatch, "
                             "which cu_seq_lens cannot express")
        self.pack = PackedCollator(device, ignore_index=ignore_index)
        self.reference, self.shared_prefix, self.ignore_index = reference, shared_prefix, ignore_index

    def __call__(self, examples: Sequence[dict]) -> dict:
        records, answer_records, groups, sizes = [], [], [], set()
        for i, ex in enumerate(examples):
            prompt = ex.get("short_prompt_ids") if self.reference else ex["prompt_ids"]
            if prompt is None:
                raise ValueError(f"example {i}: reference=True needs short_prompt_ids (LongPO's short prompt)")
            answers = _answers_of(ex)
            sizes.add(len(answers))
            prompt = [int(t) for t in prompt]
            # shared: the prompt's first len - 1 tokens once, each answer after the prompt's last token
            cut = shared_prefix_tokens(len(prompt)) if self.shared_prefix else 0
            if self.shared_prefix:
                records.append(dict(input_ids=prompt[:cut], labels=[self.ignore_index] * cut))
            head = prompt[cut:]
            for a in answers:
                a = [int(t) for t in a]
                answer_records.append(dict(input_ids=head + a, labels=[self.ignore_index] * len(head) + a))
                records.append(answer_records[-1])
            groups.append((cut, [len(head) + len(a) for a in answers]))
        if len(sizes) > 1:
            raise ValueError(f"every example of a batch needs the same number of answers, got {sorted(sizes)}")
        out = self.pack(records)
        if self.shared_prefix:  # the row's description replaces the segments' cu_seq_lens and positions
            batch = PackedBatch.from_prefix_groups(groups, device=out["input_ids"].device)
            out = {k: v for k, v in out.items() if not k.startswith(("cu_seq_lens", "max_length"))}
            out.update(packed_batch=batch, position_ids=batch.position_ids[None])
        out["num_answers"] = sizes.pop() if sizes else 0
        device = out["input_ids"].device
        out["answer_tokens"] = torch.tensor([sum(t != self.ignore_index for t in r["labels"][1:])
                                             for r in answer_records], dtype=torch.float32, device=device)
        if examples and all(ex.get("ref_logps") is not None for ex in examples):
            out["ref_logps"] = torch.tensor([list(ex["ref_logps"]) for ex in examples], dtype=torch.float32,
                                            device=device)
        return out


__all__ = ["PreferenceCollator", "RecordError", "shared_prefix_tokens", "tokenize_record"]
