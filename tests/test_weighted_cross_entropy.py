"""Token-weighted cross-entropy (fused and plain), sequence log-probs and LongAlign weights,
against float64 references. Triton kernels run under the interpreter on CPU."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dispatch_spy import spy_inside

import longalign_ops as la
from longalign_ops import reference
from longalign_ops.kernels.weighted_cross_entropy import chunk_tokens
from longalign_ops.nn import LongAlignLoss


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / (ref.double().abs().max() + 1e-12)).item() if ref.numel() else 0.0


def make(T, H, V, dtype, ignore_every=5, weights=True, bias=False, device="cpu"):
    h = (torch.randn(T, H, device=device) / H ** 0.25).to(dtype).requires_grad_()
    W = (torch.randn(V, H, device=device) / H ** 0.25).to(dtype).requires_grad_()
    b = torch.randn(V, device=device).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (T,), device=device)
    if ignore_every:
        y[::ignore_every] = -100
    w = torch.rand(T, device=device) * 2 if weights else None
    return h, W, b, y, w


def fused_and_reference(h, W, b, y, w, reduction, softcap, low_dtype=None):
    out = la.fused_linear_cross_entropy(h, W, y, bias=b, token_weights=w, reduction=reduction, softcap=softcap)
    go = torch.randn_like(out)
    params = [t for t in (h, W, b) if t is not None]
    grads = torch.autograd.grad(out, params, go)

    def ref(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in params]
        r = reference.linear_cross_entropy(xs[0], xs[1], y, bias=xs[2] if b is not None else None, token_weights=w,
                                           reduction=reduction, softcap=softcap, compute_dtype=dtype)
        return r, torch.autograd.grad(r, xs, go.to(dtype))

    return out, grads, ref(torch.float64), (ref(low_dtype) if low_dtype else None)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("V", [1000, 333])
@pytest.mark.parametrize("weights, bias, softcap", [(True, False, None), (False, True, None), (True, True, 7.5)])
def test_fused_fp32_matches_reference(reduction, V, weights, bias, softcap):
    h, W, b, y, w = make(37, 24, V, torch.float32, weights=weights, bias=bias)
    out, grads, (ref, ref_grads), _ = fused_and_reference(h, W, b, y, w, reduction, softcap)
    assert out.dtype == torch.float32 and out.shape == ((37,) if reduction == "none" else ())
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g.dtype == h.dtype and rel_err(g, r) < 1e-5
    if reduction == "none":
        assert torch.all(out[::5] == 0)  # ignored tokens


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_fp16_within_twice_torch_fp16_error(reduction):
    """Error against fp64 at most twice that of the same computation done by
    PyTorch in fp16 (plus 1e-5)."""
    h, W, b, y, w = make(29, 32, 333, torch.float16, bias=True)
    out, grads, (ref, ref_grads), (low, low_grads) = fused_and_reference(h, W, b, y, w, reduction, None,
                                                                         low_dtype=torch.float16)
    assert (out.double() - ref).abs().max().item() <= 2 * (low.double() - ref).abs().max().item() + 1e-5
    for g, r, lo in zip(grads, ref_grads, low_grads):
        assert torch.isfinite(g).all()
        assert (g.double() - r).abs().max().item() <= 2 * (lo.double() - r).abs().max().item() + 1e-5


def test_chunking_covers_many_chunks_and_one_token():
    assert chunk_tokens(37, 24, 1000) == 1  # forces one token per chunk here
    for T in (1, 2, 37):
        h, W, b, y, w = make(T, 24, 1000, torch.float32, ignore_every=0)
        out, grads, (ref, ref_grads), _ = fused_and_reference(h, W, b, y, w, "mean", None)
        assert rel_err(out, ref) < 1e-5 and all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    h, W, b, y, w = make(8, 16, 100, torch.float32)
    y[:] = -100
    out = la.fused_linear_cross_entropy(h, W, y, token_weights=w, reduction=reduction)
    assert torch.all(out == 0)
    gh, gW = torch.autograd.grad(out.sum(), (h, W))
    assert torch.all(gh == 0) and torch.all(gW == 0)


def test_empty_input():
    h, W, b, y, w = make(0, 16, 100, torch.float32)
    assert la.fused_linear_cross_entropy(h, W, y, reduction="mean").item() == 0.0
    assert la.fused_linear_cross_entropy(h, W, y, reduction="none").shape == (0,)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_unfused_matches_reference_and_keeps_logits(reduction):
    logits = torch.randn(41, 1000, requires_grad=True)
    y = torch.randint(0, 1000, (41,))
    y[3] = -100
    w = torch.rand(41)
    before = logits.detach().clone()
    out = la.cross_entropy(logits, y, token_weights=w, reduction=reduction, softcap=30.0)
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, logits, go)
    ld = logits.detach().double().requires_grad_()
    ref = reference.weighted_cross_entropy(ld, y, token_weights=w, reduction=reduction, softcap=30.0)
    (gr,) = torch.autograd.grad(ref, ld, go.double())
    assert torch.equal(logits.detach(), before)
    assert rel_err(out, ref) < 1e-5 and rel_err(g, gr) < 1e-5


def test_unweighted_mean_equals_torch_cross_entropy():
    logits = torch.randn(30, 333)
    y = torch.randint(0, 333, (30,))
    y[:7] = -100
    torch.testing.assert_close(la.cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_fused_never_allocates_token_by_vocab(monkeypatch):
    """Peak extra memory is set by the chunk, not T*V: no tensor of T*V elements (or anywhere
    near it) is created in forward or backward."""
    T, H, V = 64, 16, 1000

    class Biggest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Biggest.largest = max(Biggest.largest, t.numel())
            return out

    h, W, b, y, w = make(T, H, V, torch.float32)
    for reduction in ("mean", "none"):
        Biggest.largest = 0
        spy_inside(monkeypatch, Biggest)
        out = la.fused_linear_cross_entropy(h, W, y, token_weights=w, reduction=reduction)
        torch.autograd.grad(out.sum(), (h, W))
        assert Biggest.largest >= chunk_tokens(T, H, V) * V  # the spy saw the chunk logits
        assert Biggest.largest <= max(V * H, chunk_tokens(T, H, V) * V) < T * V


def test_sequence_logprobs_sum_and_average():
    lengths = [5, 0, 1, 9, 4]
    T = sum(lengths)
    h, W, b, y, _ = make(T, 16, 333, torch.float32, ignore_every=0, bias=True)
    y[15:19] = -100  # the last sequence (tokens 15..18): all ignored
    y[6] = -100
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    for average in (False, True):
        got = la.sequence_logprobs(h, W, y, cu, bias=b, average=average)
        hd, Wd, bd = (t.detach().double().requires_grad_() for t in (h, W, b))
        ref = reference.sequence_logprobs(hd, Wd, y, cu, bias=bd, average=average)
        assert got.shape == (5,) and got.dtype == torch.float32
        assert got[1] == 0 and got[4] == 0
        assert rel_err(got, ref) < 1e-5
        go = torch.randn(5)
        g = torch.autograd.grad(got, (h, W, b), go)
        gr = torch.autograd.grad(ref, (hd, Wd, bd), go.double())
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(g, gr))


def test_longalign_weights_identity_over_a_packed_step():
    """Sum the weighted (reduction="sum") losses of a step's packs, average over its K ranks:
    that is the mean over the step's M sequences of their per-token mean loss."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, 30)
    V, H, W_ranks = 200, 16, 4
    plan = la.pack(lengths, 64, world_size=W_ranks)
    weight = torch.randn(V, H)
    for step in plan.steps:
        seqs = [i for pack in step for i in pack]
        M = len(seqs)
        total, per_seq_means = 0.0, []
        for pack in step:
            if not pack:
                continue
            ys, hs = [], []
            for i in pack:
                n = int(lengths[i])
                y = torch.randint(0, V, (n,))
                y[: n // 3] = -100  # prompt tokens
                ys.append(y)
                hs.append(torch.randn(n, H))
                per_seq_means.append(reference.linear_cross_entropy(hs[-1], weight, y, reduction="mean").item())
            y, h = torch.cat(ys), torch.cat(hs)
            cu = plan.cu_seqlens(plan.steps.index(step), step.index(pack))
            w = la.longalign_loss_weights(cu, y, num_packs=W_ranks, num_sequences=M)
            total += la.fused_linear_cross_entropy(h, weight, y, token_weights=w, reduction="sum").item()
        assert total / W_ranks == pytest.approx(np.mean(per_seq_means), rel=1e-5)


@pytest.mark.parametrize("num_packs, num_sequences", [(1, 3), (4, 10)])
def test_longalign_weights_are_k_over_n_i_m(num_packs, num_sequences):
    """K/(N_i*M) written out by hand for a row of sequences of 6, 3 and 8 tokens whose ignored
    targets leave N = 4, 2 and 7; the packer's factors agree."""
    labels = torch.arange(17) % 5
    labels[[0, 1, 6, 9]] = -100          # sequence 0: tokens 0-5, two ignored; 1: 6-8, one; 2: 9-16, one
    cu = torch.tensor([0, 6, 9, 17], dtype=torch.int32)
    K, M = num_packs, num_sequences
    want = torch.zeros(17)
    for start, end, n in ((0, 6, 4), (6, 9, 2), (9, 17, 7)):
        want[start:end] = K / (n * M)
    want[labels == -100] = 0
    w = la.longalign_loss_weights(cu, labels, num_packs=K, num_sequences=M)
    torch.testing.assert_close(w, want)
    plan = la.pack([6, 3, 8], 32)
    factors = plan.loss_weights(np.array([4, 2, 7]))   # K = 1 pack, M = 3 sequences
    np.testing.assert_allclose(factors, [1 / 12, 1 / 6, 1 / 21])


def test_module_form():
    head = torch.nn.Linear(16, 100, bias=False)
    loss_fn = LongAlignLoss(head)
    h = torch.randn(2, 10, 16, requires_grad=True)
    y = torch.randint(0, 100, (2, 10))
    plain = loss_fn(h, y)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(head(h).reshape(20, 100), y.reshape(20)))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    weighted = loss_fn(h, y, cu, num_packs=1, num_sequences=2)
    logits = head(h).reshape(20, 100)
    nll = torch.nn.functional.cross_entropy(logits, y.reshape(20), reduction="none")
    torch.testing.assert_close(weighted, (nll[:7].mean() + nll[7:].mean()) / 2)
    weighted.backward()
    assert head.weight.grad is not None and h.grad is not None
    with pytest.raises(ValueError, match="num_packs"):
        loss_fn(h, y, cu)


