"""Decoder families beyond Llama: exact, or refused by name. The fused loss applies each
family's logits transform (Granite's logits_scaling, Cohere's logit_scale, Gemma's final
soft-cap); gpt-oss's sinks, DeepSeek's MLA, Llama 4's chunks and Qwen3-Next's / Qwen3.5's
linear-attention layers are honoured; what the library does not honour yet (Mamba layers) is
refused, never run differently."""
import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from family_audit import audit, causal_lm_families, check_packed_row, packed_inputs, tiny_config  # noqa: E402
from longalign_ops.integrations.transformers import (VERIFIED_FAMILIES, apply_longalign, check_family,  # noqa: E402
                                                     logit_transform, unsupported_features)


def check_packed_row_is_exact(family, overrides, fused_loss=True, lengths=(9, 1, 14)):
    """family_audit's check (a packed row against the stock eager model on each sequence alone):
    the token-mean loss to 1e-4 relative, every gradient to 1e-3 of its largest entry (plus 1e-6
    of the model's largest gradient: the linear-attention layers' decay parameters get gradients
    1e-7 in size, whose fp32 rounding in the delta rule is 1e-9)."""
    cfg = tiny_config(family, **overrides)
    rel, worst = check_packed_row(cfg, fused_loss=fused_loss, lengths=lengths)
    assert rel <= 1e-4 and worst <= 1.0, (family, rel, worst)
    return cfg


