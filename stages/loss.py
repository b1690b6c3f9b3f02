"""DPO-family losses as pure functions of sequence log-prob tensors (no model in here).

Every input is a [B] tensor of summed completion log-probs (see stages/logprobs.py): the policy's and the
reference's log p(chosen | prompt) and log p(rejected | prompt). Notation used in the docstrings:

    π_c, π_r   policy log-probs of the chosen / rejected completion     [B]
    r_c, r_r   reference log-probs of the same completions              [B]
    h          (π_c − r_c) − (π_r − r_r), the difference of log-ratios  [B]

All arithmetic happens in the dtype of the inputs (the tests use float64 and float32); token counts are cast
to that dtype. `F.logsigmoid` is used everywhere a log σ appears, so large |βh| does not overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.errors import UserError

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
_SMOOTHED = ("sigmoid", "robust")  # the loss types for which label_smoothing means something


class LossSettingsError(UserError, ValueError):
    """Bad loss settings (loss type, β, ε, sft weight). A UserError for the CLI and a ValueError for callers."""


@dataclass(frozen=True)
class LossOutput:
    losses: Tensor            # [B] per-example loss (incl. the sft term when sft_weight > 0)
    chosen_rewards: Tensor    # [B] β·(π_c − r_c), detached (ipo: from length-normalised log-probs)
    rejected_rewards: Tensor  # [B] β·(π_r − r_r), detached (ipo: likewise)


def _check_settings(loss_type: str, beta: float, label_smoothing: float, sft_weight: float) -> None:
    """Reject settings that would silently do something other than what was asked."""
    if loss_type not in LOSS_TYPES:
        raise LossSettingsError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise LossSettingsError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise LossSettingsError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in _SMOOTHED:
        raise LossSettingsError(
            f"label_smoothing applies only to loss_type sigmoid or robust, not {loss_type!r}; set it to 0")
    if not sft_weight >= 0:
        raise LossSettingsError(f"sft_weight must be >= 0, got {sft_weight}")


def _per_token(logps: Tensor, tokens: Tensor | None, name: str) -> Tensor:
    """Summed log-probs [B] -> mean log-prob per completion token [B] (token counts must be > 0)."""
    if tokens is None:
        raise ValueError(f"{name} is required here (length normalisation needs completion token counts)")
    tokens = torch.as_tensor(tokens, device=logps.device).to(logps.dtype)
    if tokens.shape != logps.shape:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}, expected {tuple(logps.shape)}")
    return logps / tokens


def sigmoid_loss(h: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """DPO (arXiv 2305.18290, Eq. 7): L = −log σ(β·h), per example.

    β MULTIPLIES the log-ratio difference, as in the paper. Some write-ups state the loss with δ/β, i.e. they
    DIVIDE by β; that is a different function of β, and the two agree only at β = 1. We follow the paper.

    With label smoothing ε > 0 this is conservative DPO (cDPO, Mitchell 2023): the preference label is
    assumed flipped with probability ε, giving L = −(1−ε)·log σ(βh) − ε·log σ(−βh).
    dL/dπ_c = −β·σ(−βh) when ε = 0.
    """
    z = beta * h
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409, the de-biased loss), per example:

        L = ( −(1−ε)·log σ(βh) + ε·log σ(−βh) ) / (1 − 2ε),   0 ≤ ε < 0.5

    an unbiased estimate of the clean DPO loss when labels flip with probability ε. At ε = 0 it equals
    `sigmoid_loss`. Note the + sign on the second term (cDPO has −) and the 1/(1−2ε) factor.
    """
    z = beta * h
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al., arXiv 2310.12036, the empirical IPO loss with τ = β): L = (h − 1/(2β))², per example.

    Here h must be built from LENGTH-NORMALISED log-probs (log p / number of completion tokens), as TRL does;
    `dpo_loss` does that. β is the regulariser τ: the loss pulls h towards 1/(2β).
    """
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023, arXiv 2305.10425, calibration loss with margin 1/β scaled by β):
    L = max(0, 1 − β·h), per example."""
    return torch.relu(1.0 - beta * h)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             sft_weight: float = 0.0, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> LossOutput:
    """Per-example preference losses and rewards from four [B] log-prob tensors.

    loss_type: "sigmoid" (DPO Eq. 7, cDPO when label_smoothing > 0), "robust" (rDPO), "ipo" (length-normalised
    log-probs; needs chosen_tokens and rejected_tokens), "hinge" (SLiC). See the functions above for formulas.
    sft_weight w > 0 adds w·(−π_c / chosen_tokens), the per-token NLL of the chosen completion, to each loss
    (needs chosen_tokens). Rewards are β·(π − r), detached; for ipo they use the normalised log-probs.
    Reduce `losses` yourself (e.g. .mean()); nothing here averages over the batch.
    """
    _check_settings(loss_type, beta, label_smoothing, sft_weight)
    shape = policy_chosen_logps.shape
    for name, t in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":  # IPO works on mean per-token log-probs, rewards too
        pc, rc = _per_token(pc, chosen_tokens, "chosen_tokens"), _per_token(rc, chosen_tokens, "chosen_tokens")
        pr = _per_token(pr, rejected_tokens, "rejected_tokens")
        rr = _per_token(rr, rejected_tokens, "rejected_tokens")
    chosen_logratio, rejected_logratio = pc - rc, pr - rr  # [B] each
    h = chosen_logratio - rejected_logratio                  # [B]
    if loss_type == "sigmoid":
        losses = sigmoid_loss(h, beta, label_smoothing)
    elif loss_type == "robust":
        losses = robust_loss(h, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(h, beta)
    else:
        losses = hinge_loss(h, beta)
    if sft_weight > 0:
        nll = -_per_token(policy_chosen_logps, chosen_tokens, "chosen_tokens")  # [B] per-token NLL of chosen
        losses = losses + sft_weight * nll
    return LossOutput(losses=losses,
                      chosen_rewards=(beta * chosen_logratio).detach(),
                      rejected_rewards=(beta * rejected_logratio).detach())
