"""The training loop: the documented command, exact resume, DDP on 2 CPU processes against the
single-process emulation, LOGO, the JSONL reader's error reporting, and one step with the
Triton kernels under the interpreter."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")
sys.path.insert(0, os.path.join(ROOT, "train"))
import train  # noqa: E402
import longalign_ops as la  # noqa: E402


def run(args, interpret="0", torchrun=None, timeout=600):
    """train.py (under torchrun with `torchrun` processes); on a hang, every process of the job
    prints its Python stacks (faulthandler, SIGABRT) into the failure message."""
    env = dict(os.environ, TRITON_INTERPRET=interpret, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", TRAIN] if torchrun \
        else [sys.executable, TRAIN]
    proc = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) + [proc.pid]:  # torchrun's workers run in sessions of their own
            os.kill(pid, signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s: " + out[-3000:] + err[-12000:])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def descendants(pid: int) -> list:
    """The processes below `pid`, from /proc (Linux)."""
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture
def cpu_reference_path(monkeypatch):
    # in-process runs use the PyTorch path on CPU; the kernels themselves are tested in
    # their own files and, inside the loop, by test_one_step_through_the_triton_kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_documented_command(tmp_path):
    out = str(tmp_path / "run")
    res = run(["--preset", "tiny", "--strategy", "packing", "--objective", "sft", "--max-steps", "8", "--out", out])
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "loss", "tokens_per_s", "padding_ratio", "ms"):
        assert all(key in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(os.path.join(out, "ckpt.pt"))
    assert "step     8 | loss" in res.stdout + res.stderr


def test_resume_continues_exactly(tmp_path, cpu_reference_path):
    full = train.main(["--max-steps", "6", "--warmup-steps", "1", "--world-size", "2", "--out", str(tmp_path / "a"),
                       "--no-plot"])["history"]

    def crash_after_three(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    args = ["--max-steps", "6", "--warmup-steps", "1", "--world-size", "2", "--out", str(tmp_path / "b"),
            "--ckpt-every", "3", "--no-plot"]
    with pytest.raises(KeyboardInterrupt):
        train.main(args, step_hook=crash_after_three)
    resumed = train.main(args + ["--resume"])["history"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["real_tokens"] for r in resumed] == [r["real_tokens"] for r in full[3:]]
    assert [r["step"] for r in metrics(str(tmp_path / "b"))] == [1, 2, 3, 4, 5, 6]


def test_ddp_two_processes_match_single_process(tmp_path):
    ddp, emu = str(tmp_path / "ddp"), str(tmp_path / "emu")
    run(["--max-steps", "3", "--out", ddp, "--no-plot"], torchrun=2)
    run(["--max-steps", "3", "--out", emu, "--world-size", "2", "--no-plot"])
    r0, r1 = (json.load(open(os.path.join(ddp, f"rank{r}.json"))) for r in (0, 1))
    single = json.load(open(os.path.join(emu, "rank0.json")))
    assert r0["param_checksum"] == r1["param_checksum"]  # the ranks agree on the weights
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-5)  # summed loss = single process
    assert r0["param_checksum"] == pytest.approx(single["param_checksum"], rel=1e-6)


@pytest.mark.parametrize("objective", ["sft", "logo"])
def test_sequence_parallel_two_processes_match_single_process(tmp_path, objective):
    """torchrun --nproc_per_node 2 train.py --sp 2: both ranks share every packed row (Ulysses),
    and the per-step losses (and the weights they lead to) are the single process's, 8 steps,
    fp32. SFT is packing with LongAlign weighting; LOGO synthesises positions over the row."""
    spd, single = str(tmp_path / "sp"), str(tmp_path / "single")
    common = ["--max-steps", "8", "--no-plot", "--objective", objective, "--strategy", "bfd"]
    run(common + ["--out", spd, "--sp", "2"], torchrun=2)
    run(common + ["--out", single])
    r0, r1 = (json.load(open(os.path.join(spd, f"rank{r}.json"))) for r in (0, 1))
    ref = json.load(open(os.path.join(single, "rank0.json")))
    assert r0["param_checksum"] == r1["param_checksum"]  # DDP over both ranks: one set of weights
    assert r0["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert r0["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-5)
    assert [m["sequences"] for m in metrics(spd)] == [m["sequences"] for m in metrics(single)]


@pytest.mark.parametrize("layout, objective", [(["--cp", "4"], "sft"),
                                               (["--sp", "2", "--cp", "2", "--grad-checkpointing"], "logo"),
                                               (["--cp", "2"], "dpo")],
                         ids=["cp4-sft", "sp2xcp2-checkpointing-logo", "cp2-dpo"])
def test_context_parallel_matches_single_process(tmp_path, layout, objective):
    """torchrun --nproc_per_node 4 train.py --preset tiny --cp 4: every packed row is split over
    four ranks, which Ulysses cannot do with the tiny preset's 6 heads; --sp 2 --cp 2 is the 2-D
    mesh, here with activation checkpointing (the recompute runs the same CP attention) and LOGO's
    synthesised positions; DPO under --cp 2 also computes its reference log-probs through the CP
    shard. Each logs the single process's losses and reaches its weights."""
    nproc = int(np.prod([int(layout[i + 1]) for i, w in enumerate(layout) if w in ("--sp", "--cp")]))
    cp, single = str(tmp_path / "cp"), str(tmp_path / "single")
    common = ["--preset", "tiny", "--max-steps", "4", "--no-plot", "--objective", objective, "--strategy", "bfd"]
    run(common + ["--out", cp] + layout, torchrun=nproc, timeout=900)
    run(common + ["--out", single] + (["--no-shared-prefix"] if objective != "sft" else []))
    ranks = [json.load(open(os.path.join(cp, f"rank{r}.json"))) for r in range(nproc)]
    ref = json.load(open(os.path.join(single, "rank0.json")))
    assert len({r["param_checksum"] for r in ranks}) == 1  # DDP over the ranks: one set of weights
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert ranks[0]["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-5)
    assert [m["sequences"] for m in metrics(cp)] == [m["sequences"] for m in metrics(single)]
    assert [m["real_tokens"] for m in metrics(cp)] == [m["real_tokens"] for m in metrics(single)]
    if objective == "dpo":  # the reference log-probs, computed under CP, are the single process's
        for key in ("ref_chosen_logp", "ref_rejected_logp", "chosen_logp", "margin"):
            assert [m[key] for m in metrics(cp)] == pytest.approx([m[key] for m in metrics(single)], rel=1e-4,
                                                                 abs=1e-4)


@pytest.mark.parametrize("objective", ["sft", "logo"])
def test_fsdp_two_processes_match_the_emulated_two_ranks(tmp_path, objective):
    """torchrun --nproc_per_node 2 train.py --fsdp logs the losses of --world-size 2 in one process
    for 8 steps, and the gathered weights agree."""
    fsdp, emu = str(tmp_path / "fsdp"), str(tmp_path / "emu")
    common = ["--max-steps", "8", "--no-plot", "--objective", objective]
    run(common + ["--out", fsdp, "--fsdp"], torchrun=2)
    run(common + ["--out", emu, "--world-size", "2"])
    r0, r1 = (json.load(open(os.path.join(fsdp, f"rank{r}.json"))) for r in (0, 1))
    single = json.load(open(os.path.join(emu, "rank0.json")))
    assert r0["param_checksum"] == r1["param_checksum"]
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert r0["param_checksum"] == pytest.approx(single["param_checksum"], rel=1e-5)


def test_a_killed_fsdp_run_resumes_where_it_stopped(tmp_path):
    """SIGKILL of the whole torchrun job once two steps are logged; --resume reads the full state
    dicts on every rank, shards them again and finishes with the losses of an uninterrupted run."""
    import signal
    import time

    out, clean = str(tmp_path / "run"), str(tmp_path / "clean")
    args = ["--max-steps", "6", "--no-plot", "--fsdp", "--ckpt-every", "1"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN] + args + ["--out", out]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(metrics(out)) < 6, "the run finished before it could be killed"
    run(args + ["--out", out, "--resume"], torchrun=2)
    run(args + ["--out", clean], torchrun=2)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics(clean)], rel=1e-5)
    with pytest.raises(AssertionError, match="with --fsdp"):  # the optimizer state is keyed differently
        run(["--max-steps", "7", "--no-plot", "--out", out, "--resume"])


