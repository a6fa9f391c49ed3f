"""varlen attention against the float64 reference: outputs, LSE and gradients, awkward shapes,
GQA, bottom-right causal, determinism, bad inputs, and the flash-attn call patterns.

Under TRITON_INTERPRET=1 (set by conftest) CPU tensors run the Triton kernels themselves.
Tolerance (flash-attn's rule): our error against fp64 is at most twice that of the same
computation done by PyTorch in the input precision, plus 1e-5.
"""
import math

import pytest
import torch

import longalign_ops
import longalign_ops as la
from longalign_ops import reference, varlen_attention
from longalign_ops._validation import set_validation
from longalign_ops.flash_attn_compat import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                             flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                             flash_attn_varlen_qkvpacked_func)


def make_cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def make_inputs(lq, lk, Hq, Hk, D, dtype, device="cpu"):
    q = torch.randn(sum(lq), Hq, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(sum(lk), Hk, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(sum(lk), Hk, D, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, make_cu(lq, device), make_cu(lk, device)


def reference_run(q, k, v, cq, ck, causal, dtype, dout, **options):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.varlen_attention(*xs, cq, ck, causal=causal, compute_dtype=dtype, **options)
    grads = torch.autograd.grad(out, xs, dout.to(dtype))
    return out, lse, grads


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def check_against_reference(lq, lk, Hq, Hk, D, dtype, causal, device="cpu", **options):
    """options: window_size, softcap (as varlen_attention and the reference take them)."""
    q, k, v, cq, ck = make_inputs(lq, lk, Hq, Hk, D, dtype, device)
    out, lse = varlen_attention(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (Hq, sum(lq))

    ref_out, ref_lse, ref_grads = reference_run(q, k, v, cq, ck, causal, torch.float64, dout, **options)
    low_out, _, low_grads = reference_run(q, k, v, cq, ck, causal, dtype, dout, **options)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert max_err(out, ref_out) <= 2 * max_err(low_out, ref_out) + 1e-5
    for name, g, r, low in zip("qkv", grads, ref_grads, low_grads):
        assert max_err(g, r) <= 2 * max_err(low, r) + 1e-5, f"d{name}"
    # lse: -inf exactly where a row sees no key, otherwise close to fp64
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty.to(lse.device))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert max_err(lse[~empty], ref_lse[~empty]) <= tol


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, Hq, Hk, D", [
    ([1], 2, 2, 8),                 # one token
    ([97, 0, 1, 33], 4, 1, 40),     # zero-length sequence, head dim 40, MQA
    ([64, 17], 8, 2, 64),           # GQA 4:1
    ([300], 2, 1, 16),              # crosses ten 32-token tiles (the interpreter's) each way
    ([3, 50], 2, 2, 96),            # head dim 96
])
def test_matches_reference(lengths, Hq, Hk, D, dtype, causal):
    check_against_reference(lengths, lengths, Hq, Hk, D, dtype, causal)


def test_a_long_sequence_matches_reference():
    """1025 tokens: 33 tiles, the last holding one token (one case: the interpreter takes a minute)."""
    check_against_reference([1025], [1025], 2, 1, 16, torch.float32, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal, window_size, softcap", [
    (True, (16, -1), None),     # Mistral / Qwen2 sliding window: 16 keys back, causal
    (False, (5, 9), None),      # two-sided local window
    (False, (-1, 0), None),     # right bound 0 without causal: causal by window
    (True, (-1, -1), 2.0),      # Gemma 2 soft-capping (a small cap, so tanh bends)
    (True, (33, 0), 1.5),       # Gemma 2 local layer: window and cap together
])
def test_sliding_window_and_softcap(causal, window_size, softcap, dtype):
    check_against_reference([97, 0, 1, 40], [97, 0, 1, 40], 4, 2, 40, dtype, causal, window_size=window_size,
                            softcap=softcap)


def test_window_with_query_and_key_lengths_differ():
    check_against_reference([10, 33, 5], [20, 40, 5], 2, 1, 16, torch.float32, True, window_size=(6, -1))
    check_against_reference([30, 7], [12, 9], 2, 2, 16, torch.float32, False, window_size=(3, 4), softcap=1.0)


