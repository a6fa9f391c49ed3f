"""Sequence-tiled MLP: the same outputs and gradients as the untiled model, with and without
layer checkpointing, and what it saves (peak counted with MemTracker on real CPU tensors)."""
import copy

import pytest
import torch

from longalign_ops.memory import apply_tiled_mlp

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)


def twins(checkpointing):
    torch.manual_seed(0)
    plain = LlamaForCausalLM._from_config(copy.deepcopy(CFG), attn_implementation="eager")
    tiled = copy.deepcopy(plain)
    apply_tiled_mlp(tiled, chunk_tokens=37)  # 300 tokens: 9 chunks, the last one short
    for m in (plain, tiled):
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        m.train()
    return plain, tiled


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_is_exact(checkpointing):
    plain, tiled = twins(checkpointing)
    ids = torch.randint(0, 64, (1, 300))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, tiled)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert plain.state_dict().keys() == tiled.state_dict().keys()


def test_tiled_mlp_holds_one_chunk_of_intermediates():
    from torch.distributed._tools.mem_tracker import MemTracker

    peaks = {}
    for name, chunk in (("plain", None), ("tiled", 64)):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(copy.deepcopy(CFG), attn_implementation="eager")
        if chunk:
            apply_tiled_mlp(model, chunk)
        ids = torch.randint(0, 64, (1, 2048))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model.model(input_ids=ids).last_hidden_state.sum().backward()
        peaks[name] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    # a layer's (2048 x 512) fp32 gate, up and activation outputs (4 MB each) are no longer kept
    # whole: at the peak (inside a backward) at least one layer's worth is gone
    assert peaks["tiled"] < peaks["plain"] - 3 * 2048 * 512 * 4 * 0.9, peaks


def test_bad_inputs():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        apply_tiled_mlp(LlamaForCausalLM._from_config(copy.deepcopy(CFG)), 0)
    with pytest.raises(ValueError, match="model.model.layers"):
        apply_tiled_mlp(torch.nn.Linear(2, 2))


def test_train_py_tiled_mlp_flag_trains_the_same(tmp_path, monkeypatch):
    import os
    import sys

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
    import train

    common = ["--max-steps", "3", "--no-plot", "--num-samples", "64"]
    plain = train.main(common + ["--out", str(tmp_path / "plain")])["history"]
    tiled = train.main(common + ["--out", str(tmp_path / "tiled"), "--tiled-mlp", "16"])["history"]
    assert [r["loss"] for r in tiled] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
