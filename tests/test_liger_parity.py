"""Liger-Kernel parity for the cross-entropy ops: label smoothing, z-loss, fp32 weight-gradient
accumulation, token accuracy and predicted tokens, the loss module's call shape, and soft-capping
at Liger's fp32 tolerance. Checked against the float64 reference and, where liger-kernel is
installed, against Liger itself run side by side (its Triton kernels run under the interpreter
on CPU too). Cases adapted from Liger's test/transformers/test_cross_entropy.py and
test_fused_linear_cross_entropy.py, with sizes cut down for the interpreter."""
import pytest
import torch

import longalign_ops as la
from longalign_ops import reference
from longalign_ops.nn import FusedLinearCrossEntropyLoss


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / (ref.double().abs().max() + 1e-12)).item()


def make(T, H, V, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) / H ** 0.25).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.25).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (T,), generator=g)
    y[::5] = -100
    return h, W, b, y


def reference_and_grads(params, y, go, **options):
    xs = [t.detach().double().requires_grad_() for t in params]
    bias = xs[2] if len(xs) > 2 else None
    r = reference.linear_cross_entropy(xs[0], xs[1], y, bias=bias, **options)
    return r, torch.autograd.grad(r, xs, go.double())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing, lse_square_scale, softcap, weights", [
    (0.1, 0.0, None, False),
    (0.0, 1e-3, None, True),
    (0.25, 1e-2, 4.0, True),
])
def test_fused_options_match_float64_reference(reduction, label_smoothing, lse_square_scale, softcap, weights):
    h, W, b, y = make(37, 24, 333, bias=True)
    w = torch.rand(37) * 2 if weights else None
    options = dict(token_weights=w, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
                   lse_square_scale=lse_square_scale)
    res = la.fused_linear_cross_entropy(h, W, y, bias=b, return_z_loss=True, **options)
    go = torch.randn_like(res.loss)
    grads = torch.autograd.grad(res.loss, (h, W, b), go)
    ref, ref_grads = reference_and_grads((h, W, b), y, go, **options)
    assert rel_err(res.loss, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    # the z-loss alone: the reference with the z term only, minus the one without it
    with torch.no_grad():
        logits = h.double() @ W.double().t() + b.double()
        z_only = reference.weighted_cross_entropy(logits, y, lse_square_scale=lse_square_scale, **{
            k: v for k, v in options.items() if k not in ("lse_square_scale",)}) - \
            reference.weighted_cross_entropy(logits, y, **{k: v for k, v in options.items()
                                                          if k != "lse_square_scale"})
    torch.testing.assert_close(res.z_loss.double(), z_only, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_plain_cross_entropy_options_match_reference(reduction):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(29, 1000, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 1000, (29,), generator=g)
    y[3] = -100
    options = dict(reduction=reduction, label_smoothing=0.2, lse_square_scale=1e-3, softcap=8.0)
    out = la.cross_entropy(logits, y, **options)
    go = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, go)
    x = logits.detach().double().requires_grad_()
    ref = reference.weighted_cross_entropy(x, y, **options)
    (ref_grad,) = torch.autograd.grad(ref, x, go.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_label_smoothing_equals_torch_cross_entropy():
    logits = torch.randn(40, 77, requires_grad=True)
    y = torch.randint(0, 77, (40,))
    y[::7] = -100
    ours = la.cross_entropy(logits, y, label_smoothing=0.3)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.3))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_accuracy_and_predicted_tokens(reduction):
    h, W, _, y = make(50, 16, 40)
    with torch.no_grad():
        logits = h @ W.t()
    y[1::3] = logits.argmax(-1)[1::3]  # a third of the tokens right, for a non-trivial accuracy
    y[::5] = -100
    res = la.fused_linear_cross_entropy(h, W, y, reduction=reduction, return_token_accuracy=True,
                                        return_predicted_tokens=True)
    kept = y != -100
    want_pred = torch.where(kept, logits.argmax(-1), -1)
    assert torch.equal(res.predicted_tokens, want_pred) and res.z_loss is None
    hits = ((want_pred == y) & kept).float()
    want = hits if reduction == "none" else hits.sum() / kept.sum()
    torch.testing.assert_close(res.token_accuracy, want)
    assert 0.2 < hits.sum() / kept.sum() < 0.6
    plain = la.cross_entropy(logits, y, reduction=reduction, return_token_accuracy=True)
    torch.testing.assert_close(plain.token_accuracy, want)


