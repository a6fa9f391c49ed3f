"""What a run trains on, as units: the embedded long-context task, the user's chat and
preference JSONL (records.py), raw documents from token stores (token_store.py); a unit is a
sequence (SFT, pretrain) or a prompt's group of answer sequences (preference objectives).
"""
from __future__ import annotations

import math
import os
from typing import List

import numpy as np
import torch.distributed as dist

import mds
import records
import token_store
from config import Config, PRESETS, as_list, data_sources
from longalign_ops.losses import NEEDS_REFERENCE
from longalign_ops.preference import shared_prefix_tokens


PAD, BOS, EOS, SEP, QUERY, ANSWER = 0, 1, 2, 3, 4, 5


FIRST_KEY = 16


def retrieval_sample(rng, n_pairs: int, vocab: int):
    """Key-value retrieval: BOS (k v1 v2 SEP)*n QUERY k* ANSWER v1* v2* EOS; the answer (v1*,
    v2*, EOS) is the only target. Needs attention across the whole context, so long samples
    teach long-range retrieval."""
    n_keys = (vocab - FIRST_KEY) // 3
    keys = rng.choice(n_keys, size=n_pairs, replace=False) + FIRST_KEY
    values = rng.integers(FIRST_KEY + n_keys, vocab, size=(n_pairs, 2))
    q = int(rng.integers(n_pairs))
    body = np.stack([keys, values[:, 0], values[:, 1], np.full(n_pairs, SEP)], 1).reshape(-1)
    prompt = np.concatenate([[BOS], body, [QUERY, keys[q], ANSWER]])
    return prompt, values, q


