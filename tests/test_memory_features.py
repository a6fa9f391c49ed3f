"""Sequence-tiled MLP: the same outputs and gradients as the untiled model, with and without
layer checkpointing, and what it saves (peak counted with MemTracker on real CPU tensors)."""
import copy

import pytest
import torch

from longalign_ops.memory import apply_tiled_mlp, enable_checkpointing

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)


def twins(checkpointing, tiled=True):
    torch.manual_seed(0)
    plain = LlamaForCausalLM._from_config(copy.deepcopy(CFG), attn_implementation="eager")
    other = copy.deepcopy(plain)
    if tiled:
        apply_tiled_mlp(other, chunk_tokens=37)  # 300 tokens: 9 chunks, the last one short
    for m in (plain, other):
        if checkpointing:
            enable_checkpointing(m)
        m.train()
    return plain, other


def assert_trains_the_same(plain, other, tol=1e-6):
    ids = torch.randint(0, 64, (1, 300))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, other)]
    torch.testing.assert_close(losses[1], losses[0], atol=tol, rtol=tol)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=tol, rtol=10 * tol, msg=name)
    assert plain.state_dict().keys() == other.state_dict().keys()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_is_exact(checkpointing):
    assert_trains_the_same(*twins(checkpointing))


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


# --- activation-checkpoint offload ---------------------------------------------------------------

def test_activation_offload_is_exact_and_round_trips():
    from longalign_ops.memory import apply_activation_offload

    plain, offloaded = twins(checkpointing=True, tiled=False)
    offload = apply_activation_offload(offloaded, host="cpu", min_bytes=0)
    offload.copy_same_device = True  # CPU here: force the host copy so the round trip is exercised
    saved, restored = [], []
    pack, unpack = offload.pack, offload.unpack
    offload.pack = lambda t: saved.append(pack(t)) or saved[-1]
    offload.unpack = lambda r: restored.append(unpack(r)) or restored[-1]
    ids = torch.randint(0, 64, (1, 300))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, offloaded)]
    # one host copy per decoder layer: its input hidden states, a tensor of its own
    assert len(saved) == CFG.num_hidden_layers and all(r.host.shape == (1, 300, CFG.hidden_size) for r in saved)
    assert len(offload.pending) == CFG.num_hidden_layers
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0)
    for loss in losses:
        loss.backward()
    assert len(restored) == CFG.num_hidden_layers and not offload.pending
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0, msg=name)


def test_activation_offload_rejects_a_model_without_decoder_layers():
    from longalign_ops.memory import apply_activation_offload

    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        apply_activation_offload(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="min_bytes"):
        apply_activation_offload(twins(False)[0], min_bytes=-1)


def test_activation_offload_takes_checkpoints_off_the_device():
    """Counted as bench_memory counts: fake tensors, the device stood in by the CPU and the host by
    `meta`. With offload the device no longer holds every layer's input; the host holds them all."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from longalign_ops.memory import apply_activation_offload

    cfg = copy.deepcopy(CFG)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, T = 6, 256, 256, 64, 4096
    layer_input = T * cfg.hidden_size * 4
    peaks = {}
    for name in ("checkpointing", "offload"):
        with torch.device("meta"):
            model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
        enable_checkpointing(model)
        if name == "offload":
            apply_activation_offload(model, host="meta", min_bytes=0)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu").train()
            ids = torch.zeros(1, T, dtype=torch.long)
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                model.model(input_ids=ids).last_hidden_state.sum().backward()
            snap = tracker.get_tracker_snapshot("peak")
        peaks[name] = {str(dev): {str(k).split(".")[-1]: v for k, v in c.items()} for dev, c in snap.items()}
    assert "meta" not in peaks["checkpointing"]
    assert peaks["offload"]["meta"]["Total"] == cfg.num_hidden_layers * layer_input, peaks
    # at its peak plain checkpointing holds every layer's input; with offload at most the one
    # being recomputed and the one prefetched
    kept = peaks["checkpointing"]["cpu"]["ACT"] - peaks["offload"]["cpu"]["ACT"]
    assert kept >= (cfg.num_hidden_layers - 2) * layer_input, (kept, peaks)
    assert peaks["offload"]["cpu"]["Total"] < peaks["checkpointing"]["cpu"]["Total"], peaks


# --- sequence-tiled RMSNorms -------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_norms_are_exact(checkpointing):
    from longalign_ops.memory import apply_tiled_norms

    plain, tiled = twins(checkpointing, tiled=False)
    apply_tiled_norms(tiled, chunk_tokens=37)
    norms = [m for m in tiled.modules() if hasattr(m.forward, "longalign_tiled")]
    assert len(norms) == 2 * CFG.num_hidden_layers + 1  # input, post-attention, and the final norm
    assert_trains_the_same(plain, tiled)
    with pytest.raises(ValueError, match="chunk_tokens"):
        apply_tiled_norms(tiled, chunk_tokens=0)


def test_tiled_norm_keeps_no_fp32_copy_of_the_row():
    """A bf16 row through transformers' RMSNorm: untiled, autograd keeps fp32 copies of the whole row
    and the backward makes more; tiled, one chunk's worth (peak counted with MemTracker, real
    CPU tensors)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from longalign_ops.memory import _tiled

    T, H = 8192, 256
    peaks = {}
    for name in ("plain", "tiled"):
        norm = LlamaRMSNorm(H).to(torch.bfloat16)
        if name == "tiled":
            norm.forward = _tiled(norm.forward, 512)
        x = torch.randn(1, T, H, dtype=torch.bfloat16, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(norm)
        with tracker:
            norm(x).float().sum().backward()
        peaks[name] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    assert peaks["tiled"] < peaks["plain"] - 2 * T * H * 4, peaks


@pytest.mark.gpu
def test_gpu_activation_offload_streams():
    """On a GPU the checkpoints go to pinned host memory on a side stream and come back (the
    previous layer's prefetched): gradients equal plain checkpointing's, and the device holds
    fewer bytes after the forward."""
    from longalign_ops.memory import apply_activation_offload

    plain, offloaded = (m.cuda() for m in twins(checkpointing=True, tiled=False))
    offload = apply_activation_offload(offloaded, min_bytes=0)
    ids = torch.randint(0, 64, (1, 4096), device="cuda")
    held = []
    for m in (plain, offloaded):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = m(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        if m is offloaded:
            assert len(offload.pending) == CFG.num_hidden_layers
            assert all(r.host.is_pinned() and r.host.device.type == "cpu" for r in offload.pending)
        loss.backward()
    assert not offload.pending
    assert held[1] < held[0] - (CFG.num_hidden_layers - 1) * 4096 * CFG.hidden_size * 4 * 0.9, held
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0, msg=name)
