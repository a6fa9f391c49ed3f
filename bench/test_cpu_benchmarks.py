"""CPU benchmarks under pytest-benchmark: the packer against plain-Python BFD and against
lightbinpack (a native C++ BFD packer), position synthesis against NumPy. Each group times ours
and its peers in the same run, with pytest-benchmark's rounds, median and spread.

    make bench-cpu      # runs, stores the JSON (machine info included) under bench/results/pytest-benchmark/
                        # and compares it with the last stored run of this machine: a regression shows there

Not part of the test suite (tests/ is what CI collects); sizes are those of bench_packer.py and
bench_positions.py, smaller where a peer is plain Python.
"""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_packer import longalign_mixture  # noqa: E402
from bench_positions import batches  # noqa: E402

import longalign_ops as la  # noqa: E402
from longalign_ops.reference import best_fit_decreasing, synthesize_positions_numpy  # noqa: E402

CAPACITY, WORLD = 65536, 8
torch.set_num_threads(1)  # the timings are single-threaded on both sides


@pytest.fixture(scope="module")
def lengths_100k():
    return longalign_mixture(100_000)


@pytest.mark.benchmark(group="bfd packing, 100K sequences, 64K rows")
def test_pack_ours(benchmark, lengths_100k):
    plan = benchmark(la.pack, lengths_100k, CAPACITY, world_size=WORLD)
    assert plan.stats["efficiency"] > 0.99


@pytest.mark.benchmark(group="bfd packing, 100K sequences, 64K rows")
def test_pack_plain_python(benchmark, lengths_100k):
    values = lengths_100k.tolist()
    bins = benchmark.pedantic(best_fit_decreasing, args=(values, CAPACITY), rounds=3, iterations=1)
    assert sum(len(b) for b in bins) == len(values)


@pytest.mark.benchmark(group="bfd packing, 100K sequences, 64K rows")
def test_pack_lightbinpack(benchmark, lengths_100k):
    lightbinpack = pytest.importorskip("lightbinpack")
    values = lengths_100k.tolist()
    bins = benchmark(lightbinpack.bfd, values, CAPACITY)
    assert sum(len(b) for b in bins) == len(values)


@pytest.fixture(scope="module", params=["100K short sequences", "16 x 128K sequences"])
def position_batch(request):
    lengths = batches(2 * 2 ** 20, np.random.default_rng(0))
    name = next(k for k in lengths if k.split()[0] == request.param.split()[0])
    return lengths[name]


@pytest.mark.parametrize("method", ["logo", "pose"])
def test_positions_ours(benchmark, position_batch, method):
    benchmark.group = f"position synthesis {method}, {len(position_batch)} sequences"
    cu = torch.tensor(np.concatenate([[0], np.cumsum(position_batch)]), dtype=torch.int32)
    target = torch.from_numpy(position_batch * 8)
    ids = benchmark(la.synthesize_positions, cu, target, method=method)
    assert ids.numel() == int(position_batch.sum())


@pytest.mark.parametrize("method", ["logo", "pose"])
def test_positions_numpy(benchmark, position_batch, method):
    benchmark.group = f"position synthesis {method}, {len(position_batch)} sequences"
    ids = benchmark(synthesize_positions_numpy, position_batch, position_batch * 8, method=method)
    assert len(ids) == int(position_batch.sum())
