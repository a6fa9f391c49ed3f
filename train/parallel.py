"""Process groups and sharding: the (dp, cp, sp) device mesh, a row's Ulysses / CP shard,
and FSDP2 over the world.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from config import Config
from data import PAD
from longalign_ops import sequence_parallel as sp


class RowGroups(NamedTuple):
    """The process groups of the ranks that share one packed row: Ulysses (None: no head split)
    and context parallel (None: no CP)."""
    ulysses: Optional[object]
    cp: Optional[object]

    @property
    def leader(self) -> bool:
        """Rank 0 of the row: the one that counts the row's tokens."""
        return all(g is None or dist.get_rank(g) == 0 for g in (self.ulysses, self.cp))


def shard_micro_batch(mb, row: RowGroups):
    """Sequence parallel: the row padded so that every rank of it holds as many tokens (one
    ignored pad sequence), and this rank's tokens of its ids, labels and positions."""
    shard = sp.shard(mb["batch"], row.ulysses, cp_group=row.cp)
    pad = shard.pad
    full = dict(input_ids=mb["input_ids"], labels=mb["labels"], position_ids=mb["batch"].position_ids)
    if pad:
        dev = mb["input_ids"].device
        full = dict(input_ids=torch.cat([full["input_ids"], torch.full((pad,), PAD, device=dev)]),
                    labels=torch.cat([full["labels"], torch.full((pad,), -100, device=dev)]),
                    position_ids=torch.cat([full["position_ids"], torch.arange(pad, device=dev)]))
    return dict(mb, shard=shard, num_sequences=mb["batch"].num_sequences,
                **{k: shard.local(v) for k, v in full.items()})


def shard_model(wrapped, model, world: int, device, offload_params: bool = False):
    """FSDP2 over every rank: each decoder layer its own unit, the rest (embeddings, final norm,
    lm head: what the loss reads) in the root, the wrapper that runs forward and loss. With
    `offload_params` the shards live in host memory (CPUOffloadPolicy): each unit is copied in for
    its forward and backward, its gradients copied out, and the optimizer steps on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload_params else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return fully_shard(wrapped, mesh=mesh, mp_policy=policy, offload_policy=offload)


def setup_distributed(cfg: Config):
    """(rank, world size, data-parallel rank, data-parallel size, RowGroups or None). With --sp U
    and --cp C the torchrun world is a (world / (C U)) x C x U device mesh (dimensions dp, cp,
    sp; Ulysses innermost, its all-to-alls the heaviest traffic): the C x U ranks of one dp index
    share a packed row, the "dp" dimension splits the data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.sp < 1 or world % cfg.sp:  # checked on every rank before any collective
        raise SystemExit(f"--sp {cfg.sp} must be >= 1 and divide the world size {world} (run --sp N under "
                         f"torchrun --nproc_per_node M, M a multiple of N)")
    if cfg.cp < 1 or world % (cfg.sp * cfg.cp):
        raise SystemExit(f"--cp {cfg.cp} must be >= 1 and --sp x --cp ({cfg.sp} x {cfg.cp}) must divide the world "
                         f"size {world} (run under torchrun --nproc_per_node M, M a multiple of sp x cp)")
    if world > 1 or (cfg.fsdp and "LOCAL_RANK" in os.environ):  # FSDP on one GPU (offload) needs a group too
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.sp > 1 or cfg.cp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            dp = world // (cfg.sp * cfg.cp)
            mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dp, cfg.cp, cfg.sp),
                                    mesh_dim_names=("dp", "cp", "sp"))
            row_groups = RowGroups(mesh["sp"].get_group() if cfg.sp > 1 else None,
                                   mesh["cp"].get_group() if cfg.cp > 1 else None)
            return rank, world, mesh["dp"].get_local_rank(), dp, row_groups
        return rank, world, rank, world, None
    return 0, 1, 0, 1, None
