"""The ops are torch.library custom ops: opcheck (schema, fake kernel, autograd registration,
AOT dispatch) passes for each, and torch.compile(fullgraph=True) captures them, alone and inside
a transformers Llama training step, matching eager."""
import copy

import pytest
import torch

import longalign_ops as la
from longalign_ops.attention import _varlen_attention_bwd, _varlen_attention_fwd
from longalign_ops.cross_entropy import _ce, _ce_bwd, _flce, _flce_bwd

transformers = pytest.importorskip("transformers")
import longalign_ops.integrations.transformers  # noqa: E402,F401
from longalign_ops.data import PackedCollator  # noqa: E402

OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def attention_args(tiles: bool, requires_grad=True, shared_prefix=False, sinks=False):
    b = la.PackedBatch.from_prefix_groups([(5, [3, 1]), (0, [19]), (1, [])]) if shared_prefix \
        else la.PackedBatch.from_lengths([5, 0, 19, 1])
    T = b.total
    q = torch.randn(T, 4, 16, requires_grad=requires_grad)
    k, v = (torch.randn(T, 2, 16, requires_grad=requires_grad) for _ in range(2))
    t = (b.tiles(32), b.tiles(32), b.tiles(32)) if tiles else (None, None, None)
    s = torch.randn(4, requires_grad=requires_grad) if sinks else None
    # prefix table, sinks; scale, window (left, right): a causal sliding window of 6, soft cap 2
    return (q, k, v, b.cu_seqlens, b.cu_seqlens, *t, b.prefix_table, s, b.max_len, b.max_len, 0.25, 6, 0, 2.0)


@pytest.mark.parametrize("tiles, shared_prefix, sinks", [(True, False, False), (False, False, True),
                                                          (True, True, True)])