def test_argmax_ties_take_the_first_index_across_vocabulary_blocks():
    # the interpreter's vocabulary block is 1024: equal maxima in block 0 and block 2
    logits = torch.zeros(2, 3000)
    logits[0, 2500] = 5.0
    logits[0, 700] = 5.0
    logits[1, 2999] = 1.0
    res = la.cross_entropy(logits, torch.tensor([0, 2999]), return_predicted_tokens=True,
                           return_token_accuracy=True)
    assert res.predicted_tokens.tolist() == [700, 2999] and res.token_accuracy.item() == 0.5


def test_all_ignored_accuracy_and_z_loss_are_zero():
    h, W, _, y = make(6, 8, 30)
    y[:] = -100
    res = la.fused_linear_cross_entropy(h, W, y, lse_square_scale=1e-2, return_z_loss=True,
                                        return_token_accuracy=True)
    assert res.loss.item() == 0.0 and res.z_loss.item() == 0.0 and res.token_accuracy.item() == 0.0


def test_fp32_accumulation_of_the_bf16_weight_gradient():
    """Many chunks (V >> T*H gives one token per chunk): summing 256 same-signed bf16 chunk
    products in bf16 loses digits that an fp32 accumulator keeps. The result is bf16 either way."""
    T, H, V = 256, 8, 4096
    h, W, _, y = make(T, H, V, dtype=torch.bfloat16)
    h = h.detach().abs().requires_grad_()  # positive inputs, one target: every chunk adds the same sign
    y[:] = 7
    grads = {}
    for accum in (None, torch.float32):
        loss = la.fused_linear_cross_entropy(h, W, y, reduction="sum", accum_dtype=accum)
        (grads[accum],) = torch.autograd.grad(loss, W)
    ref, (_, ref_gw) = reference_and_grads((h, W), y, torch.tensor(1.0), reduction="sum")
    err_bf16, err_fp32 = ((grads[a].double() - ref_gw).abs().max().item() for a in (None, torch.float32))
    assert grads[torch.float32].dtype == torch.bfloat16
    assert err_fp32 < err_bf16 / 2
    # fp32 accumulation: within a few bf16 roundings of the float64 gradient
    assert err_fp32 <= 4 * 2 ** -8 * ref_gw.abs().max().item()


