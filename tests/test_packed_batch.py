"""The per-batch description: built once on the host, owned, accepted by every op, and, in a
whole transformers training step, the reason nothing is read back from the device."""
import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longalign_ops as la
from longalign_ops.batch import TILE_BLOCKS
from longalign_ops.data import PackedCollator

transformers = pytest.importorskip("transformers")
import longalign_ops.integrations.transformers  # noqa: E402,F401


def test_from_lengths_lays_out_everything_the_ops_need():
    lengths = [3, 0, 5, 1]
    b = la.PackedBatch.from_lengths(lengths)
    assert b.total == 9 and b.max_len == 5 and b.num_sequences == 4
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 3, 8, 9]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert b.sequence_ids.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3]
    for block in TILE_BLOCKS:
        seq, blk = b.tiles(block).tolist()
        want = {(i, j) for i, n in enumerate(lengths) for j in range(-(-n // block))}
        assert set(zip(seq, blk)) == want and len(seq) == len(want)
    assert b.tiles(16)[1].tolist() == sorted(b.tiles(16)[1].tolist(), reverse=True)  # heaviest first


def test_the_description_owns_its_data():
    lengths = np.array([4, 2], dtype=np.int64)
    b = la.PackedBatch.from_lengths(lengths)
    lengths[0] = 100
    assert b.lengths.tolist() == [4, 2] and b.cu_seqlens.tolist() == [0, 4, 6]
    with pytest.raises(ValueError):
        b.lengths[0] = 1  # read-only
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    c = la.PackedBatch.from_cu_seqlens(cu)
    cu[1] = 5
    assert c.cu_seqlens.tolist() == [0, 3, 7] and c.lengths.tolist() == [3, 4]


@pytest.mark.parametrize("lengths, exc, pattern", [
    ([3, -1], ValueError, "lengths must be >= 0: 1 negative, first at index 1"),
    ([1.5, 2.0], TypeError, "lengths must hold integers"),
    ([[1, 2]], ValueError, "lengths must be 1-D"),
    ([2 ** 30, 2 ** 30], ValueError, "do not fit int32"),
])
def test_from_lengths_bad_input(lengths, exc, pattern):
    with pytest.raises(exc, match=pattern):
        la.PackedBatch.from_lengths(lengths, device="meta")


def test_from_cu_seqlens_bad_input():
    with pytest.raises(ValueError, match="must start at 0"):
        la.PackedBatch.from_cu_seqlens(torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        la.PackedBatch.from_cu_seqlens(torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        la.PackedBatch.from_cu_seqlens(torch.tensor([0, 3]))


def test_with_positions_and_plan_batch():
    plan = la.pack([5, 9, 3, 7, 2], 12, world_size=2)
    for s in range(plan.num_steps):
        for r in range(2):
            b = plan.batch(s, r)
            assert torch.equal(b.cu_seqlens, plan.cu_seqlens(s, r))
    b = plan.batch(0, 0)
    pos = la.synthesize_positions(b, b.lengths * 4, method="logo", chunk_size=2, seed=3)
    assert torch.equal(pos, la.synthesize_positions(b.cu_seqlens, torch.from_numpy(b.lengths * 4), method="logo",
                                                    chunk_size=2, seed=3))
    b2 = b.with_positions(pos)
    assert torch.equal(b2.position_ids, pos) and b2.cu_seqlens is b.cu_seqlens
    with pytest.raises(ValueError, match="position_ids must have shape"):
        b.with_positions(pos[:-1])


def test_losses_accept_the_description():
    lengths = [4, 0, 7, 1]
    T, H, V = sum(lengths), 16, 37
    hidden, weight = torch.randn(T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (T,))
    labels[:4] = -100  # sequence 0 has no target
    b = la.PackedBatch.from_lengths(lengths)
    cu = b.cu_seqlens.clone()
    got = la.sequence_logprobs(hidden, weight, labels, b, average=True)
    want = la.sequence_logprobs(hidden, weight, labels, cu, average=True)
    assert torch.equal(got, want) and got[0] == 0 and got[1] == 0
    w_b = la.longalign_loss_weights(b, labels, num_packs=2, num_sequences=3)
    assert torch.equal(w_b, la.longalign_loss_weights(cu, labels, num_packs=2, num_sequences=3))
    fused = la.fused_linear_cross_entropy(hidden, weight, labels, packed_batch=b, num_packs=2, num_sequences=3,
                                          reduction="sum")
    assert torch.allclose(fused, la.fused_linear_cross_entropy(hidden, weight, labels, token_weights=w_b,
                                                               reduction="sum"))
    with pytest.raises(ValueError, match="hidden has 11 tokens but the PackedBatch describes 12"):
        la.sequence_logprobs(hidden[:-1], weight, labels[:-1], b)
    with pytest.raises(ValueError, match="not both"):
        la.fused_linear_cross_entropy(hidden, weight, labels, packed_batch=b, token_weights=w_b, num_packs=1,
                                      num_sequences=1)


# ----------------------------------------------------------------------------- a whole model step


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="longalign")


def records(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, vocab, (n,), generator=g).tolist()) for n in lengths]


def training_step(model, inputs, K=1, M=3):
    """Model body, then the LongAlign-weighted fused loss from the description; backward."""
    batch = inputs["packed_batch"]
    out = model.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], packed_batch=batch)
    loss = la.fused_linear_cross_entropy(out.last_hidden_state[0], model.lm_head.weight, inputs["shift_labels"][0],
                                         packed_batch=batch, num_packs=K, num_sequences=M, reduction="sum")
    loss.backward()
    return loss


