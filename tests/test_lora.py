"""LoRA (PEFT), LOGO's own setting: train.py --lora trains only the adapters, the dpo / longpo
reference is the model without them, --export writes the merged model and --export-adapter
PEFT's adapter directory; apply_longalign drops into a PEFT model (packed rows, fused loss)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_assets import assets, write_jsonl

peft = pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train", "train.py")


def run(args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN] + args, env=env, capture_output=True, text=True, timeout=timeout)


def prefs(path, n=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = [dict(prompt_input_ids=[2] + rng.integers(7, 200, int(rng.integers(10, 40))).tolist(),
                 chosen_input_ids=rng.integers(7, 200, int(rng.integers(2, 6))).tolist() + [3],
                 rejected_input_ids=rng.integers(7, 200, int(rng.integers(2, 6))).tolist() + [3]) for _ in range(n)]
    return write_jsonl(path, rows)


def test_lora_dpo_trains_the_adapters_only_and_exports_merged_and_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the training path; the kernels have their own tests
    sys.path.insert(0, os.path.join(ROOT, "train"))
    import train

    a = assets(str(tmp_path / "assets"))
    data = prefs(str(tmp_path / "prefs.jsonl"))
    out, merged, adapter = (str(tmp_path / d) for d in ("run", "merged", "adapter"))
    res = train.main(["--model", a["model"], "--data", data, "--objective", "dpo", "--lora", "4", "--lora-alpha", "16",
                      "--lr", "1e-2", "--max-steps", "4", "--grad-checkpointing", "--out", out, "--export", merged,
                      "--export-adapter", adapter, "--no-plot"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # the reference is the model without adapters: at step 1 (B = 0) the policy is that model
    assert rows[0]["chosen_logp"] == pytest.approx(rows[0]["ref_chosen_logp"], rel=1e-5, abs=1e-5)
    assert rows[-1]["chosen_logp"] != pytest.approx(rows[-1]["ref_chosen_logp"], rel=1e-3)  # it trained
    base = AutoModelForCausalLM.from_pretrained(a["model"], attn_implementation="eager").eval()
    out_model = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    adapters = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert adapters and all(k.startswith("base_model.model.") and ".default." not in k for k in adapters)
    base_state, merged_state = base.state_dict(), out_model.state_dict()
    assert set(base_state) == set(merged_state)
    changed = set()
    for name, w in base_state.items():
        stem = name[:-len(".weight")]
        a_key, b_key = f"base_model.model.{stem}.lora_A.weight", f"base_model.model.{stem}.lora_B.weight"
        if a_key in adapters:  # W + alpha / r * B @ A
            want = w + 16 / 4 * adapters[b_key] @ adapters[a_key]
            torch.testing.assert_close(merged_state[name], want, rtol=1e-5, atol=1e-6)
            changed.add(name)
        else:  # embeddings, norms, the LM head: frozen
            assert torch.equal(merged_state[name], w), name
    assert any(".self_attn." in n for n in changed) and any(".mlp." in n for n in changed)
    assert "lm_head.weight" not in changed
    # PEFT loads the adapter onto the base: the merged model's logits
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    ids = torch.randint(7, 200, (1, 24))
    with torch.no_grad():
        want = out_model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        # and the model as trained (its adapters unmerged, longalign attention) gives the same logits
        torch.testing.assert_close(res["model"].eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


def test_lora_flags_are_refused_in_one_line(tmp_path):
    a = assets(str(tmp_path / "assets"))
    for args, needle in ((["--export-adapter", str(tmp_path / "ad")], "--lora"),
                         (["--lora", "4", "--lora-targets", "no_such_proj"], "--lora-targets"),
                         (["--lora", "-1"], "--lora"),
                         (["--lora", "4", "--export", str(tmp_path / "same"), "--export-adapter", str(tmp_path / "same")],
                          "--export-adapter")):
        res = run(["--model", a["model"], "--max-steps", "1", "--out", str(tmp_path / "o"), "--no-plot"] + args)
        lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("Loading weights")]
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_apply_longalign_on_a_peft_model_matches_the_stock_model(order):
    """A packed row through a LoRA model with longalign attention and the fused loss: the loss
    and every adapter's gradient equal the stock (eager) LoRA model's on each sequence alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import longalign_ops as la
    from longalign_ops.integrations.transformers import apply_longalign

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    stock = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ours.load_state_dict(stock.state_dict())
    stock = get_peft_model(stock, lora)
    if order == "patch_then_peft":
        ours = get_peft_model(apply_longalign(ours), lora)
    else:
        ours = apply_longalign(get_peft_model(ours, lora))
    ours.load_state_dict(stock.state_dict())
    lengths = [9, 1, 30]
    seqs = [torch.randint(0, 96, (n,)) for n in lengths]
    batch = la.PackedBatch.from_lengths(lengths)
    shift = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    out = ours(input_ids=torch.cat(seqs)[None], position_ids=batch.position_ids[None], shift_labels=shift[None],
               packed_batch=batch)
    assert out.logits is None
    out.loss.backward()
    total, count = 0.0, 0
    for s in seqs:
        logits = stock(input_ids=s[None]).logits[0, :-1].float()
        total = total + torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum")
        count += len(s) - 1
    (total / count).backward()
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for n, p in ours.named_parameters():
        if p.requires_grad:
            g = grads[n]
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-3 * g.abs().max().item())


