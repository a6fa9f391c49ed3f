"""Shared-prefix packing: a prompt stored and attended once for all of its answers.

The attention forward and every gradient against a float64 masked-attention reference written
here from the rule (a prefix token sees its prefix causally; a branch token sees the whole prefix
and its own branch causally, never another branch), on awkward groups, through the Triton
kernels (interpreter) and the plain-CPU path; the per-branch log-probs of a model against the
same answers packed unshared; bad groups."""
import numpy as np
import pytest
import torch

import longalign_ops as la
import longalign_ops.integrations.transformers  # noqa: F401  (registers attn_implementation="longalign")

# prefix 0 and 1, one-token branches, a group without branches, branches longer than a tile
GROUPS = [(0, [3, 1]), (1, [1, 2]), (5, []), (7, [4, 1, 6]), (40, [9, 33])]


def group_mask(groups, window_left=-1):
    """(T, T) bool: may query i see key j, from the rule itself, and (T,) positions."""
    rows = []  # per token: (group, branch or -1 for the prefix, position)
    for g, (p, branches) in enumerate(groups):
        rows += [(g, -1, i) for i in range(p)]
        for b, n in enumerate(branches):
            rows += [(g, b, p + i) for i in range(n)]
    T = len(rows)
    keep = torch.zeros(T, T, dtype=torch.bool)
    for i, (gi, bi, pi) in enumerate(rows):
        for j, (gj, bj, pj) in enumerate(rows):
            same = gi == gj and (bj == -1 or bj == bi)
            keep[i, j] = same and pj <= pi and (window_left < 0 or pj >= pi - window_left)
    return keep, torch.tensor([r[2] for r in rows])


def reference_attention(q, k, v, keep, softcap=None):
    """float64 dense masked attention (GQA by repetition)."""
    q, k, v = (t.double() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) / q.shape[-1] ** 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, v)


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype, Hq, Hk, D, window, softcap", [
    (torch.float32, 4, 2, 40, -1, None),      # GQA, head dim 40
    (torch.float16, 2, 1, 16, -1, None),      # MQA, half precision
    (torch.float32, 2, 2, 32, 6, 20.0),       # sliding window reaching into the prefix, soft-capping
])
def test_attention_and_gradients_match_a_masked_reference(path, dtype, Hq, Hk, D, window, softcap, monkeypatch):
    if path == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_against_masked_reference(dtype, Hq, Hk, D, window, softcap)


@pytest.mark.parametrize("arch, window, softcap", [((9, 0), -1, None), ((9, 0), 6, 20.0), ((8, 0), 6, 20.0)])
def test_the_gpu_tiles_compute_shared_prefix_attention_under_the_interpreter(arch, window, softcap, monkeypatch):
    """The head-dim-256 tiles with shared prefixes, run by the interpreter on fp32 data: sm_90's,
    where dK and dV are separate launches (attention_config's dkdv_split), and sm_80's with
    soft-capping (dQ 64 x 16)."""
    from longalign_ops.kernels import varlen_attention as va

    gpu = va.attention_config
    assert gpu(256, torch.bfloat16, True, arch, softcap is not None, True)["dkdv_split"] == (arch == (9, 0))
    monkeypatch.setattr(va, "config_for", lambda q, softcap=0.0, prefix=False: gpu(
        q.shape[-1], torch.bfloat16, True, arch, softcap > 0, prefix))
    check_against_masked_reference(torch.float32, 2, 1, 256, window, softcap)


def check_against_masked_reference(dtype, Hq, Hk, D, window, softcap):
    batch = la.PackedBatch.from_prefix_groups(GROUPS)
    keep, positions = group_mask(GROUPS, window)
    T = batch.total
    assert T == keep.shape[0] and torch.equal(batch.position_ids, positions)
    q, k, v = (torch.randn(T, H, D).to(dtype).requires_grad_() for H in (Hq, Hk, Hk))
    dout = torch.randn(T, Hq, D).to(dtype)
    out = la.varlen_attention(q, k, v, batch, window_size=(window, -1), softcap=softcap)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, keep, softcap)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert (out.double() - ref).abs().max() < tol
    for got, want, name in zip(grads, ref_grads, "qkv"):
        assert (got.double() - want).abs().max() < tol * max(1.0, want.abs().max().item()), name


def test_the_description():
    batch = la.PackedBatch.from_prefix_groups([(3, [2, 1]), (2, [])])
    # segments: prefix 3, branch 2, branch 1, then a plain sequence of 2
    assert batch.lengths.tolist() == [3, 2, 1, 2] and batch.num_sequences == 3
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1]
    assert batch.sequence_ids.tolist() == [0, 0, 0, 0, 0, 1, 2, 2]  # a prefix counts with its first branch
    assert batch.prefix_table.tolist() == [[0, 0, 1, 2], [-3, 3, 0, 0], [-5, 3, 0, 0], [0, 0, 0, 0]]
    assert batch.max_key_len == 5
    plain = la.PackedBatch.from_prefix_groups([(4, []), (2, [])])
    assert plain.groups is None and plain.lengths.tolist() == [4, 2]
    again = batch.with_positions(batch.position_ids + 1)  # LOGO-style ids keep the groups
    assert again.groups == [(3, [2, 1]), (2, [])] and again.prefix_table is batch.prefix_table


