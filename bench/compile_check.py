"""Compile every Triton kernel ahead of time for sm_80 and sm_90, without a GPU (triton ships
ptxas), and print the compiler's resource report: registers per thread, spills, shared memory,
and the instruction mix read from the PTX (wgmma, mma.sync, cp.async, TMA), with tiles and stages;
then each bf16 / fp16 attention kernel beside the tutorial-style reference (reference_attention.py)
compiled for the same architecture and head dim (also written as <out>_vs_reference.csv).

    python bench/compile_check.py [--arch 80,90] [--strict] [--out report.csv]
    python bench/compile_check.py --matrix --arch 80,86,89,90,100,120 [--dtypes bf16,fp16,fp32]
        [--head-dims 8,16,40,64,96,128,192,256]   # every GPU users own x dtype x head dim x variant

This catches what the interpreter cannot (type errors in compiled control flow, register
spills, a matmul that falls off Hopper's tensor-core path) and costs no device time;
tests/test_compile.py runs it with --strict for sm_90 and sm_80 in CI. It reads compiled code,
not speed: bench/gpu_check.sh measures speed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # reference_attention, common

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from longalign_ops.kernels import varlen_attention as va  # noqa: E402
from longalign_ops.kernels import weighted_cross_entropy as ce  # noqa: E402

import reference_attention as ref  # noqa: E402  (beside this file)


def _signature(fn, pointers: dict, floats=(), i64=(), constexprs: dict = None):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in i64 else "i32"
    return sig


def _stride_unit(head_dim: int) -> int:
    """va.stride_unit of launch_ints' tensors (token strides H x D, head stride D)."""
    return va.stride_unit(torch.empty(8, 8, head_dim))


