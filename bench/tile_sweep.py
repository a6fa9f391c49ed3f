"""Compile one attention kernel (ours or the tutorial-style reference) at one head dim over a
list of tile shapes, without a GPU, and report what compile_check reports for each: registers,
spilled bytes, spill loads/stores inside loops, wgmma / mma.sync / cp.async counts. It is how
attention_config's entries were chosen, and how a user re-checks them on another Triton.

    python bench/tile_sweep.py --kernel dkdv --head-dim 256 --arch 90 \\
        --tiles "16,64,8,2;64,16,4,2" [--reference | --variant local|prefix [--dkdv-split]] [--out sweep.csv]

Tiles are BLOCK_M,BLOCK_N,warps,stages (dK/dV: BLOCK_N keys per program stepping BLOCK_M queries).
"""
from __future__ import annotations

import argparse

import compile_check as cc


def sweep(kernel: str, head_dim: int, arch: int, tiles: list, reference: bool = False, dtype: str = "bf16",
          variant: str = "plain", dkdv_split: bool = False):
    """`variant`: plain causal, "local" (a sliding window with soft-capping) or "prefix" (shared
    prefixes); `dkdv_split`: dK and dV as separate launches (two rows per tile)."""
    rows = []
    for t in tiles:
        cases = cc.reference_cases(dtype, head_dim, tiles=t) if reference else \
            cc.attention_cases(dtype, head_dim, True, arch, tiles=t, local=variant == "local", prefix=variant == "prefix",
                               dkdv_split=dkdv_split)
        for name, fn, ptr, floats, constexprs, warps, stages in cases:
            if name.split(" ")[1] != kernel:
                continue
            k = cc.compile_kernel(fn, ptr, floats, constexprs, warps, stages, arch)
            row = dict(arch=f"sm_{arch}", kernel=name, dtype=dtype, head_dim=head_dim, tiles=f"{t[0]}x{t[1]}",
                       num_warps=warps, num_stages=stages, shared_bytes=k.metadata.shared,
                       variant="reference" if reference else variant,
                       **cc.cubin_usage(k.asm["cubin"]), **cc.instruction_mix(k.asm["ptx"]))
            rows.append(row)
            print(f"{row['arch']} {name:22} D={head_dim} {row['tiles']:>7} {warps}w/{stages}s: {row['n_regs']} regs, "
                  f"{row['stack_bytes']:5d} B spilled ({row['loop_spill_ops']} spill ops in loops), "
                  f"wgmma {row['wgmma']}, mma.sync {row['mma_sync']}, cp.async {row['cp_async']}", flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=("fwd", "dkdv", "dq"), required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--tiles", required=True, help="BLOCK_M,BLOCK_N,warps,stages;...")
    ap.add_argument("--reference", action="store_true", help="the tutorial-style reference instead of ours")
    ap.add_argument("--variant", choices=("plain", "local", "prefix"), default="plain",
                    help="ours with a sliding window + soft-capping (local) or shared prefixes (prefix)")
    ap.add_argument("--dkdv-split", action="store_true", help="dK and dV by separate launches (attention_config's dkdv_split)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles.split(";")]
    if any(len(t) != 4 for t in tiles):
        raise SystemExit("--tiles: each entry is BLOCK_M,BLOCK_N,warps,stages")
    rows = sweep(args.kernel, args.head_dim, args.arch, tiles, args.reference, args.dtype, args.variant, args.dkdv_split)
    if args.out:
        from common import write_csv

        print(f"wrote {write_csv(args.out, rows)}")
