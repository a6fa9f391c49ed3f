"""Preference training on the user's data: TRL-format records to ids (longalign_ops.preference),
the objectives in train/train.py against a plain transformers computation, the reference model,
sequence parallelism, and the exported model directory."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_assets as ta
from longalign_ops import losses
from longalign_ops.preference import PreferenceCollator, RecordError, tokenize_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import train  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pref"))
    paths = ta.assets(d)
    paths["prefs"] = ta.write_jsonl(os.path.join(d, "prefs.jsonl"), ta.preference_records(6, short_prompt=True))
    paths["prefs3"] = ta.write_jsonl(os.path.join(d, "prefs3.jsonl"), ta.preference_records(6, seed=1, num_rejected=2))
    paths["ref"] = os.path.join(d, "ref_model")
    ta.make_model(paths["ref"], seed=7)
    return paths


@pytest.fixture
def torch_paths(monkeypatch):
    """The ops' PyTorch paths: these tests are about the training path (the kernels are checked
    against float64 in their own tests, and one preference step runs them in test_train.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tok(folder):
    return train.records.load_tokenizer(folder["tokenizer"])


# ----------------------------------------------------------------------------- records


def test_chat_template_answers_are_the_rendered_answer_tokens(tok):
    rec = dict(prompt="w1 w2 w3", chosen="w4 w5", rejected=["w6", "w7 w8 w9"])
    ex = tokenize_record(rec, tok)
    # the template renders "<s><|user|> w1 w2 w3 </s> <|assistant|> " then "answer </s> "
    assert tok.convert_ids_to_tokens(ex["prompt_ids"]) == ["<s>", "<|user|>", "w1", "w2", "w3", "</s>", "<|assistant|>"]
    assert [tok.convert_ids_to_tokens(a) for a in ex["answers"]] == [["w4", "w5", "</s>"], ["w6", "</s>"],
                                                                      ["w7", "w8", "w9", "</s>"]]
    assert ex["uses_chat_template"] is True and ex["short_prompt_ids"] is None


def test_message_lists_and_the_plain_text_fallback(tok, folder):
    msgs = dict(prompt=[dict(role="system", content="w0"), dict(role="user", content="w1")],
                chosen=[dict(role="assistant", content="w2")], rejected=[dict(role="assistant", content="w3")])
    ex = tokenize_record(msgs, tok)
    assert tok.convert_ids_to_tokens(ex["prompt_ids"])[:4] == ["<s>", "<|system|>", "w0", "</s>"]
    assert [tok.convert_ids_to_tokens(a) for a in ex["answers"]] == [["w2", "</s>"], ["w3", "</s>"]]
    plain = train.records.load_tokenizer(folder["tokenizer"])  # a copy of its own
    plain.chat_template = None
    ex = tokenize_record(dict(prompt="w1 w2", chosen=" w3", rejected=" w4"), plain)  # text joined as given
    assert ex["uses_chat_template"] is False
    assert [plain.convert_ids_to_tokens(a) for a in ex["answers"]] == [["w3", "</s>"], ["w4", "</s>"]]


def test_pretokenised_records_are_used_as_they_are():
    rec = dict(prompt_input_ids=[5, 6, 7], chosen_input_ids=[8], rejected_input_ids=[[9, 10], [11]],
               short_prompt_input_ids=[7])
    ex = tokenize_record(rec)
    assert ex["prompt_ids"] == [5, 6, 7] and ex["answers"] == [[8], [9, 10], [11]] and ex["short_prompt_ids"] == [7]
    out = PreferenceCollator()([ex, dict(ex, prompt_ids=[1])])
    assert out["input_ids"][0].tolist() == [5, 6, 7, 8, 5, 6, 7, 9, 10, 5, 6, 7, 11, 1, 8, 1, 9, 10, 1, 11]
    assert out["num_answers"] == 3 and out["answer_tokens"].tolist() == [1, 2, 1, 1, 2, 1]
    short = PreferenceCollator(reference=True)([ex])
    assert short["input_ids"][0].tolist() == [7, 8, 7, 9, 10, 7, 11]


