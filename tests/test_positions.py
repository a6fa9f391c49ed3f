"""synthesize_positions against the placement invariants of docs/api.md (Positions), an independent NumPy implementation
(bitwise), and, on a GPU, the CUDA kernel against the CPU twin (bitwise)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from longalign_ops import synthesize_positions
from longalign_ops.reference import synthesize_positions_numpy


def cu_of(lengths, device="cpu"):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)


def chunks_of(c, chunk_size, num_chunks):
    """(start, length) of the middle chunks, per docs/api.md (Positions)."""
    if c <= 0:
        return []
    if num_chunks:
        N = min(num_chunks, c)
        sizes = [c // N + (1 if j < c % N else 0) for j in range(N)]
    else:
        sizes = [min(chunk_size, c - s) for s in range(0, c, chunk_size)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return list(zip(starts, sizes))


def check_invariants(ids, n, T, s, q, method, chunk_size, num_chunks):
    ids = np.asarray(ids)
    assert len(ids) == n
    if n == 0:
        return
    G = T - n
    assert np.all(np.diff(ids) > 0), "strictly increasing"
    assert ids[-1] <= T - 1 and ids[0] >= 0
    assert np.array_equal(ids[:s], np.arange(s)), "prefix at 0..s-1"
    if method == "contiguous":
        assert np.array_equal(ids, np.arange(n))
        return
    c = n - s - q
    chunks = chunks_of(c, chunk_size, num_chunks)
    offsets = []
    for start, size in chunks:
        a = s + start
        seg = ids[a:a + size]
        o = seg[0] - a
        assert np.array_equal(seg, np.arange(a, a + size) + o), "contiguous inside a chunk"
        assert 0 <= o <= G
        offsets.append(o)
    assert np.all(np.diff(offsets) >= 0)
    N = len(chunks)
    if method == "logo":
        for j, o in enumerate(offsets):
            assert (j * G) // N <= o <= ((j + 1) * G) // N, "logo offset inside its slot"
    if method == "pose" and offsets:
        assert offsets[0] == 0
    if q:
        last = ids[s + c - 1] if c > 0 else s - 1
        assert np.array_equal(ids[n - q:], last + 1 + np.arange(q)), "suffix right after the last chunk"


@pytest.mark.parametrize("method", ["logo", "pose", "contiguous"])
@pytest.mark.parametrize("num_chunks", [None, 4])
def test_invariants_and_numpy_twin(method, num_chunks):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 700, 40)
    lengths[:4] = [1, 2, 64, 128]
    T = lengths + rng.integers(0, 5000, 40)
    T[1] = lengths[1]  # no slack
    s = np.minimum(rng.integers(0, 20, 40), lengths)
    q = np.minimum(rng.integers(0, 20, 40), lengths - s)
    s[2], q[2] = 64, 0  # prefix only
    ids = synthesize_positions(cu_of(lengths), torch.tensor(T), method=method, chunk_size=50, num_chunks=num_chunks,
                               prefix_lens=torch.tensor(s), suffix_lens=q, seed=7)
    assert ids.dtype == torch.int64 and ids.shape == (lengths.sum(),)
    ref = synthesize_positions_numpy(lengths, T, method=method, chunk_size=50, num_chunks=num_chunks,
                                     prefix_lens=s, suffix_lens=q, seed=7)
    assert np.array_equal(ids.numpy(), ref)
    cu = cu_of(lengths).tolist()
    for i in range(40):
        check_invariants(ids[cu[i]:cu[i + 1]].numpy(), int(lengths[i]), int(T[i]), int(s[i]), int(q[i]), method,
                         50, num_chunks)


def test_logo_spreads_over_the_window():
    ids = synthesize_positions(cu_of([8192]), 65536, chunk_size=512, seed=3)
    assert ids[-1] > 60000  # the last chunk sits in the last slot of the window
    assert ids[0] < 65536 // 16  # the first chunk in the first slot


def test_seeded_and_deterministic():
    cu = cu_of([300, 500])
    a = synthesize_positions(cu, 4000, chunk_size=64, seed=1)
    b = synthesize_positions(cu, 4000, chunk_size=64, seed=1)
    c = synthesize_positions(cu, 4000, chunk_size=64, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # fixed values: the hash is ours, identical on every machine and on the GPU
    assert synthesize_positions(cu_of([6]), 100, chunk_size=2, seed=0).tolist() == \
        synthesize_positions_numpy([6], 100, chunk_size=2, seed=0).tolist()


def test_edge_cases():
    one = synthesize_positions(cu_of([1]), 10, seed=5)
    assert 0 <= int(one[0]) <= 9
    assert synthesize_positions(cu_of([5]), 5).tolist() == [0, 1, 2, 3, 4]  # no slack
    ids = synthesize_positions(cu_of([5]), 50, chunk_size=100)  # one chunk
    assert np.array_equal(np.diff(ids.numpy()), np.ones(4))
    assert synthesize_positions(cu_of([4]), 50, prefix_lens=4).tolist() == [0, 1, 2, 3]  # prefix only
    assert synthesize_positions(cu_of([]), 10).shape == (0,)
    z = synthesize_positions(cu_of([0, 3, 0]), torch.tensor([0, 9, 4]), seed=1)
    assert z.shape == (3,) and torch.all(z.diff() > 0)
    assert synthesize_positions(cu_of([4, 2]), 10, method="contiguous").tolist() == [0, 1, 2, 3, 0, 1]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), method=st.sampled_from(["logo", "pose", "contiguous"]),
       chunk_size=st.integers(1, 40), use_num=st.booleans(), seed=st.integers(0, 2 ** 64 - 1))
def test_property_invariants(data, method, chunk_size, use_num, seed):
    lengths = data.draw(st.lists(st.integers(0, 120), min_size=1, max_size=6))
    T = [n + data.draw(st.integers(0, 300)) for n in lengths]
    s = [data.draw(st.integers(0, n)) for n in lengths]
    q = [data.draw(st.integers(0, n - si)) for n, si in zip(lengths, s)]
    num_chunks = data.draw(st.integers(1, 9)) if use_num else None
    ids = synthesize_positions(cu_of(lengths), torch.tensor(T), method=method, chunk_size=chunk_size,
                               num_chunks=num_chunks, prefix_lens=s, suffix_lens=q, seed=seed).numpy()
    assert np.array_equal(ids, synthesize_positions_numpy(lengths, T, method=method, chunk_size=chunk_size,
                                                          num_chunks=num_chunks, prefix_lens=s, suffix_lens=q,
                                                          seed=seed))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    for i, n in enumerate(lengths):
        check_invariants(ids[cu[i]:cu[i + 1]], n, T[i], s[i], q[i], method, chunk_size, num_chunks)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(target_len=5), ValueError, r"target_len shorter than the sequence for 1 of 2"),
    (dict(target_len=[20]), ValueError, "one entry per sequence"),
    (dict(target_len=20.0), TypeError, "target_len must hold integers"),
    (dict(prefix_lens=[4, 4], suffix_lens=[4, 0]), ValueError, "prefix_lens \\+ suffix_lens longer"),
    (dict(prefix_lens=[-1, 0]), ValueError, "prefix_lens must be >= 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(num_chunks=0), ValueError, "num_chunks must be >= 1"),
    (dict(method="yarn"), ValueError, "method must be one of"),
    (dict(cu=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu=torch.tensor([0, 6, 10])), TypeError, "cu_seqlens must have dtype int32"),
    (dict(cu=[0, 6, 10]), TypeError, "cu_seqlens must be a torch.Tensor"),
])
def test_bad_inputs(kwargs, exc, pattern):
    args = dict(cu=cu_of([6, 4]), target_len=20)
    args.update(kwargs)
    cu = args.pop("cu")
    with pytest.raises(exc, match=pattern):
        synthesize_positions(cu, args.pop("target_len"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["logo", "pose", "contiguous"])
def test_gpu_matches_cpu_twin_bitwise(method):
    rng = np.random.default_rng(0)
    for lengths in (rng.integers(1, 600, 100_000), np.array([131072, 131072, 5, 98304])):
        T = lengths * 8
        s = np.minimum(rng.integers(0, 64, len(lengths)), lengths)
        cpu = synthesize_positions(cu_of(lengths), torch.tensor(T), method=method, prefix_lens=s, seed=11)
        gpu = synthesize_positions(cu_of(lengths, "cuda"), torch.tensor(T), method=method, prefix_lens=s, seed=11)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("method", ["logo", "contiguous", "pose"])
@pytest.mark.parametrize("num_chunks", [None, 5])
def test_one_pass_path_of_the_cuda_kernel_matches_bitwise(method, num_chunks):
    """The CUDA kernel draws "logo" offsets per token (one pass) while the CPU twin fills a
    table per sequence; both come from positions.h. Run the kernel's path on the CPU."""
    from longalign_ops import _C
    from longalign_ops.positions import METHODS

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 400, 300)
    T = lengths + rng.integers(0, 3000, 300)
    s = np.minimum(rng.integers(0, 9, 300), lengths)
    q = np.minimum(rng.integers(0, 9, 300), lengths - s)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args = (cu, T.astype(np.int64), s.astype(np.int64), q.astype(np.int64), METHODS[method],
            1 if num_chunks else 37, num_chunks or 0, 99)
    assert np.array_equal(_C.synthesize_positions(*args, one_pass=True), _C.synthesize_positions(*args))
    assert np.array_equal(_C.synthesize_positions(*args), synthesize_positions_numpy(
        lengths, T, method=method, chunk_size=37, num_chunks=num_chunks, prefix_lens=s, suffix_lens=q, seed=99))


def test_huge_target_len_is_refused_not_wrapped():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    # past int64: a ValueError naming the argument, not numpy's OverflowError
    for target in (2 ** 63, -(2 ** 64), [2 ** 63, 9], [2 ** 70, 9], np.array([2 ** 63, 9], dtype=np.uint64)):
        with pytest.raises(ValueError, match="target_len must fit in int64"):
            synthesize_positions(cu, target)
    with pytest.raises(ValueError, match="prefix_lens must fit in int64"):
        synthesize_positions(cu, 10, prefix_lens=[2 ** 64, 0])
    with pytest.raises(ValueError, match="target_len must be at most 2\\*\\*40"):
        synthesize_positions(cu, 2 ** 62)
    for method in ("logo", "pose"):
        pos = synthesize_positions(cu, 2 ** 40, method=method, chunk_size=2)
        assert (pos >= 0).all() and int(pos.max()) <= 2 ** 40 - 1