@pytest.mark.parametrize("groups, exc, match", [
    ([(3, [-1])], ValueError, r"groups\[0\] must be >= 0"),
    ([(-2, [1])], ValueError, r"groups\[0\] must be >= 0"),
    ([(3, 4)], TypeError, r"groups\[0\]: the branch lengths must be a list"),
    ([(3,)], TypeError, r"groups\[0\] must be a pair"),
    ([(2.5, [1])], TypeError, r"groups\[0\] must hold integers"),
    ((3, [1]), TypeError, r"groups\[0\] must be a pair"),
    ("x", TypeError, "groups must be a list"),
])
def test_bad_groups_are_named(groups, exc, match):
    with pytest.raises(exc, match=match):
        la.PackedBatch.from_prefix_groups(groups)


def test_a_shared_prefix_batch_is_self_attention_only():
    batch = la.PackedBatch.from_prefix_groups([(3, [2, 1])])
    other = la.PackedBatch.from_lengths([3, 2, 1])
    q = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="shared prefixes describes self-attention"):
        la.varlen_attention(q, q, q, batch, other)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_branch_logprobs_equal_the_unshared_packing(path, monkeypatch):
    """A tiny Llama: each answer's log-prob from one shared-prefix row equals the one from the
    prompt + answer sequences packed one after another (prefix = prompt[:-1]; the prompt's last
    token starts each branch)."""
    if path == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="longalign").eval()
    prompts = [torch.randint(0, 64, (n,)) for n in (30, 1, 12)]
    answers = [[torch.randint(0, 64, (n,)) for n in ns] for ns in ([5, 1, 7], [3, 2], [4])]

    # unshared: prompt + answer per sequence, targets on the answer tokens
    seqs, labels = [], []
    for prompt, group in zip(prompts, answers):
        for a in group:
            ids = torch.cat([prompt, a])
            y = torch.full_like(ids, -100)
            y[len(prompt) - 1:-1] = a  # position t predicts token t+1
            seqs.append(ids)
            labels.append(y)
    flat = la.PackedBatch.from_lengths([len(s) for s in seqs])
    ids, y = torch.cat(seqs), torch.cat(labels)

    # shared: prefix = prompt[:-1]; each branch = prompt[-1] + answer
    groups, sids, sy = [], [], []
    for prompt, group in zip(prompts, answers):
        groups.append((len(prompt) - 1, [1 + len(a) for a in group]))
        sids.append(prompt[:-1])
        sy.append(torch.full((len(prompt) - 1,), -100))
        for a in group:
            sids.append(torch.cat([prompt[-1:], a]))
            sy.append(torch.cat([a, torch.tensor([-100])]))
    shared = la.PackedBatch.from_prefix_groups(groups)
    s_ids, s_y = torch.cat(sids), torch.cat(sy)
    assert shared.total < flat.total

    def logps(batch, tokens, targets):
        hidden = model.model(input_ids=tokens[None], position_ids=batch.position_ids[None],
                             packed_batch=batch).last_hidden_state[0]
        return la.sequence_logprobs(hidden, model.lm_head.weight, targets, batch)

    with torch.no_grad():
        want, got = logps(flat, ids, y), logps(shared, s_ids, s_y)
    assert got.shape == want.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_benchmark_counts_tokens_and_attention_pairs_of_both_layouts():
    """bench/bench_shared_prefix.py's token and attention-pair counts, against the mask of the rule
    (shared) and of one causal sequence per answer (unshared)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_shared_prefix import layouts

    prompt, answers = 13, [4, 1, 6]
    (_, tokens_u, pairs_u, _, lengths), (_, tokens_s, pairs_s, groups, _) = layouts(prompt, answers)
    keep, _ = group_mask(groups)
    assert tokens_s == keep.shape[0] == prompt - 1 + sum(1 + a for a in answers) and pairs_s == int(keep.sum())
    assert tokens_u == sum(lengths) and pairs_u == sum(int(torch.ones(n, n).tril().sum()) for n in lengths)


@pytest.mark.parametrize("method", ["logo", "pose"])
def test_positions_of_a_shared_prefix_batch(method):
    """One position per shared token: each prefix synthesised once (as a plain batch of the
    prefixes would be) within its window less its longest branch, each branch contiguous after
    it, so a group's longest branch ends inside target_len."""
    groups = [(40, [9, 33]), (0, [3]), (5, []), (1, [1, 2])]
    batch = la.PackedBatch.from_prefix_groups(groups)
    target = [400, 50, 20, 30]
    pos = la.synthesize_positions(batch, target, method=method, chunk_size=8, seed=3)
    alone = la.synthesize_positions(la.PackedBatch.from_lengths([40, 0, 5, 1]),
                                    [400 - 33, 50 - 3, 20, 30 - 2], method=method, chunk_size=8, seed=3)
    at, pre_at = 0, 0
    for (p, branches), t in zip(groups, target):
        prefix = pos[at:at + p]
        assert torch.equal(prefix, alone[pre_at:pre_at + p])
        at, pre_at = at + p, pre_at + p
        start = int(prefix[-1]) + 1 if p else 0
        for b in branches:
            assert pos[at:at + b].tolist() == list(range(start, start + b))
            at += b
        assert start + max(branches, default=0) <= t
    with pytest.raises(ValueError, match="target_len shorter than a group's prefix and longest branch"):
        la.synthesize_positions(batch, 45, method=method)
