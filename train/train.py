"""Minimal long-context alignment training: SFT with naive / sorted / packed batching (LongAlign)
and preference training (LOGO, SimPO, DPO, LongPO) on packed rows, on a transformers model, with
every longalign_ops op.

    python train/train.py --preset tiny --strategy bfd --objective sft --max-steps 8 --out runs/x
    python train/train.py --model DIR --data prefs.jsonl --objective dpo --export runs/x/model
    torchrun --nproc_per_node=2 train/train.py --preset tiny ...       (DDP: gloo on CPU, nccl on GPU)

Reads top to bottom: config, small helpers (model, data, batches, loss), one loop.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import export
import longalign_ops as la
import records
import token_store
import longalign_ops.integrations.transformers  # noqa: F401  registers attn_implementation="longalign"
from longalign_ops import sequence_parallel as sp
from longalign_ops.losses import NEEDS_REFERENCE, PREFERENCE_METRICS, packed_preference_loss, preference_metric_sums

# ----------------------------------------------------------------------------- config

PRESETS = {
    # a couple of million parameters: seconds per step on a 2-core CPU
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024, window=512, num_samples=512, short_len=48),
    # ~0.45B parameters, 64K window: one H100/H200
    "small": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32000, window=65536, num_samples=2048, short_len=700),
}


@dataclass
class Config:
    preset: str = "tiny"
    model: Optional[str] = None         # local model dir (nothing is fetched from a hub)
    data: Optional[str] = None          # JSONL (chat or preference records); default: embedded retrieval task
    tokenizer: Optional[str] = None     # local tokenizer dir for --data (default: --model's)
    token_cache: Optional[str] = None   # pretrain: where tokenised stores are kept and reused
    skip_bad_records: bool = False      # skip (and count) bad records instead of stopping
    strategy: str = "bfd"               # naive | sorted | bfd (LongAlign packing; "packing" is an alias)
    loss_weighting: Optional[bool] = None  # LongAlign K/(N_i M); default: on with packing
    objective: str = "sft"              # sft | pretrain | logo | simpo | dpo | longpo
    shared_prefix: Optional[bool] = None  # preference rows: each prompt once for all its answers (default: on)
    ref_model: Optional[str] = None     # dpo / longpo reference (default: the initial policy)
    export: Optional[str] = None        # write a transformers model directory here at the end
    max_steps: int = 8
    out: str = "runs/train"
    seed: int = 0
    lr: float = 2e-3
    warmup_steps: int = 4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    world_size: int = 1                 # ranks emulated in one process (torchrun sets real ranks)
    sp: int = 1                         # Ulysses sequence-parallel group size (torchrun ranks per packed row)
    cp: int = 1                         # context-parallel group size (the row split further, no head limit)
    fsdp: bool = False                  # FSDP2: parameters, gradients and optimizer state sharded over the world
    batch_size: int = 4                 # sequences per rank per step (naive, sorted)
    window: Optional[int] = None        # max tokens per pack / sequence (preset default)
    num_samples: Optional[int] = None
    grad_checkpointing: bool = False
    tiled_mlp: int = 0                  # tokens per MLP chunk (sequence-tiled MLP with recompute); 0: off
    tiled_norms: int = 0                # tokens per RMSNorm chunk, the same way; 0: off
    offload_activations: bool = False   # every layer checkpointed, the checkpoints in host memory
    offload_params: bool = False        # FSDP2 CPUOffloadPolicy: parameters, gradients, AdamW state on the host
    resume: bool = False
    overwrite: bool = False             # replace a previous run in --out (refused without it)
    ckpt_every: int = 0                 # 0: only at the end
    log_every: int = 1
    time_repeats: int = 1               # benchmark: each emulated rank's micro-batch timed as a median
    # preference objectives (None: the objective's default, OBJECTIVE_DEFAULTS)
    num_rejected: Optional[int] = None  # rejected answers per prompt (embedded task: 2; --data: the records')
    target_window: int = 4              # LOGO: synthesised positions cover window * target_window
    beta: Optional[float] = None
    gamma: Optional[float] = None
    sft_weight: Optional[float] = None
    dpo_lambda: float = 1.0
    plot: bool = True


# The library's names (la.pack, longalign-pack); old spellings kept as aliases
STRATEGY_ALIASES = {"packing": "bfd"}
CHOICES = dict(preset=tuple(PRESETS), strategy=("naive", "sorted", "bfd"),
               objective=("sft", "pretrain", "logo", "simpo", "dpo", "longpo"))
# (beta, gamma, sft_weight) per preference objective: LOGO's paper (beta 3, gamma 0.3, lambda 0.1
# on the tiny task), SimPO's Llama-3 recipe (beta 2, gamma 1), DPO's and LongPO's beta 0.1
OBJECTIVE_DEFAULTS = dict(logo=(3.0, 0.3, 0.1), simpo=(2.0, 1.0, 0.0), dpo=(0.1, 0.0, 0.0), longpo=(0.1, 0.0, 1.0))
PREFERENCE_OBJECTIVES = tuple(OBJECTIVE_DEFAULTS)
HELP = dict(
    preset="model and data size: tiny (a few M parameters, seconds per step on a CPU) or small (~0.45B, 64K "
           "window, one H100)",
    model="local transformers model directory to train instead of the preset's (nothing is downloaded)",
    data="JSONL of chat records {\"messages\": [...]} (sft) or TRL-format preference records {\"prompt\", "
         "\"chosen\", \"rejected\"} (preference objectives); default: the embedded long-context retrieval task. "
         "pretrain: documents {\"text\"} or {\"input_ids\"}, repeatable as PATH:WEIGHT to mix sources at those "
         "token proportions",
    tokenizer="local tokenizer directory for --data (default: the --model directory's)",
    token_cache="--objective pretrain: directory of the memory-mapped token stores each --data file is tokenised "
                "into once and reused from (default: $XDG_CACHE_HOME/longalign_ops/tokens or "
                "~/.cache/longalign_ops/tokens)",
    skip_bad_records="skip bad records, counting them in the log (default: stop at the first, naming its line "
                     "and field)",
    strategy="batching: naive (random batches, padded), sorted (LongAlign sorted batching) or bfd (LongAlign "
             "packing, best-fit decreasing; alias: packing)",
    loss_weighting="LongAlign loss weighting K/(N_i M) (default: on with bfd packing and --objective sft)",
    objective="sft (token cross-entropy); preference objectives over each prompt's packed answers: logo "
              "(reference-free, several rejected answers, synthesised positions), simpo, dpo, longpo (DPO whose "
              "reference reads the record's short_prompt, plus the chosen answer's NLL)",
    shared_prefix="preference objectives: pack each prompt once, its answers after it as branches that all "
                  "attend to it (PackedBatch.from_prefix_groups), so the prompt is embedded, attended and "
                  "back-propagated once per prompt instead of once per answer (default: on); LOGO then synthesises "
                  "each prompt's positions once and every answer follows them",
    ref_model="dpo / longpo: local model directory of the reference (default: the initial policy); its log-probs "
              "are computed once before training and cached in --out",
    export="write the trained model here at the end as a transformers directory (safetensors, config, tokenizer)",
    max_steps="optimizer steps to run", out="run directory: metrics.jsonl, checkpoints, plot", seed="random seed",
    lr="peak learning rate", warmup_steps="linear warm-up steps", min_lr_ratio="final learning rate / peak (cosine)",
    weight_decay="AdamW weight decay", grad_accum="micro-batches per optimizer step",
    world_size="data-parallel ranks emulated in one process (under torchrun the real world size is used)",
    sp="Ulysses sequence parallelism under torchrun: this many ranks share each packed row (data-parallel size = "
       "world size / sp)",
    cp="context parallelism under torchrun: each packed row is split over this many ranks (head-and-tail, K/V "
       "all-gathered; no head-count limit); with --sp U, U x cp ranks share a row (data-parallel size = world size "
       "/ (sp x cp))",
    fsdp="FSDP2 under torchrun: fully_shard per decoder layer and the root, over every rank (bf16 parameters, fp32 "
         "gradient reduction on GPU); checkpoints are sharded torch.distributed.checkpoint directories",
    batch_size="sequences per rank per step for naive and sorted", window="tokens per pack / longest sequence "
    "(default: the preset's)", num_samples="samples of the embedded dataset (default: the preset's)",
    grad_checkpointing="activation checkpointing of every decoder layer",
    tiled_mlp="run each decoder layer's MLP over chunks of this many tokens with recompute, so the MLP "
              "intermediates of a long row never exist at once (longalign_ops.memory.apply_tiled_mlp); 0: off",
    tiled_norms="run the RMSNorms over chunks of this many tokens with recompute, so their fp32 temporaries "
                "never cover the whole row (longalign_ops.memory.apply_tiled_norms); 0: off",
    offload_activations="checkpoint every decoder layer and keep the checkpoints (each layer's input) in pinned "
                        "host memory, copied on a side stream (longalign_ops.memory.apply_activation_offload; on a "
                        "CPU-only run: plain checkpointing)",
    offload_params="with --fsdp: parameters, gradients and AdamW state in host memory, the optimizer step on the "
                   "CPU (FSDP2 CPUOffloadPolicy)",
    resume="continue from the checkpoint in --out", overwrite="replace a previous run found in --out",
    ckpt_every="checkpoint every N steps (0: only at the end)", log_every="print a progress line every N steps",
    time_repeats="benchmarking: time each emulated rank's micro-batch as the median of this many forward + "
                 "backward passes (the extra ones compute gradients and drop them: training is unchanged)",
    num_rejected="rejected answers per prompt (embedded task: 2; --data: every record's count must match)",
    target_window="LOGO: synthesised positions cover window x this",
    beta="reward scale (default per objective: logo 3, simpo 2, dpo / longpo 0.1)",
    gamma="target margin of logo / simpo (default: logo 0.3, simpo 1)",
    sft_weight="weight of the chosen answer's per-token NLL (LOGO's lambda, LongPO's NLL term; default: logo 0.1, "
               "longpo 1, else 0)",
    dpo_lambda="longpo: weight of the DPO term (LongPO's trainer: NLL + dpo_lambda x DPO)",
    plot="draw loss.png at the end (needs matplotlib)",
)


def data_sources(entries) -> List[tuple]:
    """[(path, weight)] from --data PATH[:WEIGHT] entries: weights normalised to sum 1, equal when
    none is given; a weight on some sources but not others, or one <= 0, is refused."""
    out = []
    for e in entries:
        head, _, tail = e.rpartition(":")
        try:
            out.append((head, float(tail)) if head else (e, None))
        except ValueError:
            out.append((e, None))
    given = [w for _, w in out if w is not None]
    if given and len(given) != len(out):
        raise SystemExit(f"--data: give every source a weight (PATH:WEIGHT) or none, got {list(entries)}")
    if any(not (w > 0 and math.isfinite(w)) for w in given):
        raise SystemExit(f"--data: weights must be positive numbers, got {list(entries)}")
    total = sum(given) if given else len(out)
    return [(p, (w if w is not None else 1.0) / total) for p, w in out]


def parse_args(argv=None) -> Config:
    cfg = Config()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(cfg).items():
        flag = "--" + name.replace("_", "-")
        text = HELP[name] + (f" (default: {value})" if value is not None and not isinstance(value, bool) else "")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP[name])
        elif name == "data":  # repeatable: --objective pretrain mixes sources (PATH:WEIGHT)
            ap.add_argument(flag, action="append", default=None, metavar="PATH[:WEIGHT]", help=text)
        elif name in ("loss_weighting", "shared_prefix"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in CHOICES:
            aliases = tuple(a for a, target in STRATEGY_ALIASES.items() if name == "strategy")
            ap.add_argument(flag, choices=CHOICES[name] + aliases, default=value, metavar="{" + ",".join(
                CHOICES[name]) + "}", help=text)
        else:
            kind = type(value) if value is not None else (
                int if name in ("window", "num_samples", "num_rejected") else
                float if name in ("beta", "gamma", "sft_weight") else str)
            ap.add_argument(flag, type=kind, default=value, help=text)
    args = ap.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items()})
    cfg.strategy = STRATEGY_ALIASES.get(cfg.strategy, cfg.strategy)
    if cfg.data is not None:
        sources = data_sources(cfg.data)
        if cfg.objective != "pretrain" and (len(sources) > 1 or sources[0][0] != cfg.data[0]):
            raise SystemExit("several --data sources (PATH:WEIGHT) are mixed for --objective pretrain; the other "
                             "objectives read one JSONL")
        # one plain path stays a string: the checkpoints of earlier runs compare equal
        cfg.data = cfg.data[0] if len(cfg.data) == 1 and sources[0][0] == cfg.data[0] else cfg.data
    elif cfg.objective == "pretrain":
        raise SystemExit("--objective pretrain trains on your documents: --data FILE.jsonl[:WEIGHT] (records "
                         "{\"text\": ...} or {\"input_ids\": [...]}), repeatable to mix sources")
    preset = PRESETS[cfg.preset]
    cfg.window = cfg.window or preset["window"]
    cfg.num_samples = cfg.num_samples or preset["num_samples"]
    if cfg.loss_weighting is None:
        cfg.loss_weighting = cfg.strategy == "bfd" and cfg.objective == "sft"  # pretrain: ProLong's token mean
    if cfg.cp > 1 and cfg.shared_prefix:
        raise SystemExit("--shared-prefix rows are split by Ulysses (--sp) only; with --cp the answers are packed "
                         "unshared (drop --shared-prefix)")
    # context parallelism cuts every sequence head-and-tail, which a branch sharing its prompt's keys cannot follow
    cfg.shared_prefix = cfg.objective in PREFERENCE_OBJECTIVES and cfg.shared_prefix is not False and cfg.cp == 1
    if cfg.objective in PREFERENCE_OBJECTIVES:
        for name, value in zip(("beta", "gamma", "sft_weight"), OBJECTIVE_DEFAULTS[cfg.objective]):
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
    if cfg.num_rejected is None and not cfg.data:
        cfg.num_rejected = 2
    return cfg


# ----------------------------------------------------------------------------- helpers: model


def build_model(cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.model:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, attn_implementation="longalign")
    else:
        p = PRESETS[cfg.preset]
        mc = LlamaConfig(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"],
                         intermediate_size=p["intermediate_size"], num_hidden_layers=p["num_hidden_layers"],
                         num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
                         max_position_embeddings=cfg.window * max(1, cfg.target_window), rope_theta=10000.0,
                         tie_word_embeddings=False)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and every strategy
        model = LlamaForCausalLM._from_config(mc, attn_implementation="longalign")
    from longalign_ops import memory

    if cfg.offload_activations:
        memory.apply_activation_offload(model)
    elif cfg.grad_checkpointing:
        memory.enable_checkpointing(model)
    if cfg.tiled_mlp:
        memory.apply_tiled_mlp(model, cfg.tiled_mlp)
    if cfg.tiled_norms:
        memory.apply_tiled_norms(model, cfg.tiled_norms)
    return model.to(device)


class CausalLMWithLoss(torch.nn.Module):
    """The model body plus our loss: DDP wraps this, so its gradient hooks see every step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mb, loss_fn):
        batch = mb["batch"]  # one description for every layer, the loss and the backward
        if "shard" in mb:  # sequence parallel: this rank's slice of the row, Ulysses attention (the shard
            # travels in the call, so a checkpointed layer's recompute runs the same attention)
            out = self.model.model(input_ids=mb["input_ids"][None], position_ids=mb["position_ids"][None],
                                   packed_batch=mb["shard"])
        else:
            out = self.model.model(input_ids=mb["input_ids"][None], position_ids=batch.position_ids[None],
                                   packed_batch=batch)
        hidden = out.last_hidden_state[0]
        weight = self.model.lm_head.weight
        return loss_fn(hidden, weight.to(hidden.dtype), mb)


