"""Small local stand-ins for what users bring: a tokenizer (word level, with a chat template),
a tiny Llama saved as a transformers directory, and JSONL files of chat, preference and raw
document records. Everything is made here; nothing is downloaded."""
import json
import os

import numpy as np

WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["[UNK]", "[PAD]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
# a chat template of the usual shape (role markers, an end-of-turn token, a generation prompt)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(path: str):
    """A whitespace word-level tokenizer over WORDS with a chat template, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_model(path: str, vocab_size: int = len(SPECIAL) + len(WORDS), seed: int = 0, **overrides):
    """A tiny Llama (2 layers, 6 query / 2 kv heads) saved with safetensors to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=2,
               eos_token_id=3, pad_token_id=1)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    return model


def sentence(rng, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def write_jsonl(path: str, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def chat_records(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [dict(messages=[dict(role="user", content=sentence(rng, int(rng.integers(5, 60)))),
                           dict(role="assistant", content=sentence(rng, int(rng.integers(2, 12))))])
            for _ in range(n)]


def preference_records(n: int, seed: int = 0, num_rejected: int = 1, short_prompt: bool = False):
    """TRL's string form: prompt, chosen, rejected (a list when several), and LongPO's short_prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rec = dict(prompt=sentence(rng, int(rng.integers(10, 80))), chosen=sentence(rng, int(rng.integers(2, 8))))
        rejected = [sentence(rng, int(rng.integers(2, 8))) for _ in range(num_rejected)]
        rec["rejected"] = rejected if num_rejected > 1 else rejected[0]
        if short_prompt:
            rec["short_prompt"] = sentence(rng, int(rng.integers(3, 10)))
        out.append(rec)
    return out


def assets(folder: str):
    """{"tokenizer", "model", "chats"} paths, made once per folder."""
    tok, model = os.path.join(folder, "tokenizer"), os.path.join(folder, "model")
    if not os.path.exists(model):
        make_tokenizer(tok)
        make_model(model)
        write_jsonl(os.path.join(folder, "chats.jsonl"), chat_records(48))
    return dict(tokenizer=tok, model=model, chats=os.path.join(folder, "chats.jsonl"))


# ----------------------------------------------------------------------------- the seeds' own formats

PAD = 1


def _padded(seqs, length):
    """(input_ids, attention_mask, labels) of `seqs` [(ids, target mask)], right-padded to `length`."""
    out = ([], [], [])
    for ids, target in seqs:
        n = length - len(ids)
        out[0].append(list(ids) + [PAD] * n)
        out[1].append([1] * len(ids) + [0] * n)
        out[2].append([int(t) if m else -100 for t, m in zip(ids, target)] + [-100] * n)
    return out


def longpo_rows(n: int, seed: int = 0):
    """LongPO's tokenised records: chosen_* / rejected_* the long conversation with every turn's
    answer (labels -100 elsewhere, right-padded), ref_chosen_* / ref_rejected_* one padded
    sequence per turn over that turn's short context."""
    rng = np.random.default_rng(seed)
    words = lambda k: [int(t) for t in rng.integers(7, 200, k)]  # noqa: E731
    rows = []
    for _ in range(n):
        turns = int(rng.integers(1, 3))
        context = words(int(rng.integers(30, 60)))
        questions = [words(int(rng.integers(2, 5))) for _ in range(turns)]
        answers = {name: [words(int(rng.integers(2, 6))) for _ in range(turns)] for name in ("chosen", "rejected")}
        shorts = [words(int(rng.integers(4, 9))) for _ in range(turns)]
        row = {}
        for name, ans in answers.items():
            ids, target = [2] + context, [False] * (1 + len(context))
            for q, a in zip(questions, ans):
                ids, target = ids + q + a, target + [False] * len(q) + [True] * len(a)
            for key, v in zip(("input_ids", "attention_mask", "labels"), _padded([(ids, target)], len(ids) + 3)):
                row[f"{name}_{key}"] = v[0]
            ref = [([2] + s + q + a, [False] * (1 + len(s) + len(q)) + [True] * len(a))
                   for s, q, a in zip(shorts, questions, ans)]
            for key, v in zip(("input_ids", "attention_mask", "labels"),
                              _padded(ref, max(len(r[0]) for r in ref) + 2)):
                row[f"ref_{name}_{key}"] = v
        rows.append(row)
    return rows


def logo_rows(n: int, seed: int = 0, rejected: int = 2, shared_positions: bool = True):
    """LOGO's records: chosen_*, reject_1_*, reject_2_* ... with position ids already spread over
    a window larger than the sequence (the context's chunks apart), the answer after them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        context = [2] + [int(t) for t in rng.integers(7, 200, int(rng.integers(20, 50)))]
        ctx_pos = np.cumsum(rng.integers(1, 6, len(context))) - 1
        row = {}
        for name in ["chosen"] + [f"reject_{k}" for k in range(1, rejected + 1)]:
            answer = [int(t) for t in rng.integers(7, 200, int(rng.integers(2, 6)))]
            pos = ctx_pos if shared_positions else np.cumsum(rng.integers(1, 6, len(context))) - 1
            row[f"{name}_input_ids"] = context + answer
            row[f"{name}_attention_mask"] = [1] * (len(context) + len(answer))
            row[f"{name}_labels"] = [-100] * len(context) + answer
            row[f"{name}_position_ids"] = [int(p) for p in pos] + [int(pos[-1]) + 1 + i for i in range(len(answer))]
        rows.append(row)
    return rows


def save_dataset(rows, path):
    """`rows` as datasets' save_to_disk writes a DatasetDict (train, and a test split of two)."""
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:2])).save_to_disk(path)
    return path
