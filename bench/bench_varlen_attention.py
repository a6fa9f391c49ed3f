"""Varlen attention benchmark (GPU): ours against PyTorch's FA2-based varlen attention (or SDPA's
flash backend per sequence where that is missing), FlexAttention with a document mask, and
flash-attn when installed, all in one run, with the bf16 matmul rate measured beside them.

    python bench/bench_varlen_attention.py [--out CSV] [--totals 4096,...,262144]

Rows of `total` tokens drawn from a LongAlign-like length mix (capped at 64K per sequence);
bf16, head dim 128, 32 query heads over 8 kv heads, causal. Medians of triton.testing.do_bench.
TFLOP/s by the flash-attn formula: 4*sum(L^2)*H*D, halved for causal, x2.5 for backward.

Then fixed-length rows (B sequences of T tokens, no GQA) against the tutorial-style reference
(reference_attention.py) at head dims 64, 128 and 256: the speed behind compile_check's
side-by-side of the two kernels' compiled code. Last, on an H100, Gemma 2's attention (D=256,
window, soft-capping) with dK and dV split over two wgmma launches against the one mma.sync
program it replaced.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_args, out_path, write_csv  # noqa: E402

import longalign_ops as la  # noqa: E402


def mixture_lengths(total: int, rng, cap: int = 65536) -> list:
    out, left = [], total
    while left > 0:
        L = int(rng.integers(8192, cap + 1)) if rng.random() < 0.1 else int(np.clip(rng.lognormal(np.log(700), 0.8), 16, cap))
        L = min(L, left, cap)
        out.append(L)
        left -= L
    return out


def attention_flops(lengths, H, D, causal):
    f = 4.0 * sum(L * L for L in lengths) * H * D
    return f / 2 if causal else f


def bench(fn, grad_of=None):
    from triton.testing import do_bench

    fwd = do_bench(fn, warmup=50, rep=300, return_mode="median")
    if grad_of is None:
        return fwd, float("nan")
    out = fn()
    dout = torch.randn_like(out)

    def fwd_bwd():
        o = fn()
        torch.autograd.grad(o, grad_of, dout)

    return fwd, do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")


def peers(q, k, v, cu, lengths, causal):
    """Callables computing the same attention, by name; each returns (total, Hq, D)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    max_len = max(lengths)
    fns = {"longalign_ops": lambda: la.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw = {}
        if "is_causal" in params:
            kw["is_causal"] = causal
        elif causal:
            kw["window_size"] = (-1, 0)
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
            kk, vv = k, v
        else:
            kk, vv = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
        fns["torch varlen_attn (FA2)"] = lambda: varlen_attn(q, kk, vv, cu, cu, max_len, max_len, **kw)
    except ImportError:
        starts = cu.tolist()

        def sdpa_per_sequence():
            outs = []
            for s, e in zip(starts[:-1], starts[1:]):
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
                    is_causal=causal, enable_gqa=True)[0].transpose(0, 1))
            return torch.cat(outs)

        fns["SDPA flash per sequence"] = sdpa_per_sequence
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))

        def doc_mask(b, h, qi, ki):
            same = doc[qi] == doc[ki]
            return same & (qi >= ki) if causal else same

        block_mask = create_block_mask(doc_mask, 1, None, T, T, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        fns["FlexAttention (document mask)"] = lambda: flex(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
            enable_gqa=True)[0].transpose(0, 1)
    except Exception as e:  # noqa: BLE001  (an older torch without flex attention)
        print(f"FlexAttention unavailable: {e}")
    try:
        from flash_attn import flash_attn_varlen_func

        fns["flash-attn 2"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
    except ImportError:
        pass
    return fns


def against_reference(head_dims=(64, 128, 256), lengths=(4096,), tokens=16384, heads=16, causal=True,
                      device="cuda", dtype=torch.bfloat16):
    """ours and the tutorial-style reference on equal-length sequences, (B, H, T, D) for the
    reference and the same data packed (B*T, H, D) for ours; rows as in main()."""
    from reference_attention import reference_attention

    rows = []
    for D in head_dims:
        for T in lengths:
            B = max(1, tokens // T)
            qr, kr, vr = (torch.randn(B, heads, T, D, device=device, dtype=dtype, requires_grad=True)
                          for _ in range(3))
            q, k, v = (t.detach().transpose(1, 2).reshape(B * T, heads, D).contiguous().requires_grad_()
                       for t in (qr, kr, vr))
            cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
            flops = attention_flops([T] * B, heads, D, causal)
            for name, fn, leaves in (
                    ("longalign_ops", lambda: la.varlen_attention(q, k, v, cu, cu, T, T, causal=causal), (q, k, v)),
                    ("reference (tutorial-style)", lambda: reference_attention(qr, kr, vr, causal=causal),
                     (qr, kr, vr))):
                try:
                    fwd, both = bench(fn, leaves)
                except Exception as e:  # noqa: BLE001  (the reference's 5-stage tiles outgrow shared memory at D=256)
                    print(f"D={D} T={T} {name}: failed: {str(e)[:200]}")
                    continue
                rows.append(dict(op="fixed_length_attention", impl=name, total_tokens=B * T, num_seqs=B, max_len=T,
                                 heads=heads, kv_heads=heads, head_dim=D, causal=causal, dtype=str(dtype)[6:], fwd_ms=fwd,
                                 bwd_ms=both - fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                                 bwd_tflops=2.5 * flops / (both - fwd) / 1e9))
                print(f"D={D} T={T:>5} x{B:<3} {name:>28}: fwd {fwd:7.3f} ms  bwd {both - fwd:7.3f} ms")
    return rows


def split_dkdv_against_one_program(tokens=16384, T=4096, heads=16, kv_heads=8, D=256, window=4096, softcap=50.0,
                                   device="cuda", dtype=torch.bfloat16):
    """Gemma 2's attention (head dim 256, sliding window, soft-capping), where attention_config
    has dK and dV computed by two launches on wgmma tiles (dkdv_split), timed against the one
    program holding both on spill-free mma.sync 16 x 16 tiles that it replaced: the compiled
    code says the split should win (its tiles are 8x larger; it recomputes the scores once
    more); this is where a GPU says whether it does. Rows as in main(); none where the device's
    config does not split (not an sm_90)."""
    from longalign_ops.kernels import varlen_attention as va

    config_for = va.config_for
    q = torch.randn(tokens, heads, D, device=device, dtype=dtype, requires_grad=True)
    if not config_for(q, softcap)["dkdv_split"]:
        return []
    k, v = (torch.randn(tokens, kv_heads, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    cu = torch.arange(0, tokens + 1, T, dtype=torch.int32, device=device)
    options = dict(causal=True, window_size=(window, 0), softcap=softcap)
    rows = []
    for name, cfg in (("longalign_ops (dK, dV split on wgmma)", None),
                      ("longalign_ops (one dK/dV program, mma.sync 16x16)", dict(dkdv=(16, 16, 4, 1), dkdv_split=False))):
        va.config_for = config_for if cfg is None else (lambda q, softcap=0.0, prefix=False: dict(
            config_for(q, softcap, prefix), **cfg))
        try:
            fwd, both = bench(lambda: la.varlen_attention(q, k, v, cu, cu, T, T, **options), (q, k, v))
        finally:
            va.config_for = config_for
        rows.append(dict(op="gemma2_attention_dkdv", impl=name, total_tokens=tokens, num_seqs=tokens // T, max_len=T,
                         heads=heads, kv_heads=kv_heads, head_dim=D, causal=True, dtype=str(dtype)[6:], fwd_ms=fwd,
                         bwd_ms=both - fwd, fwd_bwd_ms=both))
        print(f"D={D} window {window} softcap {softcap} {name:>50}: bwd {both - fwd:7.3f} ms")
    return rows


def matmul_tflops(dtype=torch.bfloat16, n=8192):
    from triton.testing import do_bench

    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n ** 3 / ms / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    add_out_args(ap, "varlen_attention.csv")
    ap.add_argument("--totals", default="4096,8192,16384,32768,65536,131072,262144")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-causal", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_varlen_attention.py needs a CUDA GPU (the kernels are verified on CPU by the tests)")
    causal = not args.no_causal
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    mm = matmul_tflops()
    rows = [dict(op="matmul_bf16_8192", impl="torch", tflops=mm)]
    print(f"bf16 matmul: {mm:.0f} TFLOP/s")
    rng = np.random.default_rng(0)
    for total in map(int, args.totals.split(",")):
        lengths = mixture_lengths(total, rng)
        cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device="cuda")
        q = torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(total, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(total, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flops = attention_flops(lengths, H, D, causal)
        for name, fn in peers(q, k, v, cu, lengths, causal).items():
            try:
                fwd, both = bench(fn, (q, k, v))
            except Exception as e:  # noqa: BLE001  (a peer that cannot run this shape)
                print(f"{name} @ {total}: failed: {str(e)[:200]}")
                continue
            bwd = both - fwd
            rows.append(dict(op="varlen_attention", impl=name, total_tokens=total, num_seqs=len(lengths),
                             max_len=max(lengths), heads=H, kv_heads=Hk, head_dim=D, causal=causal, dtype="bf16",
                             fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                             bwd_tflops=2.5 * flops / bwd / 1e9, fwd_bwd_tflops=3.5 * flops / both / 1e9,
                             fwd_frac_of_matmul=flops / fwd / 1e9 / mm, bwd_frac_of_matmul=2.5 * flops / bwd / 1e9 / mm))
            r = rows[-1]
            print(f"{total:>7} {name:>32}: fwd {fwd:7.3f} ms ({r['fwd_tflops']:5.0f} TF/s)  "
                  f"bwd {bwd:7.3f} ms ({r['bwd_tflops']:5.0f} TF/s)  fwd+bwd {both:7.3f} ms")
        del q, k, v
        torch.cuda.empty_cache()
    # written after each part, so that gpu_check's time limit, if it strikes, keeps what was measured
    write_csv(out_path(args), rows)
    rows += against_reference(causal=causal)
    write_csv(out_path(args), rows)
    rows += split_dkdv_against_one_program()
    print(f"wrote {write_csv(out_path(args), rows)}")


if __name__ == "__main__":
    main()
