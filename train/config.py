"""The run's configuration: presets, every flag with its help text, and the parsing that
fills in defaults and refuses bad combinations before anything is built.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

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
    data_split: Optional[str] = None    # the split of a saved DatasetDict given as --data (default: train)
    tokenizer: Optional[str] = None     # local tokenizer dir for --data (default: --model's)
    token_cache: Optional[str] = None   # pretrain: where tokenised stores are kept and reused
    skip_bad_records: bool = False      # skip (and count) bad records instead of stopping
    strategy: str = "bfd"               # naive | sorted | bfd (LongAlign packing; "packing" is an alias)
    loss_weighting: Optional[bool] = None  # LongAlign K/(N_i M); default: on with packing
    objective: str = "sft"              # sft | pretrain | logo | simpo | dpo | longpo
    shared_prefix: Optional[bool] = None  # preference rows: each prompt once for all its answers (default: on)
    ref_model: Optional[str] = None     # dpo / longpo reference (default: the initial policy)
    export: Optional[str] = None        # write a transformers model directory here at the end
    lora: int = 0                       # LoRA rank (PEFT adapters on the linear layers); 0: full fine-tuning
    lora_alpha: Optional[float] = None  # LoRA alpha (default: 2 x rank)
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"    # PEFT target_modules: all-linear, or module names (q_proj,v_proj)
    lora_trainable: Optional[str] = None  # with --lora: parameters trained in full too (LongLoRA: embed,norm)
    export_adapter: Optional[str] = None  # with --lora: write the PEFT adapter directory here at the end
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
    fill_rows: bool = False             # pretrain: rows filled to the last token, pieces cut at row ends (ProLong)
    tiled_mlp: int = 0                  # tokens per MLP chunk (sequence-tiled MLP with recompute); 0: off
    tiled_norms: int = 0                # tokens per RMSNorm chunk, the same way; 0: off
    tiled_attention: int = 0            # groups of query heads the attention block runs over with recompute; 0: off
    offload_activations: bool = False   # every layer checkpointed, the checkpoints in host memory
    offload_params: bool = False        # FSDP2 CPUOffloadPolicy: parameters, gradients, AdamW state on the host
    resume: bool = False
    overwrite: bool = False             # replace a previous run in --out (refused without it)
    ckpt_every: int = 0                 # 0: only at the end
    log_every: int = 1
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
    data="JSONL, or a directory written by datasets' save_to_disk, of chat records {\"messages\": [...]} (sft) or "
         "TRL-format preference records {\"prompt\", \"chosen\", \"rejected\"} (preference objectives), or LongPO's "
         "and LOGO's tokenised datasets as published; default: the embedded long-context retrieval task. "
         "pretrain: documents {\"text\"} or {\"input_ids\"}, or a directory of MDS shards (ProLong's rows), "
         "repeatable as PATH:WEIGHT to mix sources at those token proportions",
    data_split="the split to train on when --data is a directory holding a saved DatasetDict (default: train)",
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
    export="write the trained model here at the end as a transformers directory (safetensors, config, tokenizer); "
           "with --lora the adapters merged into the weights",
    lora="train LoRA adapters of this rank (PEFT) on the linear layers instead of every weight; the dpo / longpo "
         "reference is the model without them (0: full fine-tuning)",
    lora_alpha="LoRA alpha: the adapters' update is scaled by alpha / rank (default: 2 x rank)",
    lora_dropout="dropout on the adapters' input", lora_targets="PEFT target_modules: all-linear (every linear "
                                                                "layer but the LM head) or comma-separated names",
    lora_trainable="with --lora: comma-separated parts of parameter names trained in full beside the adapters "
                   "(LongLoRA's embed,norm: the embeddings and every norm); exported merged (--export)",
    export_adapter="with --lora: write the adapter (PEFT's adapter_config.json, adapter_model.safetensors) here at "
                   "the end; PeftModel.from_pretrained(base, DIR) loads it",
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
    fill_rows="--objective pretrain: fill every row to its last token, the documents laid end to end and cut at "
              "each row's end (ProLong's packing; each part its own sequence) instead of packing whole pieces",
    tiled_mlp="run each decoder layer's MLP over chunks of this many tokens with recompute, so the MLP "
              "intermediates of a long row never exist at once (longalign_ops.memory.apply_tiled_mlp); 0: off",
    tiled_norms="run the RMSNorms over chunks of this many tokens with recompute, so their fp32 temporaries "
                "never cover the whole row (longalign_ops.memory.apply_tiled_norms); 0: off",
    tiled_attention="run each decoder layer's attention block over this many groups of query heads with recompute "
                    "(q/k/v projections, RoPE, attention, the o-projection's share), so the row's q, k, v, attention "
                    "output and their gradients exist one group at a time (longalign_ops.memory.apply_tiled_attention; "
                    "under --sp each group's heads must split over the SP ranks); 0: off",
    offload_activations="checkpoint every decoder layer and keep the checkpoints (each layer's input) in pinned "
                        "host memory, copied on a side stream (longalign_ops.memory.apply_activation_offload; on a "
                        "CPU-only run: plain checkpointing)",
    offload_params="with --fsdp: parameters, gradients and AdamW state in host memory, the optimizer step on the "
                   "CPU (FSDP2 CPUOffloadPolicy)",
    resume="continue from the checkpoint in --out", overwrite="replace a previous run found in --out",
    ckpt_every="checkpoint every N steps (0: only at the end)", log_every="print a progress line every N steps",
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr naming the flag (argparse's message), exit 2; --help has the usage."""
        self.exit(2, f"train.py: error: {message} (see --help)\n")


