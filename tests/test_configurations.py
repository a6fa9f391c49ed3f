"""Every documented configuration trains, on real processes (torchrun, gloo, CPU).

1. The configuration matrix: sequence parallelism {1, 2} x recompute {none, checkpointing,
   activation offload} x sharding {DDP, FSDP} x tiling {off, on} x objective {SFT, LOGO} is 48
   runs; the 8 below cover every pair of values of any two factors (and weigh SP 2, where a
   layer's recompute must reach the row's other ranks). Each logs the losses of one process:
   SP 2 those of a single process, SP 1 (two data-parallel ranks) those of --world-size 2.
2. Every torchrun command in the README and docs/, shrunk to the tiny preset and 2 processes.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tiny_assets import assets, chat_records, logo_rows, longpo_rows, preference_records, save_dataset, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
pytestmark = pytest.mark.slow

# (sp, recompute, sharding, tiling, objective); the first is the README's command for rows of
# millions of tokens (--sp --fsdp --offload-activations --tiled-mlp --tiled-norms)
MATRIX = [
    (2, "offload", "fsdp", True, "sft"),
    (2, "checkpointing", "ddp", False, "sft"),
    (2, "checkpointing", "fsdp", True, "logo"),
    (2, "offload", "ddp", False, "logo"),
    (2, "none", "fsdp", False, "logo"),
    (1, "none", "ddp", True, "sft"),
    (1, "checkpointing", "ddp", True, "logo"),
    (1, "offload", "fsdp", False, "sft"),
]
COMMON = ["--max-steps", "4", "--num-samples", "32", "--no-plot", "--strategy", "bfd"]


def run(args, nproc=None, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", TRAIN] if nproc \
        else [sys.executable, TRAIN]
    res = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, " ".join(args) + "\n" + res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rank_file(out, rank=0):
    return json.load(open(os.path.join(out, f"rank{rank}.json")))


def test_the_matrix_covers_every_pair():
    factors = [(1, 2), ("none", "checkpointing", "offload"), ("ddp", "fsdp"), (False, True), ("sft", "logo")]
    for i in range(len(factors)):
        for j in range(i + 1, len(factors)):
            seen = {(row[i], row[j]) for row in MATRIX}
            assert seen == {(a, b) for a in factors[i] for b in factors[j]}, (i, j)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The one-process losses each matrix row must log, computed once per (objective, ranks)."""
    cache = {}

    def get(objective, world_size):
        if (objective, world_size) not in cache:
            out = str(tmp_path_factory.mktemp(f"ref-{objective}-{world_size}"))
            run(COMMON + ["--objective", objective, "--world-size", str(world_size), "--out", out])
            cache[objective, world_size] = rank_file(out)
        return cache[objective, world_size]

    return get


@pytest.mark.parametrize("sp,recompute,sharding,tiling,objective", MATRIX,
                         ids=["-".join(map(str, row)) for row in MATRIX])
def test_configuration_matches_one_process(tmp_path, references, sp, recompute, sharding, tiling, objective):
    args = COMMON + ["--objective", objective, "--out", str(tmp_path), "--sp", str(sp)]
    args += {"none": [], "checkpointing": ["--grad-checkpointing"], "offload": ["--offload-activations"]}[recompute]
    args += ["--fsdp"] if sharding == "fsdp" else []
    args += ["--tiled-mlp", "64", "--tiled-norms", "64"] if tiling else []
    run(args, nproc=2)
    r0, r1 = rank_file(str(tmp_path), 0), rank_file(str(tmp_path), 1)
    ref = references(objective, 1 if sp == 2 else 2)
    assert r0["param_checksum"] == r1["param_checksum"]  # one set of weights on both ranks
    assert r0["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert r0["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-5)
    assert len(r0["losses"]) == 4


# the configurations behind bench/bench_memory.py's stored rows (bench/README.md, the memory
# frontier), shrunk: everything on the host (FSDP2 CPUOffloadPolicy, the layers' checkpoints), the
# MLP and norms tiled over tokens, the attention over head groups; one GPU's row as 2 FSDP ranks,
# the 8 and 32 GPUs' (Ulysses over all of them) as SP 2
FRONTIER = {
    "1-gpu": ([], 2),
    "8-gpus": (["--sp", "2"], 1),
    "32-gpus": (["--sp", "2", "--tiled-attention", "1"], 1),
}


@pytest.mark.parametrize("row", list(FRONTIER))
def test_memory_frontier_configuration_matches_one_process(tmp_path, references, row):
    extra, reference_ranks = FRONTIER[row]
    args = COMMON + ["--objective", "sft", "--out", str(tmp_path), "--fsdp", "--offload-params",
                     "--offload-activations", "--tiled-mlp", "64", "--tiled-norms", "64", "--tiled-attention", "3"]
    run(args + extra, nproc=2)  # a later --tiled-attention replaces the earlier one
    r0 = rank_file(str(tmp_path), 0)
    ref = references("sft", reference_ranks)
    assert r0["param_checksum"] == rank_file(str(tmp_path), 1)["param_checksum"]
    assert r0["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert r0["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-5)


