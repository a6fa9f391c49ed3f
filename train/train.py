"""Minimal long-context alignment training: SFT with naive / sorted / packed batching (LongAlign),
preference training (LOGO, SimPO, DPO, LongPO) and ProLong's continued training on raw documents,
on a transformers model, with every longalign_ops op.

    python train/train.py --preset tiny --strategy bfd --objective sft --max-steps 8 --out runs/x
    python train/train.py --model DIR --data prefs.jsonl --objective dpo --export runs/x/model
    torchrun --nproc_per_node=2 train/train.py --preset tiny ...       (DDP: gloo on CPU, nccl on GPU)

This file is the loop; the pieces it calls, in the order a run meets them:
    config.py      flags, presets, defaults and refusals
    data.py        the units a run trains on (records.py: JSONL; token_store.py: raw documents)
    modeling.py    the model with longalign attention and the memory features
    parallel.py    the (dp, cp, sp) mesh, a row's shard, FSDP2
    objectives.py  the losses, and DPO / LongPO's reference log-probs
    batches.py     which units each step and rank trains on, packed into micro-batches
    checkpoint.py  atomic, verified checkpoints (sharded under FSDP), resume
    metrics.py     the loss plot;  export.py  the transformers directory at the end
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import export
import records
from batches import logo_positions, make_plan, micro_batch, optimizer_step_batches
from config import Config, as_list, check_paths, data_sources, parse_args
from data import drawn_tokens, embedded_dataset, load_units, max_token_id, sft_sequences, unit_lengths
from longalign_ops.losses import NEEDS_REFERENCE, PREFERENCE_METRICS
from metrics import plot_loss
from modeling import CausalLMWithLoss, build_model
from objectives import make_loss_fn, reference_logprobs, step_loss_fn
from parallel import setup_distributed, shard_micro_batch, shard_model


def lr_lambda(cfg: Config):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def epoch_steps(argv) -> int:
    """Plan steps (each one micro-batch per rank) of one epoch of `train/train.py argv`'s data:
    what a benchmark runs to train on every unit once."""
    cfg = parse_args(argv)
    units, _ = load_units(cfg, lambda msg: None)
    return make_plan(cfg, unit_lengths(units, cfg.shared_prefix), cfg.world_size, 0).num_steps


def held_out_sequences(argv, seed: int) -> list:
    """Sequences of the embedded task (`argv`'s preset and window) drawn with `seed`, for a metric
    on data no run trains on: dicts of input_ids and labels (shifted: label t is token t + 1)."""
    return sft_sequences(embedded_dataset(parse_args(argv), np.random.default_rng(seed)))


def time_one_pass(run_pass):
    """The default `pass_timer` of main(): one forward + backward pass, timed. A pass timer gets
    `run_pass(train)` (train=True: the step's pass, whose gradients count; False: the same work
    again with its gradients dropped) and returns (the training pass's loss, each pass's ms)."""
    t = time.perf_counter()
    loss = run_pass(True)
    return loss, [(time.perf_counter() - t) * 1e3]


class StopRequest:
    """SIGTERM (Slurm's and Kubernetes' notice before a kill) and SIGINT (Ctrl-C) ask the run to
    stop: the step under way finishes, a checkpoint is written, and the run leaves with 128 +
    the signal's number. A second signal while the checkpoint is written is noted, not obeyed:
    the save is atomic, and the previous checkpoint stays until the new one is complete."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._note)

    def _note(self, signum, frame):
        self.signum = self.signum or signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def main(argv=None, step_hook=None, pass_timer=time_one_pass) -> dict:
    """Train as `train/train.py argv` does (see _main)."""
    stop = StopRequest()
    try:
        return _main(argv, step_hook, pass_timer, stop)
    finally:
        stop.restore()


def _main(argv, step_hook, pass_timer, stop) -> dict:
    """Train as `train/train.py argv` does; returns the metrics history, the model and its config.
    `step_hook(row)` sees each step's metrics row; `pass_timer` runs and times each emulated
    rank's micro-batch (time_one_pass; bench/bench_e2e.py repeats the pass for a median, which
    leaves training unchanged). Timed repeats beyond the first are left out of the step's ms.
    Under torchrun, the process group main() starts is still up when it returns (after a
    barrier): train.py's own entry leaves without tearing it down."""
    cfg = parse_args(argv)
    check_paths(cfg)
    rank, world, dp_rank, dp_size, row_groups = setup_distributed(cfg)
    if world > 1 and pass_timer is not time_one_pass:
        raise SystemExit("a pass_timer (timing repeats) is for ranks emulated in one process, not under torchrun")
    # refusals of the flag combination, on every rank, before any data is read or model built
    if cfg.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp needs a torchrun job (torchrun --nproc_per_node N train/train.py --fsdp ...)")
    if cfg.offload_params and not cfg.fsdp:
        raise SystemExit("--offload-params works through FSDP2: add --fsdp (one GPU: torchrun --nproc_per_node 1)")
    if cfg.ref_model and cfg.objective not in NEEDS_REFERENCE:
        raise SystemExit(f"--ref-model is for --objective dpo or longpo; {cfg.objective} has no reference")
    if cfg.fsdp and cfg.world_size > 1:
        raise SystemExit("--fsdp shards over torchrun's ranks; --world-size (emulated ranks) is for a single process")
    for target in (cfg.export, cfg.export_adapter):  # the user's files: refused now, not after the training
        if target:
            export.check_target(target)
    rows = checkpoint.metrics_rows(os.path.join(cfg.out, "metrics.jsonl"))
    if cfg.resume and not checkpoint.run_has_checkpoint(cfg.out) and rows:
        # a finished run (its rank0.json), or rows past the first checkpoint's step (that save
        # completed before the next step began): there were checkpoints, and they are gone; never
        # a silent restart over that history. Otherwise the run stopped before its first
        # checkpoint, and starts again from step 0, as any resume redoes its last steps
        if os.path.exists(os.path.join(cfg.out, "rank0.json")) or (cfg.ckpt_every and rows > cfg.ckpt_every):
            raise SystemExit(f"--resume: --out {cfg.out} holds no checkpoint (ckpt.pt or ckpt.dcp) but {rows} steps "
                             f"of metrics.jsonl, which is kept. Pass --overwrite instead to start afresh there, or "
                             f"choose another --out")
        if rank == 0:
            print(f"--resume: {cfg.out} stopped at step {rows}, before its first checkpoint: starting it again from "
                  f"step 0", file=sys.stderr)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    emulated = cfg.world_size if world == 1 else 1  # ranks run one after another in this process
    ranks = dp_size * emulated  # packs per plan step
    os.makedirs(cfg.out, exist_ok=True)
    is_main = rank == 0

    from tqdm import tqdm

    log = (lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None)
    units, ref_units = load_units(cfg, log)
    lengths = unit_lengths(units, cfg.shared_prefix)
    sources = units.sources if cfg.objective == "pretrain" else None
    model = build_model(cfg, device)
    vocab, top = model.get_input_embeddings().num_embeddings, max_token_id(units)
    if top >= vocab:  # else an index error deep inside the embedding or the loss
        raise SystemExit(f"--data: token id {top} is past the model's vocabulary of {vocab}: the tokenizer "
                         f"(--tokenizer, or --model's own) does not fit --model")
    # before wrapping and resuming: the default reference is the initial policy
    ref_table = reference_logprobs(cfg, model, ref_units, lengths, ranks, dp_rank, emulated, world, row_groups, device,
                                   log) if ref_units is not None else None
    wrapped = CausalLMWithLoss(model)
    if world > 1 or cfg.fsdp:
        wrapped = shard_model(wrapped, model, world, device, cfg.offload_params) if cfg.fsdp else \
            torch.nn.parallel.DistributedDataParallel(wrapped)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = checkpoint.TrainingState(cfg.out, model, opt, sched, dict(asdict(cfg), processes=world), sharded=cfg.fsdp)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    start = 0
    if cfg.resume and ckpt.exists():  # (--resume into a run that has not started yet: a new run, e.g. a requeue)
        try:
            start, used = ckpt.resume(cfg.max_steps, log)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"resume: {e}") from None
        if is_main:  # keep the history up to the checkpoint; a torn last line is dropped
            kept = checkpoint.read_metrics(metrics_path, start, log)
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        log(f"resumed from {used} at step {start}")
    elif not cfg.resume and not cfg.overwrite and (ckpt.exists() or os.path.exists(metrics_path)):
        raise SystemExit(f"{cfg.out} holds a previous run (checkpoint or metrics): pass --resume to continue it or "
                         f"--overwrite to replace it")
    elif is_main:  # a new run: the files of a replaced one (--overwrite) go, ours only
        for name in ["metrics.jsonl"] + [n for n in os.listdir(cfg.out) if n.startswith("rank") and n.endswith(".json")]:
            if os.path.exists(os.path.join(cfg.out, name)):
                os.remove(os.path.join(cfg.out, name))
    if world > 1:
        dist.barrier()  # no rank starts before rank 0 has settled the metrics file
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.preset}: {n_params / 1e6:.1f}M parameters, {len(units)} units, strategy={cfg.strategy}, "
        f"objective={cfg.objective}, weighting={cfg.loss_weighting}, ranks={ranks} ({world} processes), "
        f"device={device}")

    plans, history = {}, []
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not is_main or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    for step in range(start, cfg.max_steps):
        plan_steps = optimizer_step_batches(cfg, plans, lengths, ranks, step, sources)
        loss_fn, step_sequences = step_loss_fn(cfg, units, plan_steps, ranks, emulated)
        t0 = time.perf_counter()
        total_loss, real, slots, repeat_ms = 0.0, 0, 0, 0.0
        rank_ms, rank_min, rank_max = ([0.0] * emulated for _ in range(3))  # median / fastest / slowest pass
        for a, ps in enumerate(plan_steps):
            for e in range(emulated):
                r = dp_rank * emulated + e if world > 1 else e
                t_rank = time.perf_counter()
                mb = micro_batch(cfg, units, ps[r], device)
                if ref_table is not None and ps[r]:
                    mb["ref_logps"] = ref_table[torch.as_tensor(ps[r], device=device)]
                if cfg.objective == "logo" and not mb["given_positions"]:
                    mb["batch"] = mb["batch"].with_positions(logo_positions(cfg, mb))
                if row_groups is not None:
                    mb = shard_micro_batch(mb, row_groups)
                prepare_ms = (time.perf_counter() - t_rank) * 1e3
                defer_sync = world > 1 and a < len(plan_steps) - 1  # gradients reduced once per optimizer step
                if cfg.fsdp:
                    wrapped.set_requires_gradient_sync(not defer_sync)

                def run_pass(train, mb=mb, defer_sync=defer_sync):
                    with wrapped.no_sync() if defer_sync and not cfg.fsdp else contextlib.nullcontext(), autocast:
                        if train:
                            out = wrapped(mb, loss_fn)
                            out.backward()
                        else:  # the same work again (a timing repeat); its gradients are dropped
                            out = wrapped(mb, make_loss_fn(cfg, 1, 1, 1.0))
                            torch.autograd.grad(out, params, allow_unused=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return out

                loss, timings = pass_timer(run_pass)
                repeat_ms += sum(timings[1:])
                rank_ms[e] += prepare_ms + float(np.median(timings))
                rank_min[e] += prepare_ms + min(timings)
                rank_max[e] += prepare_ms + max(timings)
                total_loss += loss.item()
                counted = row_groups is None or row_groups.leader  # a row's tokens once per group
                real += mb["real_tokens"] if counted else 0
                slots += mb["slots"] if counted else 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1e3 - repeat_ms  # the step as training runs it, without timing repeats
        pref = getattr(loss_fn, "sums", torch.zeros(0, dtype=torch.float64)).to(device)
        # the stop flag travels with the step's sums: a signal on any rank stops every rank at this step
        stats = torch.cat([torch.tensor([total_loss, real, slots, stop.signum], dtype=torch.float64, device=device),
                           pref])
        if world > 1:
            dist.all_reduce(stats)
        loss_value = stats[0].item() / world
        row = dict(step=step + 1, loss=loss_value, tokens_per_s=stats[1].item() / (ms / 1e3),
                   padding_ratio=1.0 - stats[1].item() / max(1.0, stats[2].item()), ms=ms,
                   slowest_rank_ms=max(rank_ms), rank_ms=rank_ms, rank_ms_min=rank_min, rank_ms_max=rank_max,
                   lr=sched.get_last_lr()[0],
                   real_tokens=int(stats[1].item()), sequences=step_sequences)
        if pref.numel():
            groups = max(1.0, stats[-1].item())
            row.update({name: stats[4 + i].item() / groups for i, name in enumerate(PREFERENCE_METRICS)
                        if ref_table is not None or not name.startswith("ref_")})
        if sources is not None:  # --objective pretrain: the tokens each --data source gave this step
            given = np.zeros(int(sources.max()) + 1, np.int64)
            np.add.at(given, *drawn_tokens(units, plan_steps))
            row["source_tokens"] = {path: int(n) for (path, _), n in zip(data_sources(as_list(cfg.data)), given)}
        history.append(row)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if (step + 1) % cfg.log_every == 0:
                pref_text = f" | margin {row['margin']:+.3f} | pref acc {row['pref_accuracy']:.2f}" if pref.numel() else ""
                log(f"step {step + 1:5d} | loss {loss_value:.4f}{pref_text} | {row['tokens_per_s']:9.0f} tok/s | "
                    f"padding {row['padding_ratio']:.3f} | {ms:8.1f} ms")
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.max_steps:
            ckpt.save(step + 1)
        if step_hook is not None:  # after the step is complete (and checkpointed)
            step_hook(row)
        if stats[3].item() and step + 1 < cfg.max_steps:
            if not (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
                ckpt.save(step + 1)
            if world > 1:
                dist.barrier()  # every rank leaves after the checkpoint is whole (torchrun stops the rest at the first)
            signum = stop.signum or signal.SIGTERM  # a rank that was not signalled follows the one that was
            bar.close()
            log(f"stopped by {signal.Signals(signum).name} after step {step + 1}: checkpoint written to {ckpt.path}; "
                f"continue with the same command and --resume")
            raise SystemExit(128 + signum)
    bar.close()
    if cfg.max_steps > start:  # a checkpoint is written for new steps only, never relabelled
        ckpt.save(cfg.max_steps)
    if cfg.export:
        tok = records.optional_tokenizer(cfg.tokenizer or cfg.model) if (cfg.tokenizer or cfg.model) else None
        export.export_model(cfg.export, model, tok, sharded=cfg.fsdp, is_main=is_main)
        log(f"exported a transformers model directory to {cfg.export}" + (" (LoRA merged)" if cfg.lora else ""))
    if cfg.export_adapter:
        export.export_adapter(cfg.export_adapter, model, sharded=cfg.fsdp, is_main=is_main)
        log(f"exported the LoRA adapter to {cfg.export_adapter}")
    if is_main and cfg.max_steps > start:
        png = plot_loss(metrics_path, os.path.join(cfg.out, "loss.png"), cfg) if cfg.plot and history else None
        log(f"done: {cfg.out}/metrics.jsonl" + (f", {png}" if png else ""))
    full = (p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters())  # FSDP: DTensors
    checksum = float(sum(p.detach().double().sum().item() for p in full))
    with open(os.path.join(cfg.out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, param_checksum=checksum, losses=[h["loss"] for h in history]), f)
    if dist.is_initialized():
        dist.barrier()  # every rank has written its files before any leaves
    return dict(history=history, checksum=checksum, model=model, config=cfg)


def _leave(code: int) -> None:
    """Leave without tearing the process group down (see below)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        result = main()  # held: dropping it frees the model, whose DDP reducer owns a gloo process group
    except SystemExit as e:
        if isinstance(e.code, str):  # a refusal: one line naming the flag, exit 2 (as argparse's)
            print(f"train.py: error: {' '.join(e.code.split())}", file=sys.stderr)
            code = 2
        else:
            code = e.code or 0
        if dist.is_initialized():
            _leave(code)
        sys.exit(code)
    if dist.is_initialized():
        # every rank has written everything and passed main()'s last barrier: leave now, without
        # destroy_process_group or destructors. After destroy_process_group, freeing main()'s
        # DDP wrapper dropped the last reference to the gloo group, whose destructor joins a
        # worker thread that was waiting for the GIL the main thread held (a hung CI run,
        # 2026-12-02, read with py-spy: ~ProcessGroupGloo in std::thread::join, the worker in
        # ~AsyncBarrierWork acquiring the GIL). Left undestroyed, the group stays referenced
        # by torch.distributed until exit; os._exit also skips the interpreter's teardown, which
        # can abort with gloo threads alive (pytorch/pytorch#179291). The OS closes the sockets.
        _leave(0)