@pytest.mark.parametrize("D", [1, 59, 111, 200])
def test_any_head_dim_is_padded_inside(D):
    """flash-attn pads head dims that are not a multiple of 8; so do we (59 and 111 are in its
    test list). Out and gradients come back unpadded and exact."""
    check_against_reference([37, 1, 20], [37, 1, 20], 2, 1, D, torch.float32, True)


# Adapted from flash-attn's tests/test_flash_attn.py (test_flash_attn_varlen_output): its
# (seqlen_q, seqlen_k) pairs, head dims 59 / 111, MQA / GQA, local windows drawn in [0, seqlen_k),
# softcap 0 / 50, and its tolerance (twice PyTorch's own error in the input precision); sizes cut
# down for the interpreter.
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 239), (113, 203)])
@pytest.mark.parametrize("D, mha", [(59, "mqa"), (111, "gqa")])
@pytest.mark.parametrize("local, softcap", [(False, 0.0), (True, 0.0), (False, 50.0)])
def test_flash_attn_varlen_output_cases(seqlen_q, seqlen_k, D, mha, local, softcap):
    torch.manual_seed(seqlen_q + D)
    Hq, Hk = (4, 1) if mha == "mqa" else (4, 2)
    window = tuple(torch.randint(0, seqlen_k, (2,)).tolist()) if local else (-1, -1)
    # flash-attn draws random padding per batch row; two rows of different real lengths here
    lq, lk = [seqlen_q, max(1, seqlen_q // 3)], [seqlen_k, max(1, seqlen_k // 2)]
    for causal in (False, True):
        check_against_reference(lq, lk, Hq, Hk, D, torch.float16, causal, window_size=window,
                                softcap=softcap or None)


@pytest.mark.parametrize("causal", [True, False])
def test_query_and_key_lengths_differ(causal):
    # bottom-right causal: with lk < lq the first lq - lk rows see no key at all
    check_against_reference([10, 33, 5, 0], [40, 20, 5, 3], 4, 2, 32, torch.float32, causal)
    # queries without a single key: output 0, lse -inf, zero gradients
    check_against_reference([7, 4], [0, 9], 2, 1, 16, torch.float32, causal)


@pytest.mark.parametrize("pad", [3, 8])
def test_row_strides_that_are_no_multiple_of_16(pad):
    """The launchers pass strides in units of the largest power of two up to 16 dividing them all
    (stride_unit: 1 for a row stride of H*D + 3, 8 for H*D + 8 and for head dim 40) and the
    kernels multiply it back: q, k, v as views into wider rows give what their contiguous copies
    give, gradients included."""
    from longalign_ops.kernels.varlen_attention import stride_unit

    lengths, H, D = [37, 5], 2, 40
    rows = [torch.randn(sum(lengths), H * D + pad, requires_grad=True) for _ in range(3)]
    views = [r[:, :H * D].view(-1, H, D) for r in rows]
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    assert stride_unit(*views) == (1 if pad == 3 else 8) and stride_unit(*copies) == 8
    cu, dout = make_cu(lengths), torch.randn(sum(lengths), H, D)
    outs = [varlen_attention(*qkv, cu, cu, 37, 37) for qkv in (views, copies)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    grads_view = torch.autograd.grad(outs[0], rows, dout)
    grads_copy = torch.autograd.grad(outs[1], copies, dout)
    for g_row, g_copy in zip(grads_view, grads_copy):
        assert not g_row[:, H * D:].any()
        torch.testing.assert_close(g_row[:, :H * D].view(-1, H, D), g_copy, rtol=0, atol=1e-6)


def test_head_dim_256():
    check_against_reference([20, 7], [20, 7], 2, 1, 256, torch.float32, True)


@pytest.mark.parametrize("arch, D, options", [
    ((9, 0), 256, {}),                                          # dK/dV 16 x 64, dQ 64 x 64
    ((9, 0), 256, dict(window_size=(40, 0), softcap=20.0)),     # dK, dV split: 16 x 128 each, dQ 64 x 32
    ((8, 0), 128, {}),                                          # dK/dV 64 x 32
    ((8, 6), 8, {}),                                            # head dim 8 at 16 columns, dK/dV 16 x 32
    ((12, 0), 192, {}),                                         # the 99 KB parts' 64 x 32 forward
])
def test_the_gpu_tiles_compute_attention_under_the_interpreter(monkeypatch, arch, D, options):
    """The block shapes attention_config gives a GPU, run by the interpreter (which ignores warps
    and stages) on fp32 data: sequences that end inside, at and past a tile's edge in every loop."""
    from longalign_ops.kernels import varlen_attention as va

    gpu = va.attention_config
    assert gpu(D, torch.bfloat16, True, arch, "softcap" in options)["dkdv_split"] == ("softcap" in options)
    monkeypatch.setattr(va, "config_for", lambda q, softcap=0.0, prefix=False: gpu(
        q.shape[-1], torch.bfloat16, True, arch, softcap > 0, prefix))
    check_against_reference([1, 97, 0, 64], [1, 97, 0, 64], 2, 1, D, torch.float32, True, **options)


def test_gradients_are_bitwise_repeatable_without_asking():
    """No atomics: with the default deterministic=False, two backward passes over sequences that
    span several key and query tiles, with 4 query heads summing into one kv head, give bitwise
    the same gradients (and deterministic=True changes nothing); they are also right."""
    q, k, v, cq, ck = make_inputs([70, 45], [70, 45], 4, 1, 32, torch.float32)
    dout = torch.randn(115, 4, 32)
    runs = []
    for deterministic in (False, False, True):
        out = varlen_attention(q, k, v, cq, ck, 70, 70, deterministic=deterministic)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = reference.varlen_attention(qd, kd, vd, cq, ck, causal=True)
    want = torch.autograd.grad(out, (qd, kd, vd), dout.double())
    for got, ref in zip(runs[0], want):
        assert max_err(got, ref) < 1e-4


def test_without_validation_dense_grid_matches(monkeypatch):
    q, k, v, cq, ck = make_inputs([40, 3, 0, 65], [40, 3, 0, 65], 2, 1, 16, torch.float32)
    dout = torch.randn(108, 2, 16)
    out = varlen_attention(q, k, v, cq, ck, 65, 65)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    set_validation(False)
    try:
        out2 = varlen_attention(q, k, v, cq, ck, 65, 65)
        grads2 = torch.autograd.grad(out2, (q, k, v), dout)
    finally:
        set_validation(True)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cpu_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, cq, ck = make_inputs([9, 4], [9, 4], 2, 1, 16, torch.float16)
    out, lse = varlen_attention(q, k, v, cq, ck, 9, 9, return_lse=True)
    ref, ref_lse = reference.varlen_attention(q, k, v, cq, ck)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_softmax_scale():
    q, k, v, cq, ck = make_inputs([30], [30], 2, 2, 16, torch.float32)
    out = varlen_attention(q, k, v, cq, ck, 30, 30, softmax_scale=0.3)
    ref, _ = reference.varlen_attention(q, k, v, cq, ck, softmax_scale=0.3)
    assert max_err(out, ref) < 1e-5
    assert max_err(varlen_attention(q, k, v, cq, ck, 30, 30), ref) > 1e-3  # the scale matters


def test_validation_is_cached_per_device_tensor(monkeypatch):
    """Device tensors: one host read per tensor version, however many layers use it."""
    from longalign_ops import batch as batch_module
    from longalign_ops.batch import PackedBatch

    q, k, v, cq, _ = make_inputs([5, 6], [5, 6], 2, 2, 8, torch.float32)
    reads = []
    real = PackedBatch.from_cu_seqlens.__func__
    monkeypatch.setattr(PackedBatch, "from_cu_seqlens",
                        classmethod(lambda cls, cu, **kw: reads.append(cu) or real(cls, cu, **kw)))
    monkeypatch.setattr(batch_module, "_cacheable", lambda cu: True)  # as for a CUDA tensor
    for _ in range(3):  # three "layers": one host read
        varlen_attention(q, k, v, cq, cq, 6, 6)
    assert len(reads) == 1
    with torch.no_grad():
        cq[1] = 6  # an in-place change bumps the version: checked again, and now wrong
    with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller"):
        varlen_attention(q, k, v, cq, cq, 5, 5)
    assert len(reads) == 2


def test_cpu_cu_seqlens_written_through_numpy_is_checked_again():
    """A write through .numpy() does not bump torch's version counter; CPU tensors are never
    cached, so the next call sees it (it used to read out of bounds from a stale tile list)."""
    q, k, v, cq, _ = make_inputs([5, 6], [5, 6], 2, 2, 8, torch.float32)
    varlen_attention(q, k, v, cq, cq, 6, 6)
    cq.numpy()[2] = 40
    with pytest.raises(ValueError, match="must end at the total number of tokens 11, got 40"):
        varlen_attention(q, k, v, cq, cq, 40, 40)


@pytest.mark.parametrize("cu_values", [[0, 1000], [0, -50, 11], [0, 11, 5000, 3], [-7, 3, 11]])
def test_kernels_stay_in_bounds_whatever_cu_seqlens_holds_with_validation_off(cu_values):
    """Validation off: q/k/v are views into NaN-guarded buffers; a kernel that read outside
    [0, total) would pick up NaN. Bounds are clamped in the kernels, so every output and
    gradient is finite."""
    la.set_validation(False)
    try:
        T, H, D = 11, 2, 16
        guard = 64
        bufs = [torch.full((T + 2 * guard, H, D), float("nan")) for _ in range(3)]
        for b in bufs:
            b[guard:guard + T] = torch.randn(T, H, D)
        q, k, v = (b[guard:guard + T].detach().requires_grad_() for b in bufs)
        cu = torch.tensor(cu_values, dtype=torch.int32)
        out, lse = varlen_attention(q, k, v, cu, cu, 2000, 2000, return_lse=True)
        assert torch.isfinite(out).all()
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
    finally:
        la.set_validation(True)


def test_packed_batch_matches_cu_seqlens_form():
    lengths = [0, 1, 97, 33, 0, 5]
    q, k, v, cq, _ = make_inputs(lengths, lengths, 4, 2, 40, torch.float32)
    batch = la.PackedBatch.from_lengths(lengths, device="cpu")
    out_b, lse_b = varlen_attention(q, k, v, batch, return_lse=True)
    out_c, lse_c = varlen_attention(q, k, v, cq, cq, 97, 97, return_lse=True)
    assert torch.equal(out_b, out_c) and torch.equal(lse_b, lse_c)
    ref, _ = reference.varlen_attention(q, k, v, cq, cq)
    assert max_err(out_b, ref) < 1e-5
    g = torch.randn_like(out_b)
    grads_b = torch.autograd.grad(out_b, (q, k, v), g)
    grads_c = torch.autograd.grad(varlen_attention(q, k, v, cq, cq, 97, 97), (q, k, v), g)
    for a, b in zip(grads_b, grads_c):
        assert torch.equal(a, b)


def test_packed_batch_that_disagrees_with_the_tensors_is_refused():
    q, k, v, _, _ = make_inputs([5, 6], [5, 6], 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="q has 11 tokens but the PackedBatch describes 12"):
        varlen_attention(q, k, v, la.PackedBatch.from_lengths([6, 6]))
    with pytest.raises(ValueError, match="PackedBatch was built for meta"):
        varlen_attention(q, k, v, la.PackedBatch.from_lengths([5, 6], device="meta"))
    with pytest.raises(ValueError, match="pass no cu_seqlens_k"):
        varlen_attention(q, k, v, la.PackedBatch.from_lengths([5, 6]), la.PackedBatch.from_lengths([5, 6]).cu_seqlens)


@pytest.mark.parametrize("mutate, exc, pattern", [
    (lambda a: a.update(q=a["q"].double()), TypeError, "q must have dtype"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k must have dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dimensions"),
    (lambda a: a.update(q=torch.randn(11, 3, 16), k=torch.randn(11, 2, 16), v=torch.randn(11, 2, 16)),
     ValueError, "multiple of kv heads"),
    (lambda a: a.update(q=torch.randn(11, 2, 264), k=torch.randn(11, 1, 264), v=torch.randn(11, 1, 264)),
     ValueError, "head dim"),
    (lambda a: a.update(v=torch.randn(10, 1, 16)), ValueError, "v must have k's tokens and heads"),
    (lambda a: a.update(v=torch.randn(11, 1, 257)), ValueError, "v's head dim must be in"),
    (lambda a: a.update(cq=a["cq"].long()), TypeError, "cu_seqlens_q must have dtype int32"),
    (lambda a: a.update(cq=torch.tensor([1, 5, 11], dtype=torch.int32)), ValueError, "must start at 0"),
    (lambda a: a.update(cq=torch.tensor([0, 7, 5, 11], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.update(cq=torch.tensor([0, 5, 12], dtype=torch.int32)), ValueError, "must end at"),
    (lambda a: a.update(max_q=3), ValueError, "max_seqlen_q=3 is smaller"),
    (lambda a: a.update(max_q=2.5), TypeError, "max_seqlen_q must be an int"),
    (lambda a: a.update(ck=torch.tensor([0, 11], dtype=torch.int32), max_k=11), ValueError, "same number of sequences"),
    (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
])
def test_bad_inputs(mutate, exc, pattern):
    a = dict(q=torch.randn(11, 2, 16), k=torch.randn(11, 1, 16), v=torch.randn(11, 1, 16),
             cq=make_cu([5, 6]), ck=make_cu([5, 6]), max_q=6, max_k=6)
    mutate(a)
    with pytest.raises(exc, match=pattern):
        varlen_attention(a["q"], a["k"], a["v"], a["cq"], a["ck"], a["max_q"], a["max_k"])


def test_flash_attn_compat_call_patterns():
    q, k, v, cq, ck = make_inputs([12, 30], [12, 30], 4, 2, 32, torch.float32)
    ref, ref_lse = reference.varlen_attention(q, k, v, cq, ck, causal=True)
    # LongAlign / ProLong style: positional max_seqlens, dropout_p positional, causal keyword
    out = flash_attn_varlen_func(q, k, v, cq, ck, 30, 30, 0.0, softmax_scale=None, causal=True)
    assert max_err(out, ref) < 1e-5
    out, lse, probs = flash_attn_varlen_func(q, k, v, cq, ck, 30, 30, causal=True, return_attn_probs=True)
    assert probs is None and max_err(lse, ref_lse) < 1e-5
    # flash-attn's default is causal=False
    nc, _ = reference.varlen_attention(q, k, v, cq, ck, causal=False)
    assert max_err(flash_attn_varlen_func(q, k, v, cq, ck, 30, 30), nc) < 1e-5
    qkv = torch.stack([q.detach(), torch.randn_like(q), torch.randn_like(q)], 1)
    ref_p, _ = reference.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cq, cq, causal=True)
    assert max_err(flash_attn_varlen_qkvpacked_func(qkv, cq, 30, causal=True), ref_p) < 1e-5
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_varlen_func(q, k, v, cq, ck, 30, 30, 0.1)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        flash_attn_varlen_func(q, k, v, cq, ck, 30, 30, alibi_slopes=torch.ones(4))
    # window and softcap pass through with flash-attn's meaning (0.0: no cap)
    ref_w, _ = reference.varlen_attention(q, k, v, cq, ck, causal=True, window_size=(8, -1), softcap=3.0)
    assert max_err(flash_attn_varlen_func(q, k, v, cq, ck, 30, 30, causal=True, window_size=(8, 0), softcap=3.0),
                   ref_w) < 1e-5
    kv = torch.stack([k.detach(), v.detach()], 1)
    assert max_err(flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 30, 30, causal=True), ref) < 1e-5


@pytest.mark.parametrize("window_size, softcap, exc, pattern", [
    ((-2, 0), None, ValueError, r"window_size\[0\] must be >= -1"),
    ((3, -5), None, ValueError, r"window_size\[1\] must be >= -1"),
    ((3,), None, TypeError, "window_size must be a pair"),
    ((1.5, 0), None, TypeError, r"window_size\[0\] must be an int"),
    ((-1, -1), -1.0, ValueError, "softcap must be > 0"),
    ((-1, -1), 0.0, ValueError, "softcap must be > 0"),
    ((-1, -1), float("nan"), ValueError, "softcap must be a finite number"),
])
def test_bad_window_and_softcap(window_size, softcap, exc, pattern):
    q, k, v, cq, ck = make_inputs([5, 6], [5, 6], 2, 1, 16, torch.float32)
    with pytest.raises(exc, match=pattern):
        varlen_attention(q, k, v, cq, ck, 6, 6, window_size=window_size, softcap=softcap)


def test_flash_attn_compat_rejects_negative_softcap():
    q, k, v, cq, ck = make_inputs([5, 6], [5, 6], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        flash_attn_varlen_func(q, k, v, cq, ck, 6, 6, softcap=-2.0)


def test_flash_attn_lse_is_plus_inf_for_a_row_that_sees_no_key():
    """flash-attn returns softmax_lse = +inf (and out 0) for a query row with no visible key:
    causal with seqlen_q > seqlen_k, bottom-right aligned."""
    q, k, v, cq, ck = make_inputs([6], [2], 2, 1, 16, torch.float32)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, 6, 2, causal=True, return_attn_probs=True)
    assert torch.equal(lse[:, :4], torch.full((2, 4), float("inf")))
    assert torch.isfinite(lse[:, 4:]).all() and (out[:4] == 0).all()
    # our own API keeps the mathematical value, logsumexp of nothing
    _, own = varlen_attention(q, k, v, cq, ck, 6, 2, causal=True, return_lse=True)
    assert torch.equal(own[:, :4], torch.full((2, 4), float("-inf")))


def test_flash_attn_func_dense():
    q = torch.randn(2, 9, 2, 16)
    k, v = torch.randn(2, 9, 1, 16), torch.randn(2, 9, 1, 16)
    out = flash_attn_func(q, k, v, causal=True)
    cu = make_cu([9, 9])
    ref, _ = reference.varlen_attention(q.reshape(18, 2, 16), k.reshape(18, 1, 16), v.reshape(18, 1, 16), cu, cu)
    assert out.shape == q.shape and max_err(out.reshape(18, 2, 16), ref) < 1e-5
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 2, 9)
    qkv = torch.stack([q, q.flip(1), q.flip(0)], 2)  # (B, S, 3, H, D)
    ref_qkv, _ = reference.varlen_attention(*(qkv[:, :, i].reshape(18, 2, 16) for i in range(3)), cu, cu, causal=False)
    assert max_err(flash_attn_qkvpacked_func(qkv).reshape(18, 2, 16), ref_qkv) < 1e-5
    kv = torch.stack([k, v], 2)
    assert max_err(flash_attn_kvpacked_func(q, kv, causal=True).reshape(18, 2, 16), ref) < 1e-5


# flash-attn 2.x's parameter names, in order (flash_attn/flash_attn_interface.py): code that passes
# them by keyword or by position must run unchanged
FLASH_ATTN_SIGNATURES = {
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale "
                              "causal window_size softcap alibi_slopes deterministic return_attn_probs block_table",
    "flash_attn_func": "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
                       "return_attn_probs",
    "flash_attn_qkvpacked_func": "qkv dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
                                 "return_attn_probs",
}


def test_flash_attn_names_and_parameters():
    import inspect

    import longalign_ops.flash_attn_compat as fac

    for name, params in FLASH_ATTN_SIGNATURES.items():
        assert list(inspect.signature(getattr(fac, name)).parameters) == params.split(), name
    # flash-attn 1's name for the varlen function computes the same thing
    q, k, v, cq, ck = make_inputs([9, 4], [9, 4], 2, 1, 16, torch.float32)
    assert torch.equal(fac.flash_attn_unpadded_func(q, k, v, cq, ck, 9, 9, 0.0, None, True),
                       varlen_attention(q, k, v, cq, ck, 9, 9, causal=True))


# ------------------------------------------------------------------ GPU (bench/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 40, 256])
def test_gpu_matches_reference(dtype, causal, D):
    check_against_reference([1, 97, 0, 1025, 300], [1, 97, 0, 1025, 300], 8, 2, D, dtype, causal, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 111])
def test_gpu_sliding_window_and_softcap(dtype, D):
    """The compiled softcap tiles (smaller than the plain ones) and the window bounds."""
    check_against_reference([1, 97, 0, 1025, 300], [1, 97, 0, 1025, 300], 8, 2, D, dtype, True, device="cuda",
                            window_size=(256, 0), softcap=20.0)


@pytest.mark.gpu
def test_gpu_large_shapes_bf16():
    # a 64K row: one 40K sequence and many short ones; checked against fp32 PyTorch per sequence
    lengths = [40000] + [300] * 80
    q, k, v, cq, ck = make_inputs(lengths, lengths, 32, 8, 128, torch.bfloat16, "cuda")
    out = varlen_attention(q, k, v, cq, ck, max(lengths), max(lengths))
    out.backward(torch.randn_like(out))
    s, e = 40000, 40300  # a short sequence, fully checked
    ref, _ = reference.varlen_attention(q[s:e], k[s:e], v[s:e], make_cu([300], "cuda"), make_cu([300], "cuda"),
                                        compute_dtype=torch.float32)
    assert max_err(out[s:e], ref) < 2e-2
    # the long one: last 256 queries against fp32 attention over all its keys
    qt = q[40000 - 256:40000].float().transpose(0, 1)
    kt = k[:40000].float().transpose(0, 1).repeat_interleave(4, 0)
    vt = v[:40000].float().transpose(0, 1).repeat_interleave(4, 0)
    s_ = qt @ kt.transpose(1, 2) / math.sqrt(128)
    mask = torch.arange(40000, device="cuda")[None] <= torch.arange(40000 - 256, 40000, device="cuda")[:, None]
    ref_tail = torch.softmax(s_.masked_fill(~mask, float("-inf")), -1) @ vt
    assert max_err(out[40000 - 256:40000].transpose(0, 1), ref_tail) < 2e-2
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
def test_gpu_128k_sequence_runs():
    lengths = [131072]
    q, k, v, cq, ck = make_inputs(lengths, lengths, 8, 8, 128, torch.bfloat16, "cuda")
    out = varlen_attention(q, k, v, cq, ck, 131072, 131072)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_longalign_modelling_call_pattern():
    """LongAlign's Llama patch: kv heads already repeated, the packed row's cu_seqlens passed in
    place of the attention mask, the *row* length (not the longest sequence) as max_seqlen,
    positional arguments, causal as a keyword; without a packed mask, uniform rows."""
    from longalign_ops.flash_attn_compat import flash_attn_unpadded_func

    bsz, row_len, H, D = 1, 96, 4, 32
    q = torch.randn(bsz * row_len, H, D)
    k = torch.randn(bsz * row_len, H, D)
    v = torch.randn(bsz * row_len, H, D)
    cu = make_cu([40, 1, 55])
    out = flash_attn_unpadded_func(q, k, v, cu, cu, row_len, row_len, causal=True)
    ref, _ = reference.varlen_attention(q, k, v, cu, cu, causal=True)
    assert out.shape == (bsz * row_len, H, D) and max_err(out, ref) < 1e-5
    rows = torch.arange(0, 3 * 32 + 1, 32, dtype=torch.int32)  # no packing: 3 rows of 32
    out = flash_attn_unpadded_func(q, k, v, rows, rows, 32, 32, causal=True)
    assert max_err(out, reference.varlen_attention(q, k, v, rows, rows, causal=True)[0]) < 1e-5


# ----------------------------------------------------------------------------- family variants
# gpt-oss's sinks, DeepSeek's value head dim, Llama 4's chunks: each against the float64
# reference (which writes each out from its model's eager definition), through the Triton
# kernels under the interpreter and through the PyTorch path, fp32 and fp16, with flash-attn's
# tolerance rule (our error at most twice that of the same computation in the input dtype)


def check_variant(lengths, Hq, Hk, D, Dv, dtype, **options):
    batch = la.PackedBatch.from_lengths(lengths)
    g = torch.Generator().manual_seed(len(lengths) * 7 + D + Dv)
    T = sum(lengths)
    q, k = (torch.randn(T, h, D, generator=g).to(dtype).requires_grad_() for h in (Hq, Hk))
    v = torch.randn(T, Hk, Dv, generator=g).to(dtype).requires_grad_()
    leaves = [q, k, v]
    if options.get("sinks") == "learned":  # spread wide: some sinks dominate their rows, some vanish
        options["sinks"] = (torch.randn(Hq, generator=g) * 3).to(dtype).requires_grad_()
        leaves.append(options["sinks"])
    out, lse = varlen_attention(q, k, v, batch, return_lse=True, **options)
    assert out.shape == (T, Hq, Dv) and out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    def run(compute):
        xs = [t.detach().to(compute).requires_grad_() for t in leaves]
        opts = dict(options, sinks=xs[3]) if len(xs) == 4 else options
        o, l = reference.varlen_attention(*xs[:3], batch.cu_seqlens, batch.cu_seqlens, compute_dtype=compute, **opts)
        return o, l, torch.autograd.grad(o, xs, dout.to(compute))

    ref_out, ref_lse, ref_grads = run(torch.float64)
    low_out, _, low_grads = run(dtype)
    assert max_err(out, ref_out) <= 2 * max_err(low_out, ref_out) + 1e-5
    for name, got, r, low in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, low_grads):
        assert got.shape == r.shape and got.dtype == dtype, name
        assert max_err(got, r) <= 2 * max_err(low, r) + 1e-5, name
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) <= (1e-5 if dtype == torch.float32 else 2e-3)
    return grads


@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, Hq, Hk, D, Dv, options", [
    ([5, 0, 17, 1, 33], 4, 2, 40, 40, dict(sinks="learned")),  # gpt-oss: full layers
    ([97, 3], 4, 1, 16, 16, dict(sinks="learned", window_size=(7, 0))),  # gpt-oss: sliding layers
    ([5, 0, 17, 1, 33], 4, 2, 24, 16, {}),  # DeepSeek's MLA: value head dim below q/k's (192/128)
    ([9, 40], 2, 2, 8, 40, dict(causal=False)),  # and above it
    ([5, 0, 17, 1, 33, 97], 4, 2, 16, 16, dict(chunk_size=8)),  # Llama 4's chunked layers
    ([30, 19], 4, 2, 40, 24, dict(chunk_size=7, window_size=(4, 0), sinks="learned", softcap=5.0)),  # all at once
])
def test_sinks_value_head_dims_and_chunks_match_float64(lengths, Hq, Hk, D, Dv, options, dtype, interpret,
                                                        monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_variant(lengths, Hq, Hk, D, Dv, dtype, **options)


def test_a_sink_takes_its_share_of_every_row():
    """Written out: one query, one key per sequence: p = 1 / (1 + exp(sink - s)), so the output is
    that fraction of v, lse = log(exp(s) + exp(sink)); a huge sink leaves nothing, and a row that
    sees no key (a window past it) outputs 0 with lse = the sink."""
    q, k, v = torch.ones(2, 2, 8), torch.ones(2, 1, 8), torch.arange(16.0).view(2, 1, 8)
    sinks = torch.tensor([0.0, 50.0])
    out, lse = varlen_attention(q, k, v, la.PackedBatch.from_lengths([1, 1]), sinks=sinks, return_lse=True,
                                softmax_scale=1.0)
    share = 1 / (1 + math.exp(0.0 - 8.0))
    assert torch.allclose(out[:, 0], v[:, 0] * share) and out[:, 1].abs().max() < 1e-15
    assert torch.allclose(lse[0], torch.tensor(math.log(math.exp(8.0) + 1.0))) and torch.allclose(lse[1], torch.tensor(50.0))
    q2, k2, v2, cq, ck = make_inputs([3], [2], 2, 2, 8, torch.float32)
    out, lse = varlen_attention(q2, k2, v2, cq, ck, 3, 2, causal=True, sinks=sinks, return_lse=True)
    assert out[0].abs().max() == 0 and torch.equal(lse[:, 0], sinks)  # query 0 sees no key (bottom-right)


def test_chunks_are_counted_from_each_sequences_start():
    """chunk_size=4 over [6, 5]: the same as attention over sequences [4, 2, 4, 1]."""
    q, k, v, _, _ = make_inputs([11], [11], 2, 1, 16, torch.float32)
    chunked = varlen_attention(q, k, v, la.PackedBatch.from_lengths([6, 5]), chunk_size=4)
    assert torch.equal(chunked, varlen_attention(q, k, v, la.PackedBatch.from_lengths([4, 2, 4, 1])))
    assert la.PackedBatch.from_lengths([6, 0, 5]).chunked(4).lengths.tolist() == [4, 2, 4, 1]


@pytest.mark.parametrize("options, exc, pattern", [
    (dict(sinks=torch.zeros(3)), ValueError, "one logit per query head"),
    (dict(sinks=torch.zeros(2, 1)), ValueError, "sinks must have 1 dimension"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks must have dtype"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
])
def test_bad_sinks_and_chunks(options, exc, pattern):
    q, k, v, cq, ck = make_inputs([5, 6], [5, 6], 2, 1, 16, torch.float32)
    with pytest.raises(exc, match=pattern):
        varlen_attention(q, k, v, la.PackedBatch.from_lengths([5, 6]), **options)


def test_chunks_need_self_attention_without_shared_prefixes():
    q, k, v, cq, ck = make_inputs([5, 6], [4, 6], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size: chunked attention needs the same sequences"):
        varlen_attention(q, k, v, cq, ck, 6, 6, chunk_size=2)
    batch = la.PackedBatch.from_prefix_groups([(3, [2, 4])])
    q, k, v, _, _ = make_inputs([9], [9], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size: chunked attention over a batch with shared prefixes"):
        varlen_attention(q, k, v, batch, chunk_size=2)
