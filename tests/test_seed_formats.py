"""The seeds' own data files go through train.py as the seeds train on them: LongPO's tokenised
saved datasets (the policy on the whole multi-turn conversation, the reference on each turn's
short context, summed per answer) and LOGO's (any number of rejected answers, position ids used
as given). Each is checked against the stock transformers model run on every sequence alone."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_assets import assets, logo_rows, longpo_rows, save_dataset as save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
sys.path.insert(0, os.path.join(ROOT, "train"))


def stock_logp(model, ids, labels, positions=None):
    """The summed log-prob of a sequence's targets (transformers' unshifted labels), the stock
    model on the sequence alone."""
    ids = torch.as_tensor(np.asarray(ids))[None]
    pos = None if positions is None else torch.as_tensor(np.asarray(positions))[None]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos).logits[0].double()
    labels = torch.as_tensor(np.asarray(labels))
    lp = torch.log_softmax(logits[:-1], -1)
    tgt = labels[1:]
    keep = tgt != -100
    return float(lp[keep].gather(-1, tgt[keep][:, None]).sum())


def run(args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN] + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_labelled_records_drop_padding_and_shift_labels():
    import records
    from longalign_ops.preference import RecordError

    row = longpo_rows(1)[0]
    ex = records.labelled_record(row)
    chosen = ex["sequences"][0]
    n = sum(row["chosen_attention_mask"])
    assert len(chosen["input_ids"]) == n and (chosen["input_ids"] == row["chosen_input_ids"][:n]).all()
    assert (chosen["labels"][:-1] == np.asarray(row["chosen_labels"][1:n])).all() and chosen["labels"][-1] == -100
    turns = len(row["ref_chosen_input_ids"])
    assert [s["answer"] for s in ex["ref_sequences"]] == [0] * turns + [1] * turns
    bad = dict(row, chosen_labels=row["chosen_labels"][:-1])
    with pytest.raises(RecordError, match="chosen_labels"):
        records.labelled_record(bad)
    with pytest.raises(RecordError, match="no target"):
        records.labelled_record(dict(row, chosen_labels=[-100] * len(row["chosen_labels"])))
    logo = records.labelled_record(logo_rows(1, rejected=3)[0])
    assert len(logo["sequences"]) == 4 and logo["ref_sequences"] is None
    assert all("position_ids" in s for s in logo["sequences"])


def test_longpo_tokenised_dataset_trains_with_the_reference_summed_over_turns(tmp_path, monkeypatch):
    """--objective longpo on LongPO's saved dataset: trains, and the cached reference table holds,
    per record and answer, the sum over turns of the stock model's log-prob of that turn's answer
    after its short context."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the training path; the kernels have their own tests
    a = assets(str(tmp_path / "assets"))
    rows = longpo_rows(10)
    data = save(rows, str(tmp_path / "longpo"))
    out = str(tmp_path / "run")
    res = run(["--model", a["model"], "--data", data, "--objective", "longpo", "--max-steps", "3", "--window", "512",
               "--out", out, "--no-plot"])
    assert res.returncode == 0, res.stderr[-3000:]
    stock = AutoModelForCausalLM.from_pretrained(a["model"], attn_implementation="eager").eval()
    # the policy's log-probs: every answer turn of the long conversation (the packed row through
    # the training path against the stock model on each conversation alone)
    import data as train_data
    from batches import micro_batch
    from config import Config
    from modeling import CausalLMWithLoss
    from objectives import answer_logprobs

    cfg = Config(objective="longpo", data=data, model=a["model"], window=512, shared_prefix=True)
    units, ref_units = train_data.load_units(cfg, lambda m: None)
    assert not cfg.shared_prefix  # multi-turn answers share no single prompt: unshared rows
    packed = AutoModelForCausalLM.from_pretrained(a["model"], attn_implementation="longalign").eval()
    with torch.no_grad():
        got = CausalLMWithLoss(packed)(micro_batch(cfg, units, list(range(4)), torch.device("cpu")), answer_logprobs)
    want = [stock_logp(stock, r[f"{n}_input_ids"][:sum(r[f"{n}_attention_mask"])],
                       r[f"{n}_labels"][:sum(r[f"{n}_attention_mask"])]) for r in rows[:4] for n in ("chosen", "rejected")]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    (cache,) = [f for f in os.listdir(out) if f.startswith("ref_logps-")]
    table = torch.load(os.path.join(out, cache), weights_only=True)["logps"]
    model = stock
    for i, row in enumerate(rows):
        for j, name in enumerate(("chosen", "rejected")):
            want = sum(stock_logp(model, ids[:sum(m)], lab[:sum(m)]) for ids, m, lab in zip(
                row[f"ref_{name}_input_ids"], row[f"ref_{name}_attention_mask"], row[f"ref_{name}_labels"]))
            assert table[i, j].item() == pytest.approx(want, rel=1e-4, abs=1e-4), (i, name)
    # without the reference's columns, longpo is refused in one line naming them
    stripped = save([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows], str(tmp_path / "noref"))
    res = run(["--model", a["model"], "--data", stripped, "--objective", "longpo", "--out", str(tmp_path / "r2")])
    assert res.returncode == 2 and "Traceback" not in res.stderr and "ref_chosen" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("shared_positions", [True, False])
