"""From a packing plan to model inputs: a collator for HF ``Trainer``, TRL or a plain loop.

    plan = la.pack(lengths, 65536, world_size=world)
    collate = PackedCollator(device="cuda")           # or device=None inside a DataLoader worker
    inputs = collate([dataset[i] for i in plan.indices(step, rank)])
    loss = model(**inputs).loss                        # or model.model(...) + the fused loss

The sequences of one micro-batch go back to back in a single row. ``labels`` follow the
transformers convention (unshifted; the model shifts them), with -100 on the first token of
every sequence so that no sequence learns to predict its neighbour's first token, as
transformers' ``DataCollatorWithFlattening`` does. ``shift_labels`` holds the same targets
already shifted (label t is the token after t), which is what :func:`fused_linear_cross_entropy`
and :func:`sequence_logprobs` take.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._validation import canonical_device
from .batch import PackedBatch


def _ids(name: str, value, index: int) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"sequence {index}: {name} must be a 1-D list of ints, got shape {arr.shape} and dtype "
                         f"{arr.dtype}")
    return arr.astype(np.int64)


class PackedCollator:
    """Collate a list of ``{"input_ids": [...], "labels": [...] (optional), "loss_weight": float
    (optional)}`` records into one packed row. A record may give ``shift_labels`` (its targets
    already shifted: entry t is the target of position t, ignore_index on its last position)
    instead of ``labels``. The row holds ``input_ids``, ``labels``, ``shift_labels`` and
    ``position_ids`` of shape ``(1, T)``, ``cu_seq_lens_q/k`` and ``max_length_q/k``
    (transformers' flash-attention kwargs), ``token_weights`` ``(1, T)`` when the records carry a
    ``loss_weight`` (each sequence's factor, e.g. LongAlign's ``K/(N_i M)`` from
    :meth:`PackPlan.loss_weights`, on each of its targets in ``shift_labels``), and, when
    ``device`` is given, ``packed_batch``: the batch description on that device, and every
    tensor moved there (with ``device=None``, e.g. in DataLoader workers whose trainer moves
    tensors itself, the attention derives the description once per forward from
    ``cu_seq_lens_q/k``).

    ``pad_to_longest=True`` right-pads every sequence to the batch's longest with
    ``pad_token_id`` (ignored targets), each padded sequence one segment: a padded batch in packed
    form, for naive or length-sorted batching baselines, where the padding costs what it costs."""

    def __init__(self, device=None, *, ignore_index: int = -100, pad_to_longest: bool = False,
                 pad_token_id: int = 0):
        self.device = None if device is None else canonical_device(device)
        self.ignore_index = ignore_index
        self.pad_to_longest, self.pad_token_id = pad_to_longest, int(pad_token_id)

    def _shifted(self, records, ids) -> list:
        """Each sequence's shifted targets: given (shift_labels) or from its labels (or its ids)."""
        out = []
        for i, (r, x) in enumerate(zip(records, ids)):
            if r.get("shift_labels") is not None:
                if r.get("labels") is not None:
                    raise ValueError(f"sequence {i}: give labels or shift_labels, not both")
                y = _ids("shift_labels", r["shift_labels"], i)
                if len(y) and y[-1] != self.ignore_index:
                    raise ValueError(f"sequence {i}: the last shift_labels entry must be ignore_index "
                                     f"({self.ignore_index}): no token of the sequence follows its last")
            else:
                labels = _ids("labels", r["labels"], i) if r.get("labels") is not None else x
                y = np.full(len(labels), self.ignore_index, np.int64)
                y[:-1] = labels[1:]
            if len(x) != len(y):
                raise ValueError(f"sequence {i}: {len(y)} labels for {len(x)} input_ids")
            out.append(y)
        return out

    def __call__(self, records: Sequence[dict]) -> dict:
        ids = [_ids("input_ids", r["input_ids"], i) for i, r in enumerate(records)]
        shifted_each = self._shifted(records, ids)
        if self.pad_to_longest and ids:
            longest = max(len(x) for x in ids)
            ids = [np.concatenate([x, np.full(longest - len(x), self.pad_token_id, np.int64)]) for x in ids]
            shifted_each = [np.concatenate([y, np.full(longest - len(y), self.ignore_index, np.int64)])
                            for y in shifted_each]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        device = self.device or "cpu"
        batch = PackedBatch.from_lengths(lengths, device=device)
        shifted = np.concatenate(shifted_each) if ids else np.zeros(0, np.int64)
        # transformers' labels: unshifted, the first token of each sequence ignored
        hf_labels = np.full_like(shifted, self.ignore_index)
        hf_labels[1:] = shifted[:-1]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        hf_labels[starts[lengths > 0]] = self.ignore_index
        as_row = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)[None]  # noqa: E731
        out = dict(input_ids=as_row(np.concatenate(ids) if ids else np.zeros(0, np.int64)), labels=as_row(hf_labels),
                   shift_labels=as_row(shifted), position_ids=batch.position_ids[None],
                   cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                   max_length_q=batch.max_len, max_length_k=batch.max_len)
        if any("loss_weight" in r for r in records):
            factors = np.array([float(r.get("loss_weight", 0.0)) for r in records])
            per_token = np.repeat(factors, lengths) * (shifted != self.ignore_index)
            out["token_weights"] = as_row(per_token.astype(np.float32))
        if self.device is not None:
            out["packed_batch"] = batch
        return out


class PlanBatchSampler:
    """A DataLoader ``batch_sampler`` over a :class:`PackPlan`: step s yields the sequence
    indices of ``plan.indices(s, rank)``, so each micro-batch is one pack (LongAlign packing or
    sorted batching, whichever strategy made the plan). Give each data-parallel rank its own
    ``rank``; the DataLoader must not be re-sharded (e.g. by accelerate's ``prepare``)."""

    def __init__(self, plan, rank: int = 0):
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank must be in [0, {plan.world_size}), got {rank}")
        self.plan, self.rank = plan, rank

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for step in range(len(self.plan)):
            yield self.plan.indices(step, self.rank).tolist()


__all__ = ["PackedCollator", "PlanBatchSampler"]