def embedded_dataset(cfg: Config, rng) -> List[dict]:
    """LongAlign-like length mix: 85% short (log-normal), 15% spread evenly up to the window."""
    p = PRESETS[cfg.preset]
    max_pairs = (cfg.window - 8) // 4
    samples = []
    for _ in range(cfg.num_samples):
        if rng.random() < 0.15:
            n_pairs = int(rng.integers(max(1, max_pairs // 4), max_pairs + 1))
        else:
            n_pairs = int(np.clip(rng.lognormal(math.log(p["short_len"] / 4), 0.6), 1, max_pairs))
        n_pairs = min(n_pairs, (p["vocab_size"] - FIRST_KEY) // 3)
        prompt, values, q = retrieval_sample(rng, n_pairs, p["vocab_size"])
        answers = [np.concatenate([values[q], [EOS]])]
        wrong = [j for j in range(n_pairs) if j != q]
        for j in rng.permutation(wrong)[: cfg.num_rejected] if wrong else []:
            answers.append(np.concatenate([values[j], [EOS]]))
        # LongPO's short context: the queried pair alone, then the same question
        short = np.concatenate([[BOS], prompt[1 + 4 * q:5 + 4 * q], prompt[-3:]])
        samples.append(dict(prompt=prompt, answers=answers, short_prompt=short))
    return samples


def tokenizer_path(cfg: Config) -> str:
    if not (cfg.tokenizer or cfg.model):
        raise SystemExit("--data needs a tokenizer: --tokenizer DIR, or --model DIR with one")
    return cfg.tokenizer or cfg.model


def jsonl_dataset(cfg: Config, log) -> List[dict]:
    """The user's records (train/records.py): chat records for sft, preference records otherwise.
    An explicit --tokenizer must load; --model's tokenizer is optional, since pre-tokenised
    records need none (a weights-only model directory), and a text record without one is refused
    naming --tokenizer."""
    tok = records.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else \
        records.optional_tokenizer(cfg.model) if cfg.model else None
    if cfg.objective == "sft":
        return records.read_chat_jsonl(cfg.data, tok, cfg.window, cfg.skip_bad_records, log, cfg.data_split)
    samples = records.read_preference_jsonl(cfg.data, tok, cfg.skip_bad_records, log, cfg.num_rejected,
                                            cfg.data_split)
    cfg.num_rejected = len(samples[0]["sequences"] if "sequences" in samples[0] else samples[0]["answers"]) - 1
    return samples


class DocumentPieces:
    """--objective pretrain's units without their tokens in memory: every source's documents (a
    memory-mapped token store each, or an MDS source's rows: mds.MDSRows), cut into pieces of at most --window tokens, each its own
    sequence (attention stays inside it) with every token a target (labels shifted within the
    piece). Arrays of (source, document, start, length) per piece; ``pieces[i]`` reads piece
    i's tokens from its store, ``lengths`` and ``sources`` are what the packer and the mix need."""

    def __init__(self, stores, window: int):
        self.stores, parts = stores, []
        for i, store in enumerate(stores):
            L = store.lengths
            n = -(-L // window)  # pieces per document (every document has a token)
            doc = np.repeat(np.arange(len(L)), n)
            start = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)) * window
            parts.append((np.full(len(doc), i), doc, start, np.minimum(window, L[doc] - start)))
        self.sources, self.documents, self.starts, self.lengths = (np.concatenate(a).astype(np.int64)
                                                                   for a in zip(*parts))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        """Piece i: one sequence (a dict), or, from an MDS source (ProLong's rows), the list of
        its documents' sequences (document masking, as ProLong trains); a document cut by the
        piece's bounds keeps its part."""
        return self.segment(i, 0, int(self.lengths[i]))

    def segment(self, i: int, at: int, length: int):
        """Tokens [at, at + length) of piece i, as __getitem__ gives a piece (--fill-rows cuts
        pieces at row ends)."""
        store, start = self.stores[self.sources[i]], int(self.starts[i]) + at
        ids = store.read(int(self.documents[i]), start, length)
        if not hasattr(store, "spans"):
            return _document_sequence(ids, int(self.sources[i]))
        return [_document_sequence(ids[max(a, start) - start:min(b, start + length) - start], int(self.sources[i]))
                for a, b in store.spans(int(self.documents[i])) if a < start + length and b > start]


def _document_sequence(ids, source: int) -> dict:
    """A document's tokens as a sequence, every token a target (labels shifted within it)."""
    labels = np.full(len(ids), -100, np.int64)
    labels[:-1] = ids[1:]
    return dict(input_ids=ids, labels=labels, source=source)


def document_pieces(cfg: Config, log) -> DocumentPieces:
    """Every --data source's token store (token_store.py: built once, then reused from
    --token-cache), cut into --window pieces; the counts logged per source."""
    loaded = {}

    def get_tok():  # only text records need one
        if "tok" not in loaded:
            loaded["tok"] = records.load_tokenizer(tokenizer_path(cfg))
        return loaded["tok"]

    cache = cfg.token_cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "longalign_ops", "tokens")
    distributed = dist.is_available() and dist.is_initialized()
    stores = [mds.MDSRows(path) if mds.is_mds_dir(path) else  # ProLong's rows: read in place
              token_store.open_store(path, cache, get_tok, cfg.skip_bad_records, log,
                                     is_builder=not distributed or dist.get_rank() == 0,
                                     wait=dist.barrier if distributed else lambda: None)
              for path, _ in data_sources(as_list(cfg.data))]
    pieces = DocumentPieces(stores, cfg.window)
    for i, ((path, weight), store) in enumerate(zip(data_sources(as_list(cfg.data)), stores)):
        long_docs = int((store.lengths > cfg.window).sum())
        if isinstance(store, mds.MDSRows):
            log(f"data: {path}: {len(store)} MDS rows, {int(store.lengths.sum())} tokens, weight {weight:.3f}; each row "
                f"a unit, its documents (indices) its sequences; {long_docs} rows longer than --window {cfg.window} "
                f"cut into {int((pieces.sources == i).sum())} pieces")
            continue
        log(f"data: {path}: {len(store)} documents, {int(store.lengths.sum())} tokens, weight {weight:.3f}; "
            f"{long_docs} longer than --window {cfg.window} split into row-sized pieces "
            f"({int((pieces.sources == i).sum())} sequences)")
    return pieces


def sft_sequences(samples) -> List[dict]:
    """(input_ids, labels) per sequence; labels already shifted: label t is token t+1 when that
    token is a target, else -100."""
    seqs = []
    for s in samples:
        if "ids" in s:
            ids, target = s["ids"], s["target"]
        else:
            ids = np.concatenate([s["prompt"], s["answers"][0]])
            target = np.concatenate([np.zeros(len(s["prompt"]), bool), np.ones(len(s["answers"][0]), bool)])
        labels = np.full(len(ids), -100, np.int64)
        labels[:-1] = np.where(target[1:], ids[1:], -100)
        seqs.append(dict(input_ids=ids.astype(np.int64), labels=labels))
    return seqs


def answer_sequence(prompt, answer) -> dict:
    """prompt + answer, the answer tokens the (shifted) targets."""
    ids = np.concatenate([prompt, answer]).astype(np.int64)
    labels = np.full(len(ids), -100, np.int64)
    labels[len(prompt) - 1:-1] = answer
    return dict(input_ids=ids, labels=labels, answer_len=len(answer), prompt_len=len(prompt))


def preference_groups(samples, num_rejected: int, short: bool = False) -> List[List[dict]]:
    """One group per prompt: prompt + chosen answer, then prompt + each rejected answer, packed
    together. `short`: the groups LongPO's reference reads (the short prompt). The embedded task's
    prompts with fewer than `num_rejected` wrong answers are left out."""
    groups = []
    for s in samples:
        if "sequences" in s:  # the seeds' tokenised records: their sequences, as given
            seqs = s["ref_sequences"] if short else s["sequences"]
            if seqs is None:
                raise SystemExit("--objective longpo needs the reference's sequences in every record: ref_chosen_* "
                                 "and ref_rejected_* (LongPO's tokenised format), or a short_prompt")
            groups.append([dict(q) for q in seqs])
            continue
        prompt = s["short_prompt"] if short else s["prompt"]
        if prompt is None:
            raise SystemExit("--objective longpo needs a short_prompt (or short_prompt_input_ids) in every record")
        group = [answer_sequence(prompt, ans) for ans in s["answers"][:1 + num_rejected]]
        if len(group) == 1 + num_rejected:
            groups.append(group)
    return groups


def shared_prompt_len(group) -> int:
    """The prompt a group of given sequences shares, as a shared-prefix row needs it: every token
    before the chosen answer's first target is the same in each sequence (with its position id,
    where given) and every token from there on is a target (the answer). 0 where the group
    does not have that shape (a multi-turn conversation, branches with their own positions)."""
    first = [int(np.flatnonzero(s["labels"] != -100)[0]) + 1 for s in group]  # the first answer token
    p = first[0]
    if any(f != p for f in first):
        return 0
    for s in group:
        answer = s["labels"][p - 1:-1]
        if (answer == -100).any() or (answer != s["input_ids"][p:]).any() or len(s["input_ids"]) <= p:
            return 0
        if (s["input_ids"][:p] != group[0]["input_ids"][:p]).any():
            return 0
        if ("position_ids" in s) != ("position_ids" in group[0]) or \
                ("position_ids" in s and (s["position_ids"][:p] != group[0]["position_ids"][:p]).any()):
            return 0
    return p


def share_given_prompts(cfg: Config, units, log) -> None:
    """--shared-prefix over the seeds' tokenised records: each group's sequences get their shared
    prompt's length (prompt_len) where every group has one; otherwise the run trains unshared
    and the log says why (it is exact either way, only the prompt is computed once per answer)."""
    if not cfg.shared_prefix or not units or "prompt_len" in units[0][0]:
        return
    lens = [shared_prompt_len(group) for group in units]
    if min(lens) == 0:
        cfg.shared_prefix = False
        log(f"data: --shared-prefix off: {lens.count(0)} of {len(units)} records' answers do not follow one "
            f"shared prompt (multi-turn conversations, or branches with their own position ids)")
        return
    for p, group in zip(lens, units):
        for s in group:
            s["prompt_len"] = p


def answer_slots(units, idx):
    """(unit row, answer column) of each sequence of units `idx`, in sequences_of's order: a
    reference table's cell. A sequence's ``answer`` says which answer it scores (LongPO's
    reference has one sequence per turn and answer); otherwise its place in the group."""
    rows, cols = [], []
    for k, i in enumerate(idx):
        for j, s in enumerate(units[i]):
            rows.append(k)
            cols.append(s.get("answer", j))
    return rows, cols


def load_units(cfg: Config, log):
    """(units, reference units): SFT sequences, or one group of sequences per prompt; LongPO's
    reference reads other sequences (the short prompt with the same answers)."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.objective == "pretrain":
        return document_pieces(cfg, log), None
    samples = jsonl_dataset(cfg, log) if cfg.data else embedded_dataset(cfg, rng)
    if cfg.objective == "sft":
        return sft_sequences(samples), None
    units = preference_groups(samples, cfg.num_rejected)
    ref_units = preference_groups(samples, cfg.num_rejected, short=cfg.objective == "longpo") \
        if cfg.objective in NEEDS_REFERENCE else None
    share_given_prompts(cfg, units, log)
    too_long = sum(n > cfg.window for n in unit_lengths(units, cfg.shared_prefix))
    if too_long == len(units):  # nothing would train: an epoch of empty steps, planned without end
        raise SystemExit(f"--window {cfg.window}: every one of the {len(units)} prompts with its answers is longer "
                         f"(a prompt and its answers share one row); raise --window")
    if too_long:  # the packer drops them (overlong="drop"): said here, with the count
        log(f"data: {too_long} of {len(units)} prompts with their answers exceed --window {cfg.window} tokens "
            f"and are left out (a prompt and its answers always share one row)")
    return units, ref_units


def sequences_of(units, idx) -> List[dict]:
    """The sequences of units `idx`: an SFT unit is one sequence, a LOGO unit a group of them."""
    out = []
    for i in idx:  # a (unit, start, length) entry is a segment of a piece (--fill-rows)
        unit = units.segment(*i) if isinstance(i, tuple) else units[i]
        out += unit if isinstance(unit, list) else [unit]
    return out


def drawn_tokens(units, plan_steps):
    """(source, tokens) of every entry of an optimizer step's plan steps (pretrain): what each
    --data source gave the step."""
    entries = [e for ps in plan_steps for pack in ps for e in pack]
    sources = np.array([units.sources[e[0] if isinstance(e, tuple) else e] for e in entries], np.int64)
    tokens = np.array([e[2] if isinstance(e, tuple) else units.lengths[e] for e in entries], np.int64)
    return sources, tokens


def unit_lengths(units, shared_prefix: bool = False) -> List[int]:
    """Tokens per unit: what the packer packs (a prompt's answers stay in one pack). With shared
    prefixes a prompt is stored once: its len - 1 tokens plus each answer's branch."""
    if isinstance(units, DocumentPieces):  # from the stores' offsets: no token is read
        return units.lengths.tolist()
    if shared_prefix and units and "prompt_len" in units[0][0]:
        # as PreferenceCollator lays the row out: the prompt's stored tokens, then each branch
        cuts = [shared_prefix_tokens(unit[0]["prompt_len"]) for unit in units]
        return [cut + sum(len(s["input_ids"]) - cut for s in unit) for cut, unit in zip(cuts, units)]
    return [sum(len(s["input_ids"]) for s in sequences_of(units, [i])) for i in range(len(units))]


def max_token_id(units) -> int:
    """The largest token id of in-memory units (-1 for none, and for token stores, whose ids the
    loss checks as it reads them)."""
    if isinstance(units, DocumentPieces):
        return -1
    return max((int(s["input_ids"].max()) for s in sequences_of(units, range(len(units))) if len(s["input_ids"])),
               default=-1)


def count_targets(units, idx) -> int:
    return sum(int((s["labels"] != -100).any()) for s in sequences_of(units, idx))
