"""The ops inside the trainers users train with: ``apply_longalign`` on a transformers causal LM
(the loss from hidden states with the fused cross-entropy, attention through "longalign"), HF
``Trainer`` and TRL's ``SFTTrainer`` with padding-free BFD packing, each against the stock path
(eager attention, the model's own loss) step by step, on CPU with a tiny Llama built from a config
and a tokenizer trained here."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import longalign_ops as la  # noqa: E402
from longalign_ops.data import PackedCollator  # noqa: E402
from longalign_ops.integrations.transformers import apply_longalign  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def twin_models(config=None, model_cls=LlamaForCausalLM):
    """(stock eager model, the same weights patched by apply_longalign)."""
    cfg = config or LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    stock = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ours = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ours.load_state_dict(stock.state_dict())
    return stock, apply_longalign(ours)


def packed_inputs(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = [dict(input_ids=torch.randint(0, vocab, (n,), generator=g).tolist()) for n in lengths]
    return PackedCollator()(records)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_num_items", [False, True])
def test_patched_forward_gives_the_models_own_loss_and_gradients(with_num_items):
    stock, ours = twin_models()
    batch = packed_inputs([9, 1, 30, 14])
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    extra = dict(num_items_in_batch=torch.tensor(17)) if with_num_items else {}
    want = stock(**inputs, attention_mask=torch.ones_like(batch["input_ids"]), **extra).loss
    got = ours(**inputs, **extra)
    assert ours.config._attn_implementation == "longalign" and got.logits is None
    # eager with an all-ones mask attends across the packed row; the reference runs each
    # sequence alone instead, which is what packed training means
    per_seq = []
    total_targets = 0
    cu = batch["cu_seq_lens_q"].tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        ids = batch["input_ids"][:, s:e]
        out = stock(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(1))  # summed loss
        per_seq.append(out.loss)
        total_targets += e - s - 1
    want = torch.stack(per_seq).sum() / (17 if with_num_items else total_targets)
    torch.testing.assert_close(got.loss, want, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    want.backward()
    g_ours, g_stock = grads_of(ours), grads_of(stock)
    for name in g_stock:
        torch.testing.assert_close(g_ours[name], g_stock[name], atol=1e-5, rtol=1e-4)


def test_patched_forward_without_labels_is_untouched():
    stock, ours = twin_models()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits, atol=2e-5, rtol=1e-5)


def test_gemma2_final_logit_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**CONFIG, final_logit_softcapping=2.0, attn_logit_softcapping=None, sliding_window=4)
    stock, ours = twin_models(cfg, Gemma2ForCausalLM)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss,
                                   stock(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss,
                                   atol=1e-5, rtol=1e-5)


def test_longalign_token_weights_through_the_patched_forward():
    _, ours = twin_models()
    batch = packed_inputs([12, 5, 20])
    targets = batch["shift_labels"].reshape(-1)
    weights = la.longalign_loss_weights(batch["cu_seq_lens_q"], targets, num_packs=1, num_sequences=3)
    got = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"], shift_labels=batch["shift_labels"],
               token_weights=weights).loss
    # LongAlign eq. 4 with K = 1: the mean over sequences of each sequence's mean token loss
    hidden = ours.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    nll = torch.nn.functional.cross_entropy(ours.lm_head(hidden)[0], targets, reduction="none")
    cu = batch["cu_seq_lens_q"].tolist()
    want = torch.stack([nll[s:e - 1].mean() for s, e in zip(cu[:-1], cu[1:])]).mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- real trainer runs


def train_tokenizer(texts):
    """A word-level tokenizer trained here with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_texts(n=48, seed=0):
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    return [" ".join(rng.choice(words) for _ in range(rng.choice([3, 7, 15, 30, 45]))) for _ in range(n)]


def test_hf_trainer_losses_match_the_stock_model():
    from transformers import Trainer, TrainingArguments

    texts = make_texts()
    tok = train_tokenizer(texts)
    records = [dict(input_ids=tok(t)["input_ids"]) for t in texts]
    losses = {}
    for name in ("stock", "ours"):
        cfg = LlamaConfig(**dict(CONFIG, vocab_size=len(tok)))
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
        if name == "ours":
            apply_longalign(model)
        args = TrainingArguments(output_dir=f"/tmp/la_hf_{name}", max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
        # the packed collator gives position ids that restart per sequence: the stock eager
        # model reads them as separate sequences (transformers' packed-sequence detection)
        trainer = Trainer(model=model, args=args, train_dataset=records, data_collator=PackedCollator())
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["ours"]) == 4
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["stock"]), atol=1e-4, rtol=1e-4)


