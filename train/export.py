"""The trained model as a transformers directory (safetensors weights, config, tokenizer) that
``AutoModelForCausalLM.from_pretrained(DIR)`` and inference servers load.

Under FSDP the full weights are gathered to rank 0's host memory (one layer's shards at a time
is what torch.distributed.checkpoint.state_dict does), written there, and every rank waits."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch.distributed as dist


def full_state_dict(model, sharded: bool) -> dict:
    """The model's weights as plain CPU tensors (FSDP's DTensors gathered; rank 0 only)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_model(path: str, model, tokenizer=None, *, sharded: bool = False, is_main: bool = True) -> None:
    """Write `model` (a transformers PreTrainedModel) to `path`, atomically (a temporary sibling
    directory renamed into place). The config keeps the model's own attention implementation
    out: the directory loads without longalign_ops installed."""
    state = full_state_dict(model, sharded)  # a collective under FSDP: every rank calls it
    if is_main:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
        implementation = model.config._attn_implementation
        try:
            model.config._attn_implementation = None  # "longalign" would need this library to load
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        finally:
            model.config._attn_implementation = implementation
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