@pytest.mark.slow
def test_lora_dpo_under_sequence_and_context_parallelism_equals_one_process(tmp_path):
    a = assets(str(tmp_path / "assets"))
    data = prefs(str(tmp_path / "prefs.jsonl"), n=12, seed=2)
    args = ["--model", a["model"], "--data", data, "--objective", "dpo", "--lora", "4", "--lr", "3e-3",
            "--max-steps", "3", "--window", "256", "--no-plot"]
    one = run(args + ["--out", str(tmp_path / "one"), "--export", str(tmp_path / "merged")])
    assert one.returncode == 0, one.stderr[-3000:]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    # context parallelism packs unshared rows (other packs, other prompts per step): its twin too
    assert run(args + ["--out", str(tmp_path / "one-unshared"), "--no-shared-prefix"]).returncode == 0
    for split, single in ((["--sp", "2"], "one"), (["--cp", "2"], "one-unshared")):
        one_rows = [json.loads(line) for line in open(tmp_path / single / "metrics.jsonl")]
        out = tmp_path / split[0][2:]
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN] + args +
                             split + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=600,
                             cwd=ROOT)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        for x, y in zip(one_rows, rows, strict=True):
            for key in ("loss", "chosen_logp", "rejected_logp"):
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (split, key, x, y)
            # the margin is a difference of float32 log-probs of ~30: its rounding is ~1e-5
            assert y["margin"] == pytest.approx(x["margin"], abs=1e-5), (split, x, y)


def test_lora_trainable_weights_train_in_full_and_are_exported_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    a = assets(str(tmp_path / "assets"))
    data = prefs(str(tmp_path / "prefs.jsonl"))
    res = run(["--model", a["model"], "--data", data, "--objective", "simpo", "--lora", "2", "--lora-targets",
               "q_proj,v_proj", "--lora-trainable", "embed,norm", "--lr", "1e-2", "--max-steps", "2",
               "--out", str(tmp_path / "run"), "--export", str(tmp_path / "merged"), "--no-plot"])
    assert res.returncode == 0, res.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(a["model"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).state_dict()
    for name, w in base.items():
        trained = any(t in name for t in ("embed", "norm", "q_proj", "v_proj"))
        assert torch.equal(merged[name], w) != trained, name


def test_preference_trainer_trains_a_peft_model_against_its_adapters_off(tmp_path, monkeypatch):
    """PreferenceTrainer on a PeftModel whose adapters already hold an update: the reference
    log-probs are the base model's (adapters disabled, no copy), the adapters train, the base
    stays frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from longalign_ops.integrations.preference_trainer import PreferenceTrainer
    from tiny_assets import preference_records

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the training path; the kernels have their own tests
    a = assets(str(tmp_path / "assets"))
    sys.path.insert(0, os.path.join(ROOT, "train"))
    import records as train_records

    tok = train_records.load_tokenizer(a["tokenizer"])
    recs = preference_records(6, seed=3)
    common = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                  logging_steps=1, seed=0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(a["model"]),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    ours = PreferenceTrainer(peft_model, TrainingArguments(output_dir=str(tmp_path / "p"), **common),
                             train_dataset=recs, processing_class=tok, objective="dpo", beta=0.1)
    base = PreferenceTrainer(AutoModelForCausalLM.from_pretrained(a["model"]),
                             TrainingArguments(output_dir=str(tmp_path / "b"), **common), train_dataset=recs,
                             processing_class=tok, objective="dpo", beta=0.1)
    got = [ex["ref_logps"] for ex in ours.train_dataset]
    want = [ex["ref_logps"] for ex in base.train_dataset]
    assert np.asarray(got) == pytest.approx(np.asarray(want), rel=1e-5, abs=1e-5)
    ours.train()
    losses = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[0] != pytest.approx(0.6931471805599453, rel=1e-3)  # the adapters count
    for n, p in peft_model.named_parameters():
        assert torch.equal(p.detach(), before[n]) != ("lora_" in n), n


def test_a_killed_lora_run_resumes_to_the_same_losses(tmp_path, monkeypatch):
    """The checkpoint holds the adapters and their optimizer state: a LoRA run killed after step 2
    and resumed logs the uninterrupted run's losses."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sys.path.insert(0, os.path.join(ROOT, "train"))
    import train

    a = assets(str(tmp_path / "assets"))
    data = prefs(str(tmp_path / "prefs.jsonl"), n=12, seed=4)
    common = ["--model", a["model"], "--data", data, "--objective", "simpo", "--lora", "4", "--lr", "1e-2",
              "--max-steps", "4", "--warmup-steps", "1", "--no-plot"]
    full = [r["loss"] for r in train.main(common + ["--out", str(tmp_path / "full")])["history"]]

    def crash_after_two(row):
        if row["step"] == 2:
            raise KeyboardInterrupt

    args = common + ["--out", str(tmp_path / "killed"), "--ckpt-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        train.main(args, step_hook=crash_after_two)
    resumed = [r["loss"] for r in train.main(args + ["--resume"])["history"]]
    assert resumed == pytest.approx(full[2:], rel=1e-6)
