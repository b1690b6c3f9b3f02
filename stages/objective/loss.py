"""The DPO family as pure functions of sequence log-prob tensors (no model in here): every loss TRL 1.16 computes
against a reference, under TRL's names, with mixtures, f-divergence scores, WPO weights and LD-DPO sums.

Every input is a [B] tensor of summed completion log-probs (see stages/model/logprobs.py): the policy's and the
reference's log p(chosen | prompt) and log p(rejected | prompt). Notation used in the docstrings:

    π_c, π_r   policy log-probs of the chosen / rejected completion               [B]
    r_c, r_r   reference log-probs of the same completions                        [B]
    ρ_c, ρ_r   log-ratios π_c − r_c, π_r − r_r                                    [B]
    s_c, s_r   f-divergence scores f'(ρ) (reverse KL, the default: s = ρ)         [B]
    h          s_c − s_r (reverse KL: the difference of log-ratios)               [B]
    n_c, n_r   completion token counts                                            [B]
    h̄          s_c/n_c − s_r/n_r, the per-token (length-normalised) difference    [B]
    β, ε       --beta, --label-smoothing;  σ the logistic function

A loss is a mixture: ((type, weight), ...) from the one-string syntax "sigmoid*0.8+bco_pair*0.2+sft" (weight 1
when left out; YAML also takes a mapping {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}). Its value per example is
Σ weight·loss_type, each term times the WPO weight when weighting is on; TRL's `loss_type` list + `loss_weights`.

All arithmetic happens in the dtype of the inputs (the tests use float64 and float32); token counts are cast
to that dtype. `F.logsigmoid` is used everywhere a log σ appears, so large |βh| does not overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.objective.lossspec import (  # noqa: F401  (re-exported: the loss names and settings live there, without torch)
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    SMOOTHED,
    LossSettingsError,
    LossSpec,
    LossSpec_,
    canonical_loss,
    check_loss,
    format_loss_spec,
    loss_slug,
    parse_loss_spec,
)


@dataclass(frozen=True)
class LossOutput:
    losses: Tensor            # [B] per-example loss: Σ weight·term (+ the sft_weight term); mean it yourself
    chosen_rewards: Tensor    # [B] β·ρ_c, detached (TRL's definition, for every loss type)
    rejected_rewards: Tensor  # [B] β·ρ_r, detached
    components: dict[str, Tensor] = field(default_factory=dict)  # type -> [B] its term (WPO-weighted), unweighted


# ------------------------------------------------------------------------------------------ f-divergences
def f_scores(logratio: Tensor, f_divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """f-DPO (Wang et al. 2023, arXiv 2309.16240, Table 1): the score f'(u) at u = π/π_ref = exp(ρ), per example.

    reverse_kl: ρ (plain DPO);  forward_kl: 1 − e^{−ρ};  js_divergence: log 2 + log σ(ρ);
    alpha_divergence: (e^{(α−1)ρ} − 1)/(α−1), with (α−1)ρ clamped at 80 as TRL does (ρ itself at α → 1).
    """
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if abs(alpha - 1.0) < 1e-6:  # the limit is log u = ρ
        return logratio
    t = ((alpha - 1.0) * logratio).clamp(max=80.0)
    return (torch.exp(t) - 1.0) * (1.0 / (alpha - 1.0))


# ------------------------------------------------------------------------------------------------ the losses
def sigmoid_loss(h: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """DPO (arXiv 2305.18290, Eq. 7): L = −log σ(β·h), per example.

    β MULTIPLIES the log-ratio difference, as in the paper. Some write-ups state the loss with δ/β, i.e. they
    DIVIDE by β; that is a different function of β, and the two agree only at β = 1. We follow the paper.

    With label smoothing ε > 0 this is conservative DPO (cDPO, Mitchell 2023): the preference label is
    assumed flipped with probability ε, giving L = −(1−ε)·log σ(βh) − ε·log σ(−βh). (TRL 1.16's sigmoid ignores
    ε; ours keeps cDPO, so sigmoid equals TRL's only at ε = 0.)  dL/dπ_c = −β·σ(−βh) when ε = 0.
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


def ipo_loss(h_norm: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17, τ = β): L = (h̄ − 1/(2β))², per example.

    h̄ is built from LENGTH-NORMALISED scores (s / completion tokens), as TRL does (confirmed by the IPO
    authors as the form behind the paper's results). The loss pulls h̄ towards 1/(2β).
    """
    return (h_norm - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023, arXiv 2305.10425, calibration loss with margin 1/β scaled by β):
    L = max(0, 1 − β·h), per example."""
    return torch.relu(1.0 - beta * h)


def exo_pair_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, Eq. 16): KL(q ‖ p) over {chosen, rejected} with
    q = (σ(βh), σ(−βh)) and the smoothed label p = (1−ε, ε), ε > 0 (the paper suggests 1e-3):
    L = σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)."""
    z = beta * h
    log_pw, log_pl = math.log1p(-eps), math.log(eps)
    return torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)


def nca_pair_loss(rho_c: Tensor, rho_r: Tensor, beta: float) -> Tensor:
    """NCA (Chen et al. 2024, Noise Contrastive Alignment, arXiv 2402.05369, pairwise form), with the absolute
    rewards βρ: L = −log σ(βρ_c) − ½·log σ(−βρ_c) − ½·log σ(−βρ_r)."""
    zc, zr = beta * rho_c, beta * rho_r
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


def bco_pair_loss(rho_c: Tensor, rho_r: Tensor, beta: float) -> Tensor:
    """BCO on pairs (Jung et al. 2024, Binary Classifier Optimization, arXiv 2404.04656): chosen classified as
    good, rejected as bad, from the absolute rewards: L = −log σ(βρ_c) − log σ(−βρ_r). (TRL 1.16 has no reward
    shift δ here, so neither do we.)"""
    return -F.logsigmoid(beta * rho_c) - F.logsigmoid(-beta * rho_r)


def sppo_hard_loss(rho_c: Tensor, rho_r: Tensor, beta: float) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 for the winner, 0 for the
    loser): L = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²."""
    return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2


