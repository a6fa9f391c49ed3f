"""Packed preference training inside HF ``Trainer``: DPO, SimPO, LOGO and LongPO on TRL's record
format, each prompt packed with all of its answers in one row, log-probs from the fused op.

    from longalign_ops.integrations.preference_trainer import PreferenceTrainer
    trainer = PreferenceTrainer(model, TrainingArguments(...), train_dataset=records,
                                processing_class=tokenizer, objective="dpo", beta=0.1)
    trainer.train()

``train_dataset``: TRL-format records (a list of dicts or a ``datasets.Dataset``: ``prompt``,
``chosen``, ``rejected``, strings or message lists, or the ``*_input_ids`` columns; LongPO adds
``short_prompt``). Each prompt is stored once per row with its answers branching off it
(``shared_prefix=True``, the default; with ``dataloader_num_workers`` the rows are unshared). The
reference log-probs (dpo, longpo) are computed once, before training, with
``ref_model`` or the initial model, as TRL's ``precompute_ref_log_probs=True`` does: no second
model in device memory while training. The step's loss is the objective's mean over its prompts.
"""
from __future__ import annotations

from typing import Optional

import contextlib

import torch
from transformers import Trainer

from .. import losses
from ..cross_entropy import sequence_logprobs
from ..preference import PreferenceCollator, tokenize_record
from .transformers import apply_longalign, logit_transform


def _answer_logprobs(model, inputs) -> torch.Tensor:
    """Summed log-prob of each packed answer, from the backbone's hidden states (no logits)."""
    batch = inputs.get("packed_batch")
    if batch is None:
        from ..batch import PackedBatch

        batch = PackedBatch.from_cu_seqlens(inputs["cu_seq_lens_q"])
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                 packed_batch=batch, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    scale, softcap = logit_transform(model.config)  # the family's own logits (Granite, Cohere, Gemma)
    return sequence_logprobs(hidden if scale == 1.0 else hidden * scale, head.weight.to(hidden.dtype),
                             inputs["shift_labels"][0], batch, bias=head.bias, softcap=softcap)


class PreferenceTrainer(Trainer):
    def __init__(self, model, args=None, train_dataset=None, processing_class=None, *, objective: str = "dpo",
                 beta: float = 0.1, gamma: float = 0.0, sft_weight: float = 0.0, dpo_lambda: float = 1.0,
                 ref_model=None, shared_prefix: bool = True, **kwargs):
        if objective not in losses.OBJECTIVES:
            raise ValueError(f"objective must be one of {losses.OBJECTIVES}, got {objective!r}")
        if train_dataset is None:
            raise ValueError("train_dataset is required (TRL-format preference records)")
        self.objective, self.beta, self.gamma = objective, beta, gamma
        self.sft_weight, self.dpo_lambda = sft_weight, dpo_lambda
        apply_longalign(model, fused_loss=False)  # packed rows need the varlen attention
        examples = []
        for i, record in enumerate(train_dataset):
            try:
                examples.append(tokenize_record(dict(record), processing_class))
            except ValueError as e:
                raise ValueError(f"train_dataset[{i}]: {e}") from None
        if args is not None:
            args.remove_unused_columns = False  # the collator reads its own keys
        super().__init__(model=model, args=args, train_dataset=examples, processing_class=processing_class,
                         data_collator=PreferenceCollator(), **kwargs)
        # the batch description built once per step on the training device (the loader runs in
        # this process unless dataloader_num_workers is set, when the attention derives it)
        # (and then each prompt once per row, its answers branching off it: the same log-probs)
        self.shared_prefix = shared_prefix and not self.args.dataloader_num_workers
        if not self.args.dataloader_num_workers:
            self.data_collator = PreferenceCollator(self.args.device, shared_prefix=self.shared_prefix)
        if objective in losses.NEEDS_REFERENCE:
            self._add_reference_logprobs(examples, ref_model)

    @torch.no_grad()
    def _add_reference_logprobs(self, examples, ref_model):
        """The reference: `ref_model`, or the model itself before training; a PEFT model with its
        adapters disabled (TRL's convention: the base model, no second copy in memory)."""
        model = self.model if ref_model is None else apply_longalign(ref_model, fused_loss=False)
        adapters_off = getattr(model, "disable_adapter", None) if ref_model is None else None
        was_training = model.training
        model.eval()
        model.to(self.args.device)
        collate = PreferenceCollator(self.args.device, reference=self.objective == "longpo",
                                     shared_prefix=self.shared_prefix)
        size = self.args.per_device_train_batch_size
        with adapters_off() if adapters_off is not None else contextlib.nullcontext():
            for start in range(0, len(examples), size):
                chunk = examples[start:start + size]
                inputs = collate(chunk)
                logps = _answer_logprobs(model, inputs).view(len(chunk), -1).float().cpu()
                for ex, row in zip(chunk, logps):
                    ex["ref_logps"] = row.tolist()
        model.train(was_training)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = _answer_logprobs(model, inputs)
        loss, _ = losses.packed_preference_loss(self.objective, logps, inputs["answer_tokens"], inputs["num_answers"],
                                                ref_logps=inputs.get("ref_logps"), beta=self.beta, gamma=self.gamma,
                                                sft_weight=self.sft_weight, dpo_lambda=self.dpo_lambda)
        return (loss, dict(logps=logps.view(-1, inputs["num_answers"]))) if return_outputs else loss


__all__ = ["PreferenceTrainer"]
