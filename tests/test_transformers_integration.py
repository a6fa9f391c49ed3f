"""attn_implementation="longalign" in a tiny random Llama: packed, padding-free inputs give the
logits of each sequence run alone with eager attention."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import longalign_ops.integrations.transformers  # noqa: E402,F401  (registers "longalign")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def models():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    torch.manual_seed(0)
    eager = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="longalign").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "longalign"
    return eager, ours


def test_packed_position_ids_match_separate_sequences(models):
    eager, ours = models
    lengths = [7, 1, 40, 13]
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=pos).logits[0]
        want = torch.cat([eager(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_explicit_cu_seq_lens_with_synthesised_positions(models):
    """LOGO ids do not restart at 0: the boundaries come from cu_seq_lens kwargs."""
    eager, ours = models
    lengths = [9, 20]
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    pos = [torch.arange(n) * 3 + 5 for n in lengths]  # strided, starting at 5
    cu = torch.tensor([0, 9, 29], dtype=torch.int32)
    with torch.no_grad():
        got = ours(input_ids=torch.cat(seqs)[None], position_ids=torch.cat(pos)[None], cu_seq_lens_q=cu,
                   cu_seq_lens_k=cu, max_length_q=20, max_length_k=20).logits[0]
        want = torch.cat([eager(input_ids=s[None], position_ids=p[None]).logits[0] for s, p in zip(seqs, pos)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_padded_batch_and_gradients(models):
    eager, ours = models
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    got = ours(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        want0 = eager(input_ids=ids[:1]).logits[0]
        want1 = eager(input_ids=ids[1:, :8]).logits[0]
    torch.testing.assert_close(got[0].detach(), want0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :8].detach(), want1, atol=2e-5, rtol=1e-5)
    got[0].sum().backward()
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    ours.zero_grad()


def test_a_mask_it_cannot_honour_is_refused():
    from longalign_ops.integrations.transformers import longalign_attention_forward

    q = torch.randn(1, 2, 5, 8)
    mask4d = torch.zeros(1, 1, 5, 5)
    with pytest.raises(ValueError, match="2-D padding mask"):
        longalign_attention_forward(torch.nn.Module(), q, q, q, mask4d)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_sliding_window_and_softcap_models(family):
    """Qwen2 with sliding-window layers (window 6) and Gemma 2 (local layers of window 6 plus
    attention logit soft-capping): packed sequences through "longalign" give each sequence's
    logits run alone with eager attention, and gradients."""
    if family == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model

        cfg = Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True,
                     sliding_window=6, max_window_layers=0, layer_types=["sliding_attention"] * 2)
    else:
        from transformers import Gemma2Config as Config, Gemma2ForCausalLM as Model

        cfg = Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     sliding_window=6, attn_logit_softcapping=0.5, final_logit_softcapping=None)
    torch.manual_seed(0)
    eager = Model._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = Model._from_config(copy.deepcopy(cfg), attn_implementation="longalign").eval()
    with torch.no_grad():  # scores of order 1 (init gives ~1e-3), so the cap and the window both bite
        for name, p in eager.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(25.0)
    ours.load_state_dict(eager.state_dict())
    lengths = [19, 1, 11]
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    got = ours(input_ids=torch.cat(seqs)[None], position_ids=pos).logits[0]
    with torch.no_grad():
        want = torch.cat([eager(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits[0]
                          for s in seqs])
    torch.testing.assert_close(got.detach(), want, atol=3e-5, rtol=1e-5)
    got.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
