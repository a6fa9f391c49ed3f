"""Memory features for rows of hundreds of thousands of tokens.

Sequence-tiled MLP with recompute (as ALST's TiledMLP): a decoder layer's MLP runs over chunks of
tokens, each under non-reentrant activation checkpointing, so that neither the forward nor the
backward ever holds the ``(T, intermediate)`` gate / up / activation tensors of the whole row,
only those of one chunk (at T = 137K tokens per GPU, Llama-3-8B's three bf16 intermediates are
11.8 GB; at 8K-token chunks, 0.7 GB). The price is the MLP's forward run twice, about a third
more MLP compute. Token-wise MLPs only: the result is exactly the untiled one.
"""
from __future__ import annotations

import functools

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


def apply_tiled_mlp(model: torch.nn.Module, chunk_tokens: int = 8192) -> torch.nn.Module:
    """Tile the MLP of every decoder layer of a transformers causal LM (``model.model.layers[i].mlp``)
    over `chunk_tokens`-token chunks, in place; parameters and state-dict keys are unchanged.
    Returns the model."""
    chunk_tokens = check_int("chunk_tokens", chunk_tokens, minimum=1)
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("apply_tiled_mlp needs a transformers causal LM with model.model.layers")
    for layer in layers:
        forward = layer.mlp.forward
        base = getattr(forward, "__wrapped__", forward) if hasattr(forward, "longalign_tiled") else forward
        layer.mlp.forward = _tiled(base, chunk_tokens)
    return model


__all__ = ["apply_tiled_mlp"]
