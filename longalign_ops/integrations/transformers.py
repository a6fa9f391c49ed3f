"""Register longalign_ops' varlen attention with transformers as ``attn_implementation="longalign"``.

    import longalign_ops.integrations.transformers  # registers on import
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longalign")
    out = model(input_ids=ids[None], position_ids=batch.position_ids[None], packed_batch=batch)

    apply_longalign(model)  # also: the loss from hidden states with the fused cross-entropy

Where the sequence boundaries come from, best first:
- ``packed_batch=`` a :class:`longalign_ops.PackedBatch` passed to the model's forward (it reaches
  every layer through transformers' attention kwargs): built on the host, nothing is read back;
  or a :class:`longalign_ops.sequence_parallel.Shard` (sequence parallelism: this rank's slice
  of the row, Ulysses attention over the row's global description; survives recompute);
- ``cu_seq_lens_q/k`` (+ ``max_length_q/k``), as transformers' flash-attention path and its
  ``DataCollatorWithFlattening`` give them (needed when positions do not restart at 0, as with
  LOGO's synthesised ids);
- a batch of one row whose ``position_ids`` restart at 0 per sequence;
- the 2-D padding mask of a padded batch (rows unpadded, attended, scattered back);
- otherwise each row is one sequence.
All but the first need the boundaries on the host: they are derived once per forward, in the
first layer, and reused by every other layer (memoised on the tensor that carries them, which is
the same object in every layer, and on its version counter).
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import numpy as np
import torch

from .. import sequence_parallel
from .._validation import memo_by_tensor
from ..attention import varlen_attention
from ..batch import PackedBatch, lengths_from_cu

NAME = "longalign"


def _memo(key: torch.Tensor, build, *extra):
    """build() once per forward: memoised on the tensor every layer receives (not while
    torch.compile traces, which has no tensor identities to key on)."""
    if torch.compiler.is_compiling():
        return build()
    return memo_by_tensor(key, build, "transformers", *extra)


def _from_cu_pair(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """Query and key descriptions from cu_seq_lens_q/k: one host read for both."""
    if cu_k is cu_q:
        batch = PackedBatch.from_cu_seqlens(cu_q.to(torch.int32), name="cu_seq_lens_q")
        return batch, batch
    host = torch.cat([cu_q.reshape(-1).long(), cu_k.reshape(-1).long()]).cpu().numpy()
    hq, hk = host[:cu_q.numel()], host[cu_q.numel():]
    batch_q = PackedBatch.from_lengths(lengths_from_cu("cu_seq_lens_q", hq), device=cu_q.device)
    if np.array_equal(hq, hk):
        return batch_q, batch_q
    return batch_q, PackedBatch.from_lengths(lengths_from_cu("cu_seq_lens_k", hk), device=cu_k.device)


def _from_position_ids(position_ids: torch.Tensor, B: int, S: int, device) -> PackedBatch:
    """One host read of the ids: a row of one whose ids restart at 0 holds several sequences;
    anything else is one sequence per row."""
    flat = position_ids.reshape(-1)
    if B == 1 and flat.numel() == S:
        host = flat.cpu().numpy()
        starts = np.flatnonzero(host == 0)
        if starts.size and (starts.size > 1 or starts[0] != 0):
            bounds = np.concatenate([[0] if starts[0] != 0 else [], starts, [S]]).astype(np.int64)
            return PackedBatch.from_lengths(np.diff(bounds), device=device)
    return PackedBatch.from_lengths([S] * B, device=device)


def _from_padding_mask(mask: torch.Tensor, device):
    """(token indices of the real tokens on the device, their description): one host read."""
    host = mask.detach().bool().cpu().numpy()
    keep = np.flatnonzero(host.reshape(-1))
    return torch.from_numpy(keep).to(device), PackedBatch.from_lengths(host.sum(-1), device=device)


# ----------------------------------------------------------------------------- decoder families
# What a family's stock forward does that the packed path must do too, in one place: the
# refusals of apply_longalign and of the attention function, the fused loss's logits transform
# and docs/parity.md all read these. A family whose forward uses something the library does not
# honour yet is refused by name, never run differently.

# (feature, detector on the text config): features the kernels or the packed path do not honour yet
UNSUPPORTED = (
    ("attention sinks (gpt-oss's learnable per-head sink logits, s_aux)",
     lambda c: getattr(c, "model_type", "") == "gpt_oss"),
    ("chunked local attention (Llama 4's attention_chunk_size)",
     lambda c: bool(getattr(c, "attention_chunk_size", None))
     and "chunked_attention" in (getattr(c, "layer_types", None) or ["chunked_attention"])),
    ("linear-attention / state-space layers (Qwen3-Next's and Qwen3.5's Gated DeltaNet, Granite 4's Mamba), which "
     "would mix the packed sequences",
     lambda c: any(t in ("linear_attention", "mamba", "mamba2") for t in (getattr(c, "layer_types", None) or []))),
    ("multi-head latent attention with a value head dim unlike the query/key head dim (DeepSeek V2/V3's MLA)",
     lambda c: getattr(c, "v_head_dim", None) is not None
     and c.v_head_dim != (getattr(c, "qk_nope_head_dim", 0) or 0) + (getattr(c, "qk_rope_head_dim", 0) or 0)),
)


def _text_config(config):
    """The language model's config (a multimodal config's text part; itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def unsupported_features(config) -> list:
    """The features of `config`'s family (its text config) that the library does not honour."""
    text = _text_config(config)
    return [name for name, used in UNSUPPORTED if used(text)]


