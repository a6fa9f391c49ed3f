"""The benchmarks write their CSVs first and plot only when matplotlib is there: without it
they finish, say so, and keep every figure (bench_e2e used to crash at plot time, after all its
measurements)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_e2e_without_matplotlib(tmp_path):
    out = tmp_path / "e2e"
    code = ("import sys, runpy\n"
            "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
            f"sys.argv = ['bench_e2e.py', '--preset', 'tiny', '--world-size', '2', '--num-samples', '32', "
            f"'--max-steps', '2', '--convergence-steps', '2', '--out', {str(out)!r}]\n"
            f"runpy.run_path({os.path.join(ROOT, 'bench', 'bench_e2e.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not drawn: matplotlib is not installed" in res.stdout
    assert (out / "e2e.csv").exists() and (out / "convergence.csv").exists()
    assert not (out / "e2e.png").exists()


def test_gpu_check_stops_at_once_without_a_device(tmp_path):
    """One line, exit 1, nothing installed, created or run (it used to print a CUDA traceback,
    make bench/results/-<date>/ and start training on the CPU)."""
    before = set(os.listdir(os.path.join(ROOT, "bench")))
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "no CUDA device" in res.stderr
    assert set(os.listdir(os.path.join(ROOT, "bench"))) == before


def test_benchmarks_write_under_runs_unless_asked(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import argparse

    import common

    ap = argparse.ArgumentParser()
    common.add_out_args(ap, "x.csv")
    assert common.out_path(ap.parse_args([])).startswith(os.path.join("runs", "bench"))
    assert common.out_path(ap.parse_args(["--results"])).startswith(os.path.join(ROOT, "bench", "results"))
    assert common.out_path(ap.parse_args(["--out", "y.csv"])) == "y.csv"


def test_bench_against_reference_runs_both_kernels(monkeypatch):
    """gpu_check's ours-vs-reference rows, on the interpreter with a stand-in timer: both kernels
    run forward and backward on the same equal-length data and give the same attention."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import bench_varlen_attention as bva

    outs = []

    def one_call(fn, grad_of=None):
        out = fn()
        torch.autograd.grad(out, grad_of, torch.ones_like(out))
        outs.append(out.detach())
        return 1.0, 3.0

    monkeypatch.setattr(bva, "bench", one_call)
    rows = bva.against_reference(head_dims=(16,), lengths=(33,), tokens=66, heads=2, device="cpu",
                                 dtype=torch.float32)
    assert [r["impl"] for r in rows] == ["longalign_ops", "reference (tutorial-style)"]
    assert rows[0]["num_seqs"] == 2 and rows[0]["bwd_ms"] == 2.0
    ours, ref = outs
    torch.testing.assert_close(ours.reshape(2, 33, 2, 16).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_bench_split_dkdv_times_both_dkdv_layouts(monkeypatch):
    """gpu_check's Gemma-2 rows, on the interpreter with sm_90's config and a stand-in timer: the
    split dK/dV launches and the one-program mma.sync tiles both run, give the same gradients,
    and the config is restored afterwards."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import bench_varlen_attention as bva
    from longalign_ops.kernels import varlen_attention as va

    gpu = va.attention_config
    sm90 = lambda q, softcap=0.0, prefix=False: gpu(q.shape[-1], torch.bfloat16, True, (9, 0), softcap > 0, prefix)  # noqa: E731
    monkeypatch.setattr(va, "config_for", sm90)
    grads, splits = [], []

    def one_call(fn, grad_of=None):
        splits.append(va.config_for(grad_of[0], 50.0)["dkdv_split"])
        out = fn()
        grads.append(torch.autograd.grad(out, grad_of, torch.ones_like(out)))
        return 1.0, 3.0

    monkeypatch.setattr(bva, "bench", one_call)
    rows = bva.split_dkdv_against_one_program(tokens=66, T=33, heads=2, kv_heads=1, window=20, device="cpu",
                                              dtype=torch.float32)
    assert [r["op"] for r in rows] == ["gemma2_attention_dkdv"] * 2 and splits == [True, False]
    assert va.config_for is sm90
    for split, single in zip(*grads):
        torch.testing.assert_close(split, single, atol=1e-4, rtol=1e-4)