class CountHostReads(TorchDispatchMode):
    """Counts every read of tensor data into Python: the dispatched ops that sync on a GPU
    (``.item()``, ``nonzero``, ``equal``...) and the Tensor methods that on a CPU tensor read
    memory without dispatching (``tolist``, ``numpy``, ``bool(t)``, ``int(t)``...). The Triton
    interpreter's own copies (it runs kernels on host arrays) are not counted: on a GPU those
    are kernel launches."""
    DISPATCHED = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item"}
    METHODS = ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.reads = []
        self._saved = {}

    def __enter__(self):
        import sys

        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def counted(t, *a, _real=real, _name=name, **kw):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if not caller.startswith(("triton", "torch")):
                    self.reads.append((_name, caller))
                return _real(t, *a, **kw)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.DISPATCHED:
            self.reads.append((name, "dispatch"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("validate", [False, True])
def test_a_training_step_on_a_description_reads_nothing_back(validate):
    la.set_validation(validate)
    try:
        model = tiny_llama()
        inputs = PackedCollator(device="cpu")(records([5, 17, 1]))
        with CountHostReads() as counter:
            training_step(model, inputs)
        # validation on: the label / weight checks of the one loss call (one read per batch)
        assert len(counter.reads) == (1 if validate else 0), counter.reads
    finally:
        la.set_validation(True)


def test_without_a_description_the_boundaries_are_derived_once_per_forward():
    model = tiny_llama()
    inputs = PackedCollator()(records([5, 17, 1]))
    for kwargs in (dict(cu_seq_lens_q=inputs["cu_seq_lens_q"], cu_seq_lens_k=inputs["cu_seq_lens_k"],
                        max_length_q=17, max_length_k=17), {}):
        with CountHostReads() as counter:
            model.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"].clone(), **kwargs)
        # three layers, at most one read: the boundaries are derived in the first layer only
        assert len(counter.reads) <= 1, counter.reads


def test_collator_labels_and_the_description_give_the_per_sequence_losses():
    model = tiny_llama().eval()
    recs = records([6, 1, 11])
    inputs = PackedCollator(device="cpu")(recs)
    with torch.no_grad():
        packed = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       packed_batch=inputs["packed_batch"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor(r["input_ids"])[None]).logits[0] for r in recs])
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)
    hf, shifted = inputs["labels"][0].tolist(), inputs["shift_labels"][0].tolist()
    flat = [t for r in recs for t in r["input_ids"]]
    assert hf[0] == hf[6] == hf[7] == -100 and hf[1:6] == flat[1:6]
    assert shifted[:5] == flat[1:6] and shifted[5] == shifted[6] == -100 and shifted[17] == -100


def test_fake_training_step_runs_to_the_end():
    """Under FakeTensorMode tensors have shapes and no data, so any read of tensor data raises:
    with validation off, the whole step built on a description runs through the ops' fake
    kernels to the end. (Fake tensors on the cpu device: this CPU-only torch cannot index fake
    cuda tensors from Python; the ops never look at the device type beyond dispatch.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):  # weights are never read: shapes only
        model = tiny_llama()
    la.set_validation(False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):  # the meta parameters below
            model = model.to_empty(device="cpu")
            batch = la.PackedBatch.from_lengths([5, 17, 1])
            inputs = dict(input_ids=torch.empty(1, 23, dtype=torch.long), position_ids=batch.position_ids[None],
                          packed_batch=batch, shift_labels=torch.empty(1, 23, dtype=torch.long))
            loss = training_step(model, inputs)
            assert loss.shape == () and type(loss).__name__ == "FakeTensor"
            assert model.model.layers[0].self_attn.q_proj.weight.grad.shape == (32, 32)
            with pytest.raises(Exception):  # the probe works: a data read does raise here
                inputs["input_ids"].sum().item()
    finally:
        la.set_validation(True)


def test_logo_positions_ride_on_the_description():
    model = tiny_llama().eval()
    inputs = PackedCollator(device="cpu")(records([9, 20]))
    b = inputs["packed_batch"]
    pos = la.synthesize_positions(b, b.lengths * 3, method="logo", chunk_size=4)
    b = b.with_positions(pos)
    eager = transformers.LlamaForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model(input_ids=inputs["input_ids"], position_ids=b.position_ids[None], packed_batch=b).logits[0]
        ids = inputs["input_ids"][0]
        # an explicit mask: without one transformers reads jumps in position_ids as new sequences
        want = torch.cat([eager(input_ids=ids[s:e][None], position_ids=pos[s:e][None],
                                attention_mask=torch.ones(1, e - s, dtype=torch.long)).logits[0]
                          for s, e in ((0, 9), (9, 29))])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