def test_memory_features_train_exactly_as_without_them(tmp_path, cpu_reference_path):
    """--offload-activations (checkpoints in host memory), --tiled-mlp and --tiled-norms change
    where memory goes, not the numbers: same per-step losses and weights as a plain run."""
    common = ["--max-steps", "4", "--no-plot", "--num-samples", "24"]
    plain = train.main(common + ["--out", str(tmp_path / "plain")])
    lean = train.main(common + ["--out", str(tmp_path / "lean"), "--offload-activations", "--tiled-mlp", "64",
                                "--tiled-norms", "64", "--tiled-attention", "3"])
    from longalign_ops.memory import HostOffload

    layer = lean["model"].model.layers[0]
    assert isinstance(layer._gradient_checkpointing_func.__self__, HostOffload) and layer.gradient_checkpointing
    assert layer.mlp.forward.longalign_tiled == 64 and layer.input_layernorm.forward.longalign_tiled == 64
    assert layer.self_attn.forward.longalign_head_groups == 3
    assert [h["loss"] for h in lean["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    assert lean["checksum"] == pytest.approx(plain["checksum"], rel=1e-6)


def test_fsdp_with_host_offload_on_one_process_matches_a_plain_run(tmp_path):
    """torchrun --nproc_per_node 1 train.py --fsdp --offload-params (FSDP2 CPUOffloadPolicy: what a
    single GPU needs past ~75 GiB of Llama-8B state) trains like the plain single-process run."""
    common = ["--max-steps", "4", "--no-plot", "--num-samples", "24"]
    off, plain = str(tmp_path / "off"), str(tmp_path / "plain")
    run(common + ["--out", off, "--fsdp", "--offload-params"], torchrun=1)
    run(common + ["--out", plain])
    a, b = (json.load(open(os.path.join(d, "rank0.json"))) for d in (off, plain))
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["param_checksum"] == pytest.approx(b["param_checksum"], rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--tiled-attention", "-2"], "--tiled-attention -2: takes a positive number"),
    (["--tiled-attention", "5"], "--tiled-attention 5: head_groups=5: 6 query heads on 2 kv heads cannot be cut"),
    (["--tiled-attention", "2", "--lora", "4"], "--tiled-attention 2: .*wrapped by LoRA adapters"),
])
def test_tiled_attention_refusals_are_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--max-steps", "1", "--no-plot", "--out", str(tmp_path / "x")] + args)


def test_offload_params_needs_fsdp(tmp_path):
    with pytest.raises(SystemExit, match="--offload-params works through FSDP2"):
        train.main(["--max-steps", "1", "--out", str(tmp_path / "x"), "--offload-params"])


def test_sequence_parallel_size_must_divide_the_world(tmp_path):
    with pytest.raises(SystemExit, match="--sp 3 must be >= 1 and divide the world size 1"):
        train.main(["--sp", "3", "--out", str(tmp_path / "x")])
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN, "--sp", "4",
                          "--out", str(tmp_path / "z"), "--max-steps", "1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "--sp 4 must be >= 1 and divide the world size 2" in res.stdout + res.stderr


def test_context_parallel_size_must_divide_the_world_and_excludes_shared_prefixes(tmp_path):
    with pytest.raises(SystemExit, match=r"--cp 3 must be >= 1 and --sp x --cp \(1 x 3\) must divide the world size 1"):
        train.main(["--cp", "3", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--cp 0 must be >= 1"):
        train.main(["--cp", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="with --cp the answers are packed unshared"):
        train.main(["--cp", "2", "--objective", "logo", "--shared-prefix", "--out", str(tmp_path / "x")])
    assert train.parse_args(["--cp", "2", "--objective", "dpo"]).shared_prefix is False
    assert train.parse_args(["--objective", "dpo"]).shared_prefix is True


def initial_eager_model(cfg):
    """The run's initial weights (build_model seeds them) on transformers' own eager attention."""
    model = train.build_model(cfg, torch.device("cpu"))
    model.config._attn_implementation = "eager"
    return model


def answer_nll_fp64(model, ids, labels, position_ids=None):
    """Summed negative log-likelihood of one sequence's (already shifted) targets and their count,
    from the model's logits in float64: no longalign_ops op is involved."""
    ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    pos = None if position_ids is None else torch.as_tensor(position_ids)[None]
    logits = model(input_ids=ids[None], position_ids=pos).logits[0].double()
    keep = labels != -100
    return -logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum().item(), int(keep.sum())


@pytest.mark.parametrize("strategy", ["naive", "sorted"])
def test_padded_strategies(tmp_path, cpu_reference_path, strategy):
    """The first step's logged loss is each rank's token mean averaged over ranks, recomputed from
    the model's logits in float64; the padding ratio is that of the step's padded rows."""
    args = ["--strategy", strategy, "--max-steps", "2", "--world-size", "2", "--no-plot"]
    hist = train.main(args + ["--out", str(tmp_path / strategy)])["history"]
    cfg = train.parse_args(args)
    units, _ = train.load_units(cfg, print)
    model = initial_eager_model(cfg)
    [ranks] = train.optimizer_step_batches(cfg, {}, train.unit_lengths(units), 2, 0)
    means, real, slots = [], 0, 0
    with torch.no_grad():
        for pack in ranks:
            sums = [answer_nll_fp64(model, units[i]["input_ids"], units[i]["labels"]) for i in pack]
            means.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
            lengths = [len(units[i]["input_ids"]) for i in pack]
            real, slots = real + sum(lengths), slots + len(lengths) * max(lengths)
    assert len(hist) == 2
    assert hist[0]["loss"] == pytest.approx(sum(means) / 2, rel=1e-5)
    assert hist[0]["padding_ratio"] == pytest.approx(1 - real / slots)
    if strategy == "naive":  # random batches of very different lengths pad a lot; sorted ones little
        assert hist[0]["padding_ratio"] > 0.1


def sequence_positions(mb, pos):
    """Each answer sequence's position ids in the micro-batch's row (prompt + answer): its own
    span, or with shared prefixes its prompt's prefix span followed by its branch's."""
    batch, cu = mb["batch"], mb["batch"].cu_seqlens.tolist()
    if batch.groups is None:
        return [pos[cu[j]:cu[j + 1]] for j in range(len(mb["seqs"]))]
    out, seg = [], 0
    for _, branches in batch.groups:
        prefix = pos[cu[seg]:cu[seg + 1]]
        out += [torch.cat([prefix, pos[cu[seg + 1 + b]:cu[seg + 2 + b]]]) for b in range(len(branches))]
        seg += 1 + len(branches)
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_logo_objective(tmp_path, cpu_reference_path, shared):
    out = tmp_path / "logo"
    args = ["--objective", "logo", "--max-steps", "3", "--world-size", "2"] + ([] if shared else ["--no-shared-prefix"])
    hist = train.main(args + ["--out", str(out)])["history"]
    assert len(hist) == 3
    # the first step's loss from scratch: every answer's per-token mean log-prob from the model's
    # float64 logits on prompt + answer at the row's synthesised positions (with shared prefixes,
    # the prompt's once-synthesised ids, then the answer's), LOGO's formula written out, the mean
    # over prompts
    cfg = train.parse_args(args)
    assert cfg.shared_prefix == shared
    units, _ = train.load_units(cfg, print)
    model = initial_eager_model(cfg)
    [ranks] = train.optimizer_step_batches(cfg, {}, train.unit_lengths(units, shared), 2, 0)
    losses = []
    with torch.no_grad():
        for pack in ranks:
            mb = train.micro_batch(cfg, units, pack, "cpu")
            assert (mb["batch"].groups is not None) == shared
            positions = sequence_positions(mb, train.logo_positions(cfg, mb))
            means = []
            for seq, seq_pos in zip(mb["seqs"], positions):
                nll, n = answer_nll_fp64(model, seq["input_ids"], seq["labels"], seq_pos)
                means.append(-nll / n)
            for g in torch.tensor(means, dtype=torch.float64).view(-1, 1 + cfg.num_rejected):
                z = cfg.beta * (g[0] - g[1:].mean()) - cfg.gamma
                losses.append(-torch.nn.functional.logsigmoid(z).item() + cfg.sft_weight * -g[0].item())
    assert hist[0]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    # the preference metrics of every step, in the history and in metrics.jsonl
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for r in logged:
        assert r["chosen_logp"] < 0 and r["rejected_logp"] < 0 and 0 <= r["pref_accuracy"] <= 1
        assert abs(r["margin"] - (r["chosen_logp"] - r["rejected_logp"])) < 1e-9
    assert logged[-1]["margin"] == hist[-1]["margin"]
    png = train.plot_loss(str(out / "metrics.jsonl"), str(out / "again.png"), train.parse_args(["--objective", "logo"]))
    assert png == str(out / "again.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_logo_metrics_match_a_direct_computation(cpu_reference_path):
    """The margin and accuracy a LOGO step logs are those of its own groups' log-probs."""
    cfg = train.parse_args(["--objective", "logo", "--num-rejected", "2"])
    loss_fn = train.make_loss_fn(cfg, 1, 2, 1.0, step_groups=2)
    torch.manual_seed(0)
    T, H, V = 24, 8, 30
    hidden, weight = torch.randn(T, H), torch.randn(V, H)
    labels = torch.randint(0, V, (T,))
    labels[[3, 7]] = -100  # a sequence's last label is the next sequence's first token: not a target
    batch = la.PackedBatch.from_lengths([4, 4, 4, 4, 4, 4])  # two groups of chosen + 2 rejected
    tokens = (labels != -100).view(6, 4).sum(1).float()
    loss_fn(hidden, weight, dict(num_units=2, labels=labels, batch=batch, answer_tokens=tokens))
    # per-token means from the model's logits, in float64
    logp = (hidden.double() @ weight.double().T).log_softmax(-1)
    picked = torch.where(labels != -100, logp.gather(1, labels.clamp_min(0)[:, None])[:, 0], torch.zeros(()))
    logps = (picked.view(6, 4).sum(1) / tokens.double()).view(2, 3)
    chosen, rejected = logps[:, 0], logps[:, 1:]
    want = [chosen.sum(), rejected.mean(1).sum(), 0, 0, (chosen - rejected.mean(1)).sum(),
            (chosen > rejected.amax(1)).sum(), 2]
    torch.testing.assert_close(loss_fn.sums, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)  # fp32 log-probs


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[BOS]", "<|user|>", "<|assistant|>", "<|system|>"] + [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]").save_pretrained(path)


def test_jsonl_reader_stops_at_a_bad_record_or_skips_and_counts(tmp_path, cpu_reference_path, capsys):
    make_tokenizer(str(tmp_path / "tok"))  # no chat template: the plain "<|role|>" fallback, said in the log
    good = {"messages": [{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4 w5"}]}
    lines = [json.dumps(good)] * 6 + ["{not json", json.dumps({"messages": []}),
                                      json.dumps({"messages": [{"role": "user", "content": "w1 " * 500}]})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data", str(tmp_path / "data.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--max-steps", "2",
            "--window", "64", "--no-plot"]
    with pytest.raises(SystemExit, match=r"data.jsonl:7: field '<record>': not JSON"):
        train.main(args + ["--out", str(tmp_path / "a")])
    hist = train.main(args + ["--out", str(tmp_path / "b"), "--skip-bad-records"])["history"]
    text = capsys.readouterr().out
    assert "has no chat template" in text
    assert "data.jsonl:8: field 'messages': missing or empty" in text
    assert "data.jsonl:9: field 'messages': no assistant message" in text
    assert "3 bad records skipped, 6 kept" in text
    assert len(hist) == 2


def test_chat_records_use_the_tokenizers_chat_template(tmp_path):
    """The assistant turn's tokens, as the template renders them, are the only targets."""
    from tiny_assets import make_tokenizer as make_chat_tokenizer

    tok = make_chat_tokenizer(str(tmp_path / "tok"))
    rec = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"},
                        {"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(rec) + "\n")
    [sample] = train.records.read_chat_jsonl(str(tmp_path / "chat.jsonl"), tok, 512, False, print)
    tokens = tok.convert_ids_to_tokens(sample["ids"].tolist())
    assert tokens == ["<s>", "<|user|>", "w1", "w2", "</s>", "<|assistant|>", "w3", "w4", "</s>", "<|user|>", "w5",
                      "</s>", "<|assistant|>", "w6", "</s>"]
    assert [t for t, keep in zip(tokens, sample["target"]) if keep] == ["w3", "w4", "</s>", "w6", "</s>"]


@pytest.mark.parametrize("objective", ["sft", "logo", "dpo"])  # one test each: xdist spreads the slowest
def test_one_step_through_the_triton_kernels(tmp_path, objective):
    """Attention and the fused loss inside the loop, executed by the Triton interpreter, log the
    loss of the plain-CPU path (SDPA per sequence and PyTorch's cross-entropy): two independent
    implementations of every op in the step."""
    args = ["--max-steps", "1", "--window", "128", "--num-samples", "16", "--objective", objective, "--no-plot"]
    kernels, plain = str(tmp_path / objective), str(tmp_path / f"{objective}-cpu")
    run(args + ["--out", kernels], interpret="1")
    run(args + ["--out", plain], interpret="0")
    assert metrics(kernels)[0]["loss"] == pytest.approx(metrics(plain)[0]["loss"], rel=1e-4), objective


@pytest.mark.parametrize("extra", [["--grad-accum", "2", "--world-size", "2"], ["--grad-accum", "3"]])
def test_weighted_objective_is_mean_of_sequence_means(cpu_reference_path, extra):
    """With LongAlign weighting, the micro-batch losses of one optimisation step (ranks x
    accumulation packs, each scaled as the loop scales it) add up to the mean over the step's
    sequences of their per-token mean loss (from the model's float64 logits), whatever the
    accumulation."""
    import numpy as np

    cfg = train.parse_args(["--num-samples", "40", "--loss-weighting"] + extra)
    units, _ = train.load_units(cfg, print)
    lengths = train.unit_lengths(units)
    model, eager = train.build_model(cfg, torch.device("cpu")), initial_eager_model(cfg)
    wrapped = train.CausalLMWithLoss(model)
    ranks = cfg.world_size
    plan_steps = train.optimizer_step_batches(cfg, {}, lengths, ranks, 0)
    loss_fn, M = train.step_loss_fn(cfg, units, plan_steps, ranks, emulated=ranks)
    with torch.no_grad():
        total = sum(wrapped(train.micro_batch(cfg, units, pack, "cpu"), loss_fn).item()
                    for ps in plan_steps for pack in ps)
        means = []
        for i in (i for ps in plan_steps for pack in ps for i in pack):
            u = units[i]
            if (u["labels"] != -100).any():
                nll, n = answer_nll_fp64(eager, u["input_ids"], u["labels"])
                means.append(nll / n)
    assert len(means) == M
    assert total == pytest.approx(float(np.mean(means)), rel=1e-4)


def test_local_model_directory(tmp_path, cpu_reference_path):
    """--model DIR loads a saved model from disk (nothing is fetched) with our attention."""
    import torch

    cfg = train.parse_args([])
    train.build_model(cfg, torch.device("cpu")).save_pretrained(str(tmp_path / "model"))
    res = train.main(["--model", str(tmp_path / "model"), "--max-steps", "2", "--out", str(tmp_path / "run"),
                      "--no-plot"])
    assert res["model"].config._attn_implementation == "longalign"
    assert len(res["history"]) == 2 and res["history"][-1]["loss"] > 0


# ----------------------------------------------------------------------------- checkpoint safety

FAST = ["--max-steps", "4", "--warmup-steps", "1", "--num-samples", "64", "--no-plot"]


def test_a_corrupted_or_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, cpu_reference_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--out", out, "--ckpt-every", "2"])
    path = os.path.join(out, "ckpt.pt")
    assert os.path.exists(path + ".prev")  # step 2 kept beside step 4
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    open(path, "wb").write(bytes(data))
    with pytest.raises(train.checkpoint.CheckpointError, match="ckpt.pt: checksum mismatch"):
        train.checkpoint.load(path, "cpu")
    res = train.main(FAST[:1] + ["6"] + FAST[2:] + ["--out", out, "--resume"])
    assert [r["step"] for r in res["history"]] == [3, 4, 5, 6]  # resumed from the previous (step 2)
    open(path, "wb").close()  # a 0-byte file, as a kill during a plain torch.save left
    with pytest.raises(train.checkpoint.CheckpointError, match="not a complete longalign checkpoint"):
        train.checkpoint.load(path, "cpu")


def test_resume_refuses_what_would_change_the_data_or_relabel_a_step(tmp_path, cpu_reference_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--out", out])
    with pytest.raises(SystemExit, match="seed: 0 -> 1"):
        train.main(FAST + ["--out", out, "--resume", "--seed", "1"])
    with pytest.raises(SystemExit, match="step 4, past --max-steps 2"):
        train.main(["--max-steps", "2"] + FAST[2:] + ["--out", out, "--resume"])
    with pytest.raises(SystemExit, match="pass --resume to continue it or --overwrite"):
        train.main(FAST + ["--out", out])
    assert len(metrics(out)) == 4  # nothing was deleted by the refused runs
    train.main(FAST + ["--out", out, "--overwrite"])
    # resuming at max_steps trains nothing and rewrites no checkpoint
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    assert train.main(FAST + ["--out", out, "--resume"])["history"] == []
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, cpu_reference_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--out", out, "--ckpt-every", "2"])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
    res = train.main(["--max-steps", "5"] + FAST[2:] + ["--out", out, "--resume"])
    assert [r["step"] for r in res["history"]] == [5]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]


def test_kill_minus_nine_at_any_moment_loses_at_most_the_steps_since_the_checkpoint(tmp_path):
    """A real SIGKILL of a training process, at three moments; each resume finishes the run with
    a continuous history."""
    import signal
    import time

    out = str(tmp_path / "run")
    args = [TRAIN, "--max-steps", "8", "--warmup-steps", "1", "--num-samples", "64", "--no-plot", "--out", out,
            "--ckpt-every", "1"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    for delay in (2.0, 3.5, 5.0):
        proc = subprocess.Popen([sys.executable] + args + (["--resume"] if os.path.exists(out) else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run(args[1:] + ["--resume"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    state = train.checkpoint.load(os.path.join(out, "ckpt.pt"), "cpu")
    assert state["step"] == 8


def test_every_flag_has_help_choices_and_default(capsys):
    import config  # train/config.py

    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in config.HELP:
        assert "--" + name.replace("_", "-") in text
    assert "{naive,sorted,bfd}" in text and "(default: bfd)" in text
    assert "{sft,pretrain,logo,simpo,dpo,longpo}" in text
    # the library's vocabulary; the old spelling is an alias
    assert config.parse_args(["--strategy", "packing"]).strategy == "bfd"
    assert set(config.HELP) == set(config.asdict(config.Config()))


@pytest.mark.parametrize("objective", ["dpo", "simpo", "longpo"])
def test_shared_prefix_rows_give_the_unshared_loss_and_gradients(objective, cpu_reference_path):
    """The same prompts and answers as one shared-prefix row (each prompt once) and as prompt +
    answer sequences: the same preference loss and the same gradient of every parameter, from
    fewer tokens."""
    on = train.parse_args(["--objective", objective])
    off = train.parse_args(["--objective", objective, "--no-shared-prefix"])
    assert on.shared_prefix and not off.shared_prefix
    units, _ = train.load_units(on, print)
    model = train.build_model(on, torch.device("cpu"))
    wrapped, params = train.CausalLMWithLoss(model), [p for p in model.parameters() if p.requires_grad]
    pack = [0, 1, 2]
    ref = torch.randn(len(pack), 1 + on.num_rejected) - 30.0  # reference log-probs, the same for both rows
    results = []
    for cfg in (on, off):
        mb = train.micro_batch(cfg, units, pack, "cpu")
        mb["ref_logps"] = ref
        loss = wrapped(mb, train.make_loss_fn(cfg, 1, 1, 1.0, step_groups=len(pack)))
        results.append((loss, torch.autograd.grad(loss, params), mb["batch"].total))
    (loss_on, grads_on, tokens_on), (loss_off, grads_off, tokens_off) = results
    assert tokens_on < tokens_off
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
