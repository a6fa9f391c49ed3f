"""Which units each step and rank trains on (the packer's plans, or the pretrain mixture),
and the packed micro-batch of one rank (collated by longalign_ops.data): tokens, labels and the
PackedBatch that describes them.
"""
from __future__ import annotations

import numpy as np
import torch

import longalign_ops as la
from longalign_ops.data import PackedCollator
from longalign_ops.preference import PreferenceCollator, shared_prefix_tokens
from config import Config, as_list, data_sources
from data import PAD, sequences_of


def make_plan(cfg: Config, units_lengths, ranks: int, epoch: int, sources=None):
    if sources is not None:
        return MixturePlan(cfg, units_lengths, sources, ranks, epoch)
    return la.pack(units_lengths, cfg.window, strategy=cfg.strategy, world_size=ranks, batch_size=cfg.batch_size,
                   overlong="drop", seed=cfg.seed + epoch)


class MixturePlan:
    """An epoch of --objective pretrain over several sources, as ``steps[step][rank]`` unit
    indices (the packer's plan shape). The pieces are drawn one at a time from the source
    furthest behind its token share (each source in a seeded shuffled order, cycled when a
    small source is upsampled) until the epoch holds as many tokens as the data; the stream is
    cut into slices of one plan step's capacity (ranks x window tokens), each packed by the
    packer's BFD and balanced over the ranks. A pure function of (seed, epoch): a resumed run
    continues the same stream."""

    def __init__(self, cfg: Config, lengths, sources, ranks: int, epoch: int):
        lengths, sources = np.asarray(lengths, np.int64), np.asarray(sources)
        weights = np.array([w for _, w in data_sources(as_list(cfg.data))])
        rng = np.random.default_rng([cfg.seed, epoch])
        members = [np.flatnonzero(sources == i) for i in range(len(weights))]
        orders, at = [rng.permutation(m) for m in members], [0] * len(weights)
        taken, drawn, stream = np.zeros(len(weights)), 0, []
        total, has_pieces = int(lengths.sum()), np.array([len(m) > 0 for m in members])
        while drawn < total:  # one draw per piece: nothing here may cost O(pieces)
            i = int(np.argmax(np.where(has_pieces, weights * (drawn + 1) - taken, -np.inf)))
            if at[i] == len(orders[i]):
                orders[i], at[i] = rng.permutation(members[i]), 0
            unit = int(orders[i][at[i]])
            at[i] += 1
            stream.append(unit)
            taken[i] += lengths[unit]
            drawn += int(lengths[unit])
        if cfg.fill_rows:  # ProLong's rows: the stream end to end, cut at every row's end
            self.steps = _filled_rows(stream, lengths, cfg.window, ranks)
            return
        self.steps, capacity, start, filled = [], ranks * cfg.window, 0, 0
        for j, unit in enumerate(stream + [None]):
            if unit is not None and (filled + lengths[unit] <= capacity or j == start):
                filled += int(lengths[unit])
                continue
            piece = np.array(stream[start:j])
            plan = la.pack(lengths[piece], cfg.window, strategy="bfd", world_size=ranks, overlong="drop",
                           seed=cfg.seed + epoch)
            self.steps += [[[int(piece[k]) for k in pack] for pack in step] for step in plan.steps]
            start, filled = j, int(lengths[unit]) if unit is not None else 0

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def _filled_rows(stream, lengths, window: int, ranks: int) -> list:
    """Plan steps of rows filled to the last token: the drawn pieces laid end to end and cut at
    every `window` tokens, a piece crossing a row's end continued at the next row's start (its
    two parts separate sequences, as ProLong cuts documents). Entries are segments (unit, start,
    length); each step gives its ranks consecutive rows (the last step's spare ranks nothing)."""
    rows, row, room = [], [], window
    for unit in stream:
        at, left = 0, int(lengths[unit])
        while left:
            take = min(left, room)
            row.append((int(unit), at, take))
            at, left, room = at + take, left - take, room - take
            if room == 0:
                rows.append(row)
                row, room = [], window
    if row:
        rows.append(row)
    return [rows[s:s + ranks] + [[] for _ in range(ranks - len(rows[s:s + ranks]))] for s in range(0, len(rows), ranks)]