def attention_cases(dtype="bf16", head_dim=128, causal=True, arch=90, tile_list=True, wide=False, local=False,
                    prefix=False, tiles=None, dkdv_split=None, sinks=False):
    """`local`: a sliding window (both bounds) with logit soft-capping, Gemma-2 style; `prefix`:
    a batch with shared prefixes (PackedBatch.from_prefix_groups); `tiles`: (BLOCK_M, BLOCK_N,
    warps, stages) for every kernel instead of attention_config's (tile_sweep.py), and
    `dkdv_split` whether dK and dV are separate launches (None: as attention_config says). A
    split dK/dV is two cases, "... dK-pass" and "... dV-pass". `sinks`: the forward with learnable
    sinks only (the backward kernels do not change with them)."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = va.attention_config(head_dim, torch_dtype, on_gpu=True, capability=divmod(arch, 10), softcap=local,
                              prefix=prefix)
    if tiles is not None:
        cfg = dict(cfg, fwd=tiles, dkdv=tiles, dq=tiles)
    if dkdv_split is not None:
        cfg["dkdv_split"] = dkdv_split
    common = dict(GROUP=4, HEAD_DIM=head_dim, STRIDE_UNIT=_stride_unit(head_dim),
                  BLOCK_D=va.block_d(head_dim), HAS_LEFT=local,
                  HAS_RIGHT=causal or local, SOFTCAP=local, TILE_LIST=tile_list,
                  DOT_PRECISION=va._dot_precision(torch_dtype), WIDE_OFFSETS=wide, HAS_PREFIX=prefix)
    t = dtype
    ptr = dict(Q=t, K=t, V=t, Out=t, Lse="fp32", cu_q="i32", cu_k="i32", tile_seq="i32", tile_block="i32",
               Prefix="i32", Sinks=t, dOut=t, Delta="fp32", dK=t, dV=t, dQ=t)
    floats = ("qk_scale_log2", "scale_over_cap", "cap_log2", "sm_scale")
    variant = ("" if tile_list else " dense-grid") + (" wide-offsets" if wide else "") + \
        (" window+softcap" if local else "") + (" shared-prefix" if prefix else "") + (" sinks" if sinks else "")
    passes = dict(fwd=[("", dict(HAS_SINK=sinks))], dq=[("", {})],
                  dkdv=[(" dK-pass", dict(WANT_DK=True, WANT_DV=False)), (" dV-pass", dict(WANT_DK=False, WANT_DV=True))]
                  if cfg["dkdv_split"] else [("", dict(WANT_DK=True, WANT_DV=True))])
    for kernel, fn in (("fwd", va._varlen_attention_fwd_kernel), ("dkdv", va._varlen_attention_bwd_dkdv_kernel),
                       ("dq", va._varlen_attention_bwd_dq_kernel)):
        if sinks and kernel != "fwd":
            continue
        BM, BN, warps, stages = cfg[kernel]
        for suffix, wants in passes[kernel]:
            yield (f"varlen_attention {kernel}{variant}{suffix}", fn, ptr, floats,
                   dict(common, BLOCK_M=BM, BLOCK_N=BN, **wants), warps, stages)
    block_d = va.block_d(head_dim)
    if not tile_list or wide or local or prefix or sinks:
        return
    yield ("varlen_attention bwd preprocess", va._varlen_attention_bwd_preprocess_kernel,
           dict(Out=t, dOut=t, Delta="fp32"), (), dict(HEAD_DIM=head_dim, STRIDE_UNIT=_stride_unit(head_dim),
                                                       BLOCK_D=block_d, BLOCK_M=va.prepass_rows(block_d, torch_dtype.itemsize)), 4, 1)


def reference_cases(dtype="bf16", head_dim=128, causal=True, tiles=None):
    """The tutorial-style fixed-length attention (reference_attention.py) with the tutorial's
    tiles (or `tiles` for every kernel): the yardstick each of our attention kernels is printed beside."""
    ptr = dict(Q=dtype, K=dtype, V=dtype, Out=dtype, M="fp32", dO=dtype, Delta="fp32", dK=dtype, dV=dtype, dQ=dtype)
    for kernel, fn in (("fwd", ref._ref_fwd_kernel), ("dkdv", ref._ref_bwd_dkdv_kernel), ("dq", ref._ref_bwd_dq_kernel)):
        BM, BN, warps, stages = tiles or ref.TUTORIAL_CONFIG[kernel]
        yield (f"reference {kernel}", fn, ptr, ("qk_scale", "sm_scale"),
               dict(HEAD_DIM=head_dim, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal), warps, stages)


def cross_entropy_cases(dtype="bf16", vocab=128256):
    ptr = dict(Logits=dtype, Grad=dtype, Labels="i64", Weights="fp32", Scale="fp32", Loss="fp32", ZLoss="fp32",
               Pred="i64")
    for weights, softcap, grad, extras in ((True, False, True, False), (True, True, True, True),
                                           (False, False, False, False)):
        yield (f"weighted_cross_entropy (weights={weights}, softcap={softcap}, grad={grad}, z/argmax={extras})",
               ce._weighted_cross_entropy_fwd_kernel, ptr, ("softcap", "label_smoothing", "lse_square_scale"),
               dict(HAS_WEIGHTS=weights, HAS_SOFTCAP=softcap, COMPUTE_GRAD=grad, WANT_Z=extras, WANT_PRED=extras,
                    BLOCK_V=ce._block_v(vocab, True)), 16, 1)


def _cuobjdump(cubin: bytes, *flags) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(cubin)
        return subprocess.run([tool, *flags, path], capture_output=True, text=True, check=True).stdout


def cubin_usage(cubin: bytes) -> dict:
    """Registers and local-memory stack of the cubin triton built (the cuobjdump it ships), and
    how many local-memory loads and stores (spill traffic) sit inside loops of the SASS: a spill
    outside the loops is paid once per program, one inside on every step."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    fields = dict(x.split(":", 1) for x in out.strip().splitlines()[-1].split() if ":" in x)
    instructions = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(cubin, "-sass"))]
    # a loop is the span from a backward branch's target to the branch
    loops = [(int(target, 16), addr) for addr, text in instructions
             for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", text) if int(target, 16) < addr]
    in_loops = sum(1 for addr, text in instructions if re.search(r"\b(?:LDL|STL)\b", text)
                   and any(lo <= addr <= hi for lo, hi in loops))
    return dict(n_regs=int(fields["REG"]), stack_bytes=int(fields["STACK"]), loop_spill_ops=in_loops)


def instruction_mix(ptx: str) -> dict:
    """Matmul and load instructions of a kernel's PTX: Hopper's warpgroup tensor-core `wgmma`,
    the pre-Hopper `mma.sync`, and asynchronous (pipelined) global-to-shared copies, `cp.async`
    and TMA's `cp.async.bulk.tensor`."""
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)), mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                tcgen05=len(re.findall(r"\btcgen05\.mma\b", ptx)),
                cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)),
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)))


