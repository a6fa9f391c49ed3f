"""Memory features for rows of hundreds of thousands of tokens.

Activation-checkpoint offload (as ALST's): with every decoder layer checkpointed, what a step still
keeps on the device is each layer's input, the ``(T, hidden)`` tensor the recompute starts from:
at 512K tokens per GPU, Llama-3-8B's 32 bf16 inputs are 128 GiB. ``apply_activation_offload``
keeps them in host memory instead: copied out (pinned, on a side CUDA stream) as each layer's
forward ends, and brought back for the layer's backward, the next one prefetched while the current
one recomputes.

Sequence-tiled MLP with recompute (as ALST's TiledMLP): a decoder layer's MLP runs over chunks of
tokens, each under non-reentrant activation checkpointing, so that neither the forward nor the
backward ever holds the ``(T, intermediate)`` gate / up / activation tensors of the whole row,
only those of one chunk (at T = 137K tokens per GPU, Llama-3-8B's three bf16 intermediates are
11.8 GB; at 8K-token chunks, 0.7 GB). The price is the MLP's forward run twice, about a third
more MLP compute. Token-wise MLPs only: the result is exactly the untiled one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ._validation import check_int


def _tiled(forward, chunk_tokens: int):
    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        T = x.shape[-2]
        if T <= chunk_tokens:
            return forward(x, *args, **kwargs)
        parts = x.split(chunk_tokens, dim=-2)
        if torch.is_grad_enabled():
            outs = [checkpoint(forward, part, *args, use_reentrant=False, **kwargs) for part in parts]
        else:
            outs = [forward(part, *args, **kwargs) for part in parts]
        return torch.cat(outs, dim=-2)

    run.longalign_tiled = chunk_tokens
    return run


def _tile(module: torch.nn.Module, chunk_tokens: int) -> None:
    """Replace `module.forward` by its tiled form; tiling it again re-tiles the original forward."""
    forward = module.forward
    base = getattr(forward, "__wrapped__", forward) if hasattr(forward, "longalign_tiled") else forward
    module.forward = _tiled(base, chunk_tokens)


def _tiling_target(model: torch.nn.Module, chunk_tokens, caller: str):
    """(checked chunk_tokens, the decoder model holding ``.layers``) of a transformers causal LM."""
    chunk_tokens = check_int("chunk_tokens", chunk_tokens, minimum=1)
    inner = getattr(model, "model", model)
    if getattr(inner, "layers", None) is None:
        raise ValueError(f"{caller} needs a transformers causal LM with model.model.layers")
    return chunk_tokens, inner


def apply_tiled_norms(model: torch.nn.Module, chunk_tokens: int = 32768) -> torch.nn.Module:
    """Tile the RMSNorms of a transformers causal LM over `chunk_tokens`-token chunks with
    recompute, in place: every ``*layernorm`` of each decoder layer and the final ``model.norm``.
    Their eager forward upcasts the row to fp32 and autograd keeps fp32 copies of it for the
    backward, whose temporaries are several more: at 512K tokens per GPU and hidden 4096, one norm's
    backward alone holds about 40 GiB. Tiled, one chunk's worth. Exact; parameters unchanged.
    Returns the model."""
    chunk_tokens, inner = _tiling_target(model, chunk_tokens, "apply_tiled_norms")
    norms = [m for layer in inner.layers for name, m in layer.named_children() if name.endswith("layernorm")]
    if isinstance(getattr(inner, "norm", None), torch.nn.Module):
        norms.append(inner.norm)
    for norm in norms:
        _tile(norm, chunk_tokens)
    return model


def apply_tiled_mlp(model: torch.nn.Module, chunk_tokens: int = 8192) -> torch.nn.Module:
    """Tile the MLP of every decoder layer of a transformers causal LM (``model.model.layers[i].mlp``)
    over `chunk_tokens`-token chunks, in place; parameters and state-dict keys are unchanged.
    Returns the model."""
    chunk_tokens, inner = _tiling_target(model, chunk_tokens, "apply_tiled_mlp")
    for layer in inner.layers:
        _tile(layer.mlp, chunk_tokens)
    return model


class _Offloaded:
    """One saved layer input: its host copy and, once restored, the device tensor."""

    __slots__ = ("host", "device", "restored", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device, self.restored, self.ready = host, device, None, None


class HostOffload:
    """Saved-tensor hooks that keep large saved tensors in host memory (`host`), for the layer inputs
    that non-reentrant checkpointing saves. Tensors already on `host`, or smaller than `min_bytes`,
    stay where they are. On CUDA the copies run on a side stream: device -> host as soon as the
    tensor is saved (the allocator keeps its memory until the copy is done), host -> device when
    the backward first needs it, and then the tensor saved just before it (the previous layer's
    input, needed next in a backward) is prefetched."""

    def __init__(self, host="cpu", pin_memory: Optional[bool] = None, min_bytes: int = 1 << 20):
        self.host = torch.device(host)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.min_bytes = check_int("min_bytes", min_bytes)
        self.pending: list = []  # offloaded, not yet restored: forward order
        self.copy_same_device = False  # tests: copy even when host == device, to check the round trip
        self._streams: dict = {}

    def _stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or (t.device == self.host and not self.copy_same_device):
            return t
        if t.device.type == "cuda":
            side = self._stream(t.device)
            host = torch.empty_like(t, device=self.host, pin_memory=self.pin_memory)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
            t.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            host = t.to(self.host, copy=True)
        record = _Offloaded(host, t.device)
        self.pending.append(record)
        return record

    def _restore(self, record: _Offloaded):
        if record.restored is not None:
            return
        if record.device.type == "cuda":
            side = self._stream(record.device)
            restored = torch.empty_like(record.host, device=record.device)
            side.wait_stream(torch.cuda.current_stream(record.device))  # the allocation is ordered before the copy
            with torch.cuda.stream(side):
                restored.copy_(record.host, non_blocking=True)
                record.ready = torch.cuda.Event()
                record.ready.record(side)
            restored.record_stream(side)  # allocated for the current stream, written on the side one
        else:
            restored = record.host.to(record.device, copy=True)
        record.restored = restored

    def unpack(self, record):
        if not isinstance(record, _Offloaded):
            return record
        self._restore(record)
        if record in self.pending:
            at = self.pending.index(record)
            if at > 0:
                self._restore(self.pending[at - 1])  # the next layer a backward needs
            del self.pending[at]
        restored, record.restored = record.restored, None  # a second backward copies it again
        if record.ready is not None:
            torch.cuda.current_stream(record.device).wait_event(record.ready)
            record.ready = None
        return restored

    def checkpoint(self, function, *args, **kwargs):
        """`torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)` with the saved
        inputs in host memory (the signature of transformers' `_gradient_checkpointing_func`)."""
        kwargs.pop("use_reentrant", None)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model, by
    the name transformers has (``activation_checkpointing_enable`` from 5.x, before it
    ``gradient_checkpointing_enable``). Returns the model."""
    kwargs = dict(use_reentrant=False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def apply_activation_offload(model: torch.nn.Module, host="cpu", *, pin_memory: Optional[bool] = None,
                             min_bytes: int = 1 << 20) -> HostOffload:
    """Checkpoint every decoder layer of a transformers causal LM and keep the checkpoints (each
    layer's input hidden states) in `host` memory, in place; returns the `HostOffload` in use.
    Gradients are exactly those of plain checkpointing. On a CPU-only run (host == device) nothing
    is copied and this is plain checkpointing.

    transformers 5's ``activation_checkpointing_enable(offload=True)`` does the same with torch's
    ``save_on_cpu``, whose copies run on the compute stream and stall it; here they run on a side
    stream and the backward's next input is prefetched."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise ValueError("apply_activation_offload needs a transformers causal LM whose model.model.layers are "
                         "GradientCheckpointingLayer modules")
    offload = HostOffload(host, pin_memory=pin_memory, min_bytes=min_bytes)
    enable_checkpointing(model)
    for layer in layers:
        layer._gradient_checkpointing_func = offload.checkpoint
    return offload


__all__ = ["HostOffload", "apply_activation_offload", "apply_tiled_mlp", "apply_tiled_norms", "enable_checkpointing"]
