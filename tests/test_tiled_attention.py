"""The attention block over groups of query heads with recompute (memory.apply_tiled_attention):
outputs and every gradient equal the untiled model's (fp32, relative 1e-5) on GQA groups that do
not divide evenly, windows, soft-capping, biases, q/k norms, sinks and shared-prefix rows; what
it keeps (MemTracker on real CPU tensors); how heads are grouped; what it refuses.
Under Ulysses and context parallelism: tests/sp_worker.py (check_tiled_model)."""
import copy
import types

import pytest
import torch

import longalign_ops as la
from longalign_ops.memory import _UnmadeLinear, apply_tiled_attention, enable_checkpointing, head_groups

pytest.importorskip("transformers")
from family_audit import tiny_config  # noqa: E402

# 6 query heads on 3 kv heads: 2 groups hold 2 and 1 kv heads (4 and 2 query heads)
HEADS = dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16, hidden_size=96)


def models(family, groups, checkpointing=False, **overrides):
    from transformers import AutoModelForCausalLM

    from longalign_ops.integrations.transformers import apply_longalign

    torch.manual_seed(0)
    cfg = tiny_config(family, **{**HEADS, "use_cache": False, **overrides})
    plain = apply_longalign(AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).float()).train()
    tiled = apply_tiled_attention(copy.deepcopy(plain), groups)
    if checkpointing:
        enable_checkpointing(tiled)
    return plain, tiled


def assert_same_step(plain, tiled, batch, tol=1e-5):
    vocab = plain.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, batch.total), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (plain, tiled):
        out = m(input_ids=ids, position_ids=batch.position_ids[None], labels=ids, packed_batch=batch)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=0)
    grads = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol * a.grad.abs().max().item(), msg=name)
            grads += "self_attn" in name
    assert grads >= 4 * plain.config.get_text_config().num_hidden_layers  # q, k, v, o at least, every layer
    assert plain.state_dict().keys() == tiled.state_dict().keys()


ROW = [23, 1, 30, 0, 13]  # 67 tokens: lengths 0 and 1 among them


@pytest.mark.parametrize("family,groups,overrides", [
    ("llama", 2, {}),                                   # uneven: 2 and 1 kv heads
    ("llama", 3, {}),                                   # one kv head each
    ("llama", 6, {}),                                   # one query head each (kv heads shared by 2 groups)
    ("llama", 4, dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)),  # kv heads x query shares
    ("mistral", 2, dict(sliding_window=7)),             # a window
    ("gemma2", 3, {}),                                  # soft-capping, window, query_pre_attn_scalar
    ("qwen2", 2, {}),                                   # q/k/v biases
    ("qwen3", 3, {}),                                   # per-head q/k RMSNorm over head_dim
    ("gpt_oss", 2, {}),                                 # sinks (one per query head), o_proj bias, window layers
    ("granite", 2, {}),                                 # attention multiplier
], ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_tiled_attention_is_exact(family, groups, overrides):
    assert_same_step(*models(family, groups, **overrides), la.PackedBatch.from_lengths(ROW))


def test_tiled_attention_under_checkpointing_and_on_shared_prefixes():
    plain, tiled = models("llama", 2, checkpointing=True)
    assert_same_step(plain, tiled, la.PackedBatch.from_prefix_groups([(20, [5, 1, 9]), (0, [3]), (7, [])]))


def test_a_transformed_output_is_refused():
    """The groups' terms sum to the block's output only when the block returns its o-projection's
    output: a forward that transforms it is refused at its first call, never summed."""
    _, tiled = models("llama", 3)
    for layer in tiled.model.layers:
        attention = layer.self_attn
        forward = type(attention).forward

        def scaled(self, *args, _forward=forward, **kwargs):
            out, weights = _forward(self, *args, **kwargs)
            return torch.tanh(out) * 2.0, weights

        attention.forward = types.MethodType(scaled, attention)
    tiled = apply_tiled_attention(tiled, 3)  # grouping again wraps the transformed forward
    with pytest.raises(NotImplementedError, match="transforms the output of its o_proj"):
        tiled(input_ids=torch.randint(3, 96, (1, 12)))