def test_opcheck_attention(tiles, shared_prefix, sinks):
    torch.library.opcheck(_varlen_attention_fwd, attention_args(tiles, shared_prefix=shared_prefix, sinks=sinks),
                          test_utils=OPCHECK_TESTS)
    q, k, v, cu, _, t1, t2, t3, prefix, s, *flags = attention_args(tiles, False, shared_prefix, sinks)
    out, lse = _varlen_attention_fwd(q, k, v, cu, cu, t1, t2, t3, prefix, s, *flags)
    torch.library.opcheck(_varlen_attention_bwd, (torch.randn_like(out), q, k, v, out, lse, cu, cu, t2, t3, prefix,
                                                  s, *flags), test_utils=OPCHECK_TESTS[:2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_cross_entropy(reduction, with_bias):
    T, H, V = 9, 8, 33
    h, W = torch.randn(T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if with_bias else None
    y = torch.randint(0, V, (T,))
    y[2] = -100
    w = torch.rand(T)
    # softcap, label smoothing, z-loss scale, fp32 weight-gradient accumulation, want z-loss / arg-max
    options = (None, 0.1, 1e-3, with_bias, with_bias, not with_bias)
    torch.library.opcheck(_flce, (h, W, b, y, w, -100, reduction, *options, reduction != "none", True, with_bias),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_flce_bwd, (torch.rand(T), h.detach(), W.detach(), b, y, w, -100, 30.0, 0.1, 1e-3, False,
                                      True, with_bias), test_utils=OPCHECK_TESTS[:2])
    logits = torch.randn(T, V, requires_grad=True)
    torch.library.opcheck(_ce, (logits, y, w, -100, reduction, 5.0, 0.1, 1e-3, with_bias, True, reduction != "none"),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_ce_bwd, (torch.rand(T), logits.detach(), y, w, -100, None, 0.1, 1e-3),
                          test_utils=OPCHECK_TESTS[:2])


def grads_of(fn, *inputs):
    out = fn(*inputs)
    loss = out.float().pow(2).sum() if out.dim() else out
    return [out.detach()] + list(torch.autograd.grad(loss, inputs))


def assert_all_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_each_op():
    torch._dynamo.reset()
    batch = la.PackedBatch.from_lengths([5, 0, 19, 1])
    q, k, v = attention_args(True)[:3]

    def attention(q, k, v):
        return la.varlen_attention(q, k, v, batch)

    assert_all_close(grads_of(torch.compile(attention, backend="aot_eager", fullgraph=True), q, k, v),
                     grads_of(attention, q, k, v))

    # the family variants (gpt-oss's sinks, MLA's value head dim, Llama 4's chunks) in one graph;
    # the chunks are described on the host before it, as the batch is
    sinks, v8 = torch.randn(4, requires_grad=True), torch.randn(batch.total, 2, 8, requires_grad=True)
    with pytest.raises(Exception, match="chunk_size=4 under torch.compile"):  # (dynamo wraps the ValueError)
        torch.compile(lambda q: la.varlen_attention(q, k, v8, batch, chunk_size=4), backend="aot_eager",
                      fullgraph=True)(q)
    batch.chunked(4)

    def variants(q, k, v, sinks):
        return la.varlen_attention(q, k, v, batch, sinks=sinks, chunk_size=4, window_size=(6, 0))

    assert_all_close(grads_of(torch.compile(variants, backend="aot_eager", fullgraph=True), q, k, v8, sinks),
                     grads_of(variants, q, k, v8, sinks))

    T, H, V = batch.total, 8, 33
    h, W = torch.randn(T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (T,))

    def fused(h, W):
        return la.fused_linear_cross_entropy(h, W, y, packed_batch=batch, num_packs=2, num_sequences=3,
                                             reduction="sum")

    def logprobs(h, W):
        return la.sequence_logprobs(h, W, y, batch, average=True)

    def plain(h, W):
        return la.cross_entropy(h @ W.t(), y)

    for fn in (fused, logprobs, plain):  # validation on (the default): the checks are traced
        assert_all_close(grads_of(torch.compile(fn, backend="aot_eager", fullgraph=True), h, W),
                         grads_of(fn, h, W))


def test_compile_fullgraph_cu_seqlens_forms_with_validation_on():
    """flash-attn's tensor cu_seqlens form compiles whole with the default validation: the value
    checks become device-side asserts and the kernels take the dense grid bounded by max_seqlen."""
    from longalign_ops.flash_attn_compat import flash_attn_varlen_func

    torch._dynamo.reset()
    assert la._validation.validation_enabled()
    batch = la.PackedBatch.from_lengths([5, 0, 19, 1])
    cu, L = batch.cu_seqlens.clone(), batch.max_len
    q, k, v = attention_args(True)[:3]
    T, H, V = batch.total, 8, 33
    h, W = torch.randn(T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (T,))
    y[3] = -100

    def attention(q, k, v):
        return la.varlen_attention(q, k, v, cu, cu, L, L, window_size=(6, 0), softcap=2.0)

    def flash(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)

    def logprobs(h, W):
        return la.sequence_logprobs(h, W, y, cu, average=True)

    def weighted(h, W):
        w = la.longalign_loss_weights(cu, y, num_packs=2, num_sequences=3)
        return la.fused_linear_cross_entropy(h, W, y, token_weights=w, reduction="sum")

    for fn, inputs in ((attention, (q, k, v)), (flash, (q, k, v)), (logprobs, (h, W)), (weighted, (h, W))):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        assert_all_close(grads_of(compiled, *inputs), grads_of(fn, *inputs))
        # and the eager answer is the one computed from the host-built description
    assert_all_close(grads_of(lambda *a: la.varlen_attention(*a, batch, window_size=(6, 0), softcap=2.0), q, k, v),
                     grads_of(attention, q, k, v))


def test_compiled_checks_still_refuse_bad_values():
    """Under fullgraph compile the value checks run inside the graph: a bad cu_seqlens, a too
    small max_seqlen and an out-of-range label raise with the message eager gives (RuntimeError
    from the traced assert, ValueError in eager)."""
    torch._dynamo.reset()
    q, k, v = attention_args(False, requires_grad=False)[:3]
    good = la.PackedBatch.from_lengths([5, 0, 19, 1]).cu_seqlens

    def attention(q, k, v, cu, max_len):
        return la.varlen_attention(q, k, v, cu, cu, max_len, max_len)

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True, dynamic=False)
    compiled(q, k, v, good, 19)
    for cu, max_len, message in ((torch.tensor([0, 5, 3, 24, 25], dtype=torch.int32), 19, "non-decreasing"),
                                 (torch.tensor([1, 5, 5, 24, 25], dtype=torch.int32), 19, "start at 0"),
                                 (good, 18, "max_seqlen_q=18 is smaller"),
                                 (torch.tensor([0, 5, 5, 24, 24], dtype=torch.int32), 19, "must end at")):
        with pytest.raises(ValueError, match=message):
            attention(q, k, v, cu, max_len)
        with pytest.raises(RuntimeError, match=message):
            compiled(q, k, v, cu, max_len)
    h, W = torch.randn(25, 8), torch.randn(33, 8)

    def loss(h, W, y):
        return la.fused_linear_cross_entropy(h, W, y)

    compiled_loss = torch.compile(loss, backend="aot_eager", fullgraph=True)
    bad = torch.randint(0, 33, (25,))
    bad[4] = 33
    with pytest.raises(ValueError, match="labels: 1 of 25 are outside"):
        loss(h, W, bad)
    with pytest.raises(RuntimeError, match="labels: some of 25 are outside"):
        compiled_loss(h, W, bad)


@pytest.mark.parametrize("form,backend", [("packed_batch", "aot_eager"), ("cu_seq_lens", "aot_eager"),
                                          pytest.param("packed_batch", "inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_llama_training_step(form, backend):
    """A transformers Llama forward + backward with attn_implementation="longalign" and the
    fused LongAlign-weighted loss, compiled whole with validation on, gives eager's loss and
    gradients: with the host-built description, and with transformers' flash-style
    cu_seq_lens_q/k keywords (DataCollatorWithFlattening), which trace without a host read."""
    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="longalign")
    inputs = PackedCollator(device="cpu")([dict(input_ids=torch.randint(0, 97, (n,)).tolist()) for n in (6, 13, 1)])
    batch = inputs["packed_batch"]

    if form == "packed_batch":
        described = dict(packed_batch=batch)
    else:
        cu = batch.cu_seqlens.clone()
        described = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_len, max_length_k=batch.max_len)

    def step(model, input_ids, position_ids, labels):
        hidden = model.model(input_ids=input_ids, position_ids=position_ids, **described).last_hidden_state
        return la.fused_linear_cross_entropy(hidden[0], model.lm_head.weight, labels, packed_batch=batch,
                                             num_packs=1, num_sequences=3, reduction="sum")

    args = (inputs["input_ids"], inputs["position_ids"], inputs["shift_labels"][0])
    twin = copy.deepcopy(model)
    eager_loss = step(model, *args)  # validation on (the default)
    eager_loss.backward()
    compiled_loss = torch.compile(step, backend=backend, fullgraph=True)(twin, *args)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for (name, p), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
