"""Fuzzing the public entry points with hostile inputs (hypothesis, fixed budget, derandomised
so CI is repeatable): every call either raises ValueError / TypeError, or returns what the
float64 reference says. No crash, no hang, no silently wrong number."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import longalign_ops as la
from longalign_ops import reference

BUDGET = settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T, H, D = 12, 2, 8
CLEAN = (ValueError, TypeError)


# half garbage, half valid boundaries (sorted cut points of the T tokens), so both branches run
ANY_CU = st.lists(st.integers(-3, T + 3), min_size=0, max_size=6)
VALID_CU = st.lists(st.integers(0, T), max_size=4).map(lambda cuts: [0, *sorted(cuts), T])


@BUDGET
@given(cu=st.one_of(ANY_CU, VALID_CU), max_q=st.integers(-1, T + 2),
       causal=st.booleans(), validate=st.booleans())
def test_varlen_attention_raises_or_is_right(cu, max_q, causal, validate):
    torch.manual_seed(0)
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    la.set_validation(validate)
    try:
        out = la.varlen_attention(q, k, v, cu_t, cu_t, max_q, max_q, causal=causal)
    except CLEAN:
        return
    finally:
        la.set_validation(True)
    valid = (len(cu) >= 1 and cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:]))
             and max_q >= max([b - a for a, b in zip(cu, cu[1:])] or [0]))
    assert torch.isfinite(out).all()  # whatever cu_seqlens held (validation off: clamped spans)
    if validate:
        assert valid, f"accepted bad input cu={cu} max={max_q}"
    if valid:
        ref, _ = reference.varlen_attention(q, k, v, cu_t, cu_t, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@BUDGET
@given(labels=st.lists(st.integers(-200, 12), min_size=5, max_size=5),
       weights=st.one_of(st.none(), st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf, 1e-50,
                                                              1e300]), min_size=5, max_size=5)),
       reduction=st.sampled_from(["mean", "sum", "none"]), wdtype=st.sampled_from([torch.float32, torch.float64]))
def test_cross_entropy_raises_or_is_right(labels, weights, reduction, wdtype):
    V = 10
    torch.manual_seed(1)
    logits = torch.randn(5, V)
    y = torch.tensor(labels)
    w = None if weights is None else torch.tensor(weights, dtype=wdtype)
    try:
        got = la.cross_entropy(logits, y, token_weights=w, reduction=reduction)
    except CLEAN:
        return
    bad_label = any(t != -100 and not 0 <= t < V for t in labels)
    assert not bad_label, f"accepted labels {labels}"
    if w is not None:
        w32 = w.float()
        assert bool(torch.isfinite(w).all() and (w >= 0).all() and torch.isfinite(w32).all()), f"accepted {weights}"
        if reduction != "mean":
            assert not bool(((w32 == 0) & (w != 0)).any()), f"accepted weights that underflow: {weights}"
    ref = reference.weighted_cross_entropy(logits, y, token_weights=w, reduction=reduction)
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-5)


@BUDGET
@given(lengths=st.lists(st.integers(-2, 40), max_size=8), device=st.sampled_from(["cpu", "meta"]))
def test_packed_batch_raises_or_describes(lengths, device):
    try:
        b = la.PackedBatch.from_lengths(lengths, device=device)
    except CLEAN:
        assert any(n < 0 for n in lengths)
        return
    assert all(n >= 0 for n in lengths) and b.total == sum(lengths) and b.num_sequences == len(lengths)
    if device == "cpu":
        assert b.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]


@pytest.mark.parametrize("bad", [[1.5], ["3"], [[1, 2]], [True, 2]])
def test_packed_batch_refuses_non_integers(bad):
    with pytest.raises(CLEAN):
        la.PackedBatch.from_lengths(bad)
