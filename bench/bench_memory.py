"""Device memory of one full training step, counted exactly without a GPU: fake tensors
(`FakeTensorMode`) and torch's `MemTracker` on real transformers model shapes.

    python bench/bench_memory.py --model llama3-8b --gpus 1,8,32 --budget-gib 80 --out DIR

For each configuration it runs forward + backward of a full-size model (no memory is allocated:
every tensor is fake) and reports the peak of parameters, gradients, optimizer state,
activations and temporaries, then finds the longest trainable sequence under the budget.

- baseline: transformers' `sdpa` attention forced to the flash backend (no L x L matrix) and the
  model's own loss from materialised logits (transformers upcasts them to fp32);
- longalign: `attn_implementation="longalign"` and the fused cross-entropy from hidden states.
Both in bf16 with fp32 AdamW moments (8 bytes per parameter, created before the step and
tracked as optimizer state; the optimizer step itself runs one parameter at a time, below the
backward's peak, and is not run). `--checkpointing` adds activation checkpointing of every
decoder layer for both.

Several GPUs (the sequence-parallel / FSDP configuration, accounted per rank): one packed row
per step split over all G ranks by Ulysses SP (activations of T/G tokens per rank, the
attention of the whole row for H/G heads, the same bytes), parameters, gradients and optimizer
state fully sharded over the G ranks (FSDP), plus what FSDP2 holds unsharded: two decoder layers'
bf16 parameters (the one computing and the one prefetched) and the root module's parameters and
gradients (embeddings, final norm, LM head: the root is not resharded after forward, and its
gradients are reduced at the end of the backward). The step is counted for T/G tokens and the
model's state replaced by its shard.

Host offload (`--offload`, applied to both modes, checkpointing on):
- activations: every decoder layer's checkpoint (its input hidden states) kept in host memory
  (`longalign_ops.memory.apply_activation_offload`; transformers 5's
  `activation_checkpointing_enable(offload=True)` moves the same bytes). Counted by giving it a
  second fake device, `meta`, as the host: what lands there is the host's, not the GPU's.
- all: that, and parameters, gradients and AdamW state on the host, the optimizer step on the CPU
  (FSDP2's `CPUOffloadPolicy`, `train.py --offload-params`): the GPU holds only the unsharded
  parameters and gradients in use, the root module's (embeddings, final norm, LM head: FSDP2
  keeps them for the whole step) and two decoder layers'.
`host_gib` is the host memory this needs per GPU.

Fake tensors live on the CPU device here: a CPU-only torch cannot index fake `cuda` tensors,
which transformers' models do; a fake tensor holds no data, so its bytes are the same.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # never asks a GPU for its capability

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_csv  # noqa: E402

GIB = 2 ** 30
MODELS = {
    # transformers configs as published (LongAlign trains Llama-2 7B/13B; Llama-3-8B, Qwen2.5-7B)
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)),
    "llama3-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                                 tie_word_embeddings=False)),
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32)),
    "llama2-13b": ("llama", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                                 tie_word_embeddings=False)),
}
# ALST's published longest rows (Arctic Long Sequence Training, arXiv 2506.13996: Llama-3.1-8B,
# H100 80 GB, bf16): written beside a sweep that includes llama3-8b (alst_published.csv) and
# drawn on its plot; what they are, not what this script counts
ALST_PUBLISHED = {("llama3-8b", 1): 500_000, ("llama3-8b", 8): 3_700_000, ("llama3-8b", 32): 15_000_000}
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")


def model_config(name: str, layers=None, max_positions: int = 1 << 23):
    if name not in MODELS:
        raise SystemExit(f"bench_memory: unknown model {name!r}; choose from {', '.join(MODELS)}")
    family, kw = MODELS[name]
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(kw, max_position_embeddings=max_positions)
    if layers:
        kw["num_hidden_layers"] = layers
    return (LlamaConfig if family == "llama" else Qwen2Config)(**kw)


def _model(cfg, mode: str, checkpointing: bool, offload_activations: bool = False, lora: int = 0):
    from transformers import AutoModelForCausalLM

    import longalign_ops.integrations.transformers  # noqa: F401
    from longalign_ops.memory import apply_activation_offload, enable_checkpointing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16,
                                                 attn_implementation="longalign" if mode == "longalign" else "sdpa")
    if lora:  # train.py --lora R: PEFT adapters on every linear layer but the LM head, the rest frozen
        from peft import LoraConfig, get_peft_model

        get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear"))
    if offload_activations:  # the host stood in by the meta device (see the module's docstring)
        apply_activation_offload(model, host="meta", min_bytes=0)
    elif checkpointing:
        enable_checkpointing(model)
    return model


class _NoHook:
    def remove(self):
        pass


_NO_HOOK = _NoHook()


def _Tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker hooks the gradient of every parameter of a module it meets; one that needs no
        gradient (LoRA's frozen base weights, the slices apply_tiled_attention hands a head group's
        projections in a forward without autograd) cannot take a hook: marked as hooked already."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            # the global peak only: MemTracker also updates every active module's own peak after
            # every op, a walk over all modules that makes a full-size model's count take minutes
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker()


def _fake_row_groups(ulysses: int, cp: int):
    """(Ulysses group or None, CP group or None) of a row split `ulysses` x `cp` ways, on torch's
    fake process group (this process is rank 0 of ulysses x cp; collectives only shape their
    outputs). The mesh is (cp, sp) as train.py builds it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():  # a real job's group is not ours to replace
        raise SystemExit("bench_memory counts Ulysses x CP on torch's fake process group: run it outside a "
                         "torch.distributed job")
    dist.init_process_group("fake", rank=0, world_size=ulysses * cp, store=FakeStore())
    mesh = init_device_mesh("cpu", (cp, ulysses), mesh_dim_names=("cp", "sp"))
    return (mesh["sp"].get_group() if ulysses > 1 else None, mesh["cp"].get_group() if cp > 1 else None)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step_peak(model_name, tokens: int, mode: str, *, checkpointing: bool = False, layers=None,
              device: str = "cpu", fake: bool = True, sequence_length=None, tiled_mlp: int = 0,
              tiled_norms: int = 0, offload_activations: bool = False, groups=None, row_split=None,
              lora: int = 0, tiled_attention: int = 0) -> dict:
    """Peak bytes per category of one training step of `tokens` tokens (one packed row; with
    `sequence_length`, sequences of that length packed in it; with `groups`, a shared-prefix row
    of PackedBatch.from_prefix_groups, `tokens` its total) on one device. `model_name`: a
    name of MODELS or a transformers config. With ``fake=False`` the step runs on real tensors
    and also reports the process's resident-memory rise over the step (VmHWM after the step
    minus VmRSS before it, peak reset first): the check of the fake count. Returns
    {category: bytes, "peak": bytes, "params": count, ...}.

    With ``row_split=(U, C)`` (longalign mode), `tokens` is the whole row, split over U Ulysses x C
    context-parallel ranks by the library's own code (``sequence_parallel.shard``, its
    all-to-alls and K/V all-gathers) on torch's fake process group: the collectives run on
    shapes, and the peak is rank 0's, its gathered K/V and their gradients included."""
    import contextlib
    import gc

    import longalign_ops as la
    from longalign_ops import sequence_parallel as sp
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model_config(model_name, layers) if isinstance(model_name, str) else model_name
    model = _model(cfg, mode, checkpointing, offload_activations, lora)
    split = _fake_row_groups(*row_split) if row_split and max(row_split) > 1 else None
    if mode == "longalign":
        from longalign_ops.memory import apply_tiled_attention, apply_tiled_mlp, apply_tiled_norms

        if tiled_attention:
            apply_tiled_attention(model, tiled_attention)
        if tiled_mlp:
            apply_tiled_mlp(model, tiled_mlp)
        if tiled_norms:
            apply_tiled_norms(model, tiled_norms)
    rss = {}
    # value checks read data, which fake tensors do not have (the caller's setting is restored)
    with la._validation.validation(not fake), \
            FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        model = model.to_empty(device=device)
        if not fake:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
        for p in params:  # fp32 moments, as mixed-precision training keeps them
            opt.state[p] = dict(step=torch.zeros((), device=device), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
        lengths = [tokens] if sequence_length is None else [sequence_length] * (tokens // sequence_length)
        shard = sp.shard(la.PackedBatch.from_lengths(lengths, device=device), split[0], cp_group=split[1]) \
            if split else None
        ids = torch.zeros(1, shard.local_tokens if shard else tokens, dtype=torch.long, device=device)
        tracker = _Tracker()
        tracker.track_external(model, opt)

        def step_loss():
            # the loss alone leaves this function: the final hidden states are not held through the
            # backward (the fused loss keeps their gradient instead), as in train.py's step
            if shard is not None:  # this rank's tokens of the row; Ulysses / CP attention inside the model
                hidden = model.model(input_ids=ids, position_ids=shard.local(shard.batch.position_ids)[None],
                                     packed_batch=shard).last_hidden_state.squeeze(0)
                loss = sp.reduce_loss(la.fused_linear_cross_entropy(hidden, model.lm_head.weight, ids.squeeze(0),
                                                                    reduction="sum"), shard)
            elif mode == "longalign":
                batch = la.PackedBatch.from_prefix_groups(groups, device=device) if groups \
                    else la.PackedBatch.from_lengths(lengths, device=device)
                hidden = model.model(input_ids=ids, position_ids=batch.position_ids.unsqueeze(0),
                                     packed_batch=batch).last_hidden_state.squeeze(0)
                loss = la.fused_linear_cross_entropy(hidden, model.lm_head.weight, ids.squeeze(0), reduction="mean")
            else:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    loss = model(input_ids=ids, labels=ids).loss
            return loss

        def step():
            step_loss().backward()

        if not fake:
            # one step first, its gradients dropped: what a first step allocates once (lazy imports,
            # oneDNN primitives and scratch, thread pools) is not step memory, and is tens of MB
            # beside this check's ~150 MB
            step()
            model.zero_grad(set_to_none=True)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            rss["before"] = _rss_kib("VmRSS")
        with tracker:
            step()
        if not fake:
            rss["rise"] = (_rss_kib("VmHWM") - rss["before"]) * 1024
        snap = tracker.get_tracker_snapshot("peak")
    per_device = next(v for k, v in snap.items() if torch.device(k).type == torch.device(device).type)
    host = next((v for k, v in snap.items() if torch.device(k).type == "meta"), {})
    out = {c: 0 for c in CATEGORIES}
    for k, v in per_device.items():
        name = getattr(k, "value", str(k))
        if name in out:
            out[name] = int(v)
    out["peak"] = int(per_device.get("Total", sum(out.values())))
    out["params"] = sum(p.numel() for p in params)  # trained (with LoRA: the adapters)
    out["all_params"] = sum(p.numel() for p in model.parameters())
    out["layer_params"] = sum(p.numel() for p in model.model.layers[0].parameters())
    out["layers"] = len(model.model.layers)
    out["host"] = int(host.get("Total", 0))  # offloaded activations
    if split:
        import torch.distributed as dist

        dist.destroy_process_group()
    out["resident_rise"] = rss.get("rise")
    return out


def rank_peak(model_name: str, tokens: int, mode: str, gpus: int, checkpointing: bool, tiled_mlp: int = 0,
              offload: str = "none", tiled_norms: int = 0, sp: int = 0, cp: int = 1, lora: int = 0,
              tiled_attention: int = 0) -> dict:
    """One rank's peak for a row of `tokens` over `gpus` ranks (SP over all of them, FSDP state),
    with `offload` none | activations | all (see the module's docstring). With `cp` > 1 the row
    is split over sp (Ulysses) x cp ranks, longalign through the library's context-parallel
    code (see :func:`step_peak`); the baseline, which has no such split, is counted at its
    idealised share of T / (sp x cp) tokens per rank (a lower bound on its memory)."""
    sp = sp or gpus  # the row is split over `sp` ranks; the state is sharded over all `gpus`
    ranks = sp * cp
    if tokens % ranks:
        tokens += ranks - tokens % ranks
    features = dict(checkpointing=checkpointing or offload != "none", tiled_mlp=tiled_mlp, tiled_norms=tiled_norms,
                    offload_activations=offload != "none", lora=lora, tiled_attention=tiled_attention)
    if cp > 1 and mode == "longalign":
        r = step_peak(model_name, tokens, mode, row_split=(sp, cp), **features)
    else:
        r = step_peak(model_name, tokens // ranks, mode, **features)
    state = r["Parameter"] + r["Gradient"] + r["Optstate"]
    itemsize = r["Parameter"] // r["all_params"]  # bf16
    root = itemsize * (r["all_params"] - r["layers"] * r["layer_params"])  # embeddings, final norm, LM head
    # gradients of the root: none where it is frozen (LoRA adapts the decoder layers only)
    root_grads = 0 if lora else root
    in_use = root + 2 * itemsize * r["layer_params"]  # unsharded: the root's and two decoder layers' (FSDP2)
    if offload == "all":
        device = dict(Parameter=in_use, Gradient=in_use if not lora else r["Gradient"], Optstate=0)
        r["host"] += state // gpus
    elif gpus > 1:
        unshard_root = root - root // gpus
        device = dict(Parameter=r["Parameter"] // gpus + unshard_root + 2 * itemsize * r["layer_params"],
                      Gradient=r["Gradient"] // gpus + (root_grads - root_grads // gpus), Optstate=r["Optstate"] // gpus)
    else:
        device = dict(Parameter=r["Parameter"], Gradient=r["Gradient"], Optstate=r["Optstate"])
    r = dict(r, **device)
    r["peak"] = r["peak"] - state + sum(device.values())
    r["tokens"] = tokens
    return r


def below_fixed_state(budget_gib: float, name: str, gpus: int, state: int) -> str:
    return (f"bench_memory: --budget-gib {budget_gib:g} is below {name}'s fixed state on {gpus} GPU(s): "
            f"{state / GIB:.1f} GiB of weights and optimizer state per GPU (more GPUs, or --offload all)")


def dominant(r: dict) -> str:
    return max(CATEGORIES, key=lambda c: r.get(c, 0))


def longest(model_name: str, mode: str, gpus: int, checkpointing: bool, budget: int, progress,
            tiled_mlp: int = 0, offload: str = "none", tiled_norms: int = 0, resolution: int = 1024,
            sp: int = 0, cp: int = 1, lora: int = 0, tiled_attention: int = 0) -> dict:
    """The longest row (a multiple of `resolution` * sp * cp tokens; sp defaults to gpus) whose
    per-rank peak fits `budget`.
    The peak grows almost linearly with the tokens: secant steps through the last two
    measurements, kept inside the bracket [longest that fits, shortest that does not], until
    the bracket is one unit wide."""
    sp = sp or gpus
    unit = resolution * sp * cp

    def measure(units):
        return rank_peak(model_name, units * unit, mode, gpus, checkpointing, tiled_mlp, offload, tiled_norms, sp, cp,
                         lora, tiled_attention)

    a = measure(4)
    state = a["Parameter"] + a["Optstate"] if offload != "all" else 0
    if state > budget:
        raise SystemExit(below_fixed_state(budget / GIB, model_name, gpus, state))
    if a["peak"] > budget:
        return dict(a, max_tokens=0)
    fits, over = (4, a), None  # (units, measurement)
    prev, last = (4, a), (8, measure(8))
    while True:
        n, r = last
        progress(f"  {model_name} {mode:9} gpus={gpus:<3} sp={sp:<3} cp={cp:<3} ckpt={checkpointing!s:5} offload={offload:11} "
                 f"{n * unit:>9} tokens: {r['peak'] / GIB:6.1f} GiB (host {r['host'] / GIB:.1f} GiB)")
        if r["peak"] <= budget:
            fits = max(fits, last, key=lambda x: x[0])
        elif over is None or n < over[0]:
            over = last
        if over is not None and over[0] - fits[0] <= 1:
            return dict(fits[1], max_tokens=fits[0] * unit)
        slope = (last[1]["peak"] - prev[1]["peak"]) / max(1, last[0] - prev[0])
        guess = int(n + (budget - r["peak"]) / slope) if slope > 0 else 2 * n
        high = over[0] - 1 if over is not None else max(guess, 2 * n)
        guess = min(max(guess, fits[0] + 1), high)
        prev, last = last, (guess, measure(guess))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help=f"one of {', '.join(MODELS)} (comma-separated for several)")
    ap.add_argument("--gpus", default="1,8,32", help="GPU counts: the row is split over all of them (SP + FSDP)")
    ap.add_argument("--sp", default="cp",
                    help="how the row is split over the GPUs: cp (the default: Ulysses as far as the model's heads "
                         "allow, context parallelism for the rest, e.g. Qwen2.5-7B's 28 heads on 32 GPUs: Ulysses 4 x "
                         "CP 8), gpus (Ulysses over all of them) or auto (the largest Ulysses size that divides the "
                         "GPUs and the heads, e.g. 4 of 8 for Qwen2.5-7B; data parallel over the rest); FSDP over all")
    ap.add_argument("--budget-gib", type=float, default=80.0, help="device memory per GPU")
    ap.add_argument("--checkpointing", default="off,on", help="activation checkpointing modes to run: off, on")
    ap.add_argument("--out", default="runs/bench/memory", help="directory for memory.csv and memory.png")
    ap.add_argument("--at-tokens", type=int, default=None,
                    help="instead of the search: the peak by category of one step of this many tokens on one GPU, "
                         "both modes, checkpointing off (memory_at.csv)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    ap.add_argument("--tiled-mlp", type=int, default=0,
                    help="longalign mode: sequence-tiled MLP with recompute over chunks of this many tokens "
                         "(longalign_ops.memory.apply_tiled_mlp; 0: off)")
    ap.add_argument("--tiled-norms", type=int, default=0,
                    help="longalign mode: RMSNorms tiled the same way over chunks of this many tokens "
                         "(longalign_ops.memory.apply_tiled_norms; 0: off)")
    ap.add_argument("--tiled-attention", type=int, default=0,
                    help="longalign mode: each decoder layer's attention block over this many groups of query heads "
                         "with recompute (longalign_ops.memory.apply_tiled_attention; 0: off)")
    ap.add_argument("--modes", default="baseline,longalign", help="which of baseline, longalign to run")
    ap.add_argument("--plot", default=None, metavar="CSV[,CSV...]",
                    help="instead of measuring: draw DIR/memory.png from these memory.csv files together")
    ap.add_argument("--resolution", type=int, default=1024,
                    help="the search's step, in tokens per GPU (max_tokens is a multiple of it times the GPUs)")
    ap.add_argument("--lora", type=int, default=0,
                    help="train.py --lora R: LoRA adapters of rank R on every linear layer but the LM head, the rest "
                         "frozen (gradients and AdamW state for the adapters only); 0: full fine-tuning")
    ap.add_argument("--offload", default="none",
                    help="host offload for both modes, comma-separated for several (none, activations, all; each but "
                         "none implies checkpointing on): activations = every layer's "
                         "checkpoint in host memory; all = also parameters, gradients and AdamW state (FSDP2 "
                         "CPUOffloadPolicy, the optimizer step on the CPU)")
    args = ap.parse_args(argv)
    if args.resolution < 1:
        raise SystemExit(f"bench_memory: --resolution {args.resolution}: must be a positive number of tokens")
    offloads = args.offload.split(",")
    if set(offloads) - {"none", "activations", "all"}:
        raise SystemExit(f"bench_memory: --offload {args.offload!r}: choose from none, activations, all")
    if args.at_tokens:
        return at_tokens(args)
    if args.plot:
        import csv

        rows = []
        for path in args.plot.split(","):
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
        os.makedirs(args.out, exist_ok=True)
        return print(f"wrote {plot(rows, os.path.join(args.out, 'memory.png'))}")
    budget = int(args.budget_gib * GIB)
    rows, started = [], time.time()
    for name in args.model.split(","):  # refusals: one line each, before any work
        cfg = model_config(name)
        params = parameter_count(cfg)
        for gpus in (int(g) for g in args.gpus.split(",")):
            row_split(args.sp, name, cfg, gpus)
            state = params * (2 if args.lora else 10) // gpus  # bf16 weights (+ fp32 AdamW moments), sharded
            if offloads != ["all"] and state > budget:
                raise SystemExit(below_fixed_state(args.budget_gib, name, gpus, state))
    out_csv = os.path.join(args.out, "memory.csv")
    for name in args.model.split(","):
        for gpus in (int(g) for g in args.gpus.split(",")):
            sp, cp = row_split(args.sp, name, model_config(name), gpus)
            settings = [(c == "on", "none") for c in args.checkpointing.split(",") if "none" in offloads]
            settings += [(True, o) for o in offloads if o != "none"]  # offload checkpoints: always on
            for ckpt, offload in settings:
                for mode in args.modes.split(","):
                    print(f"{name} {mode} gpus={gpus} sp={sp} cp={cp} checkpointing={ckpt} offload={offload} "
                          f"({time.time() - started:.0f} s)", flush=True)
                    r = longest(name, mode, gpus, ckpt, budget, lambda m: print(m, flush=True), args.tiled_mlp,
                                offload, args.tiled_norms, args.resolution, sp, cp, args.lora,
                                args.tiled_attention if mode == "longalign" else 0)
                    tiled = args.tiled_mlp if mode == "longalign" else 0
                    tiled_norms = args.tiled_norms if mode == "longalign" else 0
                    rows.append(dict(model=name, gpus=gpus, sp=sp, cp=cp, fsdp=gpus > 1 or offload == "all",
                                     mode=mode, checkpointing=ckpt, tiled_mlp=tiled, tiled_norms=tiled_norms,
                                     tiled_attention=args.tiled_attention if mode == "longalign" else 0,
                                     offload=offload, lora=args.lora,
                                     host_gib=round(r["host"] / GIB, 2),
                                     max_tokens=r["max_tokens"], peak_gib=round(r["peak"] / GIB, 2),
                                     dominant_category=dominant(r), budget_gib=args.budget_gib,
                                     **{f"{c.lower()}_gib": round(r.get(c, 0) / GIB, 2) for c in CATEGORIES}))
                    path = write_csv(out_csv, rows)  # after every configuration: an interrupted sweep keeps its rows
    published = [dict(model=m, gpus=g, max_tokens=t, source="ALST, arXiv 2506.13996 (Llama-3.1-8B, H100 80 GB)")
                 for (m, g), t in ALST_PUBLISHED.items() if m in args.model.split(",")]
    if published:
        write_csv(os.path.join(args.out, "alst_published.csv"), published)
    png = plot(rows, os.path.join(args.out, "memory.png"))
    print(f"\n{'model':>11} {'gpus':>4} {'ckpt':>5} {'offload':>11} {'mode':>9} {'max tokens':>11} {'peak GiB':>8} "
          f"{'host GiB':>8} dominant")
    for r in rows:
        print(f"{r['model']:>11} {r['gpus']:>4} {r['checkpointing']!s:>5} {r['offload']:>11} {r['mode']:>9} "
              f"{r['max_tokens']:>11} {r['peak_gib']:>8} {r['host_gib']:>8} {r['dominant_category']}")
    print(f"wrote {path}" + (f", {png}" if png else " (matplotlib not installed: no plot)"))


def parameter_count(cfg) -> int:
    """The model's parameter count, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    return sum(p.numel() for p in model.parameters())


def row_split(how: str, name: str, cfg, gpus: int):
    """(Ulysses size, CP size) for `gpus` GPUs: with ``cp`` Ulysses as far as the heads allow and
    CP over the rest (all GPUs share the row); otherwise :func:`sp_size` and no CP."""
    if how == "cp":
        ulysses = sp_size("auto", name, cfg, gpus)
        return ulysses, gpus // ulysses
    return sp_size(how, name, cfg, gpus), 1


def sp_size(how: str, name: str, cfg, gpus: int) -> int:
    """The sequence-parallel size for `gpus` GPUs: all of them, or with ``auto`` the largest size
    that divides the GPUs and the query heads and divides or is a multiple of the kv heads."""
    def valid(p):
        return gpus % p == 0 and cfg.num_attention_heads % p == 0 and (cfg.num_key_value_heads % p == 0 or
                                                                      p % cfg.num_key_value_heads == 0)
    if how not in ("gpus", "auto"):
        raise SystemExit(f"bench_memory: --sp {how!r}: choose cp, gpus or auto")
    if gpus < 1 or (how == "gpus" and not valid(gpus)):
        raise SystemExit(f"bench_memory: {gpus} GPUs (the sequence-parallel size) must divide {name}'s "
                         f"{cfg.num_attention_heads} query heads, and divide or be a multiple of its "
                         f"{cfg.num_key_value_heads} kv heads (--sp auto uses the largest size that does)")
    return gpus if how == "gpus" else max(p for p in range(1, gpus + 1) if valid(p))


def at_tokens(args):
    """Both modes at one size: where each one's memory goes (longalign also with the tiling
    flags, if given, as a third row)."""
    rows = []
    tiled = dict(tiled_mlp=args.tiled_mlp, tiled_norms=args.tiled_norms)
    for name in args.model.split(","):
        model_config(name)
        runs = [("baseline", {}), ("longalign", {})] + ([("longalign", tiled)] if any(tiled.values()) else [])
        for mode, features in runs:
            r = step_peak(name, args.at_tokens, mode, layers=args.layers, lora=args.lora, **features)
            rows.append(dict(model=name, layers=args.layers or model_config(name).num_hidden_layers,
                             tokens=args.at_tokens, mode=mode, lora=args.lora, tiled_mlp=features.get("tiled_mlp", 0),
                             tiled_norms=features.get("tiled_norms", 0), peak_gib=round(r["peak"] / GIB, 3),
                             dominant_category=dominant(r),
                             **{f"{c.lower()}_gib": round(r[c] / GIB, 3) for c in CATEGORIES}))
            print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    print(f"wrote {write_csv(os.path.join(args.out, 'memory_at.csv'), rows)}")


def plot(rows, path):
    """Longest trainable row against the number of GPUs, baseline vs longalign, per model and
    checkpointing mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        def grouped(r):  # the attention in head groups (rows of sweeps before the option have none)
            return int(r.get("tiled_attention") or 0) > 0

        lines = sorted({(r["mode"], str(r["checkpointing"]), r.get("offload", "none"), grouped(r)) for r in mine})
        for mode, ckpt, offload, heads in lines:
            same = [r for r in mine if r["mode"] == mode and str(r["checkpointing"]) == ckpt and
                    r.get("offload", "none") == offload and grouped(r) == heads]
            pts = sorted((int(r["gpus"]), int(r["max_tokens"])) for r in same if int(r["max_tokens"]) > 0)
            if pts:
                label = f"{mode}, checkpointing {'on' if ckpt == 'True' else 'off'}"
                label += f", offload {offload}" if offload != "none" else ""
                if any(int(r.get("tiled_mlp") or 0) for r in same):
                    label += ", tiled MLP + norms" if any(int(r.get("tiled_norms") or 0) for r in same) else \
                        ", tiled MLP"
                label += ", attention in head groups" if heads else ""
                marker = {"none": "o" if ckpt != "True" else "s", "activations": "^", "all": "D"}[offload]
                ax.plot([g for g, _ in pts], [t / 1e3 for _, t in pts], marker + ("-" if mode == "longalign" else "--"),
                        label=label)
        alst = sorted((g, t) for (m, g), t in ALST_PUBLISHED.items() if m == name)
        if alst:
            ax.plot([g for g, _ in alst], [t / 1e3 for _, t in alst], "kx:", label="ALST (published)")
        none = sorted({(int(r["gpus"]), r.get("offload", "none")) for r in mine if int(r["max_tokens"]) == 0})
        if none:  # configurations where not even the fixed state and 1K tokens per GPU fit
            ax.text(0.02, 0.02, "nothing fits: " + "; ".join(f"{g} GPU(s), offload {o}" for g, o in none),
                    transform=ax.transAxes, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        counts = sorted({int(r["gpus"]) for r in mine})
        ax.set_xticks(counts, [str(g) for g in counts])
        ax.set_xlim(counts[0] / 1.5, counts[-1] * 1.5)
        ax.set_xlabel("GPUs (Ulysses SP over all, or the largest size the heads allow; FSDP over all)")
        ax.set_ylabel(f"longest trainable row (K tokens), {float(rows[0]['budget_gib']):g} GiB per GPU")
        ax.set_title(f"{name}: bf16, fp32 AdamW moments (fake tensors + MemTracker)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
