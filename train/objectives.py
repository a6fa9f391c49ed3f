"""The losses of a micro-batch (SFT / pretrain token losses, LongAlign weighting, the
preference objectives) and the reference log-probs DPO and LongPO need, computed once.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

import checkpoint
import longalign_ops as la
from batches import make_plan, micro_batch
from config import Config, PREFERENCE_OBJECTIVES, PRESETS
from data import answer_slots, count_targets
from longalign_ops import sequence_parallel as sp
from longalign_ops.losses import PREFERENCE_METRICS, packed_preference_loss, preference_metric_sums
from modeling import CausalLMWithLoss
from parallel import shard_micro_batch


def make_loss_fn(cfg: Config, step_packs: int, step_sequences: int, scale: float, step_groups: int = 1):
    """The per-micro-batch loss. With LongAlign weighting: sum_t K/(N_i M) nll_t (K ranks, M
    sequences in the optimisation step), so DDP's average over ranks gives each sequence equal
    weight; otherwise the token mean. Preference objectives: sum_g loss_g K/G over the micro-batch's
    prompts g (G prompts in the step), the step's mean over prompts. `scale` folds in gradient
    accumulation and emulated ranks."""

    def sft(hidden, weight, mb):
        if "shard" in mb:  # this rank's slice; the loss of the whole row on every rank of the group
            shard, labels = mb["shard"], mb["labels"]
            if cfg.loss_weighting:
                w = sp.longalign_loss_weights(labels, shard, num_packs=step_packs, num_sequences=max(1, step_sequences))
                part = la.fused_linear_cross_entropy(hidden, weight, labels, token_weights=w, reduction="sum",
                                                     softcap=mb.get("softcap"))
                return sp.reduce_loss(part, shard) * scale
            part = la.fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", softcap=mb.get("softcap"))
            count = sp.reduce_loss((labels != -100).sum().double().detach(), shard)
            return sp.reduce_loss(part, shard) / count.clamp_min(1.0).float() * scale
        if cfg.loss_weighting:
            loss = la.fused_linear_cross_entropy(hidden, weight, mb["labels"], packed_batch=mb["batch"],
                                                 num_packs=step_packs, num_sequences=max(1, step_sequences),
                                                 reduction="sum", softcap=mb.get("softcap"))
        else:
            loss = la.fused_linear_cross_entropy(hidden, weight, mb["labels"], reduction="mean",
                                                 softcap=mb.get("softcap"))
        return loss * scale

    def preference(hidden, weight, mb):
        if mb["num_units"] == 0:  # an idle rank: zero loss that still touches every parameter (DDP)
            return (hidden.sum() + weight.sum()) * 0.0
        ref = mb.get("ref_logps")
        loss, scores = packed_preference_loss(cfg.objective, answer_logprobs(hidden, weight, mb), mb["answer_tokens"],
                                              1 + cfg.num_rejected, ref_logps=ref, beta=cfg.beta, gamma=cfg.gamma,
                                              sft_weight=cfg.sft_weight, dpo_lambda=cfg.dpo_lambda, reduction="sum")
        with torch.no_grad():  # summed on the device here, read once per step (PREFERENCE_METRICS)
            sums = preference_metric_sums(scores, ref, cfg.beta)
            preference.sums = preference.sums.to(sums.device) + sums
        # the step's mean over prompts: DDP's average over ranks and `scale` divide by the step's packs
        return loss * (step_packs / max(1, step_groups)) * scale

    preference.sums = torch.zeros(len(PREFERENCE_METRICS) + 1, dtype=torch.float64)
    return preference if cfg.objective in PREFERENCE_OBJECTIVES else sft


def answer_logprobs(hidden, weight, mb):
    """Each sequence's summed answer log-prob (fused, no logits); under sequence parallelism the
    global values on every rank, the pad sequence dropped. mb["softcap"]: the model's final
    logit soft-cap (CausalLMWithLoss sets it)."""
    if "shard" in mb:
        return sp.sequence_logprobs(hidden, weight, mb["labels"], mb["shard"],
                                    softcap=mb.get("softcap"))[:mb["num_sequences"]]
    return la.sequence_logprobs(hidden, weight, mb["labels"], mb["batch"], softcap=mb.get("softcap"))


def step_loss_fn(cfg: Config, units, plan_steps, ranks: int, emulated: int):
    """The loss of one optimisation step's micro-batches, and M. K counts every pack of the
    step (ranks x accumulation); DDP averages over the real ranks and `scale` over
    accumulation and emulated ranks, which together divide by K."""
    step_sequences = sum(count_targets(units, pack) for ps in plan_steps for pack in ps)
    step_groups = sum(len(pack) for ps in plan_steps for pack in ps)  # prompts (preference units)
    return make_loss_fn(cfg, ranks * cfg.grad_accum, step_sequences, 1.0 / (cfg.grad_accum * emulated),
                        step_groups), step_sequences


def reference_key(cfg: Config, ref_units) -> str:
    """What the reference log-probs depend on: the reference model (directory contents' names,
    sizes and times, or the preset and seed of the initial policy) and every reference token."""
    import hashlib

    h = hashlib.sha256()
    source = cfg.ref_model or cfg.model
    if source:
        for name in sorted(os.listdir(source)):
            st = os.stat(os.path.join(source, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    else:
        h.update(json.dumps(dict(PRESETS[cfg.preset], seed=cfg.seed, window=cfg.window,
                                 target_window=cfg.target_window)).encode())
    for group in ref_units:
        for s in group:
            h.update(s["input_ids"].tobytes())
            h.update(s["labels"].tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logprobs(cfg: Config, model, ref_units, lengths, ranks: int, dp_rank: int, emulated: int,
                       world: int, row_groups, device, log) -> torch.Tensor:
    """(units, 1 + num_rejected) summed reference log-probs of every answer, computed once before
    training and cached in --out (ref_logps-<key>.pt, keyed by reference model and tokens). The
    packs are those of the first epoch's plan, each data-parallel rank its own; the table is
    summed over the ranks (a row's values counted once per sequence-parallel group)."""
    key = reference_key(cfg, ref_units)
    path = os.path.join(cfg.out, f"ref_logps-{key[:16]}.pt")
    cached = None
    if os.path.exists(path):
        try:
            cached = checkpoint.safe_torch_load(path, path)
            cached = cached["logps"] if isinstance(cached, dict) and cached.get("key") == key else None
        except Exception as e:  # refused or torn: computed again
            log(f"reference cache ignored: {e}")
    found = torch.tensor([cached is not None and tuple(cached.shape) == (len(ref_units), 1 + cfg.num_rejected)],
                         dtype=torch.int32, device=device)
    if world > 1:  # every rank takes the same branch (the pass below has collectives)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
    if found.item():
        log(f"reference log-probs from the cache {path}")
        return cached.to(device=device, dtype=torch.float32)
    source = cfg.ref_model or "the initial policy"
    log(f"reference log-probs of {len(ref_units)} prompts from {source}")
    if cfg.ref_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.ref_model, local_files_only=True,
                                                     attn_implementation="longalign").to(device)
    was_training = model.training
    model.eval()
    wrapped = CausalLMWithLoss(model)
    table = torch.zeros(len(ref_units), 1 + cfg.num_rejected, dtype=torch.float64, device=device)
    plan = make_plan(cfg, lengths, ranks, 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for ps in plan.steps:
        for e in range(emulated):
            idx = ps[dp_rank * emulated + e if world > 1 else e]
            if not idx:
                continue
            mb = micro_batch(cfg, ref_units, idx, device)
            if row_groups is not None:
                mb = shard_micro_batch(mb, row_groups)
            with autocast:
                logps = wrapped(mb, answer_logprobs)
            if row_groups is None or row_groups.leader:  # each sequence's into its answer's cell (summed)
                rows, cols = answer_slots(ref_units, idx)
                table.index_put_((torch.as_tensor(idx, device=device)[torch.as_tensor(rows, device=device)],
                                  torch.as_tensor(cols, device=device)), logps.double(), accumulate=True)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(table)
    if world == 1 or dist.get_rank() == 0:
        tmp = path + ".tmp"
        torch.save(dict(key=key, logps=table.cpu()), tmp)
        os.replace(tmp, path)
    if cfg.ref_model:
        del model, wrapped
        if device.type == "cuda":
            torch.cuda.empty_cache()  # no second model in device memory during training
    return table.float()