@pytest.mark.parametrize("record, field", [
    (dict(prompt="w1", chosen="w2"), "rejected"),
    (dict(prompt=3, chosen="w2", rejected="w3"), "prompt"),
    (dict(prompt="w1", chosen=["w2"], rejected="w3"), "chosen"),
    (dict(prompt="w1", chosen="w2", rejected=[]), "rejected"),
    (dict(prompt=[dict(role="user")], chosen="w2", rejected="w3"), "prompt"),
    (dict(prompt_input_ids=[1, 2], chosen_input_ids=[3]), "rejected_input_ids"),
    (dict(prompt_input_ids=[1, 2], chosen_input_ids=[3, "4"], rejected_input_ids=[5]), "chosen_input_ids"),
    (dict(prompt_input_ids=[1, 2], chosen_input_ids=[], rejected_input_ids=[5]), "chosen"),
    (dict(prompt_input_ids=[1, -2], chosen_input_ids=[3], rejected_input_ids=[5]), "prompt_input_ids"),
])
def test_bad_records_name_the_field(tok, record, field):
    with pytest.raises(RecordError) as e:
        tokenize_record(record, tok)
    assert e.value.field == field and repr(field) in str(e.value)


def test_a_bad_record_stops_the_run_with_its_line_or_is_skipped_and_counted(folder, tmp_path, capsys, torch_paths):
    lines = open(folder["prefs"]).read().splitlines()
    lines.insert(2, json.dumps(dict(prompt="w1", chosen="w2", rejected=5)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--model", folder["model"], "--tokenizer", folder["tokenizer"], "--data", str(bad), "--objective", "simpo",
            "--max-steps", "1", "--no-plot"]
    with pytest.raises(SystemExit, match=r"bad.jsonl:3: field 'rejected'"):
        train.main(args + ["--out", str(tmp_path / "a")])
    hist = train.main(args + ["--out", str(tmp_path / "b"), "--skip-bad-records"])["history"]
    assert len(hist) == 1
    assert "1 bad records skipped, 6 kept" in capsys.readouterr().out


# ----------------------------------------------------------------------------- objectives


def plain_logps(model_dir, examples, short=False):
    """Each answer's summed log-prob from the model's own logits (transformers' eager attention,
    one unpadded sequence at a time), and its per-token mean: the reference computation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double().eval()
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            prompt = ex["short_prompt_ids"] if short else ex["prompt_ids"]
            row_s, row_m = [], []
            for a in ex["answers"]:
                ids = torch.tensor([prompt + a])
                logp = model(ids).logits[0, :-1].log_softmax(-1)
                picked = logp[len(prompt) - 1:].gather(1, torch.tensor(a)[:, None])[:, 0]
                row_s.append(picked.sum().item())
                row_m.append(picked.mean().item())
            sums.append(row_s)
            means.append(row_m)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def examples_of(path, tok):
    return [tokenize_record(json.loads(line), tok) for line in open(path)]


@pytest.mark.parametrize("objective", ["dpo", "simpo", "logo", "longpo"])
def test_each_objective_trains_and_its_first_log_probs_are_transformers(folder, tok, tmp_path, objective, torch_paths):
    """Every prompt fits one row (--window 4096), so step 1 sees the whole data set with the
    initial weights: its logged log-probs are the mean over prompts of a plain computation."""
    data = folder["prefs3"] if objective == "logo" else folder["prefs"]
    res = train.main(["--model", folder["model"], "--tokenizer", folder["tokenizer"], "--data", data,
                      "--objective", objective, "--max-steps", "8", "--window", "4096", "--lr", "3e-3",
                      "--warmup-steps", "1", "--out", str(tmp_path / "run"), "--no-plot"])
    hist = res["history"]
    sums, means = plain_logps(folder["model"], examples_of(data, tok))
    score = means if objective in losses.LENGTH_AVERAGED else sums
    first = hist[0]
    assert first["chosen_logp"] == pytest.approx(score[:, 0].mean().item(), rel=1e-4)
    assert first["rejected_logp"] == pytest.approx(score[:, 1:].mean(1).mean().item(), rel=1e-4)
    if objective in losses.NEEDS_REFERENCE:
        ref_sums, _ = plain_logps(folder["model"], examples_of(data, tok), short=objective == "longpo")
        assert first["ref_chosen_logp"] == pytest.approx(ref_sums[:, 0].mean().item(), rel=1e-4)
        assert first["ref_rejected_logp"] == pytest.approx(ref_sums[:, 1:].mean(1).mean().item(), rel=1e-4)
        if objective == "dpo":  # the reference is the initial policy: zero implicit rewards at step 1
            assert first["loss"] == pytest.approx(0.6931471805599453, rel=1e-5)
    else:
        assert "ref_chosen_logp" not in first
    # the step's loss is the objective's mean over its prompts (the library's loss, fed the plain values)
    cfg = res["config"]
    ref = (plain_logps(folder["model"], examples_of(data, tok), short=objective == "longpo")[0]
           if objective in losses.NEEDS_REFERENCE else None)
    want = losses.preference_loss(objective, score, ref_logps=ref, beta=cfg.beta, gamma=cfg.gamma,
                                  sft_weight=cfg.sft_weight, dpo_lambda=cfg.dpo_lambda, chosen_nll=-means[:, 0])
    assert first["loss"] == pytest.approx(want.item(), rel=1e-4)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.01 and hist[-1]["pref_accuracy"] > hist[0]["pref_accuracy"]


def test_ref_model_is_read_once_and_cached(folder, tok, tmp_path, capsys, torch_paths):
    args = ["--model", folder["model"], "--tokenizer", folder["tokenizer"], "--data", folder["prefs"],
            "--objective", "dpo", "--ref-model", folder["ref"], "--max-steps", "1", "--window", "4096", "--no-plot"]
    first = train.main(args + ["--out", str(tmp_path / "run")])["history"][0]
    ref_sums, _ = plain_logps(folder["ref"], examples_of(folder["prefs"], tok))
    assert first["ref_chosen_logp"] == pytest.approx(ref_sums[:, 0].mean().item(), rel=1e-4)
    assert "reference log-probs of 6 prompts from " + folder["ref"] in capsys.readouterr().out
    again = train.main(args + ["--out", str(tmp_path / "run"), "--overwrite"])["history"][0]
    assert "from the cache" in capsys.readouterr().out
    assert again["loss"] == first["loss"]
    with pytest.raises(SystemExit, match="--ref-model is for --objective dpo or longpo"):
        train.main(["--objective", "simpo", "--ref-model", folder["ref"], "--out", str(tmp_path / "x")])


def test_export_loads_in_transformers_with_the_trained_weights(folder, tmp_path, torch_paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    res = train.main(["--model", folder["model"], "--tokenizer", folder["tokenizer"], "--data", folder["prefs"],
                      "--objective", "dpo", "--max-steps", "2", "--out", str(tmp_path / "run"), "--no-plot",
                      "--export", str(out)])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))  # no longalign attention needed to load
    trained = res["model"].state_dict()
    start = AutoModelForCausalLM.from_pretrained(folder["model"]).state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    assert any(not torch.equal(start[n], trained[n]) for n in start)  # it did train
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(AutoTokenizer.from_pretrained(folder["tokenizer"]))


@pytest.mark.slow
def test_dpo_under_sequence_parallelism_equals_one_process(folder, tmp_path, torch_paths):
    args = ["--model", folder["model"], "--tokenizer", folder["tokenizer"], "--data", folder["prefs"],
            "--objective", "dpo", "--max-steps", "3", "--window", "256", "--lr", "3e-3", "--no-plot"]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    single = train.main(args + ["--out", str(tmp_path / "one")])["history"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          os.path.join(ROOT, "train", "train.py")] + args + ["--sp", "2", "--out", str(tmp_path / "sp")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    sp = [json.loads(line) for line in open(tmp_path / "sp" / "metrics.jsonl")]
    for a, b in zip(single, sp, strict=True):
        for key in ("loss", "chosen_logp", "rejected_logp", "ref_chosen_logp", "margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)


def test_preference_loss_is_each_papers_loss():
    g = torch.Generator().manual_seed(0)
    pol, ref = -torch.rand(5, 3, generator=g, dtype=torch.float64) * 9, -torch.rand(5, 3, generator=g,
                                                                                    dtype=torch.float64) * 9
    nll = torch.rand(5, generator=g, dtype=torch.float64)
    # DPO with one rejected answer, written out (Rafailov et al. eq. 7)
    z = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    want = torch.log1p(torch.exp(-z)).mean()
    torch.testing.assert_close(losses.preference_loss("dpo", pol[:, :2], ref_logps=ref[:, :2], beta=0.1).double(), want)
    # LongPO: NLL + lambda * DPO
    got = losses.preference_loss("longpo", pol[:, :2], ref_logps=ref[:, :2], beta=0.1, sft_weight=1.0,
                                 dpo_lambda=0.5, chosen_nll=nll)
    torch.testing.assert_close(got, (0.5 * torch.log1p(torch.exp(-z)) + nll).mean())
    # LOGO: the chosen against the mean of several rejected, minus the margin, plus lambda * NLL
    z = 3.0 * (pol[:, 0] - pol[:, 1:].mean(1)) - 0.3
    torch.testing.assert_close(losses.preference_loss("logo", pol, beta=3.0, gamma=0.3, sft_weight=0.1,
                                                      chosen_nll=nll), (torch.log1p(torch.exp(-z)) + 0.1 * nll).mean())
    # SimPO with two rejected: the mean of the two pairs
    z = 2.0 * (pol[:, :1] - pol[:, 1:]) - 1.0
    torch.testing.assert_close(losses.preference_loss("simpo", pol, beta=2.0, gamma=1.0),
                               torch.log1p(torch.exp(-z)).mean())
    with pytest.raises(ValueError, match="needs ref_logps"):
        losses.preference_loss("dpo", pol, beta=0.1)
    with pytest.raises(ValueError, match="objective must be one of"):
        losses.preference_loss("ipo", pol, beta=0.1)
    with pytest.raises(ValueError, match="ref_logps must have logps' shape"):
        losses.preference_loss("dpo", pol, ref_logps=ref[:, :2], beta=0.1)


# ----------------------------------------------------------------------------- HF Trainer


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_the_collator_stores_each_prompt_once_with_the_same_log_probs(path, monkeypatch):
    """PreferenceCollator(shared_prefix=True): fewer tokens, the same per-answer log-probs from a
    model (prompts of 1 and 0 tokens included), the same answer token counts."""
    from longalign_ops.integrations.preference_trainer import _answer_logprobs
    from longalign_ops.integrations.transformers import apply_longalign
    from transformers import LlamaConfig, LlamaForCausalLM

    if path == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = apply_longalign(LlamaForCausalLM(cfg), fused_loss=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    examples = [dict(prompt_ids=ids(37), answers=[ids(5), ids(1), ids(8)]),
                dict(prompt_ids=ids(1), answers=[ids(3), ids(2), ids(4)]),
                dict(prompt_ids=[], answers=[ids(2), ids(6), ids(3)])]
    shared = PreferenceCollator("cpu", shared_prefix=True)(examples)
    plain = PreferenceCollator("cpu")(examples)
    assert shared["input_ids"].shape[1] == plain["input_ids"].shape[1] - 2 * 36 and "cu_seq_lens_q" not in shared
    assert torch.equal(shared["answer_tokens"], plain["answer_tokens"])
    with torch.no_grad():
        torch.testing.assert_close(_answer_logprobs(model, shared), _answer_logprobs(model, plain), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="shared_prefix=True needs a device"):
        PreferenceCollator(shared_prefix=True)


def conversational_records(n, seed=0):
    return [dict(prompt=[dict(role="user", content=r["prompt"])], chosen=[dict(role="assistant", content=r["chosen"])],
                 rejected=[dict(role="assistant", content=r["rejected"])])
            for r in ta.preference_records(n, seed=seed)]


def test_preference_trainer_dpo_losses_equal_trl_dpo_trainer(folder, tok, tmp_path, monkeypatch):
    """The same tiny model, data, seed and arguments: our packed DPO inside HF Trainer logs the
    losses TRL's DPOTrainer logs (padded rows there; reference log-probs precomputed), and its
    first gradient is the float64 DPO gradient. Both run the CPU PyTorch paths (the kernels are
    checked against float64 in their own tests), which keeps this test to seconds.

    Measured here (tiny model, fp32): TRL's step-1 gradient norm is 1.44801, ours 1.44693, the
    float64 computation 1.44693; TRL's chunked log-prob head differs from the exact gradient by
    ~7e-4, so its losses drift from ours by ~2e-4 by step 3. Steps 1-2 agree to 1e-4, later ones
    to 1e-3, and ours is checked against float64 directly."""
    import datasets
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, TrainingArguments
    from trl import DPOConfig, DPOTrainer

    from longalign_ops.integrations.preference_trainer import PreferenceTrainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    records = conversational_records(8)
    common = dict(per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3, lr_scheduler_type="constant",
                  logging_steps=1, seed=0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)

    def model(dtype=torch.float32, **kw):
        return AutoModelForCausalLM.from_pretrained(folder["model"], dtype=dtype, **kw)

    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"],
                         precompute_ref_log_probs=True, max_length=None, **common)
    theirs = DPOTrainer(model=model(), args=trl_args, train_dataset=datasets.Dataset.from_list(records),
                        processing_class=tok)
    theirs.train()
    ours = PreferenceTrainer(model(), TrainingArguments(output_dir=str(tmp_path / "ours"), **common),
                             train_dataset=records, processing_class=tok, objective="dpo", beta=0.1)
    ours.train()  # on shared-prefix rows (the default)
    want = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    got = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(got) == 4 and got[0] == pytest.approx(0.6931471805599453, rel=1e-6)  # reference = initial model
    assert got[:2] == pytest.approx(want[:2], rel=1e-4) and got == pytest.approx(want, rel=1e-3)

    # step 1's gradient against float64 eager transformers on the same batch
    # (unshared rows here, whose cu_seq_lens split the sequences for the reference below)
    fresh = model()
    unshared = PreferenceTrainer(fresh, TrainingArguments(output_dir=str(tmp_path / "g"), **common),
                                 train_dataset=records, processing_class=tok, objective="dpo", beta=0.1,
                                 shared_prefix=False)
    first = next(iter(unshared.get_train_dataloader()))  # the sampler's first batch, as train() draws it
    unshared.compute_loss(fresh, first).backward()
    exact = model(torch.float64, attn_implementation="eager")
    ids, labels, cu = first["input_ids"][0], first["shift_labels"][0], first["cu_seq_lens_q"].tolist()
    logps = []
    for a, b in zip(cu[:-1], cu[1:]):
        logp = exact(ids[a:b][None]).logits[0].log_softmax(-1)
        keep = labels[a:b] != -100
        logps.append(logp[keep].gather(1, labels[a:b][keep][:, None]).sum())
    pol, ref = torch.stack(logps).view(-1, 2), first["ref_logps"].double()
    (-F.logsigmoid(0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])))).mean().backward()
    for (name, p), q in zip(fresh.named_parameters(), exact.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-7, msg=name)
