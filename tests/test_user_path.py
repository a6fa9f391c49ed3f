"""train/train.py on a user's own model, data and directories, run as a user runs it (a
subprocess): nothing of theirs is lost, no run hangs, every mistake is one line naming the flag."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tiny_assets import assets, make_model, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
# a run of a few hundred ms per step: the tiny preset on a short window
FAST = ["--preset", "tiny", "--window", "128", "--num-samples", "64", "--no-plot"]


def train(args, torchrun=None, timeout=600, preexec_fn=None, **popen):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", TRAIN] if torchrun \
        else [sys.executable, TRAIN]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn, **popen)


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_one_line_refusal(res, *needles):
    """Exit 2, no traceback, one error line on stderr naming what to change (the only other
    lines stderr may hold are transformers' weight-loading progress bar)."""
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("Loading weights")]
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("train.py: error: "), \
        res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_export_never_touches_files_it_did_not_write(tmp_path):
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "notes.txt").write_text("mine")
    (models / "other-model" / "config.json").write_text("{}")
    out = str(tmp_path / "run")
    res = train(FAST + ["--max-steps", "2", "--out", out, "--export", str(models)])
    assert_one_line_refusal(res, "--export", str(models))
    assert (models / "notes.txt").read_text() == "mine" and (models / "other-model" / "config.json").exists()
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # refused before training

    # a new directory, then again into the same one: only this tool's files are replaced
    export = tmp_path / "export"
    res = train(FAST + ["--max-steps", "2", "--out", out, "--export", str(export)])
    assert res.returncode == 0, res.stderr[-3000:]
    (export / "my-notes.txt").write_text("kept")
    first = (export / "model.safetensors").stat().st_mtime_ns
    res = train(FAST + ["--max-steps", "3", "--out", out, "--overwrite", "--export", str(export)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (export / "my-notes.txt").read_text() == "kept"
    assert (export / "model.safetensors").stat().st_mtime_ns != first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]  # no temporary left behind
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(export))


def test_resume_without_a_checkpoint_keeps_the_metrics(tmp_path):
    out = str(tmp_path / "run")
    assert train(FAST + ["--max-steps", "3", "--out", out]).returncode == 0
    before = open(os.path.join(out, "metrics.jsonl")).read()
    for name in os.listdir(out):
        if name.startswith("ckpt"):
            os.remove(os.path.join(out, name))
    res = train(FAST + ["--max-steps", "6", "--out", out, "--resume"])
    assert_one_line_refusal(res, "--resume", "--out", "no checkpoint")
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    # a run that has not started yet (a scheduler that always passes --resume) starts afresh
    fresh = str(tmp_path / "fresh")
    res = train(FAST + ["--max-steps", "2", "--out", fresh, "--resume"])
    assert res.returncode == 0 and len(losses(fresh)) == 2, res.stderr[-3000:]


def _interrupt_after(args, out, steps, torchrun=None):
    """Start train.py, send SIGTERM (to torchrun, which passes it on, or to the process) once
    `steps` metrics rows exist; return the finished process's result."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", TRAIN] if torchrun \
        else [sys.executable, TRAIN]
    proc = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= steps:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out_text, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out_text, err)


@pytest.mark.parametrize("torchrun", [None, 2], ids=["one-process", "torchrun-2"])
def test_sigterm_saves_a_checkpoint_and_resume_continues_the_run(tmp_path, torchrun):
    """SIGTERM after step 5 of 150: the step under way finishes, a checkpoint is written, the
    run exits 143 (under torchrun every rank saves at the same step); --resume then logs the
    uninterrupted run's losses."""
    args = FAST + ["--max-steps", "150", "--warmup-steps", "2"]
    ref = str(tmp_path / "ref")
    res = train(args + ["--out", ref], torchrun=torchrun)
    assert res.returncode == 0, res.stderr[-3000:]
    out = str(tmp_path / "run")
    res = _interrupt_after(args + ["--out", out], out, 5, torchrun)
    stopped = len(losses(out))
    # torchrun reports a worker's exit status as its own failure (1); the workers' is 143
    assert res.returncode == (143 if torchrun is None else 1), (res.returncode, res.stderr[-3000:])
    assert "stopped by SIGTERM" in res.stdout + res.stderr and 5 <= stopped < 150, res.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "ckpt.pt"))
    res = train(args + ["--out", out, "--resume"], torchrun=torchrun)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = losses(out), losses(ref)
    assert len(got) == len(want) == 150
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want)), (stopped, got[stopped - 2:stopped + 3],
                                                                        want[stopped - 2:stopped + 3])


def test_all_prompts_over_the_window_refuse_fast_under_a_memory_limit(tmp_path):
    """DPO records whose every prompt is longer than --window: one line naming --window within
    60 s, under a 4 GiB address-space limit (the run planned empty epochs without end)."""
    a = assets(str(tmp_path / "assets"))
    prefs = write_jsonl(str(tmp_path / "prefs.jsonl"),
                        [dict(prompt_input_ids=list(range(10, 90)), chosen_input_ids=[7, 8], rejected_input_ids=[9])
                         for _ in range(6)])

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    t = time.time()
    res = train(["--model", a["model"], "--data", prefs, "--objective", "dpo", "--window", "32", "--max-steps", "2",
                 "--out", str(tmp_path / "run"), "--no-plot"], timeout=60, preexec_fn=limit)
    assert time.time() - t < 60
    assert_one_line_refusal(res, "--window 32")


