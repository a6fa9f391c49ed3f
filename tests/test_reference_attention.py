"""The tutorial-style reference attention (bench/reference_attention.py), the yardstick our
kernels are compiled beside, computes attention: forward and backward against float64 torch
under the interpreter, on awkward lengths (0, 1, 97: partial tiles on both loops)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from reference_attention import reference_attention  # noqa: E402


def _float64_attention(q, k, v, causal):
    T = q.shape[2]
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("T,D,dtype,causal", [(97, 32, torch.float32, True), (97, 16, torch.float32, False),
                                              (1, 32, torch.float32, True), (40, 64, torch.float16, True)])
def test_reference_matches_float64(T, D, dtype, causal):
    torch.manual_seed(T + D)
    q, k, v = (torch.randn(2, 2, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 2, T, D, dtype=dtype)
    out = reference_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _float64_attention(*leaves, causal)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (out.double() - ref).abs().max().item() < tol
    for name, got, want in zip("qkv", grads, ref_grads):
        assert (got.double() - want).abs().max().item() < tol * 10, name


def test_reference_empty_and_bad_inputs():
    q = torch.randn(1, 2, 0, 16, requires_grad=True)
    out = reference_attention(q, q, q)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    with pytest.raises(ValueError, match="head dim"):
        reference_attention(*(torch.randn(1, 1, 4, 40) for _ in range(3)))
    with pytest.raises(ValueError, match="one shape"):
        reference_attention(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16))
    with pytest.raises(TypeError, match="q must be"):
        reference_attention(torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16))
