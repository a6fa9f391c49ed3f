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

import inspect
import types
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


def _described_cu(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(batch_q, batch_k) of cu_seq_lens_q/k, memoised: every attention and linear-attention
    layer of a forward shares the one host read."""
    return _memo(cu_q, lambda: _from_cu_pair(cu_q, cu_k), cu_k)


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

# the families (config model_type) whose packed rows tests/family_audit.py finds exact against
# their stock eager forward on each sequence alone (loss and every gradient), in transformers
# 5.25, and tests/test_families.py holds to it; any other is refused unless
# LONGALIGN_ALLOW_UNVERIFIED=1 (the audit of each: docs/parity.md)
VERIFIED_FAMILIES = frozenset({
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bitnet", "cohere", "cohere2",
    "cohere2_moe", "cwm", "deepseek_v2", "deepseek_v3", "diffllama", "ergo", "ernie4_5", "ernie4_5_moe", "exaone",
    "exaone4", "exaone_moe", "falcon", "flex_olmo", "flint", "gemma", "gemma2", "gemma3", "gemma3_text", "glm",
    "glm4", "glm4_moe", "glm4_moe_lite", "gpt2", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "granite",
    "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe", "kolibri1", "laguna",
    "lara_mini", "lfm2", "llama", "llama4", "llama4_text", "mellum", "mimo_v2_flash", "minicpm3", "minicpm5_moe",
    "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "moshi", "nanochat",
    "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe", "opt", "param2moe", "phi", "phi3", "phimoe",
    "qwen2", "qwen2_moe", "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe",
    "qwen3_next", "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2",
    "vaultgemma", "youtu",
})

# (feature, detector on the text config, refused by): features the kernels or the packed path do
# not honour yet, refused by apply_longalign and the attention function ("always"), or only by the
# bare attention function ("attention": apply_longalign makes them exact)
def has_linear_attention(text) -> bool:
    """Gated DeltaNet layers (Qwen3-Next, Qwen3.5) in a text config."""
    return "linear_attention" in (getattr(text, "layer_types", None) or [])


def has_chunked_attention(text) -> bool:
    """Llama 4's chunked local attention layers in a text config."""
    return bool(getattr(text, "attention_chunk_size", None)) \
        and "chunked_attention" in (getattr(text, "layer_types", None) or [])


UNSUPPORTED = (
    ("linear-attention layers (Qwen3-Next's and Qwen3.5's Gated DeltaNet), which would mix the packed sequences "
     "unless apply_longalign(model) keeps them apart", has_linear_attention, "attention"),
    ("decoder layers that do not hand position_ids to the attention (Llama 4), so that it cannot see the packed "
     "sequences unless apply_longalign(model) passes them on",
     lambda c: getattr(c, "model_type", "") in POSITIONS_NOT_FORWARDED, "attention"),
    ("state-space layers (Granite 4's, Falcon-H1's, Nemotron-H's Mamba), which would mix the packed sequences",
     lambda c: any(t in ("mamba", "mamba2", "hybrid") for t in (getattr(c, "layer_types", None) or []))
     or bool(getattr(c, "mamba_d_state", None) or getattr(c, "mamba_n_heads", None)), "always"),
)


# families whose decoder layers do not hand position_ids on to the attention (Llama 4): the
# sequences of a row packed by position ids reach it only as packed_batch, which apply_longalign
# derives from the ids at the model's forward
POSITIONS_NOT_FORWARDED = ("llama4", "llama4_text")


def _text_config(config):
    """The language model's config (a multimodal config's text part; itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def unsupported_features(config, patched: bool = False, bare: bool = False) -> list:
    """The features of `config`'s family (its text config) that the library does not honour
    (`patched`: through apply_longalign, which honours more than the bare attention function),
    and, for a family not checked exact (VERIFIED_FAMILIES), that it is not. `bare`: the config
    of one attention module (a vision tower's is no decoder family and is not held to the list)."""
    text = _text_config(config)
    missing = [name for name, used, by in UNSUPPORTED if used(text) and not (patched and by == "attention")]
    family = getattr(config, "model_type", None)
    if bare and not _is_decoder_family(family):
        return missing
    if family not in VERIFIED_FAMILIES and not _unverified_allowed():
        missing.append(f"a family ({family}) not among those checked exact against their stock forward "
                       f"(docs/parity.md); set LONGALIGN_ALLOW_UNVERIFIED=1 to run it unchecked")
    return missing


def _is_decoder_family(model_type) -> bool:
    """A causal-LM family of transformers (a key of its AutoModelForCausalLM mapping) or a text
    part of one (``*_text``); a vision tower's config is neither."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(model_type, str) and (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                            or model_type.endswith("_text"))


def _unverified_allowed() -> bool:
    import os

    return os.environ.get("LONGALIGN_ALLOW_UNVERIFIED", "") not in ("", "0")


def check_family(config, what: str = "apply_longalign", patched: Optional[bool] = None, bare: bool = False) -> None:
    """NotImplementedError naming every feature of the family the packed path would not honour
    (`patched`: the model went through apply_longalign; by default, when `what` is it; `bare`:
    as unsupported_features)."""
    missing = unsupported_features(config, patched=what == "apply_longalign" if patched is None else patched,
                                   bare=bare)
    if missing:
        raise NotImplementedError(f"{what}: {getattr(config, 'model_type', 'this model')} has "
                                  + "; ".join(missing) + ". longalign_ops refuses it rather than compute something "
                                  "else than the model's own forward")


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
    """The config of an attention module's model (or None), its family checked once per config
    object (configs are unhashable: kept by id with the object itself, weakly, so that a new
    config that reuses a collected one's id is checked, not taken for it)."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    if getattr(module, "_longalign_patched", False):  # apply_longalign checked the family and patched the model
        return config
    if torch.compiler.is_compiling():  # evaluated while tracing (dynamo cannot trace the weak cache)
        check_family(config, f"attn_implementation='{NAME}'", bare=True)
    elif _CHECKED.get(id(config)) is not config:
        check_family(config, f"attn_implementation='{NAME}'", bare=True)
        _CHECKED[id(config)] = config
    return config


_CHECKED = weakref.WeakValueDictionary()


def longalign_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention interface: query ``(B, Hq, S, D)``, key/value ``(B, Hk, S, D)``;
    returns ``((B, S, Hq, D), None)``."""
    if dropout not in (0, 0.0) and module.training:
        raise NotImplementedError("attention dropout is not implemented; set attention_dropout=0.0")
    config = _checked_config(module)
    if attention_mask is not None and attention_mask.dim() != 2:
        # our registered mask function gives None or the 2-D padding mask; any other mask would
        # be ignored here, so refuse it rather than attend where it forbids
        raise ValueError(f"attn_implementation='{NAME}' takes no mask or a 2-D padding mask, got a mask of shape "
                         f"{tuple(attention_mask.shape)}; pass packed sequences through position_ids, "
                         f"cu_seq_lens_q/k or packed_batch instead")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # transformers' window: key j is visible from query i iff i - sliding_window < j (and j <= i
    # when causal; symmetric otherwise), as its masks and its flash-attn path define it
    # gpt-oss's learnable sinks (s_aux); Llama 4's chunked layers
    options = dict(causal=causal, softmax_scale=scaling, softcap=softcap or None, sinks=kwargs.get("s_aux"),
                   chunk_size=_chunk_size(module, config))
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, -1 if causal else sliding_window - 1)
    B, Hq, S, D = query.shape
    Sk, Dv = key.shape[2], value.shape[-1]  # DeepSeek's MLA: Dv != D
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
        _check_temperature_tuning(module, shard.batch, 1, sharded=True)
        out = sequence_parallel.attention(query[0].transpose(0, 1), key[0].transpose(0, 1).to(query.dtype),
                                          value[0].transpose(0, 1).to(query.dtype), shard, **options)
        return out[None], None
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sk, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * Sk, value.shape[1], Dv)
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
            return out.view(B, S, Hq, Dv), None
        batch_q, batch_k = _described_cu(cu_q, cu_k)
    elif attention_mask is not None and not (S == Sk and _memo(attention_mask, lambda: bool(attention_mask.all()))):
        idx, described = _memo(attention_mask, lambda: _from_padding_mask(attention_mask, q.device), "unpad")
        out = varlen_attention(q[idx], k[idx], v[idx], described, **options)
        full = out.new_zeros(B * S, Hq, Dv)
        full[idx] = out
        return full.view(B, S, Hq, Dv), None
    elif position_ids is not None and S == Sk:
        batch_q = batch_k = _memo(position_ids, lambda: _from_position_ids(position_ids, B, S, q.device))
    else:
        batch_q = PackedBatch.from_lengths([S] * B, device=q.device)
        batch_k = batch_q if Sk == S else PackedBatch.from_lengths([Sk] * B, device=q.device)
    _check_temperature_tuning(module, batch_q, B)
    out = varlen_attention(q, k, v, batch_q, batch_k if batch_k is not batch_q else None, **options)
    return out.view(B, S, Hq, Dv), None


def _chunk_size(module, config) -> Optional[int]:
    """Llama 4's chunk size on its chunked layers (``layer_types[i] == "chunked_attention"``), else None."""
    text = _text_config(config) if config is not None else None
    layer = getattr(module, "layer_idx", None)
    if layer is None or not has_chunked_attention(text) or text.layer_types[layer] != "chunked_attention":
        return None
    return int(text.attention_chunk_size)


def _check_temperature_tuning(module, batch: PackedBatch, rows: int, sharded: bool = False) -> None:
    """Llama 4's NoPE layers scale the queries by a temperature of the token's index in the row
    (the local slice's under sequence parallelism), not of its position id; from index
    floor_scale - 1 (8191) on it is no longer 1. A sequence packed after another and reaching
    that index would be scaled unlike the same sequence alone: refused, never run differently."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return
    limit = int(module.floor_scale) - 1
    if sharded:
        late = batch.total > limit
    else:
        starts = np.cumsum(batch.lengths) - batch.lengths
        late = rows == 1 and bool(((starts > 0) & (starts + batch.lengths - 1 >= limit)).any())
    if late:
        raise NotImplementedError(
            f"attn_implementation='{NAME}': Llama 4's NoPE layers scale queries by the token's index in the row "
            f"(attn_temperature_tuning), so a sequence packed or sharded past index {limit} would attend unlike "
            f"alone; pack rows of at most {limit + 1} tokens without sequence parallelism, or set "
            f"attn_temperature_tuning=False")


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
    original_forward = model.forward
    # an earlier patch of this instance's forward (None: the class's); kept as an attribute so
    # that a deep copy of the model (TRL's reference model) holds its own copy of it
    model._longalign_inner_forward = model.__dict__.get("forward")
    linear = _keep_linear_attention_apart(model)
    for module in model.modules():  # the attention function knows the model was patched (copies keep it)
        module._longalign_patched = True
    # the row's sequences go to the layers as packed_batch where they cannot see the position ids:
    # the linear-attention layers wrapped above, or (Llama 4) the attention itself
    derive = linear > 0 or (attention and getattr(_text_config(model.config), "model_type", "")
                            in POSITIONS_NOT_FORWARDED)

    def inner_forward(self):
        """The forward under the patch, of `self` (the patched model or a deep copy of it)."""
        inner = self.__dict__.get("_longalign_inner_forward") or type(self).forward.__get__(self)
        return _deriving_packed_batch(inner) if derive else inner

    if derive and not fused_loss:
        _bind_forward(model, lambda self, *args, **kwargs: inner_forward(self)(*args, **kwargs),
                      inspect.signature(original_forward))
    if not fused_loss:
        return model
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..cross_entropy import fused_linear_cross_entropy

    logit_scale, softcap = logit_transform(model.config)

    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, token_weights=None, **kwargs):
        if (labels is None and shift_labels is None) or kwargs.get("fused_lm_head"):
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return inner_forward(self)(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        if derive:
            _add_packed_batch(kwargs)
        outputs = _backbone(self)(*args, **kwargs)
        hidden = outputs.last_hidden_state
        head = self.get_output_embeddings()
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

    _bind_forward(model, forward, _with_keywords(original_forward, _PACKED_INPUTS))
    return model


def _bind_forward(model, forward, signature) -> None:
    """``model.forward = forward`` bound to the model (``forward(self, ...)``), with `signature`
    (the model's own, without self) for what inspects it (the Trainer's unused-column removal).
    Bound, a deep copy of the model calls it on the copy: a closure over the model would run
    the original's weights from the copy (a reference model made by copying the policy)."""

    me = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[me, *signature.parameters.values()])
    model.forward = types.MethodType(forward, model)


def _keep_linear_attention_apart(model) -> int:
    """Run each linear-attention layer (Gated DeltaNet: a causal conv1d and the gated delta rule,
    both recurrent over the row) once per packed sequence, from a zero state, as the model runs
    each sequence alone; returns how many layers it wrapped. (flash-linear-attention's varlen
    kernels would do this in one launch on a GPU; this path is exact everywhere.)"""
    wrapped = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__.endswith("GatedDeltaNet"):
            # on the class, switched on per instance: a deep copy of the model (a reference
            # model) keeps the switch and runs its own weights
            if not getattr(cls.forward, "_longalign_per_sequence", False):
                cls.forward = _per_sequence(cls.forward)
            module._longalign_apart = True
            wrapped += 1
    return wrapped


def _per_sequence(forward):
    def run(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if not getattr(self, "_longalign_apart", False):
            return forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        batch = kwargs.get("packed_batch")
        if isinstance(batch, sequence_parallel.Shard) or sequence_parallel.current() is not None:
            raise NotImplementedError("linear-attention layers (Gated DeltaNet) under sequence parallelism are not "
                                      "implemented: train Qwen3-Next / Qwen3.5 without --sp / --cp")
        cu = kwargs.get("cu_seq_lens_q")
        if batch is None and cu is not None:
            batch = _described_cu(cu, kwargs.get("cu_seq_lens_k", cu))[0]
        if batch is None or batch.num_sequences <= 1:
            return forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if batch.groups is not None:
            raise NotImplementedError("linear-attention layers (Gated DeltaNet) over shared prefixes are not "
                                      "implemented (a branch's state starts from its prefix's): pack without "
                                      "shared prefixes (--no-shared-prefix)")
        if hidden_states.shape[0] != 1 or hidden_states.shape[1] != batch.total:
            raise ValueError(f"packed rows hold one row of {batch.total} tokens, got hidden states of shape "
                             f"{tuple(hidden_states.shape)}")
        # (a packed row is training input: its recurrent state would be the last sequence's, so the
        # cache transformers makes by default (use_cache) is left without it)
        pieces = torch.split(hidden_states, batch.lengths.tolist(), dim=1)
        return torch.cat([forward(self, piece) if piece.shape[1] else piece for piece in pieces], dim=1)

    run.__wrapped__ = forward
    run._longalign_per_sequence = True
    return run


def _backbone(model):
    """The decoder stack under the LM head (get_decoder(); Llama4ForCausalLM's names its stack
    `model` under a base_model_prefix of "language_model", so get_decoder() gives the LM itself)."""
    decoder = model.get_decoder()
    if decoder is model or decoder is getattr(model, "_orig_mod", None):
        decoder = getattr(model, "model", None)
        if decoder is None:
            raise NotImplementedError(f"apply_longalign: cannot find the decoder stack of {type(model).__name__}")
    return decoder


def _deriving_packed_batch(forward):
    """forward, adding packed_batch= from a packed row's position_ids (one row whose ids restart
    at 0) when nothing else describes the sequences: for families whose layers drop the ids."""

    def wrapped(*args, **kwargs):
        _add_packed_batch(kwargs)
        return forward(*args, **kwargs)

    wrapped.__wrapped__ = forward
    return wrapped


def _add_packed_batch(kwargs):
    ids, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if (ids is None or kwargs.get("packed_batch") is not None or kwargs.get("cu_seq_lens_q") is not None
            or sequence_parallel.current() is not None or ids.dim() != 2 or ids.shape[0] != 1
            or (mask is not None and not bool(mask.all()))):
        return
    batch = _memo(ids, lambda: _from_position_ids(ids, 1, ids.shape[1], ids.device))
    if batch.num_sequences > 1:
        kwargs["packed_batch"] = batch


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
