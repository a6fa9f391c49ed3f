"""What the first GPU meets, checked without one: a device named "cuda" is the current CUDA
device, a step over fake CUDA tensors traces on a CPU-only torch without calling a CUDA runtime,
the launch configuration follows the architecture (with an override), head dims below 16 pad
their contraction to what tl.dot compiles, and offsets that pass 2^31 elements are 64-bit."""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import longalign_ops as la
from longalign_ops.data import PackedCollator
from longalign_ops.flash_attn_compat import flash_attn_varlen_func
from longalign_ops.kernels import _dispatch
from longalign_ops.kernels import varlen_attention as va

from test_varlen_attention import check_against_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_cuda_runtime(monkeypatch):
    """Any call into the CUDA runtime fails the test (a CPU-only torch would raise anyway; this
    also catches one that a CUDA build would answer)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA runtime was called while tracing")

    for name in ("get_device_capability", "get_device_properties", "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LONGALIGN_GPU_ARCH", raising=False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_means_the_current_cuda_device(device, no_cuda_runtime):
    """The README's instruction as written: a batch built for "cuda" serves tensors made on
    "cuda" (which live on cuda:0); a real mismatch is still refused, naming both devices."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        batch = la.PackedBatch.from_lengths([3, 5], device=device)
        assert batch.device == torch.device("cuda:0")
        assert batch.to("cuda") is batch and batch.cu_seqlens.device == torch.device("cuda:0")
        shared = la.PackedBatch.from_prefix_groups([(4, [2, 3])], device=device)
        assert shared.device == torch.device("cuda:0")
        q = torch.empty(8, 2, 16, device=device)
        batch.check("q", 8, q.device)
        with pytest.raises(ValueError, match=r"q is on cuda:1 but the PackedBatch was built for cuda:0"):
            batch.check("q", 8, torch.device("cuda:1"))
    assert PackedCollator(device=device).device == torch.device("cuda:0")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_fake_cuda_step_traces_on_a_cpu_only_torch(device, no_cuda_runtime):
    """Attention (plain, GQA with window + soft-cap, shared prefixes, the flash-attn form) and
    its backward, the fused loss with its gradients, and per-sequence log-probs, all on fake
    CUDA tensors: what torch.compile's tracing and a memory count do. (Autograd itself cannot
    run on fake CUDA tensors in a CPU-only torch, so the backward ops are called as autograd
    would call them.)"""
    with FakeTensorMode(allow_non_fake_inputs=True):
        batch = la.PackedBatch.from_lengths([5, 0, 97, 1], device=device)
        T = batch.total
        q = torch.randn(T, 4, 64, device=device, dtype=torch.bfloat16)
        k = torch.randn(T, 2, 64, device=device, dtype=torch.bfloat16)
        v = torch.randn(T, 2, 64, device=device, dtype=torch.bfloat16)
        for options in (dict(), dict(window_size=(16, 0), softcap=30.0)):
            out = la.varlen_attention(q, k, v, batch, **options)
            assert out.shape == q.shape and out.device == torch.device("cuda:0")
        cfg = va.config_for(q)
        tiles = (batch.tiles(cfg["dkdv"][1]), batch.tiles(cfg["dq"][0]))
        sinks = torch.zeros(4, device=device, dtype=torch.bfloat16)
        out, lse = torch.ops.longalign.varlen_attention_fwd(q, k, v, batch.cu_seqlens, batch.cu_seqlens,
                                                             batch.tiles(cfg["fwd"][0]), *tiles, None, sinks,
                                                             batch.max_len, batch.max_len, 0.125, -1, 0, 0.0)
        dq, dk, dv, dsinks = torch.ops.longalign.varlen_attention_bwd(torch.randn_like(out), q, k, v, out, lse,
                                                                      batch.cu_seqlens, batch.cu_seqlens, *tiles,
                                                                      None, sinks, batch.max_len, batch.max_len,
                                                                      0.125, -1, 0, 0.0)
        assert (dq.shape, dk.shape, dv.shape, dsinks.shape) == (q.shape, k.shape, v.shape, sinks.shape)
        mla_v = torch.randn(T, 2, 40, device=device, dtype=torch.bfloat16)  # MLA: v's own head dim
        assert la.varlen_attention(q, k, mla_v, batch, sinks=sinks, chunk_size=16).shape == (T, 4, 40)
        prefixed = la.PackedBatch.from_prefix_groups([(40, [7, 9]), (3, [])], device=device)
        qp, kp = (torch.randn(prefixed.total, h, 64, device=device, dtype=torch.bfloat16) for h in (4, 2))
        assert la.varlen_attention(qp, kp, kp, prefixed).shape == qp.shape
        flash = flash_attn_varlen_func(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len,
                                       causal=True)
        assert flash.shape == q.shape

        hidden = torch.randn(T, 32, device=device, dtype=torch.bfloat16)
        lm_head = torch.randn(100, 32, device=device, dtype=torch.bfloat16)
        labels = torch.randint(0, 100, (T,), device=device)
        assert la.fused_linear_cross_entropy(hidden, lm_head, labels).shape == ()
        # the forward that computes the gradients (what autograd runs when hidden requires grad)
        loss, _, _, dh, dw, _ = torch.ops.longalign.fused_linear_cross_entropy(
            hidden, lm_head, None, labels, None, -100, "mean", None, 0.0, 0.0, True, False, False, True, True, False)
        assert dh.shape == hidden.shape and dw.shape == lm_head.shape
        logps = la.sequence_logprobs(hidden, lm_head, labels, batch)
        assert logps.shape == (4,) and logps.device == torch.device("cuda:0")


