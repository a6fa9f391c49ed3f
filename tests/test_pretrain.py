"""ProLong-style continued training on raw documents: `train.py --objective pretrain` with
several `--data PATH:WEIGHT` sources mixed at token proportions, documents longer than the window
trained as row-sized pieces, bad records named by line and field, and a killed run resuming into
the same data stream as an uninterrupted one."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import data  # noqa: E402  (train/data.py)
import train  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_reference_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the loop on the PyTorch path; kernels have their own tests
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the token stores' default home


def write_sources(folder):
    """a.jsonl: 60 documents of 20-200 tokens and one of 1500 (three 512-token windows); b.jsonl:
    200 short, repetitive ones. Pre-tokenised: no tokenizer is needed."""
    rng = np.random.default_rng(0)
    a, b = os.path.join(folder, "a.jsonl"), os.path.join(folder, "b.jsonl")
    with open(a, "w") as f:
        for i in range(60):
            n = 1500 if i == 0 else int(rng.integers(20, 200))
            f.write(json.dumps({"input_ids": rng.integers(16, 200, n).tolist()}) + "\n")
    with open(b, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"input_ids": (np.arange(int(rng.integers(10, 60))) % 50 + 20).tolist()}) + "\n")
    return a, b


def test_two_sources_mix_at_their_weights_and_the_loss_falls(tmp_path, capsys):
    """The issue's check: a tiny local model (a transformers directory) on two pre-tokenised
    sources at 0.7 / 0.3."""
    from tiny_assets import assets

    a, b = write_sources(str(tmp_path))
    out = str(tmp_path / "run")
    history = train.main(["--objective", "pretrain", "--data", f"{a}:0.7", "--data", f"{b}:0.3", "--max-steps", "16",
                          "--model", assets(str(tmp_path))["model"], "--out", out, "--no-plot"])["history"]
    log = capsys.readouterr()
    assert "1 longer than --window 512 split into row-sized pieces (62 sequences)" in log.out + log.err
    given = np.array([[r["source_tokens"][a], r["source_tokens"][b]] for r in history])
    assert (given > 0).all(1).sum() >= 12  # most steps draw from both (a full 512-token piece fills a row alone)
    share = given[:, 0].sum() / given.sum()
    assert abs(share - 0.7) <= 0.02, share
    assert [r["real_tokens"] for r in history] == given.sum(1).tolist()  # every token counted once
    # a: uniform random ids (nothing to learn), b: repetitive (learnt): the mean falls by about 0.35
    assert np.mean([r["loss"] for r in history[-4:]]) < history[0]["loss"] - 0.2


def test_a_long_document_trains_as_its_pieces(tmp_path):
    a, b = write_sources(str(tmp_path))
    cfg = train.parse_args(["--objective", "pretrain", "--data", a, "--out", str(tmp_path / "x")])
    units = data.document_pieces(cfg, lambda m: None)
    first = json.loads(open(a).readline())["input_ids"]
    pieces = [units[i]["input_ids"] for i in range(3)]
    assert [len(p) for p in pieces] == [512, 512, 476] and units.lengths[:3].tolist() == [512, 512, 476]
    assert np.concatenate(pieces).tolist() == first  # nothing dropped, nothing repeated
    assert len(units) == 62 and sum(units.lengths) == sum(len(json.loads(x)["input_ids"]) for x in open(a))
    for u in (units[i] for i in range(3)):  # each its own sequence: its last token predicts nothing across the cut
        assert u["labels"][:-1].tolist() == u["input_ids"][1:].tolist() and u["labels"][-1] == -100


def test_a_killed_run_resumes_into_the_same_data_stream(tmp_path):
    a, b = write_sources(str(tmp_path))
    common = ["--objective", "pretrain", "--data", f"{a}:0.5", "--data", f"{b}:0.5", "--max-steps", "6",
              "--warmup-steps", "1", "--no-plot"]
    full = train.main(common + ["--out", str(tmp_path / "full")])["history"]

    def crash_after_three(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    args = common + ["--out", str(tmp_path / "killed"), "--ckpt-every", "3"]
    with pytest.raises(KeyboardInterrupt):
        train.main(args, step_hook=crash_after_three)
    resumed = train.main(args + ["--resume"])["history"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["source_tokens"] for r in resumed] == [r["source_tokens"] for r in full[3:]]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]


def test_bad_records_and_bad_flags_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": [5, -1]}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field 'input_ids': must be a non-empty list of non-negative"):
        train.main(["--objective", "pretrain", "--data", str(bad), "--out", str(tmp_path / "x")])
    bad.write_text(json.dumps({"txt": "hello"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: field 'text': missing"):
        train.main(["--objective", "pretrain", "--data", str(bad), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--objective pretrain trains on your documents"):
        train.parse_args(["--objective", "pretrain"])
    with pytest.raises(SystemExit, match="give every source a weight"):
        train.parse_args(["--objective", "pretrain", "--data", "a.jsonl:0.5", "--data", "b.jsonl"])
    with pytest.raises(SystemExit, match="weights must be positive"):
        train.parse_args(["--objective", "pretrain", "--data", "a.jsonl:0", "--data", "b.jsonl:1"])
    with pytest.raises(SystemExit, match="mixed for --objective pretrain"):
        train.parse_args(["--objective", "sft", "--data", "a.jsonl:0.5", "--data", "b.jsonl:0.5"])
    assert train.parse_args(["--data", "chats.jsonl"]).data == "chats.jsonl"  # one plain path stays a string
    assert train.data_sources(["x.jsonl", "y.jsonl"]) == [("x.jsonl", 0.5), ("y.jsonl", 0.5)]


def test_text_records_use_the_tokenizer(tmp_path):
    """{"text"} records go through the tokenizer (its BOS if it adds one, its EOS appended)."""
    from tiny_assets import make_tokenizer

    tok_dir = str(tmp_path / "tokenizer")
    make_tokenizer(tok_dir)
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["w1 w2 w3", "w4 w5 w6 w7 w8"]) + "\n")
    cfg = train.parse_args(["--objective", "pretrain", "--data", str(path), "--tokenizer", tok_dir,
                            "--out", str(tmp_path / "x")])
    units = data.document_pieces(cfg, lambda m: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    want = list(tok("w1 w2 w3")["input_ids"])
    if tok.eos_token_id is not None and want[-1] != tok.eos_token_id:
        want.append(tok.eos_token_id)
    assert units[0]["input_ids"].tolist() == want and len(units) == 2


def test_sequence_context_parallel_and_fsdp_log_the_single_process_losses(tmp_path):
    """--objective pretrain under torchrun: --sp 2 and --cp 2 (both ranks share each row, its
    pieces split by heads or head-and-tail) and --fsdp (two data-parallel ranks) log the losses
    and per-source tokens of the same data in one process."""
    import subprocess

    a, b = write_sources(str(tmp_path))
    common = ["--objective", "pretrain", "--data", f"{a}:0.7", "--data", f"{b}:0.3", "--max-steps", "3", "--no-plot"]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "train", "train.py")
    for extra, emulated in ((["--sp", "2"], 1), (["--cp", "2"], 1), (["--fsdp"], 2)):
        out = str(tmp_path / extra[0].strip("-"))
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", script] + common +
                             extra + ["--out", out], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        single = train.main(common + ["--world-size", str(emulated), "--out", out + "-single"])["history"]
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], rel=1e-4)
        assert [r["source_tokens"] for r in rows] == [r["source_tokens"] for r in single]


def test_token_store_is_reused_checked_and_rebuilt(tmp_path):
    """The first run tokenises into the cache, the next reuses it; a store whose bytes changed
    fails its checksum and is rebuilt; text records tie the store to their tokenizer."""
    from tiny_assets import make_tokenizer

    a, _ = write_sources(str(tmp_path))
    cache = str(tmp_path / "stores")
    cfg = train.parse_args(["--objective", "pretrain", "--data", a, "--token-cache", cache, "--out", str(tmp_path)])
    logs = []
    first = data.document_pieces(cfg, logs.append)
    assert any("tokenising into" in m for m in logs)
    logs.clear()
    again = data.document_pieces(cfg, logs.append)
    assert any("token store reused" in m for m in logs)
    assert again[5]["input_ids"].tolist() == first[5]["input_ids"].tolist()
    [folder] = [os.path.join(cache, f) for f in os.listdir(cache)]
    with open(os.path.join(folder, "tokens.bin"), "r+b") as f:  # one flipped bit
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 1]))
    logs.clear()
    rebuilt = data.document_pieces(cfg, logs.append)
    assert any("fails its checksum; tokenised again" in m for m in logs)
    # (`first` still maps the flipped file; the rebuilt store reads the source's tokens again)
    assert rebuilt[0]["input_ids"].tolist() == json.loads(open(a).readline())["input_ids"][:512]

    docs = tmp_path / "text.jsonl"
    docs.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    for name, extra in (("tok1", []), ("tok2", ["w999"])):
        tok = make_tokenizer(str(tmp_path / name))
        if extra:  # another vocabulary: other ids for the same words
            tok.add_tokens(extra)
            tok.save_pretrained(str(tmp_path / name))
    cfg1, cfg2 = (train.parse_args(["--objective", "pretrain", "--data", str(docs), "--tokenizer", str(tmp_path / n),
                                    "--token-cache", cache, "--out", str(tmp_path)]) for n in ("tok1", "tok2"))
    data.document_pieces(cfg1, logs.append)
    logs.clear()
    data.document_pieces(cfg2, logs.append)
    assert any("made by another tokenizer; tokenised again" in m for m in logs)


RSS_RUN = """
import json, sys
sys.path.insert(0, {train!r})
import train
train.main({args!r})
print(json.dumps({{"hwm_kib": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))}}))
"""


@pytest.mark.slow
def test_host_memory_stays_flat_as_the_data_grows(tmp_path):
    """Two runs of 3 steps, one on 2,000 documents (0.5M tokens), one on 20,000 (5M tokens): the
    documents live in the memory-mapped store, so the peak resident memory of the second run,
    tokenising included, is within 10% of the first (held in Python lists the larger data would
    add ~200 MB of int64 arrays and objects to a ~400 MB process)."""
    import subprocess

    rng = np.random.default_rng(1)
    peaks = {}
    for n in (2000, 20000):
        path = tmp_path / f"docs{n}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": rng.integers(16, 200, 250).tolist()}) + "\n")
        args = ["--objective", "pretrain", "--data", str(path), "--max-steps", "3", "--no-plot",
                "--token-cache", str(tmp_path / "stores"), "--out", str(tmp_path / f"run{n}")]
        res = subprocess.run([sys.executable, "-c", RSS_RUN.format(train=os.path.join(ROOT, "train"), args=args)],
                             capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1"))
        assert res.returncode == 0, res.stderr[-3000:]
        peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])["hwm_kib"]
    print(f"peak resident memory: {peaks[2000] / 1024:.0f} MiB (0.5M tokens), {peaks[20000] / 1024:.0f} MiB (5M)")
    assert peaks[20000] <= 1.10 * peaks[2000], peaks


def test_fill_rows_fills_every_row_and_keeps_the_mix(tmp_path):
    """ProLong-like sources (a few documents of 2K-6K tokens at 0.6, many of 20-200 at 0.4) on
    1024-token rows: whole pieces packed fill under 99% of the rows; --fill-rows cuts pieces at
    row ends and fills every row but the last to its last token, the proportions within 3%, and
    every token of every drawn piece is trained exactly once, in order."""
    from batches import MixturePlan

    rng = np.random.default_rng(1)
    long_docs, short_docs = str(tmp_path / "books.jsonl"), str(tmp_path / "short.jsonl")
    with open(long_docs, "w") as f:
        for _ in range(12):
            f.write(json.dumps({"input_ids": rng.integers(16, 200, int(rng.integers(2000, 6000))).tolist()}) + "\n")
    with open(short_docs, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"input_ids": rng.integers(16, 200, int(rng.integers(20, 200))).tolist()}) + "\n")
    base = ["--objective", "pretrain", "--data", f"{long_docs}:0.6", "--data", f"{short_docs}:0.4", "--window", "1024",
            "--world-size", "2", "--out", str(tmp_path / "x")]
    fills = {}
    for flag in ([], ["--fill-rows"]):
        cfg = train.parse_args(base + flag)
        units = data.document_pieces(cfg, lambda m: None)
        plan = MixturePlan(cfg, units.lengths, units.sources, 2, 0)
        rows = [pack for step in plan.steps for pack in step]
        sizes = [sum(e[2] if isinstance(e, tuple) else units.lengths[e] for e in row) for row in rows]
        fills[bool(flag)] = sum(sizes[:-2]) / (1024 * len(sizes[:-2]))
        src, tokens = data.drawn_tokens(units, plan.steps)
        assert abs(tokens[src == 0].sum() / tokens.sum() - 0.6) <= 0.03
    assert fills[False] < 0.99 <= fills[True] and fills[True] == 1.0, fills
    # segments: a piece's parts follow each other, each its own sequence, nothing lost or repeated
    parts = {}
    for row in rows:
        for unit, at, length in row:
            parts.setdefault(unit, []).append((at, length))
            seq = data.sequences_of(units, [(unit, at, length)])[0]
            assert seq["input_ids"].tolist() == units[unit]["input_ids"][at:at + length].tolist()
            assert seq["labels"][-1] == -100
    for unit, p in parts.items():
        assert sum(n for _, n in p) % units.lengths[unit] == 0  # whole pieces (a small source is cycled)
    res = train.main(base + ["--fill-rows", "--max-steps", "2", "--no-plot", "--overwrite"])["history"]
    assert len(res) == 2 and all(r["real_tokens"] == 2 * 1024 for r in res)
