"""Correctness on the GPU at training sizes: varlen attention (forward and every gradient) and the
fused linear cross-entropy (loss, dHidden, dWeight) in bf16 on packed rows of 8K, 32K and 128K
tokens, against float64 computed on the same device. The first check `bench/gpu_check.sh` runs.

    python bench/gpu_correctness.py [--out CSV] [--tokens 8192,32768,131072] [--dtype bf16]

Rows: sequences from a LongAlign-like length mix capped at --max-len (so that the float64
reference, dense per sequence, fits), 8 query heads over 2 kv heads (GQA), head dim 128, causal;
at the first size also gpt-oss's layer (learnable sinks and a 128-token window, dsinks checked).
The loss: hidden 1024, a 32K vocabulary, 10% of the targets ignored. Each check's error is
max |ours - float64| / max |float64|; it passes under --tolerance (bf16: 2e-2; the float64 side
sees the same bf16-rounded inputs). One CSV row per check and a one-screen summary; exit 1 if
any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_args, out_path, write_csv  # noqa: E402

import longalign_ops as la  # noqa: E402
from longalign_ops import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lengths_of(total: int, cap: int, rng) -> list:
    out, left = [], total
    while left > 0:
        n = int(rng.integers(cap // 2, cap + 1)) if rng.random() < 0.15 else int(np.clip(rng.lognormal(np.log(cap / 8),
                                                                                                          0.8), 1, cap))
        out.append(min(n, left))
        left -= out[-1]
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def attention_checks(total: int, args, device, rng, sinks: bool = False) -> list:
    """Causal attention over a packed row; `sinks`: gpt-oss's layer (learnable sinks, a sliding
    window of 128) with the sinks' gradient checked too."""
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    dtype = DTYPES[args.dtype]
    batch = la.PackedBatch.from_lengths(lengths_of(total, args.max_len, rng), device=device)
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(1 << 30)))
    q, k, v = (torch.randn(total, h, D, device=device, generator=gen).to(dtype).requires_grad_()
               for h in (H, Hk, Hk))
    dout = torch.randn(total, H, D, device=device, generator=gen).to(dtype)
    leaves, options = [q, k, v], {}
    if sinks:
        options = dict(sinks=(2 * torch.randn(H, device=device, generator=gen)).to(dtype).requires_grad_(),
                       window_size=(127, 0))
        leaves.append(options["sinks"])
    out = la.varlen_attention(q, k, v, batch, **options)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if sinks:
        options["sinks"] = leaves64[3]
    ref, _ = reference.varlen_attention(*leaves64[:3], batch.cu_seqlens, batch.cu_seqlens, causal=True, **options)
    refs = torch.autograd.grad(ref, leaves64, dout.double())
    prefix = "attention+sinks " if sinks else "attention "
    return [(prefix + name, rel_err(a, b)) for name, a, b in
            zip(("out", "dq", "dk", "dv", "dsinks"), (out,) + grads, (ref,) + refs)]


def loss_checks(total: int, args, device, rng) -> list:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(1 << 30)))
    hidden = torch.randn(total, args.hidden, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) / args.hidden ** 0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.vocab, (total,), device=device, generator=gen)
    labels[torch.rand(total, device=device, generator=gen) < 0.1] = -100
    loss = la.fused_linear_cross_entropy(hidden, weight, labels)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    # float64, a chunk of rows at a time (T x V float64 logits would not fit at 128K tokens)
    h64, w64 = hidden.detach().double(), weight.detach().double()
    count = (labels != -100).sum().double()
    want_loss, want_dh, want_dw = torch.zeros((), dtype=torch.float64, device=device), torch.empty_like(h64), \
        torch.zeros_like(w64)
    for s in range(0, total, args.chunk):
        rows = slice(s, min(total, s + args.chunk))
        logits = h64[rows] @ w64.T
        lab = labels[rows]
        keep = lab != -100
        lse = torch.logsumexp(logits, -1)
        picked = logits.gather(1, lab.clamp_min(0)[:, None])[:, 0]
        want_loss += ((lse - picked) * keep).sum()
        g = torch.softmax(logits, -1)
        g[torch.arange(len(lab), device=device), lab.clamp_min(0)] -= 1.0
        g *= (keep / count)[:, None]
        want_dh[rows] = g @ w64
        want_dw += g.T @ h64[rows]
    return [("loss value", rel_err(loss.detach(), want_loss / count)), ("loss dhidden", rel_err(dh, want_dh)),
            ("loss dweight", rel_err(dw, want_dw))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,32768,131072", help="packed row sizes")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-len", type=int, default=4096, help="longest sequence (the float64 reference is dense)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=4096, help="rows per chunk of the float64 loss")
    ap.add_argument("--tolerance", type=float, default=None, help="default: 2e-2 for bf16 / fp16, 1e-4 for fp32")
    add_out_args(ap, "correctness.csv")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tol = args.tolerance or (1e-4 if args.dtype == "fp32" else 2e-2)
    rng = np.random.default_rng(0)
    rows = []
    for i, total in enumerate(int(x) for x in args.tokens.split(",")):
        # gpt-oss's sink layers at the first size only (the float64 reference bounds the run's time)
        sink_checks = attention_checks(total, args, device, rng, sinks=True) if i == 0 else []
        for check, err in attention_checks(total, args, device, rng) + sink_checks + \
                loss_checks(total, args, device, rng):
            rows.append(dict(tokens=total, check=check, dtype=args.dtype, rel_err=err, tolerance=tol,
                             passed=err <= tol))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = write_csv(out_path(args), rows)
    print(f"{'tokens':>8}  {'check':<16} {'max rel err':>12}  result")
    for r in rows:
        print(f"{r['tokens']:>8}  {r['check']:<16} {r['rel_err']:12.2e}  {'ok' if r['passed'] else 'FAILED'}")
    failed = sum(not r["passed"] for r in rows)
    print(f"gpu_correctness: {len(rows) - failed} of {len(rows)} checks within {tol:g} of float64 ({path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
