"""Package-level checks: imports without a GPU, the kernels (not the fallbacks) run in CI, and
the CUDA library was compiled where nvcc exists."""
import ctypes
import os
import shutil

import pytest
import torch

import longalign_ops
from longalign_ops.kernels._dispatch import use_triton


def test_kernels_subpackage_is_installed_under_the_package():
    """The kernels ship inside the package (longalign_ops/kernels), never as a top-level
    `kernels` package that would clash with other projects' modules."""
    import importlib.util

    import sys

    import longalign_ops.kernels.varlen_attention as k

    package_dir = os.path.dirname(longalign_ops.__file__)
    repo_kernels = os.path.join(os.path.dirname(package_dir), "kernels")  # an editable install maps here
    assert k.__spec__.name == "longalign_ops.kernels.varlen_attention"
    assert os.path.dirname(os.path.realpath(k.__file__)) in {os.path.realpath(os.path.join(package_dir, "kernels")),
                                                             os.path.realpath(repo_kernels)}
    assert importlib.util.find_spec("longalign_ops.kernels.weighted_cross_entropy") is not None
    assert "kernels" not in sys.modules or "longalign" not in (getattr(sys.modules["kernels"], "__file__", "") or "")
    top = importlib.util.find_spec("kernels")
    assert top is None or "longalign" not in (top.origin or ""), "a top-level `kernels` package was installed"


def test_a_python_started_in_the_clone_imports_transformers_and_the_package():
    """A newcomer starts Python (pytest, a notebook, the README's blocks) in the clone's root,
    where the source tree's `kernels/` lies on sys.path first: importing transformers, which
    probes the hub's top-level `kernels` package, still works, and so does the package with its
    transformers integration. The clone's `kernels/` is a namespace package (no __init__.py), so
    it never answers for an installed `kernels`, and is never a regular package by that name."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.exists(os.path.join(root, "kernels", "__init__.py"))
    script = """
import importlib.util, os, sys
spec = importlib.util.find_spec("kernels")
# an installed `kernels` (transformers 5 installs the hub's) or a namespace with no origin
assert spec is None or spec.origin is None or os.path.dirname(spec.origin) != os.path.join(os.getcwd(), "kernels"), spec
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
import longalign_ops, longalign_ops.integrations.transformers
from longalign_ops.kernels import varlen_attention, weighted_cross_entropy
print("ok", transformers.__version__)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI's fresh environment takes the newest allowed release")
def test_ci_runs_the_newest_transformers_the_bounds_allow():
    """CI installs the test extras into a fresh environment, so it must have the newest
    transformers that pyproject's upper bound admits (a bound `<X.Y` admits X.(Y-1).*): a test
    run on an older one would not show what a newcomer gets."""
    import re

    import transformers
    from packaging.version import Version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "pyproject.toml"), encoding="utf-8").read()
    major, minor = map(int, re.search(r'"transformers>=[0-9.]+,<([0-9]+)\.([0-9]+)"', text).groups())
    assert Version(transformers.__version__).release[:2] == (major, minor - 1), transformers.__version__


def _package_imports():
    """{module: modules of longalign_ops it imports}, at any depth of its code (function-level
    imports count: they are the same dependency, only deferred)."""
    import ast

    root = os.path.dirname(longalign_ops.__file__)
    graph = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py") or name == "__init__.py" and folder == root:
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            module = "longalign_ops." + rel.removesuffix(".__init__")
            package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                    deps.update([target] if node.module else [f"{base}.{a.name}" for a in node.names])
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longalign_ops."):
                    deps.add(node.module)
            graph[module] = {d for d in deps if d != module and d != "longalign_ops"}
    return graph


def test_the_package_modules_import_each_other_without_cycles():
    graph = _package_imports()
    assert "longalign_ops.batch" in graph["longalign_ops.attention"]  # the walk sees relative imports
    state = {}

    def visit(m, path):
        if state.get(m) == "done" or m not in graph:
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_one_place_reads_the_interpreter_switch():
    """Whether an op runs its Triton kernel, and with which tile configs, both follow from one
    reading of TRITON_INTERPRET (kernels/_dispatch.py)."""
    from longalign_ops.kernels import _dispatch

    readers = []
    # the kernels may be installed elsewhere than the package (an editable install maps them)
    for root in (os.path.dirname(longalign_ops.__file__), os.path.dirname(_dispatch.__file__)):
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and '"TRITON_INTERPRET"' in open(path).read():
                    readers.append(os.path.realpath(path))
    assert sorted(set(readers)) == [os.path.realpath(_dispatch.__file__)]

    cpu = torch.empty(1)
    for value, expect in (("1", True), ("0", False)):
        os.environ["TRITON_INTERPRET"], saved = value, os.environ.get("TRITON_INTERPRET")
        try:
            assert _dispatch.use_triton(cpu) is expect and _dispatch.on_compiled_gpu(cpu) is False
        finally:
            os.environ["TRITON_INTERPRET"] = saved


def test_every_attention_tile_config_has_a_schedule_in_the_batch():
    """PackedBatch lays out one tile list per block size in TILE_BLOCKS; every row block any
    config picks (any head dim, dtype, GPU generation, soft-cap) must be one of them."""
    from longalign_ops.batch import TILE_BLOCKS
    from longalign_ops.kernels.varlen_attention import attention_config

    seen = set()
    for head_dim in range(8, 257, 8):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for on_gpu, cap in ((False, (0, 0)), (True, (8, 0)), (True, (8, 6)), (True, (9, 0))):
                for softcap in (False, True):
                    for prefix in (False, True):
                        cfg = attention_config(head_dim, dtype, on_gpu, cap, softcap, prefix)
                        blocks = {cfg["fwd"][0], cfg["dkdv"][1], cfg["dq"][0]}
                        assert blocks <= set(TILE_BLOCKS), (head_dim, dtype, cap, softcap, prefix, cfg)
                        seen |= blocks
    assert len(seen) > 1


def test_ci_runs_the_triton_kernels_on_cpu():
    # conftest sets TRITON_INTERPRET=1: CPU tensors take the Triton path, not the reference
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert use_triton(torch.empty(1))
    from longalign_ops.cross_entropy import _rows_for
    from longalign_ops.kernels.weighted_cross_entropy import triton_rows

    assert _rows_for(torch.empty(1)) is triton_rows


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_library_compiled_with_nvcc():
    """nvcc is present on CI: the build must have produced the CUDA position library and it
    must export the entry point the Python side calls."""
    here = os.path.dirname(longalign_ops.__file__)
    from longalign_ops import positions

    path = positions.cuda_library_path()
    assert path is not None and os.path.exists(path), f"no CUDA library next to {here}"
    lib = ctypes.CDLL(path)
    assert hasattr(lib, "longalign_synthesize_positions_cuda")
