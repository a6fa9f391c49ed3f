"""One rank of tests/test_sequence_parallel.py, started by torchrun (gloo, CPU): Ulysses and/or
context-parallel attention, the SP losses and a transformers model under SP, each against the
single-process computation that every rank also runs on the whole row. Prints one JSON line of
named maximum errors (rank 0).

    sp_worker.py LENGTHS            Ulysses over the world
    sp_worker.py LENGTHS CP         context parallelism CP x Ulysses world / CP (a 2-D mesh)"""
import json
import os
import sys

import torch
import torch.distributed as dist

import longalign_ops as la
from longalign_ops import sequence_parallel as sp


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def full_and_local(shape, seed, shard):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*shape, generator=g).requires_grad_()
    return full, shard.local(full.detach()).clone().requires_grad_()


def check_attention(shard, Hq, Hk, errors, tag, sinks=False, Dv=16, **options):
    """`sinks`: learnable sinks (each rank's gradient holds its heads': summed over the ranks, as
    a parameter's); `Dv`: v's own head dim (MLA)."""
    T = shard.batch.total
    q, ql = full_and_local((T, Hq, 16), 1, shard)
    k, kl = full_and_local((T, Hk, 16), 2, shard)
    v, vl = full_and_local((T, Hk, Dv), 3, shard)
    dout = torch.randn(T, Hq, Dv, generator=torch.Generator().manual_seed(4))
    if sinks:  # the row's padding carries no loss (CP's pad queries see no keys: their rows differ)
        dout[T - shard.pad:] = 0
    s = torch.randn(Hq, generator=torch.Generator().manual_seed(5)).requires_grad_() if sinks else None
    sl = s.detach().clone().requires_grad_() if sinks else None
    want = la.varlen_attention(q, k, v, shard.batch, sinks=s, **options)
    want.backward(dout)
    got = sp.ulysses_attention(ql, kl, vl, shard, sinks=sl, **options)
    got.backward(shard.local(dout))
    errors[f"attention {tag} out"] = err(got, shard.local(want))
    for name, full, local in (("dq", q, ql), ("dk", k, kl), ("dv", v, vl)):
        errors[f"attention {tag} {name}"] = err(local.grad, shard.local(full.grad))
    if sinks:
        dist.all_reduce(sl.grad)
        errors[f"attention {tag} dsinks"] = err(sl.grad, s.grad)


def check_losses(shard, errors, tag=""):
    T, H, V = shard.batch.total, 16, 50
    P = shard.size
    hidden, hl = full_and_local((T, H), 5, shard)
    weight = torch.randn(V, H, generator=torch.Generator().manual_seed(6))
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(7))
    labels[::7] = -100
    labels[T - shard.pad:] = -100  # the pad sequence carries no target
    for average in (False, True):
        want = la.sequence_logprobs(hidden, weight, labels, shard.batch, average=average)
        got = sp.sequence_logprobs(hl, weight, shard.local(labels), shard, average=average)
        errors[f"{tag}sequence_logprobs average={average}"] = err(got, want)
        (g_full,) = torch.autograd.grad((want * torch.arange(len(want))).sum(), hidden)
        (g_local,) = torch.autograd.grad((got * torch.arange(len(got))).sum(), hl)
        # every rank back-propagates the same loss: P times its slice's share (sp.reduce_loss)
        errors[f"{tag}sequence_logprobs average={average} grad"] = err(g_local, P * shard.local(g_full))
    M = int(shard.batch.num_sequences)
    w_full = la.longalign_loss_weights(shard.batch, labels, num_packs=1, num_sequences=M)
    w_local = sp.longalign_loss_weights(shard.local(labels), shard, num_packs=1, num_sequences=M)
    errors[f"{tag}longalign weights"] = err(w_local, shard.local(w_full))
    want = la.fused_linear_cross_entropy(hidden, weight, labels, token_weights=w_full, reduction="sum")
    got = sp.reduce_loss(la.fused_linear_cross_entropy(hl, weight, shard.local(labels), token_weights=w_local,
                                                       reduction="sum"), shard)
    errors[f"{tag}weighted loss"] = err(got, want)


