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