def check_family(config, what: str = "apply_longalign") -> None:
    """NotImplementedError naming every feature of the family the packed path would not honour."""
    missing = unsupported_features(config)
    if missing:
        raise NotImplementedError(f"{what}: {getattr(config, 'model_type', 'this model')} uses "
                                  + "; ".join(missing) + ": longalign_ops does not implement it yet, and would "
                                  "compute something else than the model's own forward, so it refuses")


def logit_transform(config) -> Tuple[float, Optional[float]]:
    """(multiplier, soft-cap) that the family's forward applies to ``lm_head(hidden)``: Granite
    divides the logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``, Gemma
    soft-caps them (``final_logit_softcapping``). The fused loss folds the multiplier into the
    hidden states (``hidden * m`` through the head is ``m * logits``, gradients included)."""
    text = _text_config(config)
    scale = 1.0
    if getattr(text, "logits_scaling", None):
        scale /= float(text.logits_scaling)
    if getattr(text, "logit_scale", None) is not None:
        scale *= float(text.logit_scale)
    return scale, getattr(text, "final_logit_softcapping", None) or None


def _checked_config(module):
    """The config of an attention module's model, its family checked once per config object
    (configs are unhashable: kept by id with the object itself, weakly, so that a new config
    that reuses a collected one's id is checked, not taken for it)."""
    config = getattr(module, "config", None)
    if config is None:
        return
    if torch.compiler.is_compiling():  # evaluated while tracing (dynamo cannot trace the weak cache)
        check_family(config, f"attn_implementation='{NAME}'")
    elif _CHECKED.get(id(config)) is not config:
        check_family(config, f"attn_implementation='{NAME}'")
        _CHECKED[id(config)] = config


_CHECKED = weakref.WeakValueDictionary()