def check_model(shard, errors):
    """A tiny Llama's packed forward under sp.use(shard): each rank feeds its slice and gets the
    slice of the single-process hidden states (LOGO-style ids that do not restart at 0)."""
    import copy

    import longalign_ops.integrations.transformers  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="longalign")
    T = shard.batch.total
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(8))
    pos = la.synthesize_positions(shard.batch, 8 * T, method="logo", chunk_size=4)
    want = model.model(input_ids=ids[None], position_ids=pos[None], packed_batch=shard.batch).last_hidden_state[0]
    with sp.use(shard):
        got = model.model(input_ids=shard.local(ids)[None], position_ids=shard.local(pos)[None]).last_hidden_state[0]
    errors["transformers model under sp.use"] = err(got, shard.local(want))


def check_tiled_model(shard, errors):
    """A tiny Llama with its attention over 2 head groups (memory.apply_tiled_attention) and
    checkpointed layers: each rank's slice of the hidden states and, all-reduced, the parameters'
    gradients against the untiled model on the whole row in one process (GQA 8 / 2 heads: each
    group's 4 query heads split over the Ulysses ranks, its kv head replicated)."""
    import copy

    import longalign_ops.integrations.transformers  # noqa: F401
    from longalign_ops.memory import apply_tiled_attention, enable_checkpointing
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    plain = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="longalign").train()
    tiled = enable_checkpointing(apply_tiled_attention(copy.deepcopy(plain), 2))
    T = shard.batch.total
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(8))
    w = torch.randn(T, 64, generator=torch.Generator().manual_seed(9))
    w[T - shard.pad:] = 0  # the row's padding carries no loss (CP's pad queries see no keys)
    want = plain.model(input_ids=ids[None], position_ids=shard.batch.position_ids[None],
                       packed_batch=shard.batch).last_hidden_state[0]
    (want * w).sum().backward()
    got = tiled.model(input_ids=shard.local(ids)[None], position_ids=shard.local(shard.batch.position_ids)[None],
                      packed_batch=shard).last_hidden_state[0]
    (got * shard.local(w)).sum().backward()
    errors["tiled attention: hidden states"] = err(got, shard.local(want.detach()))
    worst = 0.0
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        if a.grad is None:
            continue
        dist.all_reduce(b.grad)  # each rank's share of the gradient, as DDP / FSDP sum them
        worst = max(worst, err(b.grad, a.grad) / a.grad.abs().max().item())
    errors["tiled attention: gradients (relative)"] = worst


def record_refusals(cases, errors):
    """Each case's ValueError message (or "not raised") under "refused: name"; then a barrier,
    which would hang if one rank had gone on into a collective."""
    for name, call in cases.items():
        try:
            call()
            errors[f"refused: {name}"] = "not raised"
        except (ValueError, NotImplementedError) as e:
            errors[f"refused: {name}"] = str(e)
    dist.barrier()


def shared_refusals(shard):
    """The refusals every shard makes, Ulysses or CP."""
    n = shard.local_tokens
    return {
        "labels of another length": lambda: sp.sequence_logprobs(torch.randn(n, 4), torch.randn(9, 4),
                                                                   torch.zeros(n - 1, dtype=torch.long), shard),
        "a tensor that is not the padded row": lambda: shard.local(torch.zeros(shard.batch.total - 1)),
    }


def check_bad_inputs(shard, errors):
    """Each refused on every rank, before any collective: the barrier after them would hang if
    one rank had gone on into an all-to-all."""
    n = shard.local_tokens
    cases = {
        "query heads not divisible": lambda: sp.ulysses_attention(torch.randn(n, shard.size + 1, 8),
                                                                    torch.randn(n, 1, 8), torch.randn(n, 1, 8), shard),
        "kv heads neither multiple nor divisor": lambda: sp.ulysses_attention(
            torch.randn(n, 12, 8), torch.randn(n, 3, 8), torch.randn(n, 3, 8), shard),
        "shard disagrees with the tensors": lambda: sp.ulysses_attention(
            torch.randn(n + 1, 8, 8), torch.randn(n + 1, 8, 8), torch.randn(n + 1, 8, 8), shard),
        **shared_refusals(shard),
    }
    record_refusals(cases, errors)


