"""Decoder families beyond Llama: exact, or refused by name. The fused loss applies each
family's logits transform (Granite's logits_scaling, Cohere's logit_scale, Gemma's final
soft-cap); families whose forward uses what the library does not honour yet (attention sinks,
chunked attention, linear-attention layers, MLA's value head dim) are refused, never run
differently."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CONFIG_MAPPING, AutoModelForCausalLM  # noqa: E402

from longalign_ops.integrations.transformers import (apply_longalign, check_family, logit_transform,  # noqa: E402
                                                     unsupported_features)

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str, **overrides):
    return CONFIG_MAPPING[family](**dict(SMALL, **overrides))


def packed_inputs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    labels = ids.clone()
    start = 0
    for n in lengths:  # a sequence's first token is no target of the one before it
        labels[0, start] = -100
        start += n
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, ids, labels, position_ids


@pytest.mark.parametrize("family, overrides, interpret", [
    ("granite", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
     "1"),
    ("granitemoe", dict(logits_scaling=3.0, num_local_experts=4, num_experts_per_tok=2), "0"),
    ("cohere", dict(logit_scale=0.5), "1"),
    ("cohere2", dict(logit_scale=0.25, sliding_window=6, layer_types=["sliding_attention", "full_attention"]), "0"),
    ("gemma2", dict(head_dim=16, final_logit_softcapping=2.0, sliding_window=6), "0"),
])
def test_the_fused_loss_applies_the_familys_logits_transform(family, overrides, interpret, monkeypatch):
    """A packed row of 3 sequences through apply_longalign (varlen attention, fused loss) against
    the stock eager model on each sequence alone: the token-mean loss to 1e-4 relative, and every
    gradient to 1e-3 of its largest entry (before: Granite and Cohere off by 22-25%). Granite and
    Cohere through the Triton kernels (the interpreter), the rest on the PyTorch path."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").float()
    ours = apply_longalign(copy.deepcopy(stock))
    scale, cap = logit_transform(cfg)
    assert (scale != 1.0) or cap, "the family's transform must be in play"

    lengths = [9, 1, 14]
    seqs, ids, labels, position_ids = packed_inputs(lengths, cfg.vocab_size)
    loss = ours(input_ids=ids, position_ids=position_ids, labels=labels).loss
    loss.backward()
    total, count = 0.0, 0
    for s in seqs:
        if len(s) < 2:
            continue
        part = stock(input_ids=s[None], labels=s[None]).loss
        (part * (len(s) - 1)).backward()
        total, count = total + part.detach() * (len(s) - 1), count + len(s) - 1
    want = total / count
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item()), (loss.item(), want.item())
    stock_grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert stock_grads[name].grad is None or not stock_grads[name].grad.any(), name
            continue
        g = stock_grads[name].grad / count
        assert (p.grad - g).abs().max() <= 1e-3 * g.abs().max().clamp_min(1e-12), name


@pytest.mark.parametrize("family, overrides, feature", [
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention",
                                                                                          "full_attention"]),
     "attention sinks"),
    ("llama4_text", dict(head_dim=16, attention_chunk_size=8, num_local_experts=2), "chunked local attention"),
    ("qwen3_next", dict(head_dim=16), "linear-attention"),
    ("deepseek_v3", dict(qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=None),
     "multi-head latent attention"),
])
def test_what_the_library_does_not_honour_is_refused_by_name(family, overrides, feature):
    cfg = tiny_config(family, **overrides)
    assert any(feature in f for f in unsupported_features(cfg)), unsupported_features(cfg)
    with pytest.raises(NotImplementedError, match=feature):
        check_family(cfg)


def test_a_refused_family_is_refused_by_the_attention_function_too():
    """attn_implementation="longalign" given to the constructor (no apply_longalign): the first
    forward refuses gpt-oss, whose attention would drop its sinks."""
    cfg = tiny_config("gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                      layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longalign")
    with pytest.raises(NotImplementedError, match="attention sinks"):
        model(input_ids=torch.randint(0, 96, (1, 8)))
    with pytest.raises(NotImplementedError, match="attention sinks"):
        apply_longalign(model)


def test_the_supported_families_are_not_refused():
    for family, overrides in (("llama", {}), ("qwen2", {}), ("mistral", {}), ("gemma2", dict(head_dim=16)),
                              ("granite", {}), ("cohere", {}), ("phi3", {})):
        assert unsupported_features(tiny_config(family, **overrides)) == [], family


def test_the_family_check_is_kept_per_config_object_not_per_reusable_id():
    """The attention function checks a model's family once per config object; the cache holds
    the object weakly, so once a config is collected its id (which CPython reuses) is no longer
    taken for a checked config."""
    import gc

    from transformers import LlamaConfig

    from longalign_ops.integrations import transformers as integration

    class Attention:
        config = None

    module = Attention()
    module.config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    integration._checked_config(module)
    key = id(module.config)
    assert integration._CHECKED.get(key) is module.config
    module.config = None
    gc.collect()
    assert key not in integration._CHECKED