def aot_loss(pi_diff: Tensor, ref_diff: Tensor, beta: float, eps: float) -> Tensor:
    """AOT paired (Melnyk et al. 2024, Distributional Preference Alignment via Optimal Transport, arXiv
    2406.05882): sort the batch's π_c − π_r and r_c − r_r separately, pair them by rank, d = sorted(π_c − π_r) −
    sorted(r_c − r_r); L = −(1−ε)·log σ(βd) − ε·log σ(−βd). BATCH-LEVEL: entry i belongs to rank i, not to
    example i (only the mean means something); each process sorts its own micro-batch, so the loss changes
    with --batch-size, gradient accumulation and the number of processes (as in TRL, which sorts per device)."""
    d = torch.sort(pi_diff, dim=0).values - torch.sort(ref_diff, dim=0).values
    return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps


def aot_unpaired_loss(rho_c: Tensor, rho_r: Tensor, beta: float, eps: float) -> Tensor:
    """AOT unpaired (arXiv 2406.05882): d = sorted(ρ_c) − sorted(ρ_r) over the micro-batch (chosen and rejected
    as two distributions); L = −(1−ε)·log σ(βd) − ε·log σ(−βd). BATCH-LEVEL, like `aot_loss`."""
    d = torch.sort(rho_c, dim=0).values - torch.sort(rho_r, dim=0).values
    return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps


def apo_zero_loss(rho_c: Tensor, rho_r: Tensor, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Anchored Preference Optimization, arXiv 2408.06266, Eq. 7): raise
    chosen, lower rejected, each anchored at the reference: L = 1 − σ(βρ_c) + σ(βρ_r). For chosen replies better
    than the model's own outputs."""
    return 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)


def apo_down_loss(rho_c: Tensor, rho_r: Tensor, beta: float) -> Tensor:
    """APO-down (arXiv 2408.06266, Eq. 8): lower both, the rejected more: L = σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r)).
    For chosen replies worse than the model's own outputs."""
    return torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(beta * (rho_c - rho_r))


def discopop_loss(h: Tensor, beta: float, tau: float) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, Eq. 5), z = βh:
    L = (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z}; τ = --discopop-tau (paper and TRL default 0.05)."""
    z = beta * h
    m = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sigmoid_norm_loss(h_norm: Tensor, beta: float) -> Tensor:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024, arXiv 2411.15124, "DPO-norm"): L = −log σ(β·h̄),
    with h̄ the difference of per-token scores."""
    return -F.logsigmoid(beta * h_norm)