# ----------------------------------------------------------------------------- helpers: data

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
    """The user's records (train/records.py): chat records for sft, preference records otherwise."""
    tok = records.load_tokenizer(tokenizer_path(cfg))
    if cfg.objective == "sft":
        return records.read_chat_jsonl(cfg.data, tok, cfg.window, cfg.skip_bad_records, log)
    samples = records.read_preference_jsonl(cfg.data, tok, cfg.skip_bad_records, log, cfg.num_rejected)
    cfg.num_rejected = len(samples[0]["answers"]) - 1
    return samples


class DocumentPieces:
    """--objective pretrain's units without their tokens in memory: every source's documents (a
    memory-mapped token store each), cut into pieces of at most --window tokens, each its own
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

    def __getitem__(self, i: int) -> dict:
        ids = self.stores[self.sources[i]].read(int(self.documents[i]), int(self.starts[i]), int(self.lengths[i]))
        labels = np.full(len(ids), -100, np.int64)
        labels[:-1] = ids[1:]
        return dict(input_ids=ids, labels=labels, source=int(self.sources[i]))


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
    stores = [token_store.open_store(path, cache, get_tok, cfg.skip_bad_records, log,
                                     is_builder=not distributed or dist.get_rank() == 0,
                                     wait=dist.barrier if distributed else lambda: None)
              for path, _ in data_sources(as_list(cfg.data))]
    pieces = DocumentPieces(stores, cfg.window)
    for i, ((path, weight), store) in enumerate(zip(data_sources(as_list(cfg.data)), stores)):
        long_docs = int((store.lengths > cfg.window).sum())
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
        prompt = s["short_prompt"] if short else s["prompt"]
        if prompt is None:
            raise SystemExit("--objective longpo needs a short_prompt (or short_prompt_input_ids) in every record")
        group = [answer_sequence(prompt, ans) for ans in s["answers"][:1 + num_rejected]]
        if len(group) == 1 + num_rejected:
            groups.append(group)
    return groups


# ----------------------------------------------------------------------------- helpers: batches


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
        while drawn < lengths.sum():
            i = int(np.argmax(np.where([len(m) > 0 for m in members], weights * (drawn + 1) - taken, -np.inf)))
            if at[i] == len(orders[i]):
                orders[i], at[i] = rng.permutation(members[i]), 0
            unit = int(orders[i][at[i]])
            at[i] += 1
            stream.append(unit)
            taken[i] += lengths[unit]
            drawn += int(lengths[unit])
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


def as_list(data) -> List[str]:
    return [data] if isinstance(data, str) else list(data)


def sequences_of(units, idx) -> List[dict]:
    """The sequences of units `idx`: an SFT unit is one sequence, a LOGO unit a group of them."""
    return [s for i in idx for s in (units[i] if isinstance(units[i], list) else [units[i]])]


def unit_lengths(units, shared_prefix: bool = False) -> List[int]:
    """Tokens per unit: what the packer packs (a prompt's answers stay in one pack). With shared
    prefixes a prompt is stored once: its len - 1 tokens plus each answer's branch."""
    if isinstance(units, DocumentPieces):  # from the stores' offsets: no token is read
        return units.lengths.tolist()
    if shared_prefix:
        return [int(sum(map(len, shared_prefix_row(units, [i])[1]))) for i in range(len(units))]
    return [sum(len(s["input_ids"]) for s in sequences_of(units, [i])) for i in range(len(units))]


def shared_prefix_row(units, idx):
    """A row of prompts, each stored once: per prompt its first len - 1 tokens (the shared prefix),
    then each answer as a branch that starts with the prompt's last token (which predicts a
    different first answer token in each). Returns (groups, ids, labels) for
    PackedBatch.from_prefix_groups."""
    groups, ids, labels = [], [], []
    for i in idx:
        unit = units[i]
        cut = max(unit[0]["prompt_len"] - 1, 0)
        ids.append(unit[0]["input_ids"][:cut])
        labels.append(unit[0]["labels"][:cut])
        for s in unit:
            ids.append(s["input_ids"][cut:])
            labels.append(s["labels"][cut:])
        groups.append((cut, [len(s["input_ids"]) - cut for s in unit]))
    return groups, ids, labels


def micro_batch(cfg: Config, units, idx, device):
    """Flat tokens + cu_seqlens for one rank's micro-batch. Packed: sequences back to back.
    Naive / sorted: each sequence right-padded to the batch's longest, one row per sequence, so
    the padding costs what it costs in a padded batch. A rank with nothing gets one ignored
    token (it still joins DDP's gradient averaging)."""
    seqs = sequences_of(units, idx)
    if not seqs:
        seqs = [dict(input_ids=np.array([PAD]), labels=np.array([-100]))]
    if cfg.shared_prefix and idx:  # each prompt once, its answers branching off it
        groups, ids, labels = shared_prefix_row(units, idx)
        batch = la.PackedBatch.from_prefix_groups(groups, device=device)
        real = slots = batch.total
    else:
        padded = cfg.strategy != "bfd"
        L = max(len(s["input_ids"]) for s in seqs)
        ids, labels, lens = [], [], []
        for s in seqs:
            n = len(s["input_ids"])
            pad = L - n if padded else 0
            ids.append(np.concatenate([s["input_ids"], np.full(pad, PAD)]))
            labels.append(np.concatenate([s["labels"], np.full(pad, -100)]))
            lens.append(n + pad)
        batch = la.PackedBatch.from_lengths(lens, device=device)  # from host lengths: no device sync
        real = sum(len(s["input_ids"]) for s in seqs) if idx else 0
        slots = int(sum(lens)) if idx else 0
    t = lambda a: torch.from_numpy(np.concatenate(a)).to(device=device, dtype=torch.int64)  # noqa: E731
    answer_tokens = torch.tensor([int((s["labels"] != -100).sum()) for s in seqs], dtype=torch.float32, device=device)
    return dict(input_ids=t(ids), labels=t(labels), batch=batch, real_tokens=real, answer_tokens=answer_tokens,
                slots=slots, seqs=seqs, num_units=len(idx))


class RowGroups(NamedTuple):
    """The process groups of the ranks that share one packed row: Ulysses (None: no head split)
    and context parallel (None: no CP)."""
    ulysses: Optional[object]
    cp: Optional[object]

    @property
    def leader(self) -> bool:
        """Rank 0 of the row: the one that counts the row's tokens."""
        return all(g is None or dist.get_rank(g) == 0 for g in (self.ulysses, self.cp))


def shard_micro_batch(mb, row: RowGroups):
    """Sequence parallel: the row padded so that every rank of it holds as many tokens (one
    ignored pad sequence), and this rank's tokens of its ids, labels and positions."""
    shard = sp.shard(mb["batch"], row.ulysses, cp_group=row.cp)
    pad = shard.pad
    full = dict(input_ids=mb["input_ids"], labels=mb["labels"], position_ids=mb["batch"].position_ids)
    if pad:
        dev = mb["input_ids"].device
        full = dict(input_ids=torch.cat([full["input_ids"], torch.full((pad,), PAD, device=dev)]),
                    labels=torch.cat([full["labels"], torch.full((pad,), -100, device=dev)]),
                    position_ids=torch.cat([full["position_ids"], torch.arange(pad, device=dev)]))
    return dict(mb, shard=shard, num_sequences=mb["batch"].num_sequences,
                **{k: shard.local(v) for k, v in full.items()})


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


# ----------------------------------------------------------------------------- helpers: loss


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
                part = la.fused_linear_cross_entropy(hidden, weight, labels, token_weights=w, reduction="sum")
                return sp.reduce_loss(part, shard) * scale
            part = la.fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
            count = sp.reduce_loss((labels != -100).sum().double().detach(), shard)
            return sp.reduce_loss(part, shard) / count.clamp_min(1.0).float() * scale
        if cfg.loss_weighting:
            loss = la.fused_linear_cross_entropy(hidden, weight, mb["labels"], packed_batch=mb["batch"],
                                                 num_packs=step_packs, num_sequences=max(1, step_sequences),
                                                 reduction="sum")
        else:
            loss = la.fused_linear_cross_entropy(hidden, weight, mb["labels"], reduction="mean")
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
    global values on every rank, the pad sequence dropped."""
    if "shard" in mb:
        return sp.sequence_logprobs(hidden, weight, mb["labels"], mb["shard"])[:mb["num_sequences"]]
    return la.sequence_logprobs(hidden, weight, mb["labels"], mb["batch"])


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
            if k < plans[epoch].num_steps:
                break
            k -= plans[epoch].num_steps
            epoch += 1
        out.append(plans[epoch].steps[k])
    return out


def step_loss_fn(cfg: Config, units, plan_steps, ranks: int, emulated: int):
    """The loss of one optimisation step's micro-batches, and M. K counts every pack of the
    step (ranks x accumulation); DDP averages over the real ranks and `scale` over
    accumulation and emulated ranks, which together divide by K."""
    step_sequences = sum(count_targets(units, pack) for ps in plan_steps for pack in ps)
    step_groups = sum(len(pack) for ps in plan_steps for pack in ps)  # prompts (preference units)
    return make_loss_fn(cfg, ranks * cfg.grad_accum, step_sequences, 1.0 / (cfg.grad_accum * emulated),
                        step_groups), step_sequences


def count_targets(units, idx) -> int:
    return sum(int((s["labels"] != -100).any()) for s in sequences_of(units, idx))


# ----------------------------------------------------------------------------- helpers: reference


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
            if row_groups is None or row_groups.leader:
                table[torch.as_tensor(idx, device=device)] = logps.double().view(len(idx), -1)
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


# ----------------------------------------------------------------------------- helpers: run


def shard_model(wrapped, model, world: int, device, offload_params: bool = False):
    """FSDP2 over every rank: each decoder layer its own unit, the rest (embeddings, final norm,
    lm head: what the loss reads) in the root, the wrapper that runs forward and loss. With
    `offload_params` the shards live in host memory (CPUOffloadPolicy): each unit is copied in for
    its forward and backward, its gradients copied out, and the optimizer steps on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload_params else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return fully_shard(wrapped, mesh=mesh, mp_policy=policy, offload_policy=offload)


def setup_distributed(cfg: Config):
    """(rank, world size, data-parallel rank, data-parallel size, RowGroups or None). With --sp U
    and --cp C the torchrun world is a (world / (C U)) x C x U device mesh (dimensions dp, cp,
    sp; Ulysses innermost, its all-to-alls the heaviest traffic): the C x U ranks of one dp index
    share a packed row, the "dp" dimension splits the data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.sp < 1 or world % cfg.sp:  # checked on every rank before any collective
        raise SystemExit(f"--sp {cfg.sp} must be >= 1 and divide the world size {world} (run --sp N under "
                         f"torchrun --nproc_per_node M, M a multiple of N)")
    if cfg.cp < 1 or world % (cfg.sp * cfg.cp):
        raise SystemExit(f"--cp {cfg.cp} must be >= 1 and --sp x --cp ({cfg.sp} x {cfg.cp}) must divide the world "
                         f"size {world} (run under torchrun --nproc_per_node M, M a multiple of sp x cp)")
    if world > 1 or (cfg.fsdp and "LOCAL_RANK" in os.environ):  # FSDP on one GPU (offload) needs a group too
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.sp > 1 or cfg.cp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            dp = world // (cfg.sp * cfg.cp)
            mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dp, cfg.cp, cfg.sp),
                                    mesh_dim_names=("dp", "cp", "sp"))
            row_groups = RowGroups(mesh["sp"].get_group() if cfg.sp > 1 else None,
                                   mesh["cp"].get_group() if cfg.cp > 1 else None)
            return rank, world, mesh["dp"].get_local_rank(), dp, row_groups
        return rank, world, rank, world, None
    return 0, 1, 0, 1, None


def lr_lambda(cfg: Config):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def plot_loss(metrics_path: str, png: str, cfg: Config) -> Optional[str]:
    """The loss curve titled with what was trained; for LOGO also the chosen - rejected margin
    and the preference accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path)]
    steps = [r["step"] for r in rows]
    preference = all("margin" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(11 if preference else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    weighting = ", LongAlign weighting" if cfg.loss_weighting else ""
    ax.set_title(f"{cfg.preset} preset, {cfg.strategy} batching, {cfg.objective}{weighting}", fontsize=9)
    if preference:
        ax = axes[0, 1]
        ax.plot(steps, [r["margin"] for r in rows], label="margin (chosen - rejected log-prob)")
        ax.plot(steps, [r["pref_accuracy"] for r in rows], label="preference accuracy")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{cfg.objective} preference metrics", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


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
    too_long = sum(n > cfg.window for n in unit_lengths(units, cfg.shared_prefix))
    if too_long:  # the packer drops them (overlong="drop"): said here, with the count
        log(f"data: {too_long} of {len(units)} prompts with their answers exceed --window {cfg.window} tokens "
            f"and are left out (a prompt and its answers always share one row)")
    return units, ref_units


# ----------------------------------------------------------------------------- the loop


def main(argv=None, step_hook=None) -> dict:
    cfg = parse_args(argv)
    rank, world, dp_rank, dp_size, row_groups = setup_distributed(cfg)
    # refusals of the flag combination, on every rank, before any data is read or model built
    if cfg.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp needs a torchrun job (torchrun --nproc_per_node N train/train.py --fsdp ...)")
    if cfg.offload_params and not cfg.fsdp:
        raise SystemExit("--offload-params works through FSDP2: add --fsdp (one GPU: torchrun --nproc_per_node 1)")
    if cfg.ref_model and cfg.objective not in NEEDS_REFERENCE:
        raise SystemExit(f"--ref-model is for --objective dpo or longpo; {cfg.objective} has no reference")
    if cfg.fsdp and cfg.world_size > 1:
        raise SystemExit("--fsdp shards over torchrun's ranks; --world-size (emulated ranks) is for a single process")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    emulated = cfg.world_size if world == 1 else 1  # ranks run one after another in this process
    ranks = dp_size * emulated  # packs per plan step
    os.makedirs(cfg.out, exist_ok=True)
    is_main = rank == 0

    from tqdm import tqdm

    log = (lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None)
    units, ref_units = load_units(cfg, log)
    lengths = unit_lengths(units, cfg.shared_prefix)
    sources = units.sources if cfg.objective == "pretrain" else None
    model = build_model(cfg, device)
    # before wrapping and resuming: the default reference is the initial policy
    ref_table = reference_logprobs(cfg, model, ref_units, lengths, ranks, dp_rank, emulated, world, row_groups, device,
                                   log) if ref_units is not None else None
    wrapped = CausalLMWithLoss(model)
    if world > 1 or cfg.fsdp:
        if cfg.time_repeats > 1:
            raise SystemExit("--time-repeats is for ranks emulated in one process, not under torchrun")
        wrapped = shard_model(wrapped, model, world, device, cfg.offload_params) if cfg.fsdp else \
            torch.nn.parallel.DistributedDataParallel(wrapped)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = checkpoint.TrainingState(cfg.out, model, opt, sched, dict(asdict(cfg), processes=world), sharded=cfg.fsdp)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    start = 0
    if cfg.resume and ckpt.exists():
        try:
            start, used = ckpt.resume(cfg.max_steps, log)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"resume: {e}") from None
        if is_main:  # keep the history up to the checkpoint; a torn last line is dropped
            kept = checkpoint.read_metrics(metrics_path, start, log)
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        log(f"resumed from {used} at step {start}")
    elif not cfg.resume and not cfg.overwrite and (ckpt.exists() or os.path.exists(metrics_path)):
        raise SystemExit(f"{cfg.out} holds a previous run (checkpoint or metrics): pass --resume to continue it or "
                         f"--overwrite to replace it")
    elif is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if world > 1:
        dist.barrier()  # no rank starts before rank 0 has settled the metrics file
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.preset}: {n_params / 1e6:.1f}M parameters, {len(units)} units, strategy={cfg.strategy}, "
        f"objective={cfg.objective}, weighting={cfg.loss_weighting}, ranks={ranks} ({world} processes), "
        f"device={device}")

    plans, history = {}, []
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not is_main or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    for step in range(start, cfg.max_steps):
        plan_steps = optimizer_step_batches(cfg, plans, lengths, ranks, step, sources)
        loss_fn, step_sequences = step_loss_fn(cfg, units, plan_steps, ranks, emulated)
        t0 = time.perf_counter()
        total_loss, real, slots, repeat_ms = 0.0, 0, 0, 0.0
        rank_ms, rank_min, rank_max = ([0.0] * emulated for _ in range(3))  # median / fastest / slowest pass
        for a, ps in enumerate(plan_steps):
            for e in range(emulated):
                r = dp_rank * emulated + e if world > 1 else e
                t_rank = time.perf_counter()
                mb = micro_batch(cfg, units, ps[r], device)
                if ref_table is not None and ps[r]:
                    mb["ref_logps"] = ref_table[torch.as_tensor(ps[r], device=device)]
                if cfg.objective == "logo":
                    mb["batch"] = mb["batch"].with_positions(logo_positions(cfg, mb))
                if row_groups is not None:
                    mb = shard_micro_batch(mb, row_groups)
                prepare_ms = (time.perf_counter() - t_rank) * 1e3
                defer_sync = world > 1 and a < len(plan_steps) - 1  # gradients reduced once per optimizer step
                if cfg.fsdp:
                    wrapped.set_requires_gradient_sync(not defer_sync)
                timings = []
                for repeat in range(cfg.time_repeats):
                    t_pass = time.perf_counter()
                    with wrapped.no_sync() if defer_sync and not cfg.fsdp else contextlib.nullcontext(), autocast:
                        if repeat == 0:
                            loss = wrapped(mb, loss_fn)
                            loss.backward()
                        else:  # the same work again for the timing; its gradients are dropped
                            torch.autograd.grad(wrapped(mb, make_loss_fn(cfg, 1, 1, 1.0)), params, allow_unused=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    timings.append((time.perf_counter() - t_pass) * 1e3)
                repeat_ms += sum(timings[1:])
                rank_ms[e] += prepare_ms + float(np.median(timings))
                rank_min[e] += prepare_ms + min(timings)
                rank_max[e] += prepare_ms + max(timings)
                total_loss += loss.item()
                counted = row_groups is None or row_groups.leader  # a row's tokens once per group
                real += mb["real_tokens"] if counted else 0
                slots += mb["slots"] if counted else 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1e3 - repeat_ms  # the step as training runs it, without timing repeats
        pref = getattr(loss_fn, "sums", torch.zeros(0, dtype=torch.float64)).to(device)
        stats = torch.cat([torch.tensor([total_loss, real, slots], dtype=torch.float64, device=device), pref])
        if world > 1:
            dist.all_reduce(stats)
        loss_value = stats[0].item() / world
        row = dict(step=step + 1, loss=loss_value, tokens_per_s=stats[1].item() / (ms / 1e3),
                   padding_ratio=1.0 - stats[1].item() / max(1.0, stats[2].item()), ms=ms,
                   slowest_rank_ms=max(rank_ms), rank_ms=rank_ms, rank_ms_min=rank_min, rank_ms_max=rank_max,
                   lr=sched.get_last_lr()[0],
                   real_tokens=int(stats[1].item()), sequences=step_sequences)
        if pref.numel():
            groups = max(1.0, stats[-1].item())
            row.update({name: stats[3 + i].item() / groups for i, name in enumerate(PREFERENCE_METRICS)
                        if ref_table is not None or not name.startswith("ref_")})
        if sources is not None:  # --objective pretrain: the tokens each --data source gave this step
            given = np.zeros(int(sources.max()) + 1, np.int64)
            drawn = [u for ps in plan_steps for pack in ps for u in pack]
            np.add.at(given, sources[drawn], units.lengths[drawn])
            row["source_tokens"] = {path: int(n) for (path, _), n in zip(data_sources(as_list(cfg.data)), given)}
        history.append(row)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if (step + 1) % cfg.log_every == 0:
                pref_text = f" | margin {row['margin']:+.3f} | pref acc {row['pref_accuracy']:.2f}" if pref.numel() else ""
                log(f"step {step + 1:5d} | loss {loss_value:.4f}{pref_text} | {row['tokens_per_s']:9.0f} tok/s | "
                    f"padding {row['padding_ratio']:.3f} | {ms:8.1f} ms")
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.max_steps:
            ckpt.save(step + 1)
        if step_hook is not None:  # after the step is complete (and checkpointed)
            step_hook(row)
    bar.close()
    if cfg.max_steps > start:  # a checkpoint is written for new steps only, never relabelled
        ckpt.save(cfg.max_steps)
    if cfg.export:
        tok = records.load_tokenizer(tokenizer_path(cfg)) if (cfg.tokenizer or cfg.model) else None
        export.export_model(cfg.export, model, tok, sharded=cfg.fsdp, is_main=is_main)
        log(f"exported a transformers model directory to {cfg.export}")
    if is_main and cfg.max_steps > start:
        png = plot_loss(metrics_path, os.path.join(cfg.out, "loss.png"), cfg) if cfg.plot and history else None
        log(f"done: {cfg.out}/metrics.jsonl" + (f", {png}" if png else ""))
    full = (p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters())  # FSDP: DTensors
    checksum = float(sum(p.detach().double().sum().item() for p in full))
    with open(os.path.join(cfg.out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, param_checksum=checksum, losses=[h["loss"] for h in history]), f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return dict(history=history, checksum=checksum, model=model, config=cfg)


if __name__ == "__main__":
    result = main()  # held: dropping it frees the model, whose DDP reducer owns a gloo process group
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # everything is written and the process group destroyed; leave without destructors: a
        # ProcessGroupGloo freed after destroy_process_group can hang joining its worker threads
        # (seen: the DDP reducer's, when main()'s result was dropped) or abort in the interpreter's
        # teardown ("terminate called without an active exception", pytorch/pytorch#179291)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