def micro_batch(cfg: Config, units, idx, device):
    """One rank's micro-batch, collated by longalign_ops.data: tokens, shifted targets and the
    batch description. Packed: sequences back to back (PackedCollator). Naive / sorted: each
    sequence right-padded to the batch's longest, one segment per sequence, so the padding costs
    what it costs in a padded batch (pad_to_longest). Shared prefixes: each prompt once, its
    answers branching off it (PreferenceCollator). A rank with nothing gets one ignored token
    (it still joins DDP's gradient averaging)."""
    seqs = sequences_of(units, idx)
    if not seqs:
        seqs = [dict(input_ids=np.array([PAD]), labels=np.array([-100]))]
    # (a LongPO reference's per-turn sequences have no shared prompt: those rows are unshared)
    shared = cfg.shared_prefix and idx and "prompt_len" in units[idx[0]][0]
    if shared:
        examples = [dict(prompt_ids=units[i][0]["input_ids"][:units[i][0]["prompt_len"]],
                         answers=[s["input_ids"][s["prompt_len"]:] for s in units[i]]) for i in idx]
        row = PreferenceCollator(device, shared_prefix=True)(examples)
        real = slots = row["packed_batch"].total
    else:
        collate = PackedCollator(device, pad_to_longest=cfg.strategy != "bfd", pad_token_id=PAD)
        row = collate([dict(input_ids=s["input_ids"], shift_labels=s["labels"]) for s in seqs])
        real = sum(len(s["input_ids"]) for s in seqs) if idx else 0
        slots = row["input_ids"].shape[1] if idx else 0
    batch = row["packed_batch"]
    given = bool(idx) and all("position_ids" in s for s in seqs)
    if given:  # the data's own position ids (LOGO's saved datasets): used as given, never synthesised
        batch = batch.with_positions(torch.as_tensor(given_positions(units, idx, batch, shared), device=device))
    answer_tokens = torch.tensor([int((s["labels"] != -100).sum()) for s in seqs], dtype=torch.float32, device=device)
    return dict(input_ids=row["input_ids"][0], labels=row["shift_labels"][0], batch=batch, given_positions=given,
                real_tokens=real, answer_tokens=answer_tokens, slots=slots, seqs=seqs, num_units=len(idx))


def given_positions(units, idx, batch, shared: bool) -> np.ndarray:
    """The row's position ids from its sequences' own: shared, each prompt's once (its stored
    tokens), then each branch's from the prompt's last token on; unshared, each sequence's, a
    padded segment's padding continuing from its last id."""
    parts = []
    if shared:
        for i in idx:
            cut = shared_prefix_tokens(units[i][0]["prompt_len"])
            parts += [units[i][0]["position_ids"][:cut]] + [s["position_ids"][cut:] for s in units[i]]
    else:
        for s, seg in zip(sequences_of(units, idx), batch.lengths):
            pos = s["position_ids"]
            parts += [pos, pos[-1] + 1 + np.arange(int(seg) - len(pos))]
    return np.concatenate(parts).astype(np.int64)


def logo_positions(cfg: Config, mb):
    """Synthesised ids over window * target_window; the answer stays contiguous (suffix). With
    shared prefixes, each prompt's ids are synthesised once and every answer continues from its
    last one (the group's window: its prompt and longest answer, times target_window)."""
    batch = mb["batch"]
    if batch.groups is not None:  # each prompt's ids once, its answers after them (synthesize_positions)
        spans = np.array([p + max(branches, default=0) for p, branches in batch.groups])
        return la.synthesize_positions(batch, spans * max(1, cfg.target_window), method="logo", chunk_size=64,
                                       seed=cfg.seed)
    suffix = np.minimum([s["answer_len"] + 2 if "answer_len" in s else 0 for s in mb["seqs"]], batch.lengths)
    target = batch.lengths * max(1, cfg.target_window)
    return la.synthesize_positions(batch, target, method="logo", chunk_size=64, suffix_lens=suffix, seed=cfg.seed)


def optimizer_step_batches(cfg: Config, plans: dict, lengths, ranks: int, step: int, sources=None):
    """The grad_accum plan steps (each a list of per-rank index lists) of optimisation step
    `step`. The data order is a pure function of (seed, step), so a resumed run sees exactly
    the batches it would have seen; epochs are re-planned with seed + epoch."""
    out = []
    for a in range(cfg.grad_accum):
        k, epoch = step * cfg.grad_accum + a, 0
        while True:
            if epoch not in plans:
                plans[epoch] = make_plan(cfg, lengths, ranks, epoch, sources)
                if not plans[epoch].num_steps:  # would loop over empty epochs without end
                    raise SystemExit(f"--window {cfg.window}: the data plans no training step (every unit is "
                                     f"longer than the window, or there is none)")
            if k < plans[epoch].num_steps:
                break
            k -= plans[epoch].num_steps
            epoch += 1
        out.append(plans[epoch].steps[k])
    return out