def longalign_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention interface: query ``(B, Hq, S, D)``, key/value ``(B, Hk, S, D)``;
    returns ``((B, S, Hq, D), None)``."""
    if dropout not in (0, 0.0) and module.training:
        raise NotImplementedError("attention dropout is not implemented; set attention_dropout=0.0")
    _checked_config(module)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"attn_implementation='{NAME}': attention sinks (s_aux) are not implemented yet")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"attn_implementation='{NAME}': a value head dim ({value.shape[-1]}) unlike the "
                                  f"query/key head dim ({query.shape[-1]}) is not implemented yet")
    if attention_mask is not None and attention_mask.dim() != 2:
        # our registered mask function gives None or the 2-D padding mask; any other mask would
        # be ignored here, so refuse it rather than attend where it forbids
        raise ValueError(f"attn_implementation='{NAME}' takes no mask or a 2-D padding mask, got a mask of shape "
                         f"{tuple(attention_mask.shape)}; pass packed sequences through position_ids, "
                         f"cu_seq_lens_q/k or packed_batch instead")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # transformers' window: key j is visible from query i iff i - sliding_window < j (and j <= i
    # when causal; symmetric otherwise), as its masks and its flash-attn path define it
    options = dict(causal=causal, softmax_scale=scaling, softcap=softcap or None)
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, -1 if causal else sliding_window - 1)
    B, Hq, S, D = query.shape
    Sk = key.shape[2]
    batch = kwargs.get("packed_batch")
    # the shard rides in the call (packed_batch=shard): transformers hands the same keyword to
    # every layer, and activation checkpointing captures it for the recompute, which a global
    # set around the forward (sequence_parallel.use) cannot reach
    shard = batch if isinstance(batch, sequence_parallel.Shard) else sequence_parallel.current()
    if shard is not None:
        # Ulysses and/or CP: this rank holds its tokens of one packed row; the shard carries the row's
        # global description, so nothing is derived from the (local) positions or masks
        if B != 1 or Sk != S:
            raise ValueError(f"under sequence parallelism the model takes this rank's slice of one packed row "
                             f"(batch 1), got batch {B} with {S} query and {Sk} key positions")
        out = sequence_parallel.attention(query[0].transpose(0, 1), key[0].transpose(0, 1).to(query.dtype),
                                          value[0].transpose(0, 1).to(query.dtype), shard, **options)
        return out[None], None
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sk, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * Sk, value.shape[1], D)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if batch is not None:
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"packed_batch must be a longalign_ops.PackedBatch or a sequence_parallel.Shard, got "
                            f"{type(batch).__name__}")
        batch_q = batch_k = batch
    elif cu_q is not None and cu_k is not None:
        if torch.compiler.is_compiling():
            # traced: flash-attn's cu_seqlens form, checked by device-side asserts, no host read
            max_q, max_k = kwargs.get("max_length_q") or B * S, kwargs.get("max_length_k") or B * Sk
            out = varlen_attention(q, k, v, cu_q.reshape(-1).to(torch.int32), cu_k.reshape(-1).to(torch.int32),
                                   int(max_q), int(max_k), **options)
            return out.view(B, S, Hq, D), None
        batch_q, batch_k = _memo(cu_q, lambda: _from_cu_pair(cu_q, cu_k), cu_k)
    elif attention_mask is not None and not (S == Sk and _memo(attention_mask, lambda: bool(attention_mask.all()))):
        idx, described = _memo(attention_mask, lambda: _from_padding_mask(attention_mask, q.device), "unpad")
        out = varlen_attention(q[idx], k[idx], v[idx], described, **options)
        full = out.new_zeros(B * S, Hq, D)
        full[idx] = out
        return full.view(B, S, Hq, D), None
    elif position_ids is not None and S == Sk:
        batch_q = batch_k = _memo(position_ids, lambda: _from_position_ids(position_ids, B, S, q.device))
    else:
        batch_q = PackedBatch.from_lengths([S] * B, device=q.device)
        batch_k = batch_q if Sk == S else PackedBatch.from_lengths([Sk] * B, device=q.device)
    out = varlen_attention(q, k, v, batch_q, batch_k if batch_k is not batch_q else None, **options)
    return out.view(B, S, Hq, D), None


def _loss_inputs(labels, shift_labels, ignore_index: int):
    """transformers' ForCausalLMLoss convention: labels are shifted here (padded with the ignore
    index, so each row's last position has no target) unless shift_labels come already shifted."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def apply_longalign(model, *, attention: bool = True, fused_loss: bool = True, ignore_index: int = -100):
    """Patch a transformers causal LM in place (as Liger-Kernel's ``apply_liger_kernel_to_*``):

    - ``attention``: ``attn_implementation="longalign"`` (packed rows through varlen attention);
    - ``fused_loss``: when ``labels`` (or ``shift_labels``) are given, the forward runs the
      backbone and computes the loss from the final hidden states with
      :func:`longalign_ops.fused_linear_cross_entropy`; the ``(T, V)`` logits are never made and
      ``logits`` in the output is None. The loss is transformers' own: labels shifted per row,
      the token mean, or the sum over ``num_items_in_batch`` when the Trainer passes it (gradient
      accumulation). Extra keywords: ``token_weights`` (per shifted target, e.g. LongAlign's
      ``K/(N_i M)``: the loss is then their weighted sum, already normalised) and ``packed_batch``.
      The family's logits transform is applied (Gemma's ``final_logit_softcapping``, Granite's
      ``logits_scaling``, Cohere's ``logit_scale``: :func:`logit_transform`). Without labels the
      forward is untouched. A family using what the library does not honour yet (attention sinks,
      chunked attention, linear-attention layers, MLA's value head dim: ``UNSUPPORTED``) is refused
      with NotImplementedError naming it.

    Returns the model. The backbone and head are looked up on every call, so PEFT or FSDP may
    wrap them afterwards.
    """
    check_family(model.config)
    if attention:
        model.set_attn_implementation(NAME)
    if not fused_loss:
        return model
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..cross_entropy import fused_linear_cross_entropy

    original_forward = model.forward
    logit_scale, softcap = logit_transform(model.config)

    def forward(*args, labels=None, shift_labels=None, num_items_in_batch=None, token_weights=None, **kwargs):
        if (labels is None and shift_labels is None) or kwargs.get("fused_lm_head"):
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        outputs = model.get_decoder()(*args, **kwargs)
        hidden = outputs.last_hidden_state
        head = model.get_output_embeddings()
        targets = _loss_inputs(labels, shift_labels, ignore_index).to(hidden.device)
        options = dict(bias=head.bias, ignore_index=ignore_index, softcap=softcap)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if logit_scale != 1.0:  # Granite's / Cohere's logits scaling, through the head
            flat = flat * logit_scale
        if token_weights is not None:
            loss = fused_linear_cross_entropy(flat, head.weight, targets, token_weights=token_weights.reshape(-1),
                                              reduction="sum", **options)
        elif num_items_in_batch is not None:
            loss = fused_linear_cross_entropy(flat, head.weight, targets, reduction="sum", **options)
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        else:
            loss = fused_linear_cross_entropy(flat, head.weight, targets, reduction="mean", **options)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    forward.__signature__ = _with_keywords(original_forward, _PACKED_INPUTS)
    model.forward = forward
    return model


# what PackedCollator and the patched forward add to a model's inputs: named in the forward's
# signature, so that HF Trainer's unused-column filter keeps them
_PACKED_INPUTS = ("shift_labels", "token_weights", "packed_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                  "max_length_k", "num_items_in_batch")


def _with_keywords(fn, names):
    """fn's signature with keyword-only parameters `names` (default None) added before **kwargs."""
    import inspect

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    have = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names if n not in have]
    return sig.replace(parameters=head + extra + tail)


def register() -> None:
    """Register the attention function and a flash-style mask (None or the 2-D padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, longalign_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()
