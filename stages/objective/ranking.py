"""The listwise DPO loss: Plackett-Luce over all the replies of a prompt at once (issue 23), a pure function of
per-reply log-prob tensors (no model in here), and its callable built once per run.

Inputs are flat over the R replies of a micro-batch, each reply tagged with its prompt (its group). Notation:

    π_i, r_i   policy / reference log-prob of reply i (summed over its tokens)             [R]
    ρ_i        log-ratio π_i − r_i                                                          [R]
    g_i        the prompt (group) of reply i, 0..G−1                                        [R]
    s_i        the score of reply i (higher is better; ranks r arrive as −r)                [R]
    z_i        β·ρ_i, the implicit reward of reply i
    L(i)       the replies reply i beats: {j : g_j = g_i, s_j < s_i}
    β          --beta

All arithmetic happens in the dtype of ρ (the tests use float64 and float32); logsumexp keeps large |βρ| finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stages.objective.lossspec import LISTWISE_LOSSES, parse_loss_spec


def _shapes(rho: Tensor, group: Tensor, score: Tensor) -> None:
    if rho.dim() != 1:
        raise ValueError(f"rho must be one-dimensional [R], got shape {tuple(rho.shape)}")
    for name, t in (("group", group), ("score", score)):
        if t.shape != rho.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(rho.shape)}")


def plackett_luce_loss(rho: Tensor, group: Tensor, score: Tensor, beta: float, n_groups: int | None = None) -> Tensor:
    """Plackett-Luce DPO (Rafailov et al. 2023, arXiv 2305.18290, appendix A.3: the DPO objective under the
    Plackett-Luce model of its Eq. 18): for a prompt whose K replies are ranked τ(1) ≻ ... ≻ τ(K),
    L = −log Π_k exp(z_τ(k)) / Σ_{j ≥ k} exp(z_τ(j)), per prompt.

    Ties: replies of equal score form one tier, and a reply competes only with what it beats, never with its
    tie-mates: L = Σ_i [ logsumexp({z_i} ∪ {z_j : j ∈ L(i)}) − z_i ] over the prompt's replies i. So the lowest
    tier adds 0 (whatever its order, it comes last); with no ties this is exactly Plackett-Luce; at K = 2 it is
    `loss.sigmoid_loss(ρ_c − ρ_r, β)`, and a tied pair gives 0 (ties never pair). The order of the replies in
    the input does not matter, and prompts do not interact.

    rho [R] log-ratios (gradients flow to it), group [R] long (the prompt of each reply, 0..G−1), score [R] finite
    (a NaN ties with everything), beta > 0; n_groups = G (default: max(group) + 1; a prompt with no reply gets 0).
    Returns [G] per-prompt losses, in rho's dtype; reduce them yourself. Builds an [R, R] mask: R is a micro-batch.
    """
    _shapes(rho, group, score)
    if n_groups is None:  # (a device sync: callers that know G pass it)
        n_groups = int(group.max().item()) + 1 if group.numel() else 0
    z = beta * rho
    # the competitors of each reply i (row i): itself and the replies of its prompt with a lower score
    beats = (group[:, None] == group[None, :]) & (score[None, :] < score[:, None])
    field = beats | torch.eye(rho.shape[0], dtype=torch.bool, device=rho.device)
    masked = z[None, :].expand(field.shape).masked_fill(~field, -torch.inf)
    per_reply = torch.logsumexp(masked, dim=1) - z  # ≥ 0; exactly 0 for a reply that beats none
    return torch.zeros(n_groups, dtype=z.dtype, device=z.device).index_add(0, group.to(torch.long), per_reply)


# ------------------------------------------------------------------------------------------------ the callable
@dataclass(frozen=True)
class ListwiseLoss:
    """The listwise loss built once per run by `build_listwise` (settings checked before by `check_loss`);
    calling it gives the [G] per-prompt losses of a micro-batch, times the spec's weight ("plackett_luce*2")."""

    beta: float
    weight: float = 1.0

    def __call__(self, policy: Tensor, reference: Tensor, group: Tensor, score: Tensor, n_groups: int) -> Tensor:
        """policy, reference [R] per-reply log-prob sums (π, r), group [R], score [R] -> [G] losses in policy's
        dtype. Rewards are β·ρ as for the pair losses: compute them from the same ρ where needed."""
        rho = policy - reference.to(policy.dtype)
        loss = plackett_luce_loss(rho, group, score, self.beta, n_groups)
        return loss if self.weight == 1.0 else self.weight * loss


def build_listwise(settings) -> ListwiseLoss:
    """The run's listwise loss, built once. `settings`: any object with the LossSettings attributes (loss: a spec
    naming a LISTWISE_LOSSES type alone, "plackett_luce" or "pl*0.5"; beta), checked before by `check_loss`."""
    spec = parse_loss_spec(settings.loss)
    if len(spec) != 1 or spec[0][0] not in LISTWISE_LOSSES:
        raise ValueError(f"build_listwise needs one listwise loss ({', '.join(LISTWISE_LOSSES)}), got "
                         f"{settings.loss!r}; pair losses are built by loss.build_loss")
    return ListwiseLoss(beta=settings.beta, weight=spec[0][1])
