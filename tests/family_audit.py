"""Every decoder family of the installed transformers (the AutoModelForCausalLM mapping) on a
tiny random config: a packed row of 3 sequences through ``apply_longalign`` (varlen attention,
the fused loss) against the stock eager model run on each sequence alone; the token-mean loss
to 1e-4 relative and every gradient to 1e-3 of its largest entry (plus 1e-6 of the model's
largest gradient). ``tests/test_families.py`` holds the verified families to it and every
other family to a refusal; ``python tests/family_audit.py`` prints the audit and
``--write`` regenerates docs/parity.md's family table from it.

Tiny configs: SMALL and GENERIC for every family (no dropout, few experts, small MLA ranks,
token ids inside the vocabulary), and a family's own entry in CONFIGS where it needs more."""
from __future__ import annotations

import copy
import os
import sys

import torch

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
GENERIC = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
               embd_pdrop=0.0, hidden_dropout=0.0, dropout=0.0, residual_dropout=0.0, head_dim=16, num_experts=4,
               num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=32, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
               q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0)
HYBRID = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              layer_types=["linear_attention", "full_attention"])
MLA = dict(num_key_value_heads=4, head_dim=8)  # MLA: a kv head per query head; head_dim is the rope part
DROP = object()  # a GENERIC key the family's config does not take
CONFIGS = {
    "falcon": dict(head_dim=DROP), "xlstm": dict(v_head_dim=DROP),
    "deepseek_v2": MLA, "deepseek_v3": MLA, "glm4_moe_lite": MLA, "minicpm3": MLA, "sarvam_mla": MLA, "youtu": MLA,
    "qwen3_next": HYBRID, "qwen3_5_text": dict(HYBRID, num_experts=None), "qwen3_5_moe_text": HYBRID,
    "llama4_text": dict(attention_chunk_size=4, intermediate_size_mlp=96),
    "gpt_oss": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=0.25, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    "gemma2": dict(final_logit_softcapping=2.0, sliding_window=6),
}


# multimodal families: a tiny text model (as its text family's) and a one-layer vision tower
_TEXT = {**SMALL, **GENERIC}
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=16)
_QWEN_VIT = dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64)
MULTIMODAL = {
    "gemma3": dict(text_config=_TEXT, vision_config=_VIT, mm_tokens_per_image=4),
    "llama4": dict(text_config={**_TEXT, **CONFIGS["llama4_text"]},
                   vision_config=dict(_VIT, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)),
    "qwen3_5": dict(text_config={**_TEXT, **CONFIGS["qwen3_5_text"]}, vision_config=_QWEN_VIT),
    "qwen3_5_moe": dict(text_config={**_TEXT, **CONFIGS["qwen3_5_moe_text"]}, vision_config=_QWEN_VIT),
}


# families whose default sub-configs (vision/audio towers, byte-level encoders) are too large to
# build on a small machine from these tiny text settings: not audited, so refused
NOT_BUILT = frozenset({"blt", "emu3", "gemma3n", "gemma4", "gemma4_unified", "gemma4_unified_assistant", "got_ocr2",
                       "inkling_text", "mllama", "moss_transcribe_diarize", "phi4_multimodal", "qwen4_exp"})


def tiny_config(family: str, **overrides):
    from transformers import CONFIG_MAPPING

    if family in MULTIMODAL:
        return CONFIG_MAPPING[family](**{**MULTIMODAL[family], **overrides})
    options = {**SMALL, **GENERIC, **CONFIGS.get(family, {}), **overrides}
    return CONFIG_MAPPING[family](**{k: v for k, v in options.items() if v is not DROP})


def packed_inputs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    labels = ids.clone()
    start = 0
    for n in lengths:  # a sequence's first token is no target of the one before it
        labels[0, start] = -100
        start += n
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, ids, labels, position_ids