def check_context_parallel_refusals(shard, errors):
    """CP-only refusals, on every rank before any collective."""
    n = shard.local_tokens
    cases = {
        "shared-prefix row under CP": lambda: sp.shard(la.PackedBatch.from_prefix_groups([(4, [2, 3])]), shard.group,
                                                       cp_group=shard.cp_group),
        "non-causal window under CP": lambda: sp.attention(torch.randn(n, 4, 8), torch.randn(n, 4, 8),
                                                           torch.randn(n, 4, 8), shard, causal=False,
                                                           window_size=(3, 3)),
        "chunked attention under CP": lambda: sp.attention(torch.randn(n, 4, 8), torch.randn(n, 4, 8),
                                                           torch.randn(n, 4, 8), shard, chunk_size=4),
        "shard disagrees with the tensors": lambda: sp.attention(
            torch.randn(n + 1, 4, 8), torch.randn(n + 1, 4, 8), torch.randn(n + 1, 4, 8), shard),
        **shared_refusals(shard),
    }
    record_refusals(cases, errors)


def main_context_parallel(lengths, C):
    """CP over C ranks, Ulysses over world / C: the mesh (cp, sp), Ulysses innermost."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    U = world // C
    mesh = init_device_mesh("cpu", (C, U), mesh_dim_names=("cp", "sp"))
    shard = sp.shard(la.PackedBatch.from_lengths(lengths), mesh["sp"].get_group() if U > 1 else None,
                     cp_group=mesh["cp"].get_group())
    errors = {}
    check_attention(shard, 4 * U, 4 * U, errors, "mha")
    check_attention(shard, 4 * U, U, errors, f"gqa Hk={U}")
    check_attention(shard, 2 * U, 1, errors, "mqa, window + softcap", window_size=(9, 0), softcap=3.0)
    check_attention(shard, 2 * U, 2, errors, "non-causal", causal=False)
    check_attention(shard, 2 * U, 2, errors, "gpt-oss: sinks, window", sinks=True, window_size=(9, 0))
    check_attention(shard, 2 * U, 2, errors, "MLA: Dv 24", Dv=24)
    check_losses(shard, errors)
    check_model(shard, errors)
    check_tiled_model(shard, errors)
    check_context_parallel_refusals(shard, errors)
    layout = sp.ContextParallelLayout(lengths, C, U)
    out = dict(world=world, cp=C, ulysses=U, pad=shard.pad, total=shard.batch.total, local=shard.local_tokens,
               work=layout.work().tolist(), errors=errors)
    return out


def main():
    dist.init_process_group("gloo")
    P = dist.get_world_size()
    lengths = [int(x) for x in sys.argv[1].split(",")]
    if len(sys.argv) > 2:
        out = main_context_parallel(lengths, int(sys.argv[2]))
        if dist.get_rank() == 0:
            print(json.dumps(out))
        dist.destroy_process_group()
        return
    shard = sp.shard(la.PackedBatch.from_lengths(lengths), None)
    errors = {}
    check_attention(shard, 8, 8 if P <= 8 else P, errors, "mha")
    check_attention(shard, 8, 2, errors, f"gqa Hk=2 (kv heads {'replicated' if 2 < P else 'split'})")
    check_attention(shard, 8, 1, errors, "mqa, window + softcap", window_size=(9, 0), softcap=3.0)
    check_attention(shard, 8, 2, errors, "gpt-oss: sinks, window", sinks=True, window_size=(9, 0))
    check_attention(shard, 8, 2, errors, "MLA: Dv 8", Dv=8)
    check_attention(shard, 8, 2, errors, "Llama 4: chunks of 5", chunk_size=5)
    check_losses(shard, errors)
    check_model(shard, errors)
    check_tiled_model(shard, errors)
    # a row with shared prefixes (prompts stored once, answers as branches): split the same way
    shared = sp.shard(la.PackedBatch.from_prefix_groups([(20, [5, 1, 9]), (0, [3]), (1, [2, 2]), (7, [])]), None)
    errors["shared prefix: keeps its groups"] = float(shared.batch.groups is None)
    check_attention(shared, 8, 2, errors, "shared prefix: gqa")
    check_attention(shared, 8, 1, errors, "shared prefix: mqa, window + softcap", window_size=(9, 0), softcap=3.0)
    check_losses(shared, errors, "shared prefix: ")
    check_bad_inputs(shard, errors)
    if dist.get_rank() == 0:
        print(json.dumps(dict(world=P, pad=shard.pad, total=shard.batch.total, errors=errors)))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