def test_the_architecture_comes_from_a_cached_value_or_an_override(monkeypatch, no_cuda_runtime):
    cuda = torch.device("cuda:0")
    assert _dispatch.gpu_capability(cuda) == _dispatch.TRACE_CAPABILITY
    for value, expect in (("90", (9, 0)), ("8.6", (8, 6)), ("sm_120", (12, 0)), ("SM_89", (8, 9)), ("100", (10, 0))):
        monkeypatch.setenv("LONGALIGN_GPU_ARCH", value)
        assert _dispatch.gpu_capability(cuda) == expect, value
    monkeypatch.setenv("LONGALIGN_GPU_ARCH", "hopper")
    with pytest.raises(ValueError, match="LONGALIGN_GPU_ARCH"):
        _dispatch.gpu_capability(cuda)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("head_dim", [8, 64, 128, 192, 256])
def test_every_architecture_gets_tiles_within_its_shared_memory(capability, head_dim):
    """The tile model's bound on shared memory, checked against the table of what each GPU gives
    one program: the forward keeps its K and V tiles (BLOCK_N x BLOCK_D each, `stages` deep) and
    its Q tile; the compiled figures are in bench/results/.../compile-matrix (compile_check)."""
    limit = va.shared_memory_limit(capability)
    for dtype in (torch.bfloat16, torch.float32):
        for softcap in (False, True):
            cfg = va.attention_config(head_dim, dtype, True, capability, softcap)
            bm, bn, _, stages = cfg["fwd"]
            size = dtype.itemsize
            assert (bm + 2 * bn * max(stages - 1, 1)) * va.block_d(head_dim) * size <= limit, (capability, cfg)
    assert va.shared_memory_limit((8, 6)) == va.shared_memory_limit((12, 0)) == 101376


@pytest.mark.parametrize("D", [1, 8, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims_below_16_pad_the_contraction(D, dtype):
    """tl.dot compiles for NVIDIA only with a contraction of 16 or more: the kernels tile the
    head dim at 16 (masked loads, zeros past D) below that. Against float64, forward and
    gradients, on lengths 37, 1, 0, 20."""
    assert va.block_d(D) == 16
    check_against_reference([37, 1, 0, 20], [37, 1, 0, 20], 2, 1, D, dtype, True)


def test_head_dims_below_16_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--matrix", "--arch", "80,90",
                          "--dtypes", "bf16", "--head-dims", "8,12", "--strict"], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for arch in ("sm_80", "sm_90"):
        for kernel in ("fwd", "dkdv", "dq"):
            assert f"{arch} varlen_attention {kernel}" in res.stdout and "D=   8" in res.stdout


def test_the_99kb_gpus_and_blackwell_get_tiles_that_fit():
    """sm_120 (RTX 50x0; sm_86/89's 99 KB too) and sm_100 (B200) at head dims 192 and 256, where
    the tiles of sm_80 / sm_90 asked for more shared memory than a consumer card has, or spilled:
    --strict fails a kernel over the architecture's shared memory or spilling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--matrix", "--arch",
                          "120,100", "--dtypes", "bf16", "--head-dims", "192,256", "--strict"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "sm_120 varlen_attention fwd" in res.stdout and "sm_100 varlen_attention dkdv" in res.stdout
    # fp32 (the ieee-dot correctness path) on sm_120, where its tiles have two special cases
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--matrix", "--arch",
                          "120", "--dtypes", "fp32", "--head-dims", "96,256", "--strict"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def test_the_sink_forward_compiles_spill_free():
    """gpt-oss's shapes (head dim 64, bf16, sliding and full layers) with learnable sinks on sm_90
    and sm_120 (the stored matrix, compile-matrix-sinks/, has every architecture and head dim)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--matrix", "--arch",
                          "90,120", "--dtypes", "bf16", "--head-dims", "64", "--variants", "sinks,local_sinks",
                          "--strict"], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "sm_90 varlen_attention fwd window+softcap sinks" in res.stdout


