"""The model: a preset Llama or a local transformers directory with longalign attention, the
memory features applied; and the module DDP/FSDP wrap (the body plus our loss).
"""
from __future__ import annotations

import torch

from config import Config, PRESETS
# importing it registers attn_implementation="longalign"
from longalign_ops.integrations.transformers import apply_longalign, check_family, logit_transform


def build_model(cfg: Config, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.model:
        config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        try:  # a family the packed path cannot run exactly is refused before its weights are read
            check_family(config, f"--model {cfg.model}", patched=True)
        except NotImplementedError as e:
            raise SystemExit(str(e)) from None
        check_family_flags(config, cfg)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, attn_implementation="longalign")
        # the family's layers that need the row's sequences (linear attention) keep them apart;
        # the loss is train/'s own (objectives.py), so the model's forward is left as it is
        apply_longalign(model, fused_loss=False)
    else:
        p = PRESETS[cfg.preset]
        mc = LlamaConfig(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"],
                         intermediate_size=p["intermediate_size"], num_hidden_layers=p["num_hidden_layers"],
                         num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
                         max_position_embeddings=cfg.window * max(1, cfg.target_window), rope_theta=10000.0,
                         tie_word_embeddings=False)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and every strategy
        model = LlamaForCausalLM._from_config(mc, attn_implementation="longalign")
    if cfg.lora:  # before the memory features: they wrap the layers the adapters go into
        apply_lora(model, cfg)
    from longalign_ops import memory

    if cfg.offload_activations:
        memory.apply_activation_offload(model)
    elif cfg.grad_checkpointing:
        memory.enable_checkpointing(model)
    if cfg.tiled_mlp:
        memory.apply_tiled_mlp(model, cfg.tiled_mlp)
    if cfg.tiled_norms:
        memory.apply_tiled_norms(model, cfg.tiled_norms)
    if cfg.tiled_attention:
        try:
            memory.apply_tiled_attention(model, cfg.tiled_attention)
            if cfg.sp > 1:  # each group's heads split over the Ulysses ranks: checked now, not at the first step
                text = model.config.get_text_config()
                memory.head_groups(text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads,
                                   cfg.tiled_attention, cfg.sp)
        except ValueError as e:  # a head count the model's heads cannot be cut into: one line naming the flag
            raise SystemExit(f"--tiled-attention {cfg.tiled_attention}: {e}") from None
    return model.to(device)


def check_family_flags(config, cfg: Config) -> None:
    """One line for the flags a family's layers cannot take yet: Gated DeltaNet (Qwen3-Next,
    Qwen3.5) restarts per sequence, but not per Ulysses/CP shard or from a shared prefix's state;
    Llama 4's chunks are cut per sequence, not per CP shard or shared-prefix branch."""
    from longalign_ops.integrations.transformers import _text_config, has_chunked_attention, has_linear_attention

    text = _text_config(config)
    kinds = []
    if has_linear_attention(text):
        kinds.append(("linear-attention layers", True))
    if has_chunked_attention(text):
        kinds.append(("chunked attention", False))
    for what, no_sp in kinds:
        name = f"--model {cfg.model}: {getattr(text, 'model_type', 'this family')}'s {what}"
        if cfg.cp > 1 or (no_sp and cfg.sp > 1):
            raise SystemExit(f"{name} do not run under {'--sp/--cp' if no_sp else '--cp'} yet: train without it")
        if cfg.shared_prefix:
            raise SystemExit(f"{name} do not run over shared prefixes yet: add --no-shared-prefix")


def apply_lora(model, cfg: Config):
    """LoRA adapters (PEFT) in `model`'s linear layers, in place; every other weight frozen. The
    adapters start at zero (B = 0), so the initial policy, and the dpo / longpo reference computed
    from it, is the model without them. ``model.lora_config`` keeps the config for the exports."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("--lora needs PEFT: pip install peft") from None
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)
    torch.manual_seed(cfg.seed)  # the adapters' initial A: the same on every rank and in every run of a seed
    try:
        get_peft_model(model, config)  # the adapters live in `model`'s modules; the wrapper is not kept
    except ValueError as e:
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0]}") from None
    if cfg.lora_trainable:  # LongLoRA's embeddings and norms: trained in full beside the adapters
        parts = [t.strip() for t in cfg.lora_trainable.split(",") if t.strip()]
        chosen = [p for name, p in model.named_parameters() if any(t in name for t in parts)]
        if not chosen:
            raise SystemExit(f"--lora-trainable {cfg.lora_trainable}: no parameter name contains "
                             f"{' or '.join(parts)}")
        for p in chosen:
            p.requires_grad_(True)
    model.lora_config = config
    return model


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
        scale, softcap = logit_transform(self.model.config)  # the family's logits: Granite, Cohere, Gemma
        if scale != 1.0:
            hidden = hidden * scale
        return loss_fn(hidden, weight.to(hidden.dtype), dict(mb, softcap=softcap))
