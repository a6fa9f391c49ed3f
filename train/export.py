"""The trained model as a transformers directory (safetensors weights, config, tokenizer) that
``AutoModelForCausalLM.from_pretrained(DIR)`` and inference servers load.

Under FSDP the full weights are gathered to rank 0's host memory (one layer's shards at a time
is what torch.distributed.checkpoint.state_dict does), written there, and every rank waits.

The directory is the user's: an export goes into a missing or empty directory, or one holding a
previous export of this tool (recognised by MARKER, which lists the files it wrote); only those
files are replaced, anything else there is left alone, and a directory holding anything else is
refused before training starts (check_target)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch.distributed as dist

MARKER = ".longalign_export.json"


def check_target(path: str) -> None:
    """Refuse (SystemExit, one line naming --export) a directory this tool may not write into."""
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.access(parent, os.W_OK):
            raise SystemExit(f"--export {path}: cannot create it ({parent} is not writable)")
        return
    if not os.path.isdir(path):
        raise SystemExit(f"--export {path} is a file, not a directory: choose a new or empty directory")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, MARKER)):
        raise SystemExit(f"--export {path} holds files this tool did not write: choose a new or empty directory "
                         f"(a previous export of train.py there is replaced)")


def full_state_dict(model, sharded: bool) -> dict:
    """The model's weights as plain CPU tensors (FSDP's DTensors gathered; rank 0 only)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _previous_files(path: str) -> list:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return [name for name in json.load(f)["files"] if os.path.basename(name) == name]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _move_into(tmp: str, path: str, previous) -> None:
    """The files of `tmp` into the existing export `path`, each by an atomic rename, the marker
    last; the previous export's files that this one did not write again are removed (and only
    those: the marker lists them)."""
    written = sorted(os.listdir(tmp))
    os.remove(os.path.join(path, MARKER))  # mid-way, the directory is no complete export
    for name in written:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    for name in set(previous) - set(written):
        target = os.path.join(path, name)
        if os.path.isfile(target):
            os.remove(target)
    _write_marker(path, written)
    os.rmdir(tmp)


def _write_marker(path: str, files) -> None:
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(tool="longalign_ops train/train.py", files=sorted(files)), f)
    os.replace(tmp, os.path.join(path, MARKER))


def _publish(path: str, write) -> None:
    """`write(tmp)` fills a temporary sibling directory, which then becomes `path`: renamed into
    place (a missing or empty `path`) or moved in file by file (a previous export of this tool)."""
    check_target(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(path) and os.listdir(path):  # a previous export of ours (check_target)
            _move_into(tmp, path, _previous_files(path))
        else:
            _write_marker(tmp, os.listdir(tmp))
            if os.path.isdir(path):
                os.rmdir(path)  # empty: rename(2) would replace it too, but say so
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


LORA = (".lora_A.default.", ".lora_B.default.")


def merged_lora_state(state: dict, config) -> dict:
    """A state dict of PEFT LoRA layers (``X.base_layer.weight``, ``X.lora_A.default.weight``,
    ``X.lora_B.default.weight``) as the plain model's: ``X.weight = W + alpha / r * B @ A``
    (computed in float32, stored in W's dtype), the adapters' keys dropped."""
    scale = config.lora_alpha / config.r
    out = {}
    for key, value in state.items():
        if any(tag in key for tag in LORA):
            continue
        if ".base_layer." in key:
            stem, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight":
                a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            key = f"{stem}.{leaf}"
        out[key] = value
    return out


def export_model(path: str, model, tokenizer=None, *, sharded: bool = False, is_main: bool = True) -> None:
    """Write `model` (a transformers PreTrainedModel) to `path` (_publish); with LoRA adapters
    (model.lora_config) their update merged into the weights, so the directory is a plain model.
    The config keeps the model's own attention implementation out: the directory loads without
    longalign_ops installed."""
    state = full_state_dict(model, sharded)  # a collective under FSDP: every rank calls it
    if is_main:
        lora = getattr(model, "lora_config", None)
        if lora is not None:
            state = merged_lora_state(state, lora)

        def write(tmp):
            implementation = model.config._attn_implementation
            try:
                model.config._attn_implementation = None  # "longalign" would need this library to load
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                model.config._attn_implementation = implementation
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        _publish(path, write)
    if dist.is_initialized():
        dist.barrier()


def export_adapter(path: str, model, *, sharded: bool = False, is_main: bool = True) -> None:
    """Write `model`'s LoRA adapters as PEFT saves them (adapter_config.json,
    adapter_model.safetensors with keys ``base_model.model.<module>.lora_A.weight``), so that
    ``PeftModel.from_pretrained(base, path)`` loads them."""
    from safetensors.torch import save_file

    state = full_state_dict(model, sharded)
    if is_main:
        adapters = {"base_model.model." + k.replace(".default.", "."): v.contiguous() for k, v in state.items()
                    if any(tag in k for tag in LORA)}

        def write(tmp):
            model.lora_config.save_pretrained(tmp)
            save_file(adapters, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        _publish(path, write)
    if dist.is_initialized():
        dist.barrier()
