"""A plain fixed-length flash-attention forward and backward, written the way Triton's
fused-attention tutorial writes it (this project's own code), as a yardstick for our varlen
kernels: bench/compile_check.py compiles both for sm_80 / sm_90 and prints each of our kernels
beside this one (instruction mix, tile area, stages), and bench/gpu_check.sh times both on a GPU.

Layout (B, H, T, D) contiguous, one head dim, T the same for queries and keys, optional causal
mask, no GQA, no windows, no varlen: what the tutorial covers. Tiles are the tutorial's: the
backward's fixed ones (dK/dV 128 keys stepping 32 queries, dQ 128 queries stepping 32 keys, 4 warps,
5 stages) and, for the forward, 128 queries x 64 keys, 8 warps, 3 stages (one of its autotune
candidates, flash-attn 2's shape). The softmax-backward row term (delta) is computed in torch,
which the tutorial does in a small kernel of its own.

    python bench/reference_attention.py     # a fwd+bwd check against torch on this device
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel: the tutorial's choices on Hopper
TUTORIAL_CONFIG = dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 4, 5), dq=(128, 32, 4, 5))
# the interpreter runs the same code on small tiles, so test shapes (T = 97) cross several
INTERPRETER_CONFIG = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))


@triton.jit
def _load_rows(X, base, rows, T, HEAD_DIM: tl.constexpr):
    """The (rows x HEAD_DIM) tile of one (batch, head)'s (T, HEAD_DIM) matrix at `base`; rows past T read 0."""
    return tl.load(X + base + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], mask=rows[:, None] < T,
                   other=0.0)


@triton.jit
def _ref_fwd_kernel(Q, K, V, Out, M, T, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """One (BLOCK_M queries, batch x head) tile: online softmax over the key blocks it sees;
    writes O and M = log2-sum-exp2 of the scaled scores (what the backward recomputes p from)."""
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, base, offs_m, T, HEAD_DIM)
    k_ptrs = K + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # K^T tile, advanced per block
    v_ptrs = V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = tl.load(k_ptrs, mask=cols[None, :] < T, other=0.0)
        s = tl.dot(q, kT) * qk_scale
        keep = cols[None, :] < T
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N * HEAD_DIM
    q_mask = offs_m < T
    tl.store(M + tl.program_id(1).to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=q_mask)
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=q_mask[:, None])


@triton.jit
def _ref_bwd_dkdv_kernel(Q, K, V, dO, M, Delta, dK, dV, T, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dK, dV of BLOCK_N keys, stepping BLOCK_M queries at a time over the queries that see them
    (the tutorial's transposed form: keys are the M dimension of every matmul)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < T
    k = _load_rows(K, base, offs_n, T, HEAD_DIM)
    v = _load_rows(V, base, offs_n, T, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    qT_ptrs = Q + base + (lo + offs_m0)[None, :] * HEAD_DIM + offs_d[:, None]
    do_ptrs = dO + base + (lo + offs_m0)[:, None] * HEAD_DIM + offs_d[None, :]
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + offs_m0
        m_valid = offs_m < T
        qT = tl.load(qT_ptrs, mask=m_valid[None, :], other=0.0)
        m = tl.load(M + bh * T + offs_m, mask=m_valid, other=float("inf"))
        pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - m[None, :])
        if CAUSAL:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :], pT, 0.0)
        do = tl.load(do_ptrs, mask=m_valid[:, None], other=0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        delta = tl.load(Delta + bh * T + offs_m, mask=m_valid, other=0.0)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
        qT_ptrs += BLOCK_M * HEAD_DIM
        do_ptrs += BLOCK_M * HEAD_DIM
    tl.store(dK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(dK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _ref_bwd_dq_kernel(Q, K, V, dO, M, Delta, dQ, T, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ of BLOCK_M queries, stepping BLOCK_N keys at a time over the keys they see."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = offs_m[:, None] < T
    q = _load_rows(Q, base, offs_m, T, HEAD_DIM)
    do = _load_rows(dO, base, offs_m, T, HEAD_DIM)
    m = tl.load(M + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(Delta + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kT_ptrs = K + base + offs_n0[None, :] * HEAD_DIM + offs_d[:, None]
    vT_ptrs = V + base + offs_n0[None, :] * HEAD_DIM + offs_d[:, None]
    hi = tl.minimum(start_m + BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n0
        kT = tl.load(kT_ptrs, mask=cols[None, :] < T, other=0.0)
        vT = tl.load(vT_ptrs, mask=cols[None, :] < T, other=0.0)
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - m[:, None])
        keep = cols[None, :] < T
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, p, 0.0)
        ds = p * (tl.dot(do, vT) - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
        kT_ptrs += BLOCK_N * HEAD_DIM
        vT_ptrs += BLOCK_N * HEAD_DIM
    tl.store(dQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(dQ.dtype.element_ty),
             mask=q_mask)


def _config(q: torch.Tensor) -> dict:
    return TUTORIAL_CONFIG if q.is_cuda else INTERPRETER_CONFIG


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise TypeError(f"{name} must be a (B, H, T, D) tensor, got {type(t).__name__}"
                            f"{'' if not isinstance(t, torch.Tensor) else f' of shape {tuple(t.shape)}'}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim (q.shape[-1]) must be a power of two >= 16 for the reference, got {D}")


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        B, H, T, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        m = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
        BM, BN, warps, stages = _config(q)["fwd"]
        if T:
            _ref_fwd_kernel[(triton.cdiv(T, BM), B * H)](q, k, v, out, m, T, sm_scale * LOG2E, HEAD_DIM=D, BLOCK_M=BM,
                                                          BLOCK_N=BN, CAUSAL=causal, num_warps=warps,
                                                          num_stages=stages)
        ctx.save_for_backward(q, k, v, out, m)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, m = ctx.saved_tensors
        B, H, T, D = q.shape
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if T == 0:
            return dq, dk, dv, None, None
        delta = (out.float() * do.float()).sum(-1).reshape(B * H, T)
        cfg = _config(q)
        args = (q, k, v, do, m, delta)
        scales = (T, ctx.sm_scale * LOG2E, ctx.sm_scale)
        BM, BN, warps, stages = cfg["dkdv"]
        _ref_bwd_dkdv_kernel[(triton.cdiv(T, BN), B * H)](*args, dk, dv, *scales, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN,
                                                          CAUSAL=ctx.causal, num_warps=warps, num_stages=stages)
        BM, BN, warps, stages = cfg["dq"]
        _ref_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](*args, dq, *scales, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN,
                                                        CAUSAL=ctx.causal, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale [causal]) v over (B, H, T, D) tensors, differentiable."""
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _ReferenceAttention.apply(q, k, v, bool(causal), scale)


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 128, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32,
                           requires_grad=True) for _ in range(3))
    out = reference_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    print(f"{dev}: max |out - sdpa| = {(out.float() - ref).abs().max().item():.2e}")