def launch_ints(constexprs: dict) -> dict:
    """The integer arguments of a typical launch: a packed row of Hq = 8 x GROUP query heads over 8
    kv heads (strides H x D and D), a causal window, a 128256-token vocabulary; the reference's
    T = 65536. Token totals are left unknown (a packed row's length is anything). Attention
    strides are passed in units of STRIDE_UNIT, as the launchers pass them (stride_unit)."""
    d, hk = constexprs.get("HEAD_DIM", 128), 8
    hq = hk * constexprs.get("GROUP", 4)
    unit = constexprs.get("STRIDE_UNIT", 1)
    strides = {f"stride_{t}{s}": (h * d if s == "t" else d) // unit
               for ts, h in ((("q", "o", "do", "dq"), hq), (("k", "v", "dk", "dv"), hk)) for t in ts for s in "th"}
    return dict(strides, window_left=0, window_right=0, T=65536, stride_lt=128256, stride_gt=128256, V=128256)


def compile_kernel(fn, ptr, floats, constexprs, warps, stages, arch):
    """Compile as Triton's JIT does at launch, which specializes every 16-byte-aligned pointer and
    every integer divisible by 16 as such (tt.divisibility): torch's tensors are aligned, and the
    strides of `launch_ints`. Without it loads are not vectorized or pipelined (scalar
    ld.global, no cp.async) and the registers counted are those of a launch that never happens."""
    ints = launch_ints(constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in ptr or (name in ints and ints[name] % 16 == 0)}
    src = ASTSource(fn=fn, signature=_signature(fn, ptr, floats, (), constexprs), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def all_cases(arch):
    # fp16 takes bf16's tiles; on sm_90, where --strict holds both to wgmma, at every head dim
    fp16_cases = [case for d, local in ((40, False), (128, False), (256, False), (128, True), (256, True))
                  for case in attention_cases("fp16", d, True, arch, local=local)] if arch == 90 else []
    return [case for dtype, d, causal in (("bf16", 128, True), ("fp16", 64, False), ("bf16", 256, True),
                                          ("bf16", 40, True), ("fp32", 64, True))
            for case in attention_cases(dtype, d, causal, arch)] + \
        list(attention_cases("bf16", 128, True, arch, tile_list=False)) + \
        list(attention_cases("bf16", 128, True, arch, wide=True)) + \
        [case for d in (128, 256) for case in attention_cases("bf16", d, True, arch, local=True)] + \
        [case for d in (64, 128, 256) for case in attention_cases("bf16", d, True, arch, prefix=True)] + \
        [case for d in (128, 256) for case in attention_cases("bf16", d, True, arch, local=True, prefix=True)] + \
        fp16_cases + list(cross_entropy_cases()) + \
        [case for d in (64, 128, 256) for case in reference_cases("bf16", d)]


MATRIX_DTYPES = ("bf16", "fp16", "fp32")
MATRIX_HEAD_DIMS = (8, 16, 40, 64, 96, 128, 192, 256)


VARIANTS = dict(plain=dict(), local=dict(local=True), prefix=dict(prefix=True), sinks=dict(sinks=True),
                local_sinks=dict(local=True, sinks=True))


def matrix_cases(arch, dtypes=MATRIX_DTYPES, head_dims=MATRIX_HEAD_DIMS, variants=("plain", "local", "prefix")):
    """Every attention kernel the launchers pick for `arch` at each dtype x head dim x variant
    (plain, window + softcap, shared prefix; the forward with sinks, plain or window + softcap),
    the pre-pass, and (with the plain variant) the cross-entropy kernels."""
    return [case for dtype in dtypes for d in head_dims for v in variants
            for case in attention_cases(dtype, d, True, arch, **VARIANTS[v])] + \
        [case for dtype in dtypes if dtype != "fp32" and "plain" in variants for case in cross_entropy_cases(dtype)]


def compile_all(archs=(90,), quiet=False, cases=all_cases):
    results = []
    for arch in archs:
        for name, fn, ptr, floats, constexprs, warps, stages in cases(arch):
            k = compile_kernel(fn, ptr, floats, constexprs, warps, stages, arch)
            tiles = f"{constexprs['BLOCK_M']}x{constexprs['BLOCK_N']}" if "BLOCK_N" in constexprs else ""
            row = dict(arch=f"sm_{arch}", kernel=name, dtype=ptr.get("Q") or ptr.get("Out") or ptr.get("Logits"),
                       head_dim=constexprs.get("HEAD_DIM", ""), tiles=tiles, shared_bytes=k.metadata.shared,
                       num_warps=warps, num_stages=stages, **cubin_usage(k.asm["cubin"]),
                       **instruction_mix(k.asm["ptx"]))
            results.append(row)
            if not quiet:
                print(f"{row['arch']} {name:40} {row['dtype']:>5} D={row['head_dim']!s:>4} {tiles:>7}: "
                      f"{row['n_regs']:3d} regs, {row['stack_bytes']:5d} B stack (spills; {row['loop_spill_ops']} ops in loops), "
                      f"{row['shared_bytes']:6d} B "
                      f"shared, {warps} warps, {stages} stages | wgmma {row['wgmma']:3d}, mma.sync {row['mma_sync']:3d}, "
                      f"cp.async {row['cp_async']:3d}, tma {row['tma']}", flush=True)
    return results


def shared_limit(arch: str) -> int:
    """The most shared memory one program may use on "sm_XY" (the launchers' own table)."""
    return va.shared_memory_limit(divmod(int(arch[3:]), 10))


def against_reference(rows) -> list:
    """Each of our attention kernels (normal path, no window or prefix) beside the tutorial-style
    reference at the same architecture and head dim (ours at 40 beside the reference at 64, the
    power of two both pad to): tile area, stages, instruction mix, registers, spills."""
    refs = {(r["arch"], r["kernel"].split(" ")[1], r["head_dim"]): r for r in rows if r["kernel"].startswith("reference ")}
    out = []
    for r in rows:
        name = r["kernel"].split(" ")
        if name[0] != "varlen_attention" or len(name) != 2 or name[1] not in ("fwd", "dkdv", "dq") \
                or r["dtype"] not in ("bf16", "fp16"):  # the reference is the bf16 / fp16 fast path
            continue
        ref_row = refs.get((r["arch"], name[1], max(64, triton.next_power_of_2(int(r["head_dim"])))))
        if ref_row is None:
            continue
        row = dict(arch=r["arch"], kernel=name[1], dtype=r["dtype"], head_dim=r["head_dim"])
        for side, src in (("ours", r), ("reference", ref_row)):
            bm, bn = map(int, src["tiles"].split("x"))
            row.update({f"{side}_{k}": v for k, v in dict(
                tiles=src["tiles"], tile_area=bm * bn, num_warps=src["num_warps"], num_stages=src["num_stages"],
                wgmma=src["wgmma"], mma_sync=src["mma_sync"], cp_async=src["cp_async"], n_regs=src["n_regs"],
                stack_bytes=src["stack_bytes"], shared_bytes=src["shared_bytes"],
                launches=int(src["shared_bytes"]) <= shared_limit(src["arch"])).items()})
        out.append(row)
    return out


def print_against_reference(pairs) -> None:
    print("\nours | reference (tutorial-style, tutorial tiles): tiles, warps/stages, wgmma/mma.sync/cp.async, "
          "spilled bytes (* needs more shared memory than the GPU has); compiled code, not measured speed")
    for p in pairs:
        side = ["{tiles:>6} {num_warps}w/{num_stages}s  {wgmma:3d}/{mma_sync:3d}/{cp_async:3d}  {stack_bytes:5d} B{over}".format(
            over="" if p[prefix + "launches"] else " *",
            **{k.split("_", 1)[1]: v for k, v in p.items() if k.startswith(prefix)}) for prefix in ("ours_", "reference_")]
        print(f"{p['arch']} {p['kernel']:5} {p['dtype']:>5} D={p['head_dim']!s:>4}: {side[0]} | {side[1]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a kernel needs more shared memory than its architecture gives one program, "
                         "a normal-path kernel spills to local memory (fp32 included), an sm_90 bf16/fp16 "
                         "attention kernel issues mma.sync instead of wgmma, or a bf16/fp16 attention "
                         "kernel's loads are not pipelined (no cp.async)")
    ap.add_argument("--out", default=None, help="also write the report as CSV")
    ap.add_argument("--matrix", action="store_true",
                    help="compile the launchers' choices over --dtypes x --head-dims x (plain, window+softcap, "
                         "shared prefix) instead of the default selection (which also compiles the reference)")
    ap.add_argument("--dtypes", default=",".join(MATRIX_DTYPES))
    ap.add_argument("--head-dims", default=",".join(map(str, MATRIX_HEAD_DIMS)))
    ap.add_argument("--variants", default="plain,local,prefix", help=f"of the matrix: some of {','.join(VARIANTS)}")
    args = ap.parse_args()
    cases = all_cases
    if args.matrix:
        dtypes, dims = args.dtypes.split(","), tuple(int(d) for d in args.head_dims.split(","))
        variants = tuple(args.variants.split(","))
        if not set(variants) <= set(VARIANTS):
            ap.error(f"--variants: choose from {','.join(VARIANTS)}, got {args.variants}")
        cases = lambda arch: matrix_cases(arch, dtypes, dims, variants)  # noqa: E731
    rows = compile_all(tuple(int(a) for a in args.arch.split(",")), cases=cases)
    pairs = against_reference(rows)
    print_against_reference(pairs)
    if args.out:
        from common import write_csv

        print(f"wrote {write_csv(args.out, rows)}")
        if pairs:  # (the matrix compiles no reference)
            print(f"wrote {write_csv(os.path.splitext(args.out)[0] + '_vs_reference.csv', pairs)}")
    # --strict guards the configurations that run normally; the dense grid (validation off)
    # and 64-bit offsets (sequences past 2^31 elements) must compile, and may spill a little
    ours = [r for r in rows if not r["kernel"].startswith("reference ")]  # the reference is a yardstick only
    spilled = [r for r in ours if r["stack_bytes"] and "dense-grid" not in r["kernel"]
               and "wide-offsets" not in r["kernel"]]
    rare = [r for r in ours if r["stack_bytes"] and r not in spilled]
    # and a kernel that needs more shared memory than the GPU gives one program cannot launch
    too_big = [r for r in ours if r["shared_bytes"] > shared_limit(r["arch"])]
    if too_big:
        print(f"{len(too_big)} kernel configuration(s) over the shared-memory limit: "
              + ", ".join(f"{r['arch']} {r['kernel']} D={r['head_dim']} ({r['shared_bytes']} B)" for r in too_big))
    if rare:
        print(f"{len(rare)} rare-path configuration(s) spill (allowed): "
              + ", ".join(f"{r['arch']} {r['kernel']} ({r['stack_bytes']} B)" for r in rare))
    if spilled:
        print(f"{len(spilled)} kernel configuration(s) spill: " + ", ".join(f"{r['kernel']} {r['dtype']} D={r['head_dim']}"
                                                                          for r in spilled))
    # and on Hopper every bf16/fp16 attention matmul of the normal path is a wgmma, at every head
    # dim (with and without window, softcap, shared prefixes)
    not_wgmma = [r for r in rows if r["arch"] == "sm_90" and r["dtype"] in ("bf16", "fp16")
                 and r["kernel"].split(" ")[:2] in (["varlen_attention", "fwd"], ["varlen_attention", "dkdv"],
                                                    ["varlen_attention", "dq"])
                 and "dense-grid" not in r["kernel"] and "wide-offsets" not in r["kernel"]
                 and (r["mma_sync"] or not r["wgmma"])]
    if not_wgmma:
        print(f"{len(not_wgmma)} sm_90 attention kernel(s) not on wgmma: "
              + ", ".join(f"{r['kernel']} {r['dtype']} D={r['head_dim']} ({r['mma_sync']} mma.sync)" for r in not_wgmma))
    # and every bf16/fp16 attention loop, on both architectures, pipelines its loads (cp.async)
    unpipelined = [r for r in ours if r["dtype"] in ("bf16", "fp16") and not r["cp_async"]
                   and r["kernel"].split(" ")[:2] in (["varlen_attention", "fwd"], ["varlen_attention", "dkdv"],
                                                      ["varlen_attention", "dq"])]
    if unpipelined:
        print(f"{len(unpipelined)} attention kernel(s) without cp.async: "
              + ", ".join(f"{r['arch']} {r['kernel']} {r['dtype']} D={r['head_dim']}" for r in unpipelined))
    raise SystemExit(1 if args.strict and (spilled or not_wgmma or too_big or unpipelined) else 0)
