"""Preference losses against hand-written formulas from the papers, and gradients through
sequence_logprobs on packed rows (chosen and rejected answers in one batch)."""
import math

import numpy as np
import pytest
import torch

import longalign_ops as la
from longalign_ops import losses, reference


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_logo_matches_formula():
    c = torch.tensor([-1.2, -0.4, -2.0])
    r = torch.tensor([[-1.5, -2.5], [-0.3, -0.9], [-2.2, -1.0]])
    nll = torch.tensor([1.1, 0.5, 2.2])
    beta, gamma, lam = 3.0, 0.4, 0.2
    want = np.mean([-logsig(beta * (c[b].item() - r[b].mean().item()) - gamma) + lam * nll[b].item()
                    for b in range(3)])
    got = losses.logo_loss(c, r, beta=beta, gamma=gamma, chosen_nll=nll, sft_weight=lam)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # default SFT term: the chosen answer's length-averaged NLL, -c
    want2 = np.mean([-logsig(beta * (c[b].item() - r[b].mean().item()) - gamma) - lam * c[b].item()
                     for b in range(3)])
    assert losses.logo_loss(c, r, beta=beta, gamma=gamma, sft_weight=lam).item() == pytest.approx(want2, rel=1e-6)
    # one negative as a vector
    assert losses.logo_loss(c, r[:, 0], beta=beta, gamma=gamma).item() == pytest.approx(
        np.mean([-logsig(beta * (c[b].item() - r[b, 0].item()) - gamma) for b in range(3)]), rel=1e-6)


def test_simpo_dpo_longpo_match_formulas():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.2])
    assert losses.simpo_loss(pc, pr, beta=2.0, gamma=0.5).item() == pytest.approx(
        np.mean([-logsig(2.0 * (pc[b] - pr[b]).item() - 0.5) for b in range(2)]), rel=1e-6)
    z = [0.1 * ((pc[b] - rc[b]) - (pr[b] - rr[b])).item() for b in range(2)]
    assert losses.dpo_loss(pc, pr, rc, rr, 0.1).item() == pytest.approx(np.mean([-logsig(x) for x in z]), rel=1e-6)
    assert losses.dpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.1).item() == pytest.approx(
        np.mean([-0.9 * logsig(x) - 0.1 * logsig(-x) for x in z]), rel=1e-6)
    assert losses.longpo_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.5).item() == pytest.approx(
        np.mean([-logsig(x) for x in z]) + 0.5 * np.mean([-pc[b].item() for b in range(2)]), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rejected_logps must be"):
        losses.logo_loss(torch.zeros(3), torch.zeros(2, 4), beta=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="beta"):
        losses.logo_loss(torch.zeros(3), torch.zeros(3, 2), beta=float("nan"), gamma=0.0)
    with pytest.raises(ValueError, match="policy_rejected must have 2"):
        losses.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match="chosen_logps must have dtype"):
        losses.simpo_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_logo_gradient_through_packed_sequence_logprobs():
    """A packed batch of 2 prompts x (1 chosen + 2 rejected answers): the loss gradient through
    our fused sequence_logprobs equals the one through the fp64 reference."""
    torch.manual_seed(0)
    V, H = 300, 16
    lengths = [9, 7, 12, 5, 6, 10]  # [c0, r0a, r0b, c1, r1a, r1b]
    T = sum(lengths)
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    hidden = torch.randn(T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.3).requires_grad_()
    labels = torch.randint(0, V, (T,))
    labels[[0, 1, 9, 16]] = -100  # prompt tokens
    B = 2

    def loss_from(lp):
        lp = lp.view(B, 3)
        return losses.logo_loss(lp[:, 0], lp[:, 1:], beta=2.5, gamma=0.3, sft_weight=0.1)

    ours = loss_from(la.sequence_logprobs(hidden, weight, labels, cu, average=True))
    g = torch.autograd.grad(ours, (hidden, weight))
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = loss_from(reference.sequence_logprobs(hd, wd, labels, cu, average=True).float())
    hd2, wd2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp = reference.sequence_logprobs(hd2, wd2, labels, cu, average=True).view(B, 3)
    ref64 = (-torch.nn.functional.logsigmoid(2.5 * (lp[:, 0] - lp[:, 1:].mean(1)) - 0.3) - 0.1 * lp[:, 0]).mean()
    gr = torch.autograd.grad(ref64, (hd2, wd2))
    assert ours.item() == pytest.approx(ref64.item(), rel=1e-5) and ref.item() == pytest.approx(ref64.item(), rel=1e-5)
    for a, b in zip(g, gr):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)