def test_unmade_linear_gradients():
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = _UnmadeLinear.apply(x, w, b)
    assert y.shape == (2, 5, 4) and y.stride() == (0, 0, 0)  # nothing made
    dy = torch.randn(2, 5, 4, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, b), (x, w, b), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_it_keeps_one_group_of_q_and_attention_output():
    """MemTracker, real CPU tensors (torch's sdpa attention: any attention implementation is
    grouped): the tiled model's peak is below the untiled one's by at least a layer's q and
    attention output (fp32, 2048 tokens x 8 heads x 16)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    T = 2048
    cfg = tiny_config("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=16, hidden_size=128,
                      intermediate_size=64, use_cache=False)
    peaks = {}
    for name, groups in (("plain", None), ("tiled", 4)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").float().train()
        if groups:
            apply_tiled_attention(model, groups)
        ids = torch.randint(3, 96, (1, T))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model.model(input_ids=ids).last_hidden_state.sum().backward()
        peaks[name] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    q_and_out = 2 * T * 8 * 16 * 4
    assert peaks["tiled"] < peaks["plain"] - q_and_out, peaks


def test_head_groups():
    assert head_groups(8, 2, 2) == [([0, 1, 2, 3], [0]), ([4, 5, 6, 7], [1])]
    assert head_groups(6, 3, 2) == [([0, 1, 2, 3], [0, 1]), ([4, 5], [2])]  # 3 kv heads: 2 and 1
    assert head_groups(6, 2, 3) == [([0, 3], [0, 1]), ([1, 4], [0, 1]), ([2, 5], [0, 1])]  # query shares
    assert head_groups(32, 32, 5)[-1] == (list(range(26, 32)), list(range(26, 32)))  # MHA: 7, 7, 6, 6, 6
    for Hq, Hk, G in ((32, 8, 4), (32, 8, 8), (32, 8, 16), (28, 4, 7), (6, 2, 4), (40, 40, 3)):
        plan = head_groups(Hq, Hk, G)
        assert len(plan) == G
        assert sorted(h for q, _ in plan for h in q) == list(range(Hq))  # every query head once
        for q, kv in plan:  # GQA's mapping inside each group: query i reads kv head i // (len(q) / len(kv))
            assert len(q) % len(kv) == 0 and all(kv[i // (len(q) // len(kv))] == h // (Hq // Hk)
                                                 for i, h in enumerate(q))
    # Ulysses 2 over 6 / 2 heads: groups of whole kv heads (3 query heads) cannot split; query shares can
    assert head_groups(6, 2, 3, ulysses=2) == head_groups(6, 2, 3)
    assert head_groups(6, 2, 2) == [([0, 1, 2], [0]), ([3, 4, 5], [1])]
    assert head_groups(6, 2, 2, ulysses=2) == [([0, 1, 3, 4], [0, 1]), ([2, 5], [0, 1])]
    with pytest.raises(ValueError, match="Ulysses group of 4"):
        head_groups(8, 2, 4, ulysses=4)  # 2 query heads per group, whichever way
    with pytest.raises(ValueError, match="cannot be cut into 5 groups"):
        head_groups(6, 2, 5)


def test_refusals():
    plain, _ = models("llama", 2)
    with pytest.raises(ValueError, match="head_groups must be >= 1"):
        apply_tiled_attention(copy.deepcopy(plain), 0)
    with pytest.raises(TypeError, match="head_groups must be an int"):
        apply_tiled_attention(copy.deepcopy(plain), 2.0)
    with pytest.raises(ValueError, match="only 6 query heads"):
        apply_tiled_attention(copy.deepcopy(plain), 7)
    with pytest.raises(ValueError, match="model.model.layers"):
        apply_tiled_attention(torch.nn.Linear(2, 2))
    untouched = copy.deepcopy(plain)
    with pytest.raises(ValueError, match="cannot be cut into 5 groups"):
        apply_tiled_attention(untouched, 5)
    assert not any(hasattr(layer.self_attn.forward, "longalign_head_groups") for layer in untouched.model.layers)
    from transformers import AutoModelForCausalLM

    mla = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    with pytest.raises(ValueError, match="MLA is not split by heads here"):
        apply_tiled_attention(mla, 2)
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(copy.deepcopy(plain), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="wrapped by LoRA adapters"):
        apply_tiled_attention(adapted.base_model.model, 2)


def test_decoding_with_a_cache_runs_whole():
    """Generation fills a KV cache: the groups would each add their keys, so the block runs whole."""
    plain, tiled = models("llama", 3, use_cache=True)
    plain.eval(), tiled.eval()
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=4, do_sample=False)
        got = tiled.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_every_verified_family_is_exact_in_head_groups_or_refused_by_name():
    """Every text family of VERIFIED_FAMILIES, tiny, eager attention, 2 head groups: those in
    TILED_ATTENTION_FAMILIES give the untiled logits and gradients; the others are refused (by what
    their attention has, or by name; LONGALIGN_ALLOW_UNVERIFIED aside), never run differently.
    PhiMoE's grouped output differs although its layers look like Llama's: refused by name."""
    from family_audit import MULTIMODAL
    from transformers import AutoModelForCausalLM

    from longalign_ops.integrations.transformers import VERIFIED_FAMILIES
    from longalign_ops.memory import TILED_ATTENTION_FAMILIES

    assert TILED_ATTENTION_FAMILIES <= VERIFIED_FAMILIES
    phimoe = AutoModelForCausalLM.from_config(tiny_config("phimoe"))
    with pytest.raises(ValueError, match="the phimoe family's attention is not verified exact"):
        apply_tiled_attention(phimoe, 2)
    for family in sorted(VERIFIED_FAMILIES - set(MULTIMODAL)):
        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_config(tiny_config(family, use_cache=False),
                                                 attn_implementation="eager").float().train()
        tiled = copy.deepcopy(plain)
        if family not in TILED_ATTENTION_FAMILIES:
            # refused by what it has (MLA, a gate, no q/k/v/o) where that is seen, else by name
            with pytest.raises(ValueError, match="apply_tiled_attention"):
                apply_tiled_attention(tiled, 2)
            assert not any(hasattr(m.forward, "longalign_head_groups") for m in tiled.modules())
            continue
        apply_tiled_attention(tiled, 2)
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
        outs = [m(input_ids=ids).logits for m in (plain, tiled)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5, msg=family)
        for m, out in zip((plain, tiled), outs):
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * (1 + a.grad.abs().max().item()),
                                           msg=f"{family} {name}")
