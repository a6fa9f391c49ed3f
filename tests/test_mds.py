"""ProLong's data as published: MDS shards (mosaicml-streaming's format) read by train/mds.py
without streaming, checked against what streaming's own reader decodes from shards its own
writer made (tests/fixtures/make_mds.py says how), and trained on as ProLong does: each row a
unit, each of its documents a sequence."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_assets import assets, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mds")
TRAIN = os.path.join(ROOT, "train", "train.py")
sys.path.insert(0, os.path.join(ROOT, "train"))
import mds  # noqa: E402


def expected(name):
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        return json.load(f)[name]


@pytest.mark.parametrize("name", ["prolong", "dynamic"])
def test_rows_and_spans_match_streamings_reader(name):
    rows = mds.MDSRows(os.path.join(FIXTURES, name))
    want = expected(name)
    assert len(rows) == len(want) and rows.lengths.tolist() == [len(w["input_ids"]) for w in want]
    for i, w in enumerate(want):
        assert rows.read(i, 0, int(rows.lengths[i])).tolist() == w["input_ids"]
        assert rows.read(i, 3, 5).tolist() == w["input_ids"][3:8]
        spans = [tuple(s) for s in np.asarray(w.get("indices", [[0, len(w["input_ids"])]])).reshape(-1, 2).tolist()]
        assert rows.spans(i) == spans


def test_a_pickled_column_is_refused_by_name_and_never_unpickled(tmp_path, monkeypatch):
    import pickle

    def trap(*a, **k):
        raise AssertionError("unpickled")
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    with pytest.raises(SystemExit, match="'indices' is encoded as pkl"):
        mds.MDSRows(os.path.join(FIXTURES, "pickled"))
    # a torn shard (fewer bytes than its header says) is one line, not a read past the end
    torn = tmp_path / "torn"
    torn.mkdir()
    for f in os.listdir(os.path.join(FIXTURES, "dynamic")):
        data = open(os.path.join(FIXTURES, "dynamic", f), "rb").read()
        (torn / f).write_bytes(data[:-10] if f.endswith(".mds") else data)
    with pytest.raises(SystemExit, match="bytes"):
        mds.MDSRows(str(torn))


def test_pretrain_units_are_rows_and_sequences_their_documents(tmp_path):
    import torch

    import data as train_data
    from batches import micro_batch
    from config import Config

    path = os.path.join(FIXTURES, "prolong")
    want = expected("prolong")
    longest = max(len(w["input_ids"]) for w in want)
    cfg = Config(objective="pretrain", data=[path], window=longest, token_cache=str(tmp_path / "cache"))
    units, ref = train_data.load_units(cfg, lambda m: None)
    assert ref is None and len(units) == len(want)
    for i, w in enumerate(want):
        seqs = units[i]
        spans = np.asarray(w["indices"]).reshape(-1, 2)
        assert [len(s["input_ids"]) for s in seqs] == (spans[:, 1] - spans[:, 0]).tolist()
        ids = np.asarray(w["input_ids"])
        for s, (a, b) in zip(seqs, spans):
            assert s["input_ids"].tolist() == ids[a:b].tolist()
            assert s["labels"].tolist() == ids[a + 1:b].tolist() + [-100]  # nothing predicted across documents
    mb = micro_batch(cfg, units, [0, 1], torch.device("cpu"))
    assert mb["batch"].lengths.tolist() == [len(s["input_ids"]) for i in (0, 1) for s in units[i]]
    # a window shorter than the rows: pieces of a row, its documents cut at the piece's bounds
    cfg = Config(objective="pretrain", data=[path], window=64, token_cache=str(tmp_path / "cache"))
    units, _ = train_data.load_units(cfg, lambda m: None)
    assert max(units.lengths) <= 64 and units.lengths.sum() == sum(len(w["input_ids"]) for w in want)
    rebuilt = []
    for i in range(len(units)):
        if units.documents[i] == 0:
            rebuilt += [s["input_ids"] for s in units[i]]
    row0 = np.asarray(want[0]["input_ids"])
    assert np.concatenate(rebuilt).tolist() == row0.tolist()


def test_train_mixes_mds_rows_with_jsonl_documents(tmp_path):
    a = assets(str(tmp_path / "assets"))
    rng = np.random.default_rng(0)
    docs = write_jsonl(str(tmp_path / "docs.jsonl"),
                       [dict(input_ids=rng.integers(7, 200, int(rng.integers(20, 120))).tolist()) for _ in range(30)])
    out = str(tmp_path / "run")
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, TRAIN, "--model", a["model"], "--objective", "pretrain", "--data",
                          os.path.join(FIXTURES, "prolong") + ":0.6", "--data", docs + ":0.4", "--window", "320",
                          "--max-steps", "3", "--out", out, "--token-cache", str(tmp_path / "cache"), "--no-plot"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert sum(r["source_tokens"][os.path.join(FIXTURES, "prolong")] for r in rows) > 0
    # MDS shards are documents for pretrain only
    res = subprocess.run([sys.executable, TRAIN, "--model", a["model"], "--objective", "dpo", "--data",
                          os.path.join(FIXTURES, "prolong"), "--out", str(tmp_path / "x")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "MDS shards" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
