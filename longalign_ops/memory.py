"""Memory features for rows of hundreds of thousands of tokens.

Activation-checkpoint offload (as ALST's): with every decoder layer checkpointed, what a step still
keeps on the device is each layer's input, the ``(T, hidden)`` tensor the recompute starts from:
at 512K tokens per GPU, Llama-3-8B's 32 bf16 inputs are 128 GiB. ``apply_activation_offload``
keeps them in host memory instead: copied out (pinned, on a side CUDA stream) as each layer's
forward ends, and brought back for the layer's backward, the next one prefetched while the current
one recomputes.

Sequence-tiled MLP with recompute (as ALST's TiledMLP): a decoder layer's MLP runs over chunks of
tokens, each under non-reentrant activation checkpointing, so that neither the forward nor the
backward ever holds the ``(T, intermediate)`` gate / up / activation tensors of the whole row,
only those of one chunk (at T = 137K tokens per GPU, Llama-3-8B's three bf16 intermediates are
11.8 GB; at 8K-token chunks, 0.7 GB). The price is the MLP's forward run twice, about a third
more MLP compute. Token-wise MLPs only: the result is exactly the untiled one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ._validation import check_int


class _InPieces(torch.autograd.Function):
    """``out`` of a module computed piece by piece, keeping nothing of a piece but the input: the
    one home of "run this over chunks with recompute". `pieces` are ``(fn, rows)``: ``fn`` maps
    the input's `rows` (a slice over its token dimension, -2) to those rows of the output, or,
    with ``rows=None``, the whole input to a term of the output (the terms are summed). The
    forward runs every piece without autograd; the backward runs them again one at a time,
    writes each piece's input gradient into one preallocated tensor (ALST's TiledMLP does the
    same) and returns the parameters' gradients summed over the pieces, so that they reach the
    parameters through autograd as any module's do (DDP / FSDP2 hooks included). Autocast is
    restored for the recompute. Pieces must be deterministic (no dropout)."""

    @staticmethod
    def forward(ctx, pieces, x, *params):
        ctx.pieces = pieces
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *params)
        out, whole = None, x.detach()  # detached: hooks that look for autograd inputs (MemTracker's) find none
        with torch.no_grad():
            for fn, rows in pieces:
                y = fn(whole if rows is None else whole[..., rows, :])
                if rows is None:
                    out = y if out is None else out.add_(y)
                    continue
                if out is None:
                    out = y.new_empty(*x.shape[:-1], y.shape[-1])
                out[..., rows, :] = y
        return out

    @staticmethod
    def backward(ctx, dout):
        x, *params = ctx.saved_tensors
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[2 + i]]
        dx = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        dparams = [None] * len(params)
        enabled, dtype = ctx.autocast
        for fn, rows in ctx.pieces:
            part = (x if rows is None else x[..., rows, :]).detach().requires_grad_(dx is not None)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                y = fn(part, for_backward=True) if getattr(fn, "for_backward", False) else fn(part)
            inputs = ([part] if dx is not None else []) + [params[i] for i in wanted]
            grads = list(torch.autograd.grad(y, inputs, dout if rows is None else dout[..., rows, :],
                                             allow_unused=True))
            del y
            if dx is not None:
                g = grads.pop(0)
                if rows is None:
                    dx.add_(g)
                else:
                    dx[..., rows, :] = g
            for i, g in zip(wanted, grads):
                if g is not None:
                    dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        for i in wanted:
            if dparams[i] is None:  # a parameter the pieces no longer reach: never a silent zero gradient
                raise RuntimeError(f"a recomputed piece no longer uses parameter {i} of {len(params)} (of shape "
                                   f"{tuple(params[i].shape)}): was it replaced between the forward and the backward?")
        return (None, dx, *dparams)


class _UnmadeLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose output is never made: a zero-stride stand-in of its
    shape. For a recompute whose output only roots a backward (the attention term of one head
    group, recomputed in :class:`_InPieces`' backward, whose (T, hidden) output would otherwise
    be made once more only to be differentiated). The backward is F.linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.new_zeros((), dtype=dtype).expand(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        flat = dy.reshape(-1, dy.shape[-1])
        dx = (flat @ weight.to(dy.dtype)).view(*dy.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = (flat.t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = flat.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def _in_pieces(module: torch.nn.Module, pieces, x: torch.Tensor, others=()) -> torch.Tensor:
    """`module`'s output from `pieces` (see :class:`_InPieces`), differentiable in `x` and the
    module's parameters; `others` are the other tensors the pieces read, which must not need a
    gradient (the pieces close over them)."""
    for t in others:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{type(module).__name__}: a recomputed-in-pieces module takes gradients through its "
                             f"input hidden states and parameters only, but another input of shape {tuple(t.shape)} "
                             f"requires grad")
    params = [p for p in module.parameters()]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        with torch.no_grad():
            return _InPieces.forward(_NoContext(), pieces, x, *params)
    return _InPieces.apply(pieces, x, *params)


class _NoContext:
    """What _InPieces.forward is given when no backward will run (nothing is saved)."""

    def save_for_backward(self, *tensors):
        pass


def _tensors_in(args, kwargs):
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)] + \
        [t for v in (*args, *kwargs.values()) if isinstance(v, (tuple, list)) for t in v if isinstance(t, torch.Tensor)]


def _tiled(forward, chunk_tokens: int):
    """`forward` (a module's bound forward) over chunks of `chunk_tokens` tokens (dimension -2)
    with recompute: token-wise modules only (MLPs, norms), whose result is then exactly the
    untiled one."""
    module = forward.__self__

    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        T = x.shape[-2]
        if T <= chunk_tokens:
            return forward(x, *args, **kwargs)
        pieces = [(lambda part: forward(part, *args, **kwargs), slice(start, min(start + chunk_tokens, T)))
                  for start in range(0, T, chunk_tokens)]
        return _in_pieces(module, pieces, x, _tensors_in(args, kwargs))

    run.longalign_tiled = chunk_tokens
    return run


def _tile(module: torch.nn.Module, chunk_tokens: int) -> None:
    """Replace `module.forward` by its tiled form; tiling it again re-tiles the original forward."""
    forward = module.forward
    base = getattr(forward, "__wrapped__", forward) if hasattr(forward, "longalign_tiled") else forward
    module.forward = _tiled(base, chunk_tokens)


def _tiling_target(model: torch.nn.Module, chunk_tokens, caller: str):
    """(checked chunk_tokens, the decoder model holding ``.layers``) of a transformers causal LM."""
    chunk_tokens = check_int("chunk_tokens", chunk_tokens, minimum=1)
    inner = getattr(model, "model", model)
    if getattr(inner, "layers", None) is None:
        raise ValueError(f"{caller} needs a transformers causal LM with model.model.layers")
    return chunk_tokens, inner


def apply_tiled_norms(model: torch.nn.Module, chunk_tokens: int = 32768) -> torch.nn.Module:
    """Tile the RMSNorms of a transformers causal LM over `chunk_tokens`-token chunks with
    recompute, in place: every ``*layernorm`` of each decoder layer and the final ``model.norm``.
    Their eager forward upcasts the row to fp32 and autograd keeps fp32 copies of it for the
    backward, whose temporaries are several more: at 512K tokens per GPU and hidden 4096, one norm's
    backward alone holds about 40 GiB. Tiled, one chunk's worth. Exact; parameters unchanged.
    Returns the model."""
    chunk_tokens, inner = _tiling_target(model, chunk_tokens, "apply_tiled_norms")
    norms = [m for layer in inner.layers for name, m in layer.named_children() if name.endswith("layernorm")]
    if isinstance(getattr(inner, "norm", None), torch.nn.Module):
        norms.append(inner.norm)
    for norm in norms:
        _tile(norm, chunk_tokens)
    return model


def apply_tiled_mlp(model: torch.nn.Module, chunk_tokens: int = 8192) -> torch.nn.Module:
    """Tile the MLP of every decoder layer of a transformers causal LM (``model.model.layers[i].mlp``)
    over `chunk_tokens`-token chunks, in place; parameters and state-dict keys are unchanged.
    Returns the model."""
    chunk_tokens, inner = _tiling_target(model, chunk_tokens, "apply_tiled_mlp")
    for layer in inner.layers:
        _tile(layer.mlp, chunk_tokens)
    return model


def _near_equal(n: int, parts: int):
    """`n` split into `parts` counts differing by at most one, the larger first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def head_groups(Hq: int, Hk: int, groups: int, ulysses: int = 1):
    """`groups` groups of an attention's heads, as ``[(query heads, kv heads)]`` index lists: query
    head ``i`` of a group reads its kv head ``i // (len(q) / len(kv))``, as GQA's mapping, so that
    each group is an attention of its own. Whole kv heads with all their query heads when
    ``groups <= Hk``; every kv head with a share of its query heads when ``groups <= Hq / Hk``; a
    product of the two otherwise. Counts need not divide: 8 kv heads in 3 groups are 3, 3 and 2.
    Under Ulysses (`ulysses` ranks split each group's heads) every group's query heads must be a
    multiple of it and its kv heads a multiple or a divisor: the first split that allows it."""
    r = Hq // Hk
    candidates = []
    for a in range(1, min(groups, Hk) + 1):  # a groups of kv heads x b shares of their query heads
        b = groups // a
        if a * b == groups and b <= r:
            candidates.append((a, b))
    candidates.sort(key=lambda ab: (ab[1] > 1, -ab[0]))  # whole kv heads first
    for a, b in candidates:
        plan = []
        kv_start = 0
        for n_kv in _near_equal(Hk, a):
            kv = list(range(kv_start, kv_start + n_kv))
            q_start = 0
            for n_q in _near_equal(r, b):
                plan.append(([h * r + j for h in kv for j in range(q_start, q_start + n_q)], kv))
                q_start += n_q
            kv_start += n_kv
        if all(len(q) % ulysses == 0 and (len(kv) % ulysses == 0 or ulysses % len(kv) == 0) for q, kv in plan):
            return plan
    under = f" split over a Ulysses group of {ulysses}" if ulysses > 1 else ""
    raise ValueError(f"head_groups={groups}: {Hq} query heads on {Hk} kv heads cannot be cut into {groups} groups"
                     f"{under} (choose at most {Hk} groups of whole kv heads, or a product of such a count and a "
                     f"divisor of the {r} query heads per kv head; under Ulysses each group's query heads must be a "
                     f"multiple of the group size)")


# text families whose attention in head groups is exact (tests/test_tiled_attention.py runs every
# verified family of longalign_ops.integrations.transformers and holds this list to it); the
# rest are refused by name: per-head gates, norms over all heads (OLMo 2's q_norm), MLA, fused or
# partial projections, and PhiMoE, whose grouped output differs
TILED_ATTENTION_FAMILIES = frozenset({
    "apertus", "apertus1p5_text", "arcee", "aria_text", "cohere", "cohere2", "cohere2_moe", "cwm", "ernie4_5",
    "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flint", "gemma", "gemma2", "gemma3_text", "glm", "glm4",
    "glm4_moe", "gpt_oss", "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium",
    "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "kolibri1", "lara_mini", "llama", "llama4_text",
    "mellum", "mimo_v2_flash", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "nanochat",
    "nemotron", "olmo", "param2moe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_moe", "seed_oss",
    "smollm3", "solar_open", "starcoder2", "vaultgemma"})

# attention parameters beside q/k/v/o_proj that a head group takes its share of: gpt-oss's sinks
# (one per query head); per-head q/k norms (Cohere's); 1-D norms over head_dim are shared
_PER_QUERY_HEAD = ("sinks",)


def _head_grouped(attention: torch.nn.Module, groups: int):
    """`attention.forward` as the sum of its head groups' terms (see :func:`apply_tiled_attention`)."""
    name = type(attention).__name__
    projections = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    D = getattr(attention, "head_dim", None)
    if any(hasattr(m, "base_layer") for m in projections):
        raise ValueError(f"apply_tiled_attention: {name}'s projections are wrapped by LoRA adapters (PEFT), which "
                         f"are not split by heads here: tile the attention of a model without adapters")
    if not all(isinstance(m, torch.nn.Linear) for m in projections) or not D:
        raise ValueError(f"apply_tiled_attention: {name} is not an attention of q_proj / k_proj / v_proj / o_proj "
                         f"linear layers with a head_dim (DeepSeek's MLA is not split by heads here)")
    q, k, v, o = projections
    Hq, Hk = q.out_features // D, k.out_features // D
    Dv = v.out_features // max(Hk, 1)
    if (q.out_features != Hq * D or k.out_features != Hk * D or not Hk or Hq % Hk or v.out_features != Hk * Dv
            or o.in_features != Hq * Dv):
        raise ValueError(f"apply_tiled_attention: {name}'s projections ({q.out_features}, {k.out_features}, "
                         f"{v.out_features} -> {o.in_features}) are not query / kv heads of head_dim {D} (a gated "
                         f"query projection, as Qwen3-Next's, is not split by heads here)")
    if groups > Hq:
        raise ValueError(f"head_groups={groups}: {name} has only {Hq} query heads")
    head_groups(Hq, Hk, groups)  # refused here, not at the first step
    per_head = {}
    for pname, param in attention.named_parameters():
        if pname.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        owner = pname.split(".")[0]
        if pname in _PER_QUERY_HEAD and param.shape[:1] == (Hq,):
            per_head[pname] = "q"
        elif owner in ("q_norm", "k_norm") and param.dim() == 1:
            continue  # over head_dim: every head's
        elif owner in ("q_norm", "k_norm") and param.dim() == 2 and param.shape[0] == (Hq if owner == "q_norm" else Hk):
            per_head[pname] = "q" if owner == "q_norm" else "kv"
        else:
            raise ValueError(f"apply_tiled_attention: {name} has a parameter {pname} of shape {tuple(param.shape)} "
                             f"that is not split by heads here")
    forward = attention.forward
    plans = {}

    def rows(heads, width, device):
        heads = torch.as_tensor(heads, device=device)
        return (heads[:, None] * width + torch.arange(width, device=device)).reshape(-1)

    def shares(q_heads, kv_heads, first, device):
        """The group's parameters: slices of the module's (gradients reach the whole ones)."""
        qr, kr, vr = rows(q_heads, D, device), rows(kv_heads, D, device), rows(kv_heads, Dv, device)
        out = {"q_proj.weight": q.weight.index_select(0, qr), "k_proj.weight": k.weight.index_select(0, kr),
               "v_proj.weight": v.weight.index_select(0, vr), "o_proj.weight": o.weight.index_select(1, rows(q_heads, Dv, device))}
        for lin, n, r in ((q, "q_proj", qr), (k, "k_proj", kr), (v, "v_proj", vr)):
            if lin.bias is not None:
                out[f"{n}.bias"] = lin.bias.index_select(0, r)
        if o.bias is not None and not first:  # the output bias once, in the first group's term
            out["o_proj.bias"] = torch.zeros_like(o.bias, requires_grad=False)
        params = dict(attention.named_parameters())
        for pname, by in per_head.items():
            out[pname] = params[pname].index_select(0, torch.as_tensor(q_heads if by == "q" else kv_heads,
                                                                       device=device))
        if not torch.is_grad_enabled():  # the forward without autograd: slices that stand for parameters
            for pname, t in out.items():  # say so (hooks on parameters, MemTracker's, can take them)
                t.requires_grad_(params[pname].requires_grad)
        return out

    @functools.wraps(forward)
    def run(hidden_states, *args, **kwargs):
        training = attention.training and torch.is_grad_enabled()
        cached = any(kwargs.get(n) is not None for n in ("cache", "past_key_values"))
        if getattr(attention, "_longalign_in_group", False) or (cached and not training):
            return forward(hidden_states, *args, **kwargs)  # a group's own call; decoding with a cache: whole
        if cached:  # training: the groups would each add their keys to it; left unfilled, as under checkpointing
            kwargs = {n: None if n in ("cache", "past_key_values") else v for n, v in kwargs.items()}
        from . import sequence_parallel

        shard = kwargs.get("packed_batch")
        shard = shard if isinstance(shard, sequence_parallel.Shard) else sequence_parallel.current()
        ulysses = shard.ulysses_size if shard is not None else 1
        if ulysses not in plans:
            plans[ulysses] = head_groups(Hq, Hk, groups, ulysses)

        def piece(q_heads, kv_heads, first):
            def term(h, for_backward=False):
                made = []

                def project(inp):  # the o-projection, its output recorded
                    # recomputed for the backward, the term only roots it: its output is not made
                    made.append(_UnmadeLinear.apply(inp, o.weight, o.bias) if for_backward else linear(inp))
                    return made[-1]

                linear = o.forward
                o.forward = project
                attention._longalign_in_group = True
                try:
                    out = torch.func.functional_call(attention, shares(q_heads, kv_heads, first, h.device),
                                                     (h, *args), kwargs, strict=False)
                finally:
                    attention._longalign_in_group = False
                    del o.forward
                y = out[0] if isinstance(out, tuple) else out
                if not (made and y is made[-1]):
                    raise NotImplementedError(f"apply_tiled_attention: {name}'s forward transforms the output of its "
                                              f"o_proj, so that the head groups' terms do not sum to its output")
                return y

            term.for_backward = True
            return term, None

        pieces = [piece(qh, kvh, i == 0) for i, (qh, kvh) in enumerate(plans[ulysses])]
        return _in_pieces(attention, pieces, hidden_states, _tensors_in(args, kwargs)), None

    run.longalign_head_groups = groups
    return run


def apply_tiled_attention(model: torch.nn.Module, head_groups: int = 4) -> torch.nn.Module:
    """Run the attention block of every decoder layer of a transformers causal LM over
    `head_groups` groups of query heads with recompute, in place: each group's q / k / v
    projections, RoPE (and q/k norms), attention and its share of the o-projection, summed into
    the block's output. Neither the forward nor the backward holds the whole row's q, k, v,
    attention output or their gradients, only one group's; what is kept between the forward
    and the backward is the block's input alone. At 1M tokens, hidden 4096, one bf16 q or output
    is 8 GiB; with 4 groups, 2 GiB. The price is the projections and the attention forward
    run twice. Exact (the sum of the groups' terms is the o-projection of all heads);
    parameters and state-dict keys are unchanged. GQA groups keep whole kv heads where the
    count allows (:func:`head_groups`); under Ulysses each group's heads are split over the
    ranks as the whole block's would be. Returns the model."""
    groups = check_int("head_groups", head_groups, minimum=1)
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("apply_tiled_attention needs a transformers causal LM with model.model.layers")
    attentions = [layer.self_attn for layer in layers if isinstance(getattr(layer, "self_attn", None), torch.nn.Module)]
    if not attentions:
        raise ValueError("apply_tiled_attention: the model's decoder layers have no self_attn")
    for attention in attentions:  # grouping again re-groups the original forward
        if hasattr(attention.forward, "longalign_head_groups"):
            attention.forward = attention.forward.__wrapped__
    runs = [_head_grouped(attention, groups) for attention in attentions]  # every layer checked before any is changed
    from .integrations.transformers import _text_config, _unverified_allowed

    family = getattr(_text_config(model.config), "model_type", None) if hasattr(model, "config") else None
    if family is not None and family not in TILED_ATTENTION_FAMILIES and not _unverified_allowed():
        raise ValueError(f"apply_tiled_attention: the {family} family's attention is not verified exact in head "
                         f"groups (the families that are: longalign_ops.memory.TILED_ATTENTION_FAMILIES; "
                         f"LONGALIGN_ALLOW_UNVERIFIED=1 overrides)")
    for attention, run in zip(attentions, runs):
        attention.forward = run
    return model


class _Offloaded:
    """One saved layer input: its host copy and, once restored, the device tensor."""

    __slots__ = ("host", "device", "restored", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device, self.restored, self.ready = host, device, None, None


class HostOffload:
    """Saved-tensor hooks that keep large saved tensors in host memory (`host`), for the layer inputs
    that non-reentrant checkpointing saves. Tensors already on `host`, or smaller than `min_bytes`,
    stay where they are. On CUDA the copies run on a side stream: device -> host as soon as the
    tensor is saved (the allocator keeps its memory until the copy is done), host -> device when
    the backward first needs it, and then the tensor saved just before it (the previous layer's
    input, needed next in a backward) is prefetched."""

    def __init__(self, host="cpu", pin_memory: Optional[bool] = None, min_bytes: int = 1 << 20):
        self.host = torch.device(host)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.min_bytes = check_int("min_bytes", min_bytes)
        self.pending: list = []  # offloaded, not yet restored: forward order
        self.copy_same_device = False  # tests: copy even when host == device, to check the round trip
        self._streams: dict = {}

    def _stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or (t.device == self.host and not self.copy_same_device):
            return t
        if t.device.type == "cuda":
            side = self._stream(t.device)
            host = torch.empty_like(t, device=self.host, pin_memory=self.pin_memory)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
            t.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            host = t.to(self.host, copy=True)
        record = _Offloaded(host, t.device)
        self.pending.append(record)
        return record

    def _restore(self, record: _Offloaded):
        if record.restored is not None:
            return
        if record.device.type == "cuda":
            side = self._stream(record.device)
            restored = torch.empty_like(record.host, device=record.device)
            side.wait_stream(torch.cuda.current_stream(record.device))  # the allocation is ordered before the copy
            with torch.cuda.stream(side):
                restored.copy_(record.host, non_blocking=True)
                record.ready = torch.cuda.Event()
                record.ready.record(side)
            restored.record_stream(side)  # allocated for the current stream, written on the side one
        else:
            restored = record.host.to(record.device, copy=True)
        record.restored = restored

    def unpack(self, record):
        if not isinstance(record, _Offloaded):
            return record
        self._restore(record)
        if record in self.pending:
            at = self.pending.index(record)
            if at > 0:
                self._restore(self.pending[at - 1])  # the next layer a backward needs
            del self.pending[at]
        restored, record.restored = record.restored, None  # a second backward copies it again
        if record.ready is not None:
            torch.cuda.current_stream(record.device).wait_event(record.ready)
            record.ready = None
        return restored

    def checkpoint(self, function, *args, **kwargs):
        """`torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)` with the saved
        inputs in host memory (the signature of transformers' `_gradient_checkpointing_func`)."""
        kwargs.pop("use_reentrant", None)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model, by
    the name transformers has (``activation_checkpointing_enable`` from 5.x, before it
    ``gradient_checkpointing_enable``). Returns the model."""
    kwargs = dict(use_reentrant=False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def apply_activation_offload(model: torch.nn.Module, host="cpu", *, pin_memory: Optional[bool] = None,
                             min_bytes: int = 1 << 20) -> HostOffload:
    """Checkpoint every decoder layer of a transformers causal LM and keep the checkpoints (each
    layer's input hidden states) in `host` memory, in place; returns the `HostOffload` in use.
    Gradients are exactly those of plain checkpointing. On a CPU-only run (host == device) nothing
    is copied and this is plain checkpointing.

    transformers 5's ``activation_checkpointing_enable(offload=True)`` does the same with torch's
    ``save_on_cpu``, whose copies run on the compute stream and stall it; here they run on a side
    stream and the backward's next input is prefetched."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise ValueError("apply_activation_offload needs a transformers causal LM whose model.model.layers are "
                         "GradientCheckpointingLayer modules")
    offload = HostOffload(host, pin_memory=pin_memory, min_bytes=min_bytes)
    enable_checkpointing(model)
    for layer in layers:
        layer._gradient_checkpointing_func = offload.checkpoint
    return offload


__all__ = ["HostOffload", "apply_activation_offload", "apply_tiled_attention", "apply_tiled_mlp", "apply_tiled_norms", "enable_checkpointing", "head_groups"]