def test_head_offsets_past_2_to_the_31_elements():
    """The backward's dO.O pre-pass of a head-major `out` (an all-to-all's layout): with a head
    stride of 2^30 elements, head 2 starts 2^31 elements in, which an int32 product wraps. The
    view lies over one sparse 2 GiB int8 storage (only the touched pages are real); each head's
    delta must be its own rows'."""
    T, H, D, stride_h = 40, 3, 16, 2 ** 30
    storage = torch.empty((H - 1) * stride_h + T * D, dtype=torch.int8)
    out = storage.as_strided((T, H, D), (D, stride_h, 1))
    dout = storage.as_strided((T, H, D), (D, stride_h, 1))
    for h in range(H):
        out[:, h] = torch.randint(-5, 6, (T, D), dtype=torch.int8)
    delta = torch.empty(H, T, dtype=torch.float32)
    block_m = 16
    va._varlen_attention_bwd_preprocess_kernel[(triton_cdiv(T, block_m), H)](
        out, dout, delta, *va._strides(16, out, dout), T, HEAD_DIM=D, BLOCK_D=16, BLOCK_M=block_m, STRIDE_UNIT=16)
    expect = torch.stack([(out[:, h].float() * dout[:, h].float()).sum(-1) for h in range(H)])
    assert torch.equal(delta, expect)


def triton_cdiv(a, b):
    return -(-a // b)


def test_gpu_check_dry_run_checks_every_step():
    """`bash bench/gpu_check.sh --dry-run` on this CPU: the GPU tests collect, every benchmark
    script imports and parses its arguments, the plot step runs, the outputs are writable; an
    unknown argument is refused."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    res = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "every step checks out" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    for step in ("pytest -q -m gpu", "gpu_correctness.py", "bench_varlen_attention.py", "bench_cross_entropy.py",
                 "bench_e2e.py", "plot.py"):
        assert step in res.stdout, step
    bad = subprocess.run(["bash", script, "--dryrun"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --dryrun" in bad.stderr


def test_gpu_correctness_runs_its_checks_on_the_cpu(tmp_path):
    """bench/gpu_correctness.py, shrunk, through the interpreted kernels in fp32: every check
    within 1e-4 of float64 and a CSV row each; a tolerance nothing meets fails the run."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_correctness

    small = ["--device", "cpu", "--dtype", "fp32", "--tokens", "97,300", "--max-len", "97", "--heads", "2",
             "--kv-heads", "1", "--head-dim", "40", "--hidden", "32", "--vocab", "300", "--chunk", "64"]
    out = str(tmp_path / "c.csv")
    assert gpu_correctness.main(small + ["--out", out]) == 0
    import csv

    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 19 and all(float(r["rel_err"]) <= 1e-4 for r in rows)
    assert {r["check"] for r in rows} == {"attention out", "attention dq", "attention dk", "attention dv",
                                          "attention+sinks out", "attention+sinks dq", "attention+sinks dk",
                                          "attention+sinks dv", "attention+sinks dsinks",
                                          "loss value", "loss dhidden", "loss dweight"}
    assert gpu_correctness.main(small + ["--out", out, "--tolerance", "1e-30"]) == 1


MATRIX = os.path.join(ROOT, "bench", "results", "cpu-x86_64-2cores-2026-12-07", "compile-matrix")
ARCHS = ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))


def test_the_stored_compile_matrix_is_the_launchers_choice_and_fits_everywhere():
    """bench/results/.../compile-matrix/sm_*.csv (compile_check.py --matrix, cubins read): every
    architecture users own x bf16 / fp16 / fp32 x head dims 8-256 x (plain, window + softcap,
    shared prefix) x forward, dQ, dK/dV. Each row's tiles are what attention_config picks today
    (so the stored figures are of the code as it is), none spills, none asks for more shared
    memory than its architecture gives one program, and on sm_90 every bf16 / fp16 attention
    matmul is a wgmma."""
    import csv
    import glob

    rows = [r for path in sorted(glob.glob(os.path.join(MATRIX, "sm_*.csv"))) if "_vs_" not in path
            for r in csv.DictReader(open(path))]
    seen = set()
    for r in rows:
        assert int(r["stack_bytes"]) == 0, r
        cap = divmod(int(r["arch"][3:]), 10)
        assert int(r["shared_bytes"]) <= va.shared_memory_limit(cap), r
        parts = r["kernel"].split(" ")
        if parts[0] != "varlen_attention" or parts[1] not in ("fwd", "dkdv", "dq"):
            continue
        local, prefix = "window+softcap" in r["kernel"], "shared-prefix" in r["kernel"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[r["dtype"]]
        want = va.attention_config(int(r["head_dim"]), dtype, True, cap, softcap=local, prefix=prefix)[parts[1]]
        got = tuple(int(x) for x in r["tiles"].split("x")) + (int(r["num_warps"]), int(r["num_stages"]))
        assert got == tuple(want), (r["arch"], r["kernel"], r["dtype"], r["head_dim"], got, want)
        if cap == (9, 0) and r["dtype"] != "fp32":
            assert int(r["wgmma"]) > 0 and int(r["mma_sync"]) == 0, r
        seen.add((cap, r["dtype"], int(r["head_dim"]), local, prefix, parts[1]))
    missing = [(cap, dt, d, local, prefix, k) for cap in ARCHS for dt in ("bf16", "fp16", "fp32")
               for d in (8, 16, 40, 64, 96, 128, 192, 256) for local, prefix in ((False, False), (True, False),
                                                                                 (False, True))
               for k in ("fwd", "dkdv", "dq") if (cap, dt, d, local, prefix, k) not in seen]
    assert not missing, missing[:10]
