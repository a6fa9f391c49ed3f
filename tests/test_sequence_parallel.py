"""Ulysses sequence parallelism on CPU across real processes (torchrun, gloo): attention output
and q/k/v gradients, per-sequence log-probs, LongAlign weights and the weighted loss, and a
transformers model under ``sp.use``, against the single-process computation on the whole row;
rows whose sequences cross shard boundaries, a pad sequence, GQA with kv heads split and
replicated (kv heads < P), sliding window + softcap; bad inputs refused on every rank."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sp_worker.py")

# absolute tolerances, fp32; sums of ~60 log-probs (values ~250) get a relative 1e-5 budget in absolute terms
# and their hidden-state gradients (x P, the ranks' partial sums added in another order) 1e-4
TOLERANCE = {"sequence_logprobs average=False": 3e-3, "sequence_logprobs average=False grad": 1e-4}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc: int, lengths, interpret: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET=interpret, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           WORKER, ",".join(map(str, lengths))]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nproc, interpret", [(2, "1"), (4, "0")])
def test_ulysses_matches_single_process(nproc, interpret):
    """2 processes run the Triton kernels under the interpreter; 4 (kv heads replicated) the
    plain-CPU path, which on a 2-core machine is the one that finishes in seconds."""
    out = run_worker(nproc, [37, 1, 60, 0, 25], interpret)  # 123 tokens: padded to a multiple of P
    assert out["world"] == nproc and out["total"] % nproc == 0 and out["pad"] == (-123) % nproc
    numeric = {k: v for k, v in out["errors"].items() if not k.startswith("refused")}
    assert any("replicated" in k for k in numeric) == (nproc > 2)
    assert sum("shared prefix: " in k for k in numeric) == 15  # the shared-prefix row was checked
    assert sum(k.startswith("tiled attention: ") for k in numeric) == 2
    assert sum(k.startswith(("attention gpt-oss", "attention MLA", "attention Llama 4")) for k in numeric) == 13
    for name, value in numeric.items():
        assert value <= TOLERANCE.get(name.split(": ")[-1], 1e-5), (name, value)
    refused = {k: v for k, v in out["errors"].items() if k.startswith("refused")}
    assert len(refused) == 5 and all(v != "not raised" for v in refused.values()), refused
    assert f"size {nproc} must divide the query heads ({nproc + 1})" in refused["refused: query heads not divisible"]
    assert "(3)" in refused["refused: kv heads neither multiple nor divisor"]


def test_without_a_process_group_it_says_so():
    import longalign_ops as la
    from longalign_ops import sequence_parallel as sp

    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        sp.shard(la.PackedBatch.from_lengths([3, 4]))
    with pytest.raises(TypeError, match="PackedBatch"):
        sp.shard([3, 4])


def test_pad_lengths():
    from longalign_ops.sequence_parallel import pad_lengths

    assert pad_lengths([3, 4], 4).tolist() == [3, 4, 1]
    assert pad_lengths([3, 5], 4).tolist() == [3, 5]
    assert pad_lengths([], 2).tolist() == []


def run_cp_worker(nproc: int, cp: int, lengths, interpret: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET=interpret, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           WORKER, ",".join(map(str, lengths)), str(cp)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nproc, cp, interpret", [(2, 2, "1"), (3, 3, "0"), (4, 4, "0"), (4, 2, "0")],
                         ids=["cp2-triton", "cp3", "cp4", "ulysses2xcp2"])
def test_context_parallel_matches_single_process(nproc, cp, interpret):
    """Context parallelism (and Ulysses x CP on a 2-D mesh): every sequence is cut head-and-tail
    across the ranks (the 130-token one and the 1-token one cross every boundary); attention
    outputs and q/k/v gradients (MHA, GQA, MQA with window + softcap, non-causal), per-sequence
    log-probs, LongAlign weights, the weighted loss and a Llama with LOGO positions against the
    whole row in one process. cp2 runs the Triton kernels (interpreter) on the uneven
    query/key problem; the others the plain-CPU path."""
    lengths = [37, 1, 60, 0, 25, 130]
    out = run_cp_worker(nproc, cp, lengths, interpret)
    assert (out["world"], out["cp"], out["ulysses"]) == (nproc, cp, nproc // cp)
    assert out["total"] == sum(lengths) + out["pad"] and out["local"] * nproc == out["total"]
    numeric = {k: v for k, v in out["errors"].items() if not k.startswith("refused")}
    assert len(numeric) == 16 + 9 + 7 + 2 and "transformers model under sp.use" in numeric
    assert "tiled attention: gradients (relative)" in numeric
    assert numeric["attention gpt-oss: sinks, window dsinks"] <= 1e-5
    for name, value in numeric.items():
        assert value <= TOLERANCE.get(name, 1e-5), (name, value)
    refused = {k: v for k, v in out["errors"].items() if k.startswith("refused")}
    assert len(refused) == 6 and all(v != "not raised" for v in refused.values()), refused
    assert "shared-prefix" in refused["refused: shared-prefix row under CP"]
    assert "chunked attention" in refused["refused: chunked attention under CP"]


def test_context_parallel_layout_covers_the_row_once():
    """Every token of the padded row on exactly one rank; chunks c and 2C-1-c; the pad evens
    the ranks out to a multiple of the Ulysses size; no length needs to divide anything."""
    from longalign_ops.sequence_parallel import ContextParallelLayout

    for lengths, C, U in (([37, 1, 60, 0, 25], 2, 1), ([5], 4, 1), ([97, 3], 3, 2), ([], 2, 1), ([1, 1, 1], 4, 2)):
        layout = ContextParallelLayout(lengths, C, U)
        held = np.concatenate(layout.orders)
        assert sorted(held.tolist()) == list(range(int(layout.lengths.sum()))), (lengths, C)
        assert layout.piece % U == 0 and all(len(o) == layout.piece for o in layout.orders)
        assert int(layout.lengths.sum()) == sum(lengths) + layout.pad
        for c, chunks in enumerate(layout.chunks):
            for i, s, e in chunks:  # chunk c or 2C-1-c of sequence i
                L = lengths[i]
                assert (s, e) in {(c * L // (2 * C), (c + 1) * L // (2 * C)),
                                  ((2 * C - 1 - c) * L // (2 * C), (2 * C - c) * L // (2 * C))}


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_context_parallel_balance(cp):
    """Causal attention work per CP rank within 5% of the mean, on real length mixes: 64K rows
    packed (BFD) from LongAlign-like lengths (log-uniform 200..60K tokens) and ProLong-like
    ones (a few long documents with short data). Prints the per-rank work table."""
    import longalign_ops as la
    from longalign_ops.sequence_parallel import ContextParallelLayout

    rng = np.random.default_rng(0)
    mixes = {"longalign": np.exp(rng.uniform(np.log(200), np.log(60000), 400)).astype(int),
             "prolong": np.concatenate([rng.integers(20000, 65536, 20), rng.integers(100, 4000, 300)])}
    contiguous_worst = 0.0
    for name, lengths in mixes.items():
        plan = la.pack(lengths, 65536, strategy="bfd")
        for step in plan.steps[:8]:
            row = lengths[step[0]]
            work = ContextParallelLayout(row, cp).work()
            spread = work.max() / work.mean() - 1
            contiguous = contiguous_work(row, cp)
            contiguous_worst = max(contiguous_worst, contiguous.max() / contiguous.mean() - 1)
            print(f"{name} cp={cp} row of {len(row)} sequences: work per rank (1e6 pairs) "
                  f"{np.round(work / 1e6, 1).tolist()}, max/mean - 1 = {spread:.2%} (contiguous split: "
                  f"{contiguous.max() / contiguous.mean() - 1:.0%})")
            assert spread <= 0.05, (name, work.tolist())
    assert contiguous_worst > 0.3  # the split that ring-flash-attn's varlen form uses is far off on these rows


def contiguous_work(lengths, C):
    """Causal pairs per rank when the row is cut into C contiguous slices (the unbalanced split)."""
    pos = np.concatenate([np.arange(n) for n in lengths])  # each token's place in its sequence
    return np.array([(s + 1).sum() for s in np.array_split(pos, C)], dtype=np.int64)