def sft_loss(pi_c: Tensor, n_c: Tensor) -> Tensor:
    """TRL's `sft` term (the NLL of MPO, Wang et al. 2024, arXiv 2411.10442; RPO, Pang et al. 2024, arXiv
    2404.19733): the mean NLL over ALL chosen tokens of the micro-batch, −Σ_i π_c,i / Σ_i n_c,i, the same value
    for every example. BATCH-LEVEL: a long reply weighs more than a short one, and the value is per micro-batch
    and per process (TRL likewise). `--sft-weight` is the other convention: see `dpo_loss`."""
    return (-pi_c.sum() / n_c.sum()).expand(pi_c.shape[0])


def wpo_weights(chosen_wpo_logps: Tensor, rejected_wpo_logps: Tensor, n_c: Tensor, n_r: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, arXiv 2406.11827, Eq. 2 with the sampling-aligned probabilities), per pair:
    w = exp(mean_t [log p(y_t) − log Σ_v p(v)²]) of the chosen reply × the same of the rejected, detached.
    Inputs are the per-reply sums Σ_t (log p(y_t) − log Σ_v p(v)²) computed in the chunked head."""
    with torch.no_grad():
        return torch.exp(chosen_wpo_logps / n_c.clamp(min=1)) * torch.exp(rejected_wpo_logps / n_r.clamp(min=1))


def ld_token_weights(position: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, Length Desensitization in DPO, arXiv 2409.06411, Eq. 9): a reply's log-prob is
    Σ_{t ≤ l_s} log p_t + α·Σ_{t > l_s} log p_t with l_s = min(n_c, n_r), the pair's shared length; as token
    weights: 1 where position < l_s (0-based), α after. Used for the policy (logprobs.py) and reference (prepare.py)."""
    return torch.where(position < shared, torch.ones((), dtype=torch.float64), torch.full((), float(alpha),
                                                                                              dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Term:
    """One loss type: its function, the prepared values it takes first, in argument order (h, h_norm, rho_c, rho_r,
    pi_diff, ref_diff, sft_c, n_c: see `DPOLoss.values` and `_PER_TERM`), then the settings it takes (beta: β,
    eps: ε = label_smoothing, tau: discopop_tau)."""

    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    params: tuple[str, ...] = ("beta",)


_H, _H_NORM, _RHO = ("h",), ("h_norm",), ("rho_c", "rho_r")
TERMS: dict[str, Term] = {  # every LOSS_TYPES name, in that order
    "sigmoid": Term(sigmoid_loss, _H, ("beta", "eps")),
    "hinge": Term(hinge_loss, _H),
    "ipo": Term(ipo_loss, _H_NORM),
    "exo_pair": Term(exo_pair_loss, _H, ("beta", "eps")),
    "nca_pair": Term(nca_pair_loss, _RHO),
    "robust": Term(robust_loss, _H, ("beta", "eps")),
    "bco_pair": Term(bco_pair_loss, _RHO),
    "sppo_hard": Term(sppo_hard_loss, _RHO),
    "aot": Term(aot_loss, ("pi_diff", "ref_diff"), ("beta", "eps")),
    "aot_unpaired": Term(aot_unpaired_loss, _RHO, ("beta", "eps")),
    "apo_zero": Term(apo_zero_loss, _RHO),
    "apo_down": Term(apo_down_loss, _RHO),
    "discopop": Term(discopop_loss, _H, ("beta", "tau")),
    "sft": Term(sft_loss, ("sft_c", "n_c"), ()),
    "sigmoid_norm": Term(sigmoid_norm_loss, _H_NORM),
}


# ------------------------------------------------------------------------------------------------ the loss
def _tokens(tokens: Tensor | None, like: Tensor, name: str) -> Tensor:
    if tokens is None:
        raise ValueError(f"{name} is required here (length normalisation needs completion token counts)")
    tokens = torch.as_tensor(tokens, device=like.device).to(like.dtype)
    if tokens.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}, expected {tuple(like.shape)}")
    return tokens


def _check_shapes(policy_chosen_logps: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.shape != policy_chosen_logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(policy_chosen_logps.shape)}")


@dataclass(frozen=True)
class DPOLoss:
    """A loss mixture built once per run by `build_loss` (its spec parsed, each term bound to its settings, which
    were checked before); calling it computes a LossOutput per micro-batch with no parsing or checking."""

    terms: tuple[tuple[str, float, Term, tuple[float, ...]], ...]  # (type, weight, its Term, its settings' values)
    beta: float
    sft_weight: float
    f_divergence: str
    f_alpha: float
    use_weighting: bool          # WPO: every term times `wpo_weights`
    needs: frozenset[str]        # the prepared values the terms read
    wants_n_c: bool              # chosen_tokens: h_norm, WPO, the sft terms, sft_weight
    wants_n_r: bool              # rejected_tokens: h_norm, WPO

    def __call__(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, chosen_tokens: Tensor | None = None,
                 rejected_tokens: Tensor | None = None, chosen_sft_logps: Tensor | None = None,
                 chosen_wpo_logps: Tensor | None = None, rejected_wpo_logps: Tensor | None = None) -> LossOutput:
        """Per-example losses and rewards from four [B] log-prob tensors (π_c, π_r, r_c, r_r). The token counts
        (n_c, n_r) are required when `wants_n_c` / `wants_n_r`; chosen_sft_logps (default π_c) feeds the sft
        terms; the WPO sums are required with use_weighting and ignored without. See `dpo_loss` for the rest."""
        pi_c, pi_r, r_c, r_r = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        _check_shapes(pi_c, policy_rejected_logps=pi_r, ref_chosen_logps=r_c, ref_rejected_logps=r_r)
        n_c = _tokens(chosen_tokens, pi_c, "chosen_tokens") if self.wants_n_c else None
        n_r = _tokens(rejected_tokens, pi_c, "rejected_tokens") if self.wants_n_r else None
        rho_c, rho_r = pi_c - r_c, pi_r - r_r  # [B] each
        sft_c = pi_c if chosen_sft_logps is None else chosen_sft_logps
        v = self.values(pi_c, pi_r, r_c, r_r, rho_c, rho_r, n_c, n_r, sft_c)
        weights = None
        if self.use_weighting:
            if chosen_wpo_logps is None:
                raise ValueError("chosen_wpo_logps is required with use_weighting")
            if rejected_wpo_logps is None:
                raise ValueError("rejected_wpo_logps is required with chosen_wpo_logps")
            weights = wpo_weights(chosen_wpo_logps.to(rho_c.dtype), rejected_wpo_logps.to(rho_c.dtype), n_c, n_r)
        losses, components = torch.zeros_like(rho_c), {}
        for name, w, term, params in self.terms:
            value = term.fn(*(v[k] if k in v else _PER_TERM[k](v) for k in term.inputs), *params)
            if weights is not None:
                value = value * weights
            components[name] = value
            losses = losses + w * value
        if self.sft_weight > 0:
            losses = losses + self.sft_weight * (-sft_c / n_c)  # [B] per-token NLL of each chosen reply
        return LossOutput(losses=losses, chosen_rewards=(self.beta * rho_c).detach(),
                          rejected_rewards=(self.beta * rho_r).detach(), components=components)

    def values(self, pi_c: Tensor, pi_r: Tensor, r_c: Tensor, r_r: Tensor, rho_c: Tensor, rho_r: Tensor,
               n_c: Tensor | None, n_r: Tensor | None, sft_c: Tensor) -> dict[str, Tensor | None]:
        """The values the terms share: π and r (pi_c, pi_r, r_c, r_r), rho_c, rho_r, n_c, n_r, sft_c (the chosen sums
        the sft terms read), and when a term reads h or h_norm the f-divergence scores s = f_scores(ρ) (s_c, s_r)
        and h = s_c − s_r. `_PER_TERM` makes the rest."""
        v = {"pi_c": pi_c, "pi_r": pi_r, "r_c": r_c, "r_r": r_r, "rho_c": rho_c, "rho_r": rho_r, "n_c": n_c, "n_r": n_r,
             "sft_c": sft_c}
        if "h" in self.needs or "h_norm" in self.needs:
            f, alpha = self.f_divergence, self.f_alpha
            v["s_c"], v["s_r"] = f_scores(rho_c, f, alpha), f_scores(rho_r, f, alpha)
            v["h"] = v["s_c"] - v["s_r"]
        return v


# inputs made afresh for each term that reads them (from `DPOLoss.values`), so that ipo and sigmoid_norm in one
# mixture each have their own graph (their gradients sum exactly as when each type is computed on its own)
_PER_TERM: dict[str, Callable[[dict], Tensor]] = {
    "h_norm": lambda v: v["s_c"] / v["n_c"].clamp(min=1) - v["s_r"] / v["n_r"].clamp(min=1),
    "pi_diff": lambda v: v["pi_c"] - v["pi_r"],
    "ref_diff": lambda v: v["r_c"] - v["r_r"],
}


def build_loss(settings) -> DPOLoss:
    """The run's loss, built once (as in a trainer's setup). `settings`: any object with the LossSettings attributes
    loss (a spec: "sigmoid*0.8+bco_pair*0.2+sft", a mapping or pairs), beta, label_smoothing, sft_weight,
    f_divergence, f_alpha, discopop_tau, use_weighting, ld_alpha, checked once before (`check_loss`: the settings'
    group checks itself; `dpo_loss` checks its arguments); ld_alpha is unused here: the LD-DPO sums come with the
    log-probs."""
    s = settings
    knobs = {"beta": s.beta, "eps": s.label_smoothing, "tau": s.discopop_tau}
    terms = tuple((name, w, TERMS[name], tuple(knobs[p] for p in TERMS[name].params))
                  for name, w in parse_loss_spec(s.loss))  # the spec parsed once
    needs = frozenset(k for _, _, term, _ in terms for k in term.inputs)
    wants_n_r = "h_norm" in needs or s.use_weighting  # n_r: normalised scores, WPO weights
    return DPOLoss(terms, s.beta, s.sft_weight, s.f_divergence, s.f_alpha, s.use_weighting, needs,
                   wants_n_c=wants_n_r or "n_c" in needs or s.sft_weight > 0, wants_n_r=wants_n_r)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             loss_type="sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             sft_weight: float = 0.0, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None, f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
             discopop_tau: float = 0.05, chosen_wpo_logps: Tensor | None = None,
             rejected_wpo_logps: Tensor | None = None, chosen_sft_logps: Tensor | None = None) -> LossOutput:
    """`build_loss` and one call in one: per-example losses and rewards of a loss mixture from four [B] log-prob
    tensors (π_c, π_r, r_c, r_r). A training loop builds the loss once instead.

    loss_type: a LOSS_TYPES name or a mixture ("sigmoid*0.8+bco_pair*0.2+sft", a mapping, or parsed pairs); each
    term is one function above (TERMS). chosen_tokens / rejected_tokens (n_c, n_r) are needed by ipo, sigmoid_norm,
    sft, sft_weight and WPO. f_divergence / f_alpha replace ρ by the score f'(e^ρ) where a term uses h (f_scores).
    WPO (--use-weighting): give chosen_wpo_logps / rejected_wpo_logps; every term is multiplied by `wpo_weights`.
    LD-DPO: pass LD-weighted sums as π and r (ld_token_weights), and the plain sum of the chosen reply as
    chosen_sft_logps, which the sft terms use (as TRL's sft uses the unweighted per-token log-probs).
    sft_weight w > 0 adds w·(−π_c / n_c), the per-token NLL of EACH chosen reply (our older convention, a mean over
    examples; the `sft` type is TRL's mean over all chosen tokens of the batch), not WPO-weighted.
    Rewards are β·ρ for every type (TRL's; ipo too). Reduce `losses` yourself (e.g. .mean()).
    """
    settings = SimpleNamespace(loss=format_loss_spec(loss_type), beta=beta, label_smoothing=label_smoothing,
                               sft_weight=sft_weight, f_divergence=f_divergence, f_alpha=f_alpha,
                               discopop_tau=discopop_tau, use_weighting=chosen_wpo_logps is not None, ld_alpha=None)
    check_loss(settings)
    loss = build_loss(settings)
    return loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, chosen_sft_logps=chosen_sft_logps,
                chosen_wpo_logps=chosen_wpo_logps, rejected_wpo_logps=rejected_wpo_logps)