# ----------------------------------------------------------------------------- documented commands


def documented_torchrun_commands():
    """(file, command) for every torchrun command in a bash block of the README and docs/*.md,
    continuation lines joined and trailing comments dropped."""
    files = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    if os.path.isdir(docs):
        files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    found = []
    for path in files:
        text = open(path).read()
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("torchrun ") and line not in {c for _, c in found}:  # one run per command
                    found.append((os.path.relpath(path, ROOT), line))
    return found


def shrink(command: str, out: str, folder: str):
    """The command on this machine: 2 processes (1 stays 1; 4 for --sp with --cp), SP and CP sizes
    2, the tiny preset, tiles of 64 tokens, a tiny local model, tokenizer and data for DIR /
    *.jsonl, 2 steps into `out`. torchrun's other options (--nnodes, ...) are a cluster's."""
    words = shlex.split(command)
    script = next(j for j, w in enumerate(words) if w.endswith("train.py"))
    nproc, args, i = 2, [], 1
    local = assets(folder)
    objective = words[words.index("--objective") + 1] if "--objective" in words else "sft"
    if objective == "pretrain":  # raw documents for every --data source, its weight kept
        local["chats"] = write_jsonl(os.path.join(folder, "docs.jsonl"),
                                     [{"text": r["messages"][-1]["content"]} for r in chat_records(24)])
    elif objective != "sft":  # preference records (LongPO's with a short prompt) for --data
        local["chats"] = write_jsonl(os.path.join(folder, "prefs.jsonl"),
                                     preference_records(8, short_prompt=objective == "longpo"))
    # the seeds' own data, by the documented directory's name: their saved datasets, ProLong's MDS rows
    data = words[words.index("--data") + 1] if "--data" in words else ""
    seeds = {"longpo": lambda: save_dataset(longpo_rows(8), os.path.join(folder, "longpo-tokenized")),
             "logo": lambda: save_dataset(logo_rows(8), os.path.join(folder, "logo-data")),
             "prolong": lambda: os.path.join(ROOT, "tests", "fixtures", "mds", "prolong")}
    seed = next((name for name in seeds if os.path.basename(data.split(":")[0].rstrip("/")).startswith(name)), None)
    if seed:
        local["seed_data"] = seeds[seed]()
    while i < len(words):
        w = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if w.startswith("--nproc_per_node"):
            n = int(w.split("=")[1]) if "=" in w else int(value)
            nproc = min(n, 4 if "--sp" in words and "--cp" in words else 2)
            i += 1 if "=" in w else 2
            continue
        if i <= script:  # train.py itself, or a torchrun option of a multi-node job
            i += 1 if i == script or "=" in w or not w.startswith("--") else 2
            continue
        replaced = {"--preset": "tiny", "--window": "512", "--tiled-mlp": "64", "--tiled-norms": "64",
                    "--tiled-attention": "3",  # the tiny model's 6 heads on 2 kv heads: 3 groups split over SP 2
                    "--sp": "2", "--cp": "2", "--model": local["model"], "--tokenizer": local["tokenizer"],
                    "--data": local["chats"], "--max-steps": "2", "--out": out, "--ref-model": local["model"],
                    "--export": os.path.join(folder, "exported"), "--export-adapter": os.path.join(folder, "adapter")}
        if w == "--data" and "seed_data" in local and value.startswith(data.split(":")[0]):
            args += [w, local["seed_data"] + (":" + value.rpartition(":")[2] if ":" in value else "")]
            i += 2
            continue
        if w == "--data" and ":" in value:  # a weighted source: the same document file, its weight kept
            args += [w, local["chats"] + ":" + value.rpartition(":")[2]]
            i += 2
            continue
        if w in replaced:
            args += [w, replaced[w]]
            i += 2
            continue
        args.append(w)
        i += 1
    if "--model" in words and "--tokenizer" not in words:  # a user's model directory holds its tokenizer
        args += ["--tokenizer", local["tokenizer"]]
    args += ["--max-steps", "2", "--out", out, "--no-plot", "--overwrite"]
    return nproc, args


def test_the_readme_shows_torchrun_commands():
    assert len(documented_torchrun_commands()) >= 3


@pytest.mark.parametrize("where,command", documented_torchrun_commands(),
                         ids=[f"{w}:{c[:60]}" for w, c in documented_torchrun_commands()])
def test_documented_torchrun_command_trains(tmp_path, where, command):
    nproc, args = shrink(command, str(tmp_path / "run"), str(tmp_path))
    res = run(args, nproc=nproc)
    losses = rank_file(str(tmp_path / "run"))["losses"]
    assert len(losses) == 2 and all(loss == loss and abs(loss) < 1e4 for loss in losses), res.stdout[-2000:]