def test_logo_dataset_uses_its_position_ids(tmp_path, shared_positions, monkeypatch):
    """LOGO's records: every answer's summed log-prob from the packed row (shared prefix where
    the branches share their prompt and its positions, else unshared) equals the stock model's
    on that sequence alone with the record's own position ids; train.py trains on it."""
    from transformers import AutoModelForCausalLM

    import data as train_data
    from batches import micro_batch
    from config import Config
    from modeling import CausalLMWithLoss
    from objectives import answer_logprobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the training path; the kernels have their own tests
    a = assets(str(tmp_path / "assets"))
    rows = logo_rows(6, shared_positions=shared_positions)
    path = save(rows, str(tmp_path / "logo"))
    cfg = Config(objective="logo", data=path, model=a["model"], window=512, shared_prefix=True)
    logged = []
    units, ref = train_data.load_units(cfg, logged.append)
    assert ref is None and cfg.num_rejected == 2
    assert cfg.shared_prefix is shared_positions and any("--shared-prefix off" in m for m in logged) != shared_positions
    packed = AutoModelForCausalLM.from_pretrained(a["model"], attn_implementation="longalign").eval()
    stock = AutoModelForCausalLM.from_pretrained(a["model"], attn_implementation="eager").eval()
    mb = micro_batch(cfg, units, list(range(len(units))), torch.device("cpu"))
    assert mb["given_positions"]
    with torch.no_grad():
        got = CausalLMWithLoss(packed)(mb, answer_logprobs)
    names = ["chosen", "reject_1", "reject_2"]
    want = [stock_logp(stock, r[f"{n}_input_ids"], r[f"{n}_labels"], r[f"{n}_position_ids"]) for r in rows for n in names]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    # the given ids are what the model reads: spread further apart (RoPE sees distances, so a
    # uniform shift would not show), every log-prob moves
    spread = dict(mb, batch=mb["batch"].with_positions(mb["batch"].position_ids * 3))
    with torch.no_grad():
        moved = CausalLMWithLoss(packed)(spread, answer_logprobs)
    assert (moved - got).abs().min() > 1e-5, (moved - got)
    res = run(["--model", a["model"], "--data", path, "--objective", "logo", "--max-steps", "2", "--window", "512",
               "--out", str(tmp_path / "run"), "--no-plot"])
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_longpo_dataset_under_sequence_parallelism_equals_one_process(tmp_path):
    """LongPO's records under torchrun --sp 2 (each row split over both ranks, the per-turn
    reference rows too): every step's metrics equal one process's."""
    import json

    a = assets(str(tmp_path / "assets"))
    data = save(longpo_rows(8, seed=1), str(tmp_path / "longpo"))
    args = ["--model", a["model"], "--data", data, "--objective", "longpo", "--max-steps", "3", "--window", "256",
            "--lr", "3e-3", "--no-plot"]
    assert run(args + ["--out", str(tmp_path / "one")]).returncode == 0
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN] + args +
                         ["--sp", "2", "--out", str(tmp_path / "sp")], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one, sp = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "sp"))
    assert len(one) == 3
    for x, y in zip(one, sp, strict=True):
        for key in ("loss", "chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp", "margin"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)
