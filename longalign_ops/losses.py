"""Preference losses on packed batches, fed by :func:`longalign_ops.sequence_logprobs`.

Chosen and rejected answers of a prompt live in the same packed batch; their per-sequence
log-probs come from one ``sequence_logprobs`` call. Every loss returns the mean over the batch.

- ``logo_loss``: LOGO (Tang et al. 2024, eq. 2-3), reference-free, M rejected answers.
- ``simpo_loss``: SimPO (Meng et al. 2024), reference-free, one rejected answer.
- ``dpo_loss``: DPO (Rafailov et al. 2023).
- ``longpo_loss``: LongPO (Chen et al. 2025): DPO on the long-context input whose reference
  log-probs are taken on the short prompt, plus an NLL term on the chosen answer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._validation import check_finite_number, check_tensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _vector(name: str, t, B: Optional[int] = None) -> torch.Tensor:
    check_tensor(name, t, ndim=1, dtypes=_FLOAT)
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name} must have {B} entries (one per example), got {t.shape[0]}")
    return t.float()


def logo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float, gamma: float,
              chosen_nll: Optional[torch.Tensor] = None, sft_weight: float = 0.0) -> torch.Tensor:
    """``mean_b[-log sigmoid(beta * (c_b - mean_j r_bj) - gamma) + sft_weight * nll_b]``.

    Args:
        chosen_logps: ``(B,)`` length-averaged log-probs of the chosen answers
            (``sequence_logprobs(..., average=True)``).
        rejected_logps: ``(B, M)`` (or ``(B,)`` for M = 1) length-averaged log-probs of the
            M rejected answers of each prompt.
        beta, gamma: reward scale and target margin.
        chosen_nll: ``(B,)`` the SFT term per example; default ``-chosen_logps`` (the
            length-averaged NLL of the chosen answer).
        sft_weight: weight of the SFT term (LOGO's lambda).
    """
    beta = check_finite_number("beta", beta)
    gamma = check_finite_number("gamma", gamma)
    sft_weight = check_finite_number("sft_weight", sft_weight, minimum=0.0)
    c = _vector("chosen_logps", chosen_logps)
    check_tensor("rejected_logps", rejected_logps, dtypes=_FLOAT)
    r = rejected_logps.float()
    if r.dim() == 1:
        r = r[:, None]
    if r.dim() != 2 or r.shape[0] != c.shape[0] or r.shape[1] < 1:
        raise ValueError(f"rejected_logps must be ({c.shape[0]}, M) with M >= 1, got {tuple(rejected_logps.shape)}")
    loss = -F.logsigmoid(beta * (c - r.mean(1)) - gamma)
    if sft_weight:
        nll = -c if chosen_nll is None else _vector("chosen_nll", chosen_nll, c.shape[0])
        loss = loss + sft_weight * nll
    return loss.mean()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5) -> torch.Tensor:
    """SimPO: ``mean[-log sigmoid(beta * (c - r) - gamma)]`` on length-averaged log-probs ``(B,)``."""
    c = _vector("chosen_logps", chosen_logps)
    r = _vector("rejected_logps", rejected_logps, c.shape[0])
    beta = check_finite_number("beta", beta)
    gamma = check_finite_number("gamma", gamma)
    return (-F.logsigmoid(beta * (c - r) - gamma)).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: ``mean[-log sigmoid(beta * ((pc - rc) - (pr - rr)))]`` on summed log-probs ``(B,)``.
    ``label_smoothing`` eps gives the conservative variant (cDPO):
    ``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``."""
    pc = _vector("policy_chosen", policy_chosen)
    B = pc.shape[0]
    pr = _vector("policy_rejected", policy_rejected, B)
    rc = _vector("ref_chosen", ref_chosen, B)
    rr = _vector("ref_rejected", ref_rejected, B)
    beta = check_finite_number("beta", beta)
    eps = check_finite_number("label_smoothing", label_smoothing, minimum=0.0)
    if eps > 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
    z = beta * ((pc - rc) - (pr - rr))
    return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()


def longpo_loss(policy_chosen_long: torch.Tensor, policy_rejected_long: torch.Tensor, ref_chosen_short: torch.Tensor,
                ref_rejected_short: torch.Tensor, *, beta: float = 0.1, chosen_nll: Optional[torch.Tensor] = None,
                nll_weight: float = 0.0) -> torch.Tensor:
    """LongPO: DPO whose policy log-probs are taken with the long-context prompt and whose
    reference log-probs are taken with the short prompt the answers were generated from (the
    short-to-long constraint), plus ``nll_weight`` times the chosen answer's NLL ``(B,)``
    (default: ``-policy_chosen_long``)."""
    loss = dpo_loss(policy_chosen_long, policy_rejected_long, ref_chosen_short, ref_rejected_short, beta)
    nll_weight = check_finite_number("nll_weight", nll_weight, minimum=0.0)
    if nll_weight:
        pc = _vector("policy_chosen_long", policy_chosen_long)
        nll = -pc if chosen_nll is None else _vector("chosen_nll", chosen_nll, pc.shape[0])
        loss = loss + nll_weight * nll.mean()
    return loss


# ----------------------------------------------------------------------------- objectives over answer groups

OBJECTIVES = ("dpo", "simpo", "logo", "longpo")
NEEDS_REFERENCE = ("dpo", "longpo")
# reference-free objectives compare per-token mean log-probs; DPO-style ones the sums
LENGTH_AVERAGED = ("simpo", "logo")


def preference_loss(objective: str, logps: torch.Tensor, *, ref_logps: Optional[torch.Tensor] = None,
                    beta: float, gamma: float = 0.0, sft_weight: float = 0.0, dpo_lambda: float = 1.0,
                    chosen_nll: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """The loss of `objective` over prompts with several answers each.

    Args:
        logps: ``(B, 1+M)`` the policy's log-probs of each prompt's answers, chosen first:
            summed over answer tokens for "dpo" / "longpo", per-token means for "simpo" / "logo".
        ref_logps: ``(B, 1+M)`` summed reference log-probs ("dpo"; "longpo": taken on the short prompt).
        beta, gamma: reward scale; target margin (simpo, logo).
        sft_weight: weight of the chosen answer's per-token NLL ``chosen_nll`` ``(B,)`` (LOGO's
            lambda; LongPO's NLL term; an RPO-style term for dpo / simpo).
        dpo_lambda: LongPO's weight of its DPO term: ``sft_weight * NLL + dpo_lambda * DPO``.
        reduction: "mean" over prompts, "sum", or "none" ``(B,)``.

    With M > 1 rejected answers, "logo" compares the chosen one with their mean (LOGO eq. 2);
    the pairwise objectives average the M pairs.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_tensor("logps", logps, ndim=2, dtypes=_FLOAT)
    if logps.shape[1] < 2:
        raise ValueError(f"logps must be (B, 1+M) with M >= 1 rejected answers, got {tuple(logps.shape)}")
    beta, gamma = check_finite_number("beta", beta), check_finite_number("gamma", gamma)
    sft_weight = check_finite_number("sft_weight", sft_weight, minimum=0.0)
    dpo_lambda = check_finite_number("dpo_lambda", dpo_lambda, minimum=0.0)
    p = logps.double() if logps.dtype == torch.float64 else logps.float()  # half inputs computed in fp32
    c, r = p[:, :1], p[:, 1:]
    if objective in NEEDS_REFERENCE:
        if ref_logps is None:
            raise ValueError(f"objective {objective!r} needs ref_logps")
        check_tensor("ref_logps", ref_logps, ndim=2, dtypes=_FLOAT)
        if ref_logps.shape != logps.shape:
            raise ValueError(f"ref_logps must have logps' shape {tuple(logps.shape)}, got {tuple(ref_logps.shape)}")
        ref = ref_logps.to(p.dtype)
        per = (-F.logsigmoid(beta * ((c - ref[:, :1]) - (r - ref[:, 1:])))).mean(1)
        if objective == "longpo":
            per = dpo_lambda * per
    elif objective == "logo":
        per = -F.logsigmoid(beta * (c[:, 0] - r.mean(1)) - gamma)
    else:
        per = (-F.logsigmoid(beta * (c - r) - gamma)).mean(1)
    if sft_weight:
        nll = -c[:, 0] if chosen_nll is None else _vector("chosen_nll", chosen_nll, p.shape[0])
        per = per + sft_weight * nll
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def packed_preference_loss(objective: str, answer_logps: torch.Tensor, answer_tokens: torch.Tensor,
                           answers_per_prompt: int, *, ref_logps: Optional[torch.Tensor] = None, beta: float,
                           gamma: float = 0.0, sft_weight: float = 0.0, dpo_lambda: float = 1.0,
                           reduction: str = "mean"):
    """:func:`preference_loss` of prompts packed with their answers, from what the packed row
    gives: ``answer_logps`` ``(B*(1+M),)`` each answer's summed log-prob (``sequence_logprobs``),
    ``answer_tokens`` their target counts, ``answers_per_prompt`` = 1+M. Length-averaged
    objectives compare per-token means; the NLL term is the chosen answer's per-token mean.
    Returns ``(loss, scores)``, scores ``(B, 1+M)`` being what the objective compared (for
    :func:`preference_metric_sums`)."""
    sums = answer_logps.view(-1, answers_per_prompt)
    means = sums / answer_tokens.to(sums.device, sums.dtype).view_as(sums).clamp_min(1.0)
    scores = means if objective in LENGTH_AVERAGED else sums
    loss = preference_loss(objective, scores, ref_logps=ref_logps, beta=beta, gamma=gamma, sft_weight=sft_weight,
                           dpo_lambda=dpo_lambda, chosen_nll=-means[:, 0], reduction=reduction)
    return loss, scores


# the per-step metrics a preference run logs (train.py's metrics.jsonl): sums over prompts here,
# divided by the prompt count once the step's sums are reduced over ranks
PREFERENCE_METRICS = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp", "margin",
                      "pref_accuracy")


@torch.no_grad()
def preference_metric_sums(logps: torch.Tensor, ref_logps: Optional[torch.Tensor] = None,
                           beta: float = 1.0) -> torch.Tensor:
    """``(len(PREFERENCE_METRICS) + 1,)`` float64 sums over the B prompts of ``logps`` ``(B, 1+M)``
    (the objective's log-probs), then the count B. The rejected value is the mean of a prompt's
    rejected answers. With a reference, margin and accuracy are DPO's implicit rewards
    ``beta * (logp - ref)`` (chosen minus the mean rejected; chosen above every rejected); without,
    the log-probs themselves. Reference columns are 0 without one."""
    g = logps.double()
    ref = ref_logps.double() if ref_logps is not None else torch.zeros_like(g)
    score = beta * (g - ref) if ref_logps is not None else g
    c, r = score[:, 0], score[:, 1:]
    return torch.stack([g[:, 0].sum(), g[:, 1:].mean(1).sum(), ref[:, 0].sum(), ref[:, 1:].mean(1).sum(),
                        (c - r.mean(1)).sum(), (c > r.amax(1)).double().sum(), g.new_tensor(float(len(g)))])