def check_packed_row(cfg, fused_loss=True, lengths=(9, 1, 14)):
    """(loss relative error, worst gradient error in units of its tolerance) of apply_longalign's
    packed row against the stock eager model per sequence; raises what either raises."""
    from transformers import AutoModelForCausalLM

    from longalign_ops.integrations.transformers import _text_config, apply_longalign

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").float()
    ours = apply_longalign(copy.deepcopy(stock), fused_loss=fused_loss)
    seqs, ids, labels, position_ids = packed_inputs(list(lengths), _text_config(cfg).vocab_size)
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
    stock_grads = dict(stock.named_parameters())
    largest = max(p.grad.abs().max() for p in stock.parameters() if p.grad is not None) / count
    worst = 0.0
    for name, p in ours.named_parameters():
        ref = stock_grads[name].grad
        if p.grad is None:
            worst = max(worst, float("inf") if ref is not None and ref.any() else 0.0)
            continue
        g = ref / count
        worst = max(worst, ((p.grad - g).abs().max() / (1e-3 * g.abs().max() + 1e-6 * largest)).item())
    return abs(loss.item() - want.item()) / abs(want.item()), worst


def audit(family: str) -> str:
    """'exact', 'refused: ...', 'differs: ...' or 'cannot build a tiny model: ...' (checked
    with the verified list switched off, so that the audit sees what the path computes)."""
    old = os.environ.get("LONGALIGN_ALLOW_UNVERIFIED")
    os.environ["LONGALIGN_ALLOW_UNVERIFIED"] = "1"
    try:
        if family in NOT_BUILT:
            return "cannot build a tiny model: its default vision/audio/byte parts are too large here"
        try:
            cfg = tiny_config(family)
        except Exception as e:  # noqa: BLE001
            return f"cannot build a tiny model: {type(e).__name__}"
        try:
            rel, worst = check_packed_row(cfg)
        except NotImplementedError as e:
            return f"refused: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001
            return f"differs: raises {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if rel <= 1e-4 and worst <= 1.0:
            return "exact"
        return f"differs: loss {rel:.1e} relative, gradients {worst:.0f}x their tolerance"
    finally:
        if old is None:
            del os.environ["LONGALIGN_ALLOW_UNVERIFIED"]
        else:
            os.environ["LONGALIGN_ALLOW_UNVERIFIED"] = old


def causal_lm_families():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def write_parity_table(rows) -> None:
    """Replace docs/parity.md's family table (between its markers) with `rows`."""
    from longalign_ops.integrations.transformers import VERIFIED_FAMILIES

    from transformers import CONFIG_MAPPING, __version__

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "parity.md")
    text = open(path).read()
    head, rest = text.split("<!-- families:start -->")
    _, tail = rest.split("<!-- families:end -->")
    lines = [f"Audit of transformers {__version__}'s {len(rows)} causal-LM families "
             "(`python tests/family_audit.py --write`); `apply_longalign` runs the families marked exact and "
             "refuses the rest by name.", "", "| family | status |", "| --- | --- |"]
    for family, result in rows:
        verified = CONFIG_MAPPING[family].model_type in VERIFIED_FAMILIES
        if result == "exact" and not verified:
            result = "exact in the audit, not yet in VERIFIED_FAMILIES: refused"
        elif not result.startswith(("exact", "refused")):
            result = f"refused (the audit: {result})"
        result = result.replace("|", "/")
        lines.append(f"| `{family}` | {result} |")
    open(path, "w").write(head + "<!-- families:start -->\n" + "\n".join(lines) + "\n<!-- families:end -->" + tail)


if __name__ == "__main__":
    import signal
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = []

    def too_long(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, too_long)
    for family in only or causal_lm_families():
        signal.alarm(60)
        try:
            result = audit(family)
        except TimeoutError:
            result = "cannot build a tiny model: over 60 s"
        finally:
            signal.alarm(0)
        print(f"{family}\t{result}", flush=True)
        rows.append((family, result))
    if "--write" in sys.argv:
        write_parity_table(rows)