def test_trl_sft_trainer_padding_free_bfd_losses_match_the_stock_path():
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = make_texts(64)
    tok = train_tokenizer(texts)
    data = datasets.Dataset.from_dict({"text": texts})
    losses = {}
    for name, attn in (("stock", "eager"), ("ours", "longalign")):
        cfg = LlamaConfig(**dict(CONFIG, vocab_size=len(tok)))
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
        if name == "ours":
            apply_longalign(model)  # attention; TRL's trainer computes the loss with its own fused head
        args = trl.SFTConfig(output_dir=f"/tmp/la_trl_{name}", max_steps=4, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, padding_free=True,
                             packing=True, packing_strategy="bfd", max_length=64, dataset_num_proc=None)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        assert trainer.model.config._attn_implementation == attn
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["ours"]) == 4
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["stock"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_a_deep_copy_of_a_patched_model_runs_its_own_weights(family):
    """TRL makes a reference model by deep-copying the policy (create_reference_model): the copy's
    patched forward is the copy's, not a closure over the policy (which would make the reference
    log-probs the policy's, and DPO's loss a constant). Qwen3-Next: the forward that derives
    packed_batch for its Gated DeltaNet layers, with fused_loss off."""
    if family == "llama":
        policy = twin_models()[1]
    else:
        from family_audit import tiny_config
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        policy = apply_longalign(AutoModelForCausalLM.from_config(tiny_config(family)).float(), fused_loss=False)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the policy moves on; the reference must not follow
    batch = packed_inputs([9, 1, 14], vocab=policy.config.get_text_config().vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    out = reference(**inputs)
    loss = out.loss
    fresh = copy.deepcopy(reference)  # the reference's own weights, patched forward and all
    assert fresh(**inputs).loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert abs(policy(**inputs).loss.item() - loss.item()) > 1e-3
    loss.backward()
    assert all(p.grad is None for p in policy.parameters())
    assert any(p.grad is not None for p in reference.parameters())
    import inspect

    assert list(inspect.signature(reference.forward).parameters)[:2] == ["input_ids", "attention_mask"]


def test_collator_loss_weights_and_plan_batch_sampler():
    from longalign_ops.data import PlanBatchSampler

    lengths = [5, 1, 9, 4, 7]
    plan = la.pack(lengths, 12, world_size=2)
    sampler = PlanBatchSampler(plan, rank=1)
    assert [list(b) for b in sampler] == [plan.steps[s][1] for s in range(len(plan))] and len(sampler) == len(plan)
    with pytest.raises(ValueError, match="rank must be in"):
        PlanBatchSampler(plan, rank=2)
    factors = plan.loss_weights([n - 1 for n in lengths])
    records = [dict(input_ids=list(range(n)), loss_weight=factors[i]) for i, n in enumerate(lengths)]
    out = PackedCollator()([records[i] for i in (2, 1, 0)])
    w, targets = out["token_weights"][0], out["shift_labels"][0]
    # each sequence's factor on each of its targets, 0 where there is none (the one-token
    # sequence, and every sequence's last token)
    want = torch.tensor([factors[2]] * 8 + [0.0] + [0.0] + [factors[0]] * 4 + [0.0], dtype=torch.float32)
    assert torch.equal(w, want) and torch.equal(w > 0, targets != -100)


def test_collator_pads_to_longest_and_takes_shifted_targets():
    """pad_to_longest: a padded batch in packed form (each sequence one padded segment, padding
    ignored); shift_labels: targets given already shifted give the same row as their labels."""
    ids = [[3, 4, 5], [6], [7, 8, 9, 10, 11]]
    labels = [[-100, 4, 5], [-100], [-100, -100, 9, 10, 11]]
    plain = PackedCollator()([dict(input_ids=i, labels=y) for i, y in zip(ids, labels)])
    shifted = [y[1:] + [-100] for y in labels]
    given = PackedCollator()([dict(input_ids=i, shift_labels=s) for i, s in zip(ids, shifted)])
    for key in ("input_ids", "labels", "shift_labels", "cu_seq_lens_q"):
        assert torch.equal(plain[key], given[key]), key
    padded = PackedCollator(pad_to_longest=True, pad_token_id=0)([dict(input_ids=i, labels=y)
                                                                  for i, y in zip(ids, labels)])
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 10, 15] and padded["max_length_q"] == 5
    assert padded["input_ids"][0].tolist() == [3, 4, 5, 0, 0, 6, 0, 0, 0, 0, 7, 8, 9, 10, 11]
    assert padded["shift_labels"][0].tolist() == [4, 5] + [-100] * 8 + [-100, 9, 10, 11, -100]
    assert padded["position_ids"][0].tolist() == list(range(5)) * 3
    with pytest.raises(ValueError, match="last shift_labels entry"):
        PackedCollator()([dict(input_ids=[1, 2], shift_labels=[2, 3])])
    with pytest.raises(ValueError, match="labels or shift_labels"):
        PackedCollator()([dict(input_ids=[1, 2], labels=[1, 2], shift_labels=[2, -100])])
    with pytest.raises(ValueError, match="2 labels for 3 input_ids"):
        PackedCollator()([dict(input_ids=[1, 2, 3], shift_labels=[2, -100])])