def test_softcap_gradient_meets_ligers_fp32_tolerance():
    """Liger's test_correctness_with_softcap (fp32: atol 1e-8, rtol 1e-6) against PyTorch's own
    fp32 computation of the capped loss; needs a tanh that is exact near 0."""
    g = torch.Generator().manual_seed(0)
    B, T, V, softcap = 2, 8, 4096, 30.0
    scalar = 1.0
    x = (torch.randn(B * T, V, generator=g) * scalar).requires_grad_()
    y = torch.randint(0, V, (B * T,), generator=g)
    for reduction in ("mean", "sum"):
        out = la.cross_entropy(x, y, reduction=reduction, softcap=softcap)
        (grad,) = torch.autograd.grad(out, x)
        x2 = x.detach().clone().requires_grad_()
        want = torch.nn.functional.cross_entropy(softcap * torch.tanh(x2 / softcap), y, reduction=reduction)
        (want_grad,) = torch.autograd.grad(want, x2)
        torch.testing.assert_close(out, want, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(grad, want_grad, atol=1e-8, rtol=1e-6)


def test_loss_module_has_ligers_call_shape():
    h, W, b, y = make(21, 16, 50, bias=True)
    loss_fn = FusedLinearCrossEntropyLoss(label_smoothing=0.1, lse_square_scale=1e-3, return_z_loss=True)
    out = loss_fn(W, h, y, bias=b)
    want = la.fused_linear_cross_entropy(h, W, y, bias=b, label_smoothing=0.1, lse_square_scale=1e-3,
                                         return_z_loss=True)
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.z_loss, want.z_loss)
    assert isinstance(FusedLinearCrossEntropyLoss()(W, h, y), torch.Tensor)
    with pytest.raises(NotImplementedError, match="ce_weight"):
        FusedLinearCrossEntropyLoss(ce_weight=torch.ones(50))
    with pytest.raises(NotImplementedError, match="use_token_scaling"):
        FusedLinearCrossEntropyLoss(use_token_scaling=True)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be a finite number"),
    (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale must be >= 0"),
    (dict(accum_dtype="fp32"), TypeError, "accum_dtype"),
    (dict(accum_dtype=torch.int32), TypeError, "accum_dtype"),
    (dict(softcap=0.0), ValueError, "softcap must be > 0"),
])
def test_bad_options(kwargs, exc, pattern):
    h, W, _, y = make(4, 8, 10)
    with pytest.raises(exc, match=pattern):
        la.fused_linear_cross_entropy(h, W, y, **kwargs)
    with pytest.raises(exc, match=pattern):
        FusedLinearCrossEntropyLoss(**kwargs)(W, h, y)


# ----------------------------------------------------------------------------- side by side with Liger


liger = pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel is not installed")


# Liger's test_fused_linear_cross_entropy shapes that fit the interpreter: (B, T, H, V)
@pytest.mark.parametrize("B, T, H, V", [(2, 2, 8, 8), (4, 47, 31, 123), (3, 23, 48, 1024)])
@pytest.mark.parametrize("reduction, label_smoothing, lse_square_scale, softcap, bias", [
    ("mean", 0.0, 0.0, None, False),
    # (Liger's softcap path does not run under the interpreter: it calls .to() on a Python
    # float; soft-capping is checked against float64 and at Liger's tolerance above)
    ("mean", 0.1, 1e-4, None, True),
    ("sum", 0.0, 1e-4, None, True),
    ("none", 0.1, 0.0, None, False),
])
def test_fused_matches_liger(B, T, H, V, reduction, label_smoothing, lse_square_scale, softcap, bias):
    h, W, b, y = make(B * T, H, V, bias=bias, seed=B + T)
    options = dict(ignore_index=-100, lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                   reduction=reduction, softcap=softcap, return_z_loss=True, return_token_accuracy=True,
                   return_predicted_tokens=True)
    ours = la.fused_linear_cross_entropy(h, W, y, bias=b, **options)
    params = [t.detach().clone().requires_grad_() for t in (h, W, b) if t is not None]
    theirs = liger.liger_fused_linear_cross_entropy(params[0], params[1], y, bias=params[2] if bias else None,
                                                    **options)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=5e-5)
    torch.testing.assert_close(ours.z_loss, theirs.z_loss.detach(), atol=1e-6, rtol=5e-5)
    assert torch.equal(ours.predicted_tokens, theirs.predicted_tokens)
    if reduction != "none":
        torch.testing.assert_close(ours.token_accuracy, theirs.token_accuracy.detach())
        go = torch.tensor(1.7)
    else:
        go = torch.randn(B * T)
    ours_grads = torch.autograd.grad(ours.loss, [t for t in (h, W, b) if t is not None], go)
    theirs_grads = torch.autograd.grad(theirs.loss, params, go)
    for a, t in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=5e-5)


def test_module_is_a_drop_in_for_ligers():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, W, b, y = make(30, 16, 64, bias=True)
    kwargs = dict(ignore_index=-100, lse_square_scale=1e-3, label_smoothing=0.05, reduction="mean")
    torch.testing.assert_close(FusedLinearCrossEntropyLoss(**kwargs)(W, h, y, bias=b),
                               LigerFusedLinearCrossEntropyLoss(**kwargs)(W, h, y, bias=b), atol=1e-5, rtol=5e-5)