@pytest.mark.parametrize("family, overrides, interpret", [
    ("granite", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
     "1"),
    ("granitemoe", dict(logits_scaling=3.0, num_local_experts=4, num_experts_per_tok=2), "0"),
    ("cohere", dict(logit_scale=0.5), "1"),
    ("cohere2", dict(logit_scale=0.25, sliding_window=6, layer_types=["sliding_attention", "full_attention"]), "0"),
    ("gemma2", dict(head_dim=16, final_logit_softcapping=2.0, sliding_window=6), "0"),
])
def test_the_fused_loss_applies_the_familys_logits_transform(family, overrides, interpret, monkeypatch):
    """Before: Granite and Cohere off by 22-25%. Granite and Cohere through the Triton kernels
    (the interpreter), the rest on the PyTorch path."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cfg = check_packed_row_is_exact(family, overrides)
    scale, cap = logit_transform(cfg)
    assert (scale != 1.0) or cap, "the family's transform must be in play"


GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=6,
               layer_types=["sliding_attention", "full_attention"])
LLAMA4 = dict(head_dim=16, attention_chunk_size=4, num_local_experts=2, intermediate_size_mlp=96)
QWEN3_NEXT = dict(head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"])
MLA = dict(num_key_value_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16,
           q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
           moe_intermediate_size=32)


@pytest.mark.parametrize("family, overrides, fused_loss, interpret", [
    # gpt-oss: learnable sinks on sliding and full layers (before: 0.27% off, no sink gradient)
    ("gpt_oss", GPT_OSS, True, "1"),
    # DeepSeek's MLA: value head dim 16 under q/k's 24 (before: a crash)
    ("deepseek_v3", dict(MLA, n_group=1, topk_group=1), True, "1"),
    ("deepseek_v2", MLA, True, "0"),
    # Llama 4: chunks of 4 on its RoPE layers, global NoPE layers (before: 0.85% off; the fused
    # path crashed on its MoE output)
    ("llama4_text", LLAMA4, False, "0"),
    ("llama4_text", LLAMA4, True, "1"),
    # Qwen3-Next: Gated DeltaNet layers restart at every sequence (before: 2.1% off)
    ("qwen3_next", QWEN3_NEXT, True, "0"),
    ("qwen3_next", QWEN3_NEXT, False, "0"),
    ("qwen3_5_text", dict(QWEN3_NEXT, num_experts=None), True, "0"),
])
def test_families_that_used_to_differ_or_crash_are_exact(family, overrides, fused_loss, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_packed_row_is_exact(family, overrides, fused_loss=fused_loss)


def test_gpt_oss_sinks_get_their_gradient():
    cfg = tiny_config("gpt_oss", **GPT_OSS)
    torch.manual_seed(0)
    model = apply_longalign(AutoModelForCausalLM.from_config(cfg).float())
    _, ids, labels, position_ids = packed_inputs([9, 14], cfg.vocab_size)
    model(input_ids=ids, position_ids=position_ids, labels=labels).loss.backward()
    for layer in model.model.layers:
        assert layer.self_attn.sinks.grad is not None and layer.self_attn.sinks.grad.abs().max() > 0


def test_what_the_library_does_not_honour_is_refused_by_name():
    """Mamba layers (Granite 4 hybrid) would mix the packed sequences: refused everywhere.
    Gated DeltaNet layers are kept apart by apply_longalign only: the bare attention
    implementation refuses them."""
    cfg = tiny_config("granitemoehybrid", layer_types=["mamba", "attention"], mamba_d_head=16, mamba_n_heads=8)
    assert any("state-space layers" in f for f in unsupported_features(cfg)), unsupported_features(cfg)
    with pytest.raises(NotImplementedError, match="state-space layers"):
        check_family(cfg)
    qwen = tiny_config("qwen3_next", **QWEN3_NEXT)
    check_family(qwen)  # apply_longalign keeps them apart
    with pytest.raises(NotImplementedError, match="linear-attention layers"):
        check_family(qwen, "attn_implementation='longalign'")


@pytest.mark.parametrize("family, overrides, feature", [
    ("qwen3_next", QWEN3_NEXT, "linear-attention layers"),
    ("llama4_text", LLAMA4, "do not hand position_ids to the attention"),
])
def test_a_family_apply_longalign_patches_is_refused_by_the_bare_attention_function(family, overrides, feature):
    """attn_implementation="longalign" given to the constructor (no apply_longalign): the first
    forward refuses Qwen3-Next, whose linear-attention layers would mix the row's sequences, and
    Llama 4, whose attention never sees the position ids that mark them; after apply_longalign
    the same model runs (and a deep copy of it, as a reference model, too)."""
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longalign")
    with pytest.raises(NotImplementedError, match=feature):
        model(input_ids=torch.randint(0, 96, (1, 8)))
    apply_longalign(model)
    copy.deepcopy(model)(input_ids=torch.randint(0, 96, (1, 8)), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))


def test_llama4_refuses_rows_its_temperature_tuning_would_scale_unlike_alone():
    """Layer 1 is a NoPE layer (no_rope_layers[1] = 0) with the temperature from index 7 on."""
    cfg = tiny_config("llama4_text", **dict(LLAMA4, floor_scale=8, no_rope_layers=[1, 0]))
    model = apply_longalign(AutoModelForCausalLM.from_config(cfg).float(), fused_loss=False)
    _, ids, _, position_ids = packed_inputs([5, 6], cfg.vocab_size)
    with pytest.raises(NotImplementedError, match="attn_temperature_tuning"):
        model(input_ids=ids, position_ids=position_ids)
    model(input_ids=ids[:, :7], position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1]]))  # index 6 < 7: alone's scale


def test_the_supported_families_are_not_refused():
    """By apply_longalign (patched=True); the bare attention function also lets these through
    but Llama 4 and Qwen3-Next (their layers need apply_longalign)."""
    for family, overrides in (("llama", {}), ("qwen2", {}), ("mistral", {}), ("gemma2", dict(head_dim=16)),
                              ("granite", {}), ("cohere", {}), ("phi3", {}), ("gpt_oss", GPT_OSS),
                              ("llama4_text", LLAMA4), ("deepseek_v3", MLA), ("qwen3_next", QWEN3_NEXT)):
        assert unsupported_features(tiny_config(family, **overrides), patched=True) == [], family
        bare = unsupported_features(tiny_config(family, **overrides), bare=True)
        assert (bare != []) == (family in ("llama4_text", "qwen3_next")), (family, bare)


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


@pytest.mark.parametrize("family, overrides", [
    ("gpt_oss", GPT_OSS), ("deepseek_v3", dict(MLA, n_group=1, topk_group=1)), ("llama4_text", LLAMA4),
    ("qwen3_next", QWEN3_NEXT),
])
def test_train_py_trains_the_new_families(tmp_path, family, overrides):
    """train/train.py --model DIR on each family's tiny model (pre-tokenised records, no
    tokenizer): SFT trains; DPO over shared prefixes trains where the family takes them and is
    one line naming --no-shared-prefix where it does not (Gated DeltaNet, Llama 4's chunks)."""
    from test_user_path import assert_one_line_refusal, losses, train

    model_dir = str(tmp_path / family)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).save_pretrained(model_dir)
    chats = str(tmp_path / "chats.jsonl")
    with open(chats, "w") as f:
        for i in range(6):
            f.write(json.dumps(dict(input_ids=list(range(5, 25 + i)), labels=[-100] * 10 + list(range(15, 25 + i))))
                    + "\n")
    res = train(["--model", model_dir, "--data", chats, "--max-steps", "2", "--out", str(tmp_path / "sft"),
                 "--no-plot"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(math.isfinite(x) for x in losses(str(tmp_path / "sft")))
    prefs = str(tmp_path / "prefs.jsonl")
    with open(prefs, "w") as f:
        for i in range(6):
            f.write(json.dumps(dict(prompt_input_ids=list(range(10, 15 + i)), chosen_input_ids=[20 + i, 3],
                                    rejected_input_ids=[40 + i, 41, 3])) + "\n")
    dpo = ["--model", model_dir, "--data", prefs, "--objective", "dpo", "--max-steps", "2", "--no-plot"]
    res = train(dpo + ["--out", str(tmp_path / "dpo")])
    if family in ("qwen3_next", "llama4_text"):
        assert_one_line_refusal(res, "--no-shared-prefix")
        res = train(dpo + ["--out", str(tmp_path / "dpo"), "--no-shared-prefix"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(losses(str(tmp_path / "dpo"))) == 2


def _model_type(family):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[family].model_type


VERIFIED_KEYS = [f for f in causal_lm_families() if _model_type(f) in VERIFIED_FAMILIES]


@pytest.mark.parametrize("family", VERIFIED_KEYS)
def test_every_verified_family_is_exact(family):
    """Every family apply_longalign lets through: a packed row equals the stock model on each
    sequence alone (family_audit.py), on the PyTorch path."""
    assert audit(family) == "exact"


def test_every_other_decoder_family_is_refused_by_name():
    """The rest of transformers' causal LMs (encoder-decoders' decoders, ALiBi and learned
    absolute-position families whose packed rows differ, recurrent models, families whose tiny
    model could not be built here): refused, never run unchecked."""
    from types import SimpleNamespace

    others = [f for f in causal_lm_families() if f not in VERIFIED_KEYS]
    assert len(VERIFIED_KEYS) >= 90 and others
    for family in others:
        with pytest.raises(NotImplementedError, match="not among those checked exact"):
            check_family(SimpleNamespace(model_type=_model_type(family)))
    stock = AutoModelForCausalLM.from_config(tiny_config("bloom"))  # ALiBi: its packed row would differ
    with pytest.raises(NotImplementedError, match=r"a family \(bloom\) not among those checked exact"):
        apply_longalign(stock)


def test_unverified_families_run_when_the_user_says_so(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("LONGALIGN_ALLOW_UNVERIFIED", "1")
    check_family(SimpleNamespace(model_type="bloom"))


def test_the_parity_table_is_the_audits():
    """docs/parity.md's family table lists every verified family as exact (regenerate it with
    python tests/family_audit.py --write)."""
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "parity.md")).read()
    table = text.split("<!-- families:start -->")[1].split("<!-- families:end -->")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| `")}
    for family in VERIFIED_KEYS:
        assert rows.get(f"`{family}`", "").startswith("exact"), family
    for family in causal_lm_families():
        assert f"`{family}`" in rows, family