def check_paths(cfg: Config) -> None:
    """Every path flag names something that exists: a missing one is one line naming its flag,
    before anything is read or built (not a traceback from deep inside a loader)."""
    for flag, value in (("--model", cfg.model), ("--ref-model", cfg.ref_model), ("--tokenizer", cfg.tokenizer)):
        if value is not None and not os.path.isdir(value):
            raise SystemExit(f"{flag} {value}: no such directory (a local transformers directory; nothing is "
                             f"downloaded)")
    for path, _ in data_sources(as_list(cfg.data)) if cfg.data else []:
        if not os.path.exists(path):
            raise SystemExit(f"--data {path}: no such file")
        if cfg.objective == "pretrain" and os.path.isdir(path) and \
                not os.path.exists(os.path.join(path, "index.json")):
            raise SystemExit(f"--data {path}: --objective pretrain reads JSONL files of documents or a directory of "
                             f"MDS shards (index.json and shard.*.mds, as ProLong's data), not this directory")
        if cfg.objective != "pretrain" and os.path.exists(os.path.join(path, "index.json")):
            raise SystemExit(f"--data {path}: MDS shards hold documents for --objective pretrain (ProLong's rows), "
                             f"not {cfg.objective} records")
    if cfg.data_split and not (cfg.data and os.path.isdir(as_list(cfg.data)[0])):
        raise SystemExit("--data-split chooses a split of a saved dataset directory given as --data")


def parse_args(argv=None) -> Config:
    cfg = Config()
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                float if name in ("beta", "gamma", "sft_weight", "lora_alpha") else str)
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
    if cfg.fill_rows and cfg.objective != "pretrain":
        raise SystemExit("--fill-rows cuts documents at row ends: it is for --objective pretrain")
    for flag in ("tiled_mlp", "tiled_norms", "tiled_attention"):
        if getattr(cfg, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: takes a positive number (0: off)")
    if cfg.lora < 0 or (cfg.lora_alpha is not None and not cfg.lora_alpha > 0) or not 0 <= cfg.lora_dropout < 1:
        raise SystemExit("--lora takes a rank >= 1 (0: off), --lora-alpha a positive number, --lora-dropout [0, 1)")
    for flag in ("export_adapter", "lora_alpha", "lora_trainable"):
        if getattr(cfg, flag) is not None and not cfg.lora:
            raise SystemExit(f"--{flag.replace('_', '-')} is for LoRA training: add --lora RANK")
    if cfg.export_adapter and cfg.lora_trainable:
        raise SystemExit("--export-adapter writes the adapters only, not the --lora-trainable weights: export the "
                         "merged model with --export")
    if cfg.export and cfg.export_adapter and os.path.abspath(cfg.export) == os.path.abspath(cfg.export_adapter):
        raise SystemExit("--export-adapter needs a directory of its own (the same as --export): each export replaces "
                         "the files of a previous one there")
    if cfg.lora and cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora
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


def as_list(data) -> List[str]:
    return [data] if isinstance(data, str) else list(data)