def test_cpu_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, W, b, y, w = make(20, 16, 333, torch.float32, bias=True)
    out, grads, (ref, ref_grads), _ = fused_and_reference(h, W, b, y, w, "mean", 10.0)
    assert rel_err(out, ref) < 1e-5 and all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(labels=torch.tensor([0, 5, 100, -100])), ValueError, r"labels: 1 of 4 are outside \[0, 100\)"),
    (dict(labels=torch.tensor([0, -3, 1, 2])), ValueError, "labels: 1 of 4"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "labels must have dtype"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels must have 4 entries"),
    (dict(token_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "token_weights: 1 of 4 are NaN"),
    (dict(token_weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "negative"),
    (dict(token_weights=torch.ones(3)), ValueError, "token_weights must have 4 entries"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(weight=torch.randn(100, 8)), ValueError, "weight must be"),
    (dict(weight=torch.randn(100, 16).double()), TypeError, "weight must have dtype"),
    (dict(hidden=torch.randn(4, 16).long()), TypeError, "hidden must have dtype"),
    (dict(bias=torch.randn(99)), ValueError, "bias must have 100"),
])
def test_bad_inputs(kwargs, exc, pattern):
    args = dict(hidden=torch.randn(4, 16), weight=torch.randn(100, 16), labels=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    h, W, y = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(exc, match=pattern):
        la.fused_linear_cross_entropy(h, W, y, **args)


def test_bad_inputs_for_helpers():
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        la.sequence_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                             torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_sequences"):
        la.longalign_loss_weights(torch.tensor([0, 4], dtype=torch.int32), torch.zeros(4, dtype=torch.long),
                                  num_packs=1, num_sequences=0)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16(reduction):
    h, W, b, y, w = make(4096, 1024, 32000, torch.bfloat16, device="cuda")
    out = la.fused_linear_cross_entropy(h, W, y, token_weights=w, reduction=reduction)
    go = torch.randn_like(out)
    gh, gW = torch.autograd.grad(out, (h, W), go)
    hd, Wd = (t.detach().float().requires_grad_() for t in (h, W))
    ref = reference.linear_cross_entropy(hd, Wd, y, token_weights=w, reduction=reduction,
                                         compute_dtype=torch.float32)
    rh, rW = torch.autograd.grad(ref, (hd, Wd), go.float())
    assert rel_err(out, ref) < 1e-2 and rel_err(gh, rh) < 3e-2 and rel_err(gW, rW) < 3e-2


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_under_autocast(reduction):
    """Inside torch.autocast the lm head runs in the autocast dtype (as nn.Linear would), the
    loss math in fp32, and fp32 parameters get fp32 gradients."""
    h, W, b, y, w = make(20, 16, 333, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = la.fused_linear_cross_entropy(h, W, y, bias=b, token_weights=w, reduction=reduction)
        gh, gW, gb = torch.autograd.grad(out.sum(), (h, W, b))
    assert out.dtype == torch.float32 and gh.dtype == gW.dtype == gb.dtype == torch.float32
    lo = [t.detach().bfloat16().float() for t in (h, W, b)]  # what the bf16 lm head sees
    ref = reference.linear_cross_entropy(*lo[:2], y, bias=lo[2], token_weights=w, reduction=reduction)
    assert rel_err(out, ref) < 1e-2


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Evaluation under torch.no_grad() does one matmul per chunk, not three (autograd's
    needs_input_grad does not see no_grad, so the op must ask itself)."""
    T, H, V = 16, 8, 200
    h, W, b, y, w = make(T, H, V, torch.float32)
    chunks = -(-T // chunk_tokens(T, H, V))

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # matmul: inside a custom op (autograd keys off) `a @ b` reaches the mode undecomposed
            if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out,
                        torch.ops.aten.addmm_.default):
                CountMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    spy_inside(monkeypatch, CountMatmuls)
    with torch.no_grad():
        loss = la.fused_linear_cross_entropy(h, W, y, token_weights=w)
    assert CountMatmuls.count == chunks
    ref = reference.linear_cross_entropy(h.detach(), W.detach(), y, token_weights=w)
    assert rel_err(loss, ref) < 1e-5
    CountMatmuls.count = 0
    la.fused_linear_cross_entropy(h, W, y, token_weights=w)
    assert CountMatmuls.count == 3 * chunks  # logits, d hidden, d weight


# ----------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_nan_hidden_state_on_an_ignored_token_gives_a_finite_loss(monkeypatch, interpret):
    """Both paths (Triton under the interpreter, and the plain-CPU path): an ignored row
    contributes exactly 0 to the loss and its logit gradient is 0, even when its logits are NaN
    (the lm-head weight gradient h^T dlogits still meets the NaN row, as in PyTorch itself)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    T, H, V = 6, 8, 50
    h = torch.randn(T, H)
    h[2] = float("nan")
    h.requires_grad_()
    W = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (T,))
    y[2] = -100
    loss = la.fused_linear_cross_entropy(h, W, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(h.grad[torch.arange(T) != 2]).all()
    keep = torch.arange(T) != 2
    ref = reference.linear_cross_entropy(h.detach()[keep], W.detach(), y[keep])
    assert rel_err(loss, ref) < 1e-5


def test_zero_size_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least one entry, got V=0"):
        la.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one entry, got V=0"):
        la.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=torch.long))


def test_float64_weights_are_checked_after_the_float32_cast():
    T, V = 5, 11
    logits, y = torch.randn(T, V), torch.randint(0, V, (T,))
    with pytest.raises(ValueError, match="too large for float32"):
        la.cross_entropy(logits, y, token_weights=torch.full((T,), 1e300, dtype=torch.float64), reduction="sum")
    with pytest.raises(ValueError, match="too small for float32"):
        la.cross_entropy(logits, y, token_weights=torch.full((T,), 1e-50, dtype=torch.float64), reduction="sum")
    w = torch.rand(T, dtype=torch.float64)
    # the mean does not depend on the weights' scale: normalised in float64 first, it is right
    for scale in (1e-50, 1e300):
        got = la.cross_entropy(logits, y, token_weights=w * scale, reduction="mean")
        assert rel_err(got, la.cross_entropy(logits, y, token_weights=w.float(), reduction="mean")) < 1e-6


def test_a_second_backward_through_the_fused_loss_is_refused_not_scaled_twice():
    h, W = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = la.fused_linear_cross_entropy(h, W, torch.randint(0, 10, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
