"""Every Python block of the README, docs/*.md and bench/README.md runs as written, in a fresh
interpreter on this CPU machine (the way a reader pastes it: no TRITON_INTERPRET, so the ops take
their plain-CPU path); the README keeps to its size and order."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "bench/README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(page):
    return re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page), encoding="utf-8").read(), re.S)


BLOCKS = [(page, i, block) for page in PAGES for i, block in enumerate(python_blocks(page))]


def test_the_readme_is_a_front_door():
    """At most 200 lines, a pip install line and the quickstart within the first 60, and a link to
    every page of docs/."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = text.splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:60])
    assert "pip install" in head and "## Quickstart" in head and "```python" in head.split("## Quickstart")[1]
    for page in PAGES[2:]:
        assert f"({page})" in text, page
    assert len(python_blocks("README.md")) >= 2 and len(BLOCKS) >= 6


def test_relative_links_resolve():
    for page in PAGES:
        folder = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", open(os.path.join(ROOT, page), encoding="utf-8").read()):
            assert os.path.exists(os.path.join(folder, target)), (page, target)


@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_python_block_runs_as_written(page, index, block, tmp_path):
    """The README's blocks run where a newcomer pastes them, in the clone's root (its source
    tree first on sys.path: nothing there may shadow an installed package); the docs' blocks in
    an empty folder, since some of them write files."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    cwd = ROOT if page == "README.md" else tmp_path
    res = subprocess.run([sys.executable, "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{page} block {index}:\n{block}\n{res.stderr[-3000:]}"