@pytest.mark.parametrize("flag", ["--data", "--model", "--ref-model", "--tokenizer"])
def test_a_missing_path_is_one_line_naming_its_flag(tmp_path, flag):
    args = ["--out", str(tmp_path / "run"), flag, str(tmp_path / "missing")]
    if flag == "--ref-model":
        args += ["--objective", "dpo"]
    res = train(args)
    assert_one_line_refusal(res, flag, str(tmp_path / "missing"))


def test_every_refusal_is_one_line_naming_the_flag(tmp_path):
    a = assets(str(tmp_path / "assets"))
    long_chat = write_jsonl(str(tmp_path / "long.jsonl"),
                            [dict(messages=[dict(role="user", content=" ".join(["w1"] * 300)),
                                            dict(role="assistant", content="w2")])])
    small_vocab = str(tmp_path / "small-vocab")
    make_model(small_vocab, vocab_size=50)  # the tokenizer's ids run past it
    cases = [
        (["--model", a["model"], "--tokenizer", a["tokenizer"], "--data", long_chat, "--window", "64"],
         ["--window 64", "long.jsonl:1"]),
        (["--objective", "sft", "--ref-model", a["model"]], ["--ref-model"]),
        (["--strategy", "zigzag"], ["--strategy"]),
        (["--sp", "3"], ["--sp 3"]),
        (["--fsdp"], ["--fsdp"]),
        (["--model", small_vocab, "--tokenizer", a["tokenizer"], "--data", a["chats"]], ["--tokenizer", "--model"]),
    ]
    for args, needles in cases:
        res = train(FAST + ["--max-steps", "1", "--out", str(tmp_path / "run")] + args)
        assert_one_line_refusal(res, *needles)


def test_a_weights_only_model_trains_on_pretokenised_records(tmp_path):
    """A model directory with weights and config only (no tokenizer): pre-tokenised DPO and chat
    records train and export; a text record says it needs --tokenizer."""
    model = str(tmp_path / "weights-only")
    make_model(model)
    assert not any("tokenizer" in name for name in os.listdir(model))
    prefs = write_jsonl(str(tmp_path / "prefs.jsonl"),
                        [dict(prompt_input_ids=list(range(10, 10 + 5 * (i % 4 + 1))), chosen_input_ids=[20 + i, 3],
                              rejected_input_ids=[40 + i, 41, 3]) for i in range(8)])
    res = train(["--model", model, "--data", prefs, "--objective", "dpo", "--max-steps", "3", "--out",
                 str(tmp_path / "dpo"), "--no-plot", "--export", str(tmp_path / "dpo-model")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(losses(str(tmp_path / "dpo"))) == 3 and os.path.exists(tmp_path / "dpo-model" / "model.safetensors")
    chats = write_jsonl(str(tmp_path / "chats.jsonl"),
                        [dict(input_ids=list(range(5, 25)), labels=[-100] * 10 + list(range(15, 25)))
                         for _ in range(6)])
    res = train(["--model", model, "--data", chats, "--max-steps", "2", "--out", str(tmp_path / "sft"), "--no-plot"])
    assert res.returncode == 0, res.stderr[-3000:]
    text = write_jsonl(str(tmp_path / "text.jsonl"), [dict(prompt="w1 w2", chosen="w3", rejected="w4")])
    res = train(["--model", model, "--data", text, "--objective", "dpo", "--max-steps", "1", "--out",
                 str(tmp_path / "text"), "--no-plot"])
    assert_one_line_refusal(res, "--tokenizer")
    shutil.rmtree(tmp_path / "text", ignore_errors=True)


def test_data_may_be_a_saved_dataset_directory(tmp_path):
    """--data DIR written by datasets' save_to_disk: a DatasetDict's train split by default,
    --data-split to choose another, a plain Dataset; a directory of anything else is refused in
    one line naming what --data takes."""
    from datasets import Dataset, DatasetDict

    a = assets(str(tmp_path / "assets"))
    rows = [dict(prompt_input_ids=list(range(10, 10 + 4 * (i % 3 + 1))), chosen_input_ids=[20 + i, 3],
                 rejected_input_ids=[40 + i, 41, 3]) for i in range(8)]
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:4])).save_to_disk(str(tmp_path / "prefs"))
    for extra, name in (([], "train"), (["--data-split", "test"], "test")):
        res = train(["--model", a["model"], "--data", str(tmp_path / "prefs"), "--objective", "dpo", "--max-steps", "2",
                     "--out", str(tmp_path / name), "--no-plot"] + extra)
        assert res.returncode == 0 and len(losses(str(tmp_path / name))) == 2, res.stderr[-3000:]
    res = train(["--model", a["model"], "--data", str(tmp_path / "prefs"), "--objective", "dpo", "--data-split", "dev",
                 "--out", str(tmp_path / "dev")])
    assert_one_line_refusal(res, "--data-split dev", "train, test")
    chats = [dict(messages=[dict(role="user", content="w1 w2 w3"), dict(role="assistant", content=f"w{i} w9")])
             for i in range(8)]
    Dataset.from_list(chats).save_to_disk(str(tmp_path / "chats"))
    res = train(["--model", a["model"], "--tokenizer", a["tokenizer"], "--data", str(tmp_path / "chats"),
                 "--max-steps", "2", "--out", str(tmp_path / "sft"), "--no-plot"])
    assert res.returncode == 0 and len(losses(str(tmp_path / "sft"))) == 2, res.stderr[-3000:]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    res = train(["--data", str(tmp_path / "other"), "--out", str(tmp_path / "o")])
    assert_one_line_refusal(res, "--data", "save_to_disk")
