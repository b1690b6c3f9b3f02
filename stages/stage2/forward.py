"""Stage two's one policy forward per micro-batch, and its losses against the cached reference.

Pair rows: one forward over [prompt|chosen|rejected] rows gives each pair's log-probs (`pair_logps`).
Reply sets: one forward over [prompt | reply_1 | ... | reply_K] rows (a prompt over --max-row-tokens: several rows)
gives every reply's log-probs once; each pair of the prompt then reads its two replies, so the pair losses, rewards
and metrics are those of the expanded pair rows holding the same pairs, and the micro-batch's objective is the mean
over its pairs. The batch-level types (aot, sft) take the micro-batch's pairs as their batch. plackett_luce
(objective/ranking.py) is a loss per prompt over all its replies: the objective is the mean over prompts, and each
pair logs its prompt's loss.
"""

from __future__ import annotations

import dataclasses

import torch

from stages.data.replyset import split_rows
from stages.model.logprobs import LogpOutput, pair_logps
from stages.model.replylogps import ld_pair_sums
from stages.model.rowlayout import attention_of, pair_output, pair_rows, reply_logps
from stages.objective.loss import LossOutput
from stages.objective.ranking import ListwiseLoss

NO_ROW_LIMIT = 1 << 40


@dataclasses.dataclass(frozen=True)
class PolicyPass:
    """What one policy forward gives the metrics: losses [P] per pair, the policy's log-probs per pair (LD-DPO sums
    in chosen/rejected with --ld-alpha), the loss head's output and the cached reference values [P] (float64, CPU);
    `objective` is what backward takes (the mean over pairs, or over prompts for a listwise loss); `prompts` the
    micro-batch's prompts (reply sets; 0 for pair rows)."""

    losses: torch.Tensor
    logps: LogpOutput
    loss: LossOutput
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    objective: torch.Tensor
    prompts: int = 0


def policy_forward(model, items: list, pad_id: int, cfg, loss) -> PolicyPass:
    """One forward -> per-pair losses of the run's `loss` against the cached reference (pair rows or reply sets).
    With --ld-alpha the loss, rewards, logps/* and drift use the LD-DPO sums on both sides (as TRL logs them); the
    sft terms use the plain sums. With --use-weighting the head also returns the WPO sums."""
    if items and hasattr(items[0], "pairs"):
        return set_forward(model, items, pad_id, cfg, loss)
    budget, attention = _layout(cfg, model)
    if budget is None and attention == "dense":
        lp = pair_logps(model, [i.enc for i in items], pad_id, cfg.compute.chunk_size, share=cfg.compute.share_prompt,
                        ld_alpha=cfg.loss.ld_alpha, wpo=cfg.loss.use_weighting)
    else:  # --pack / --attention segments: the pairs as rows of two replies
        out = reply_logps(model, pair_rows([i.enc for i in items]), pad_id, cfg.compute.chunk_size,
                          cfg.compute.share_prompt, budget, attention, wpo=cfg.loss.use_weighting,
                          cumulative=cfg.loss.ld_alpha is not None)
        lp = pair_output(out, cfg.loss.ld_alpha)
    plain_chosen = lp.chosen_logps
    if cfg.loss.ld_alpha is not None:
        lp = dataclasses.replace(lp, chosen_logps=lp.chosen_ld_logps, rejected_logps=lp.rejected_ld_logps)
    ref_c = torch.tensor([i.ref_chosen for i in items], dtype=torch.float64)  # on the host: the metrics read them
    ref_r = torch.tensor([i.ref_rejected for i in items], dtype=torch.float64)
    return _losses(loss, lp, ref_c, ref_r, plain_chosen, None)


def set_forward(model, items: list, pad_id: int, cfg, loss) -> PolicyPass:
    """Reply sets (prepare.SetItem): one forward for every reply of the micro-batch's prompts, then the pairs."""
    rows = [row for item in items for row in split_rows(item.enc, cfg.compute.max_row_tokens or NO_ROW_LIMIT)]
    ld, (budget, attention) = cfg.loss.ld_alpha, _layout(cfg, model)
    out = reply_logps(model, rows, pad_id, cfg.compute.chunk_size, cfg.compute.share_prompt, budget, attention,
                      wpo=cfg.loss.use_weighting, cumulative=ld is not None)  # replies numbered in item order
    chosen, rejected, ref_c, ref_r, offset = [], [], [], [], 0
    for item in items:
        for c, r in item.pairs:
            chosen.append(offset + c)
            rejected.append(offset + r)
        ref_c += [p[0] for p in item.pair_ref]
        ref_r += [p[1] for p in item.pair_ref]
        offset += len(item.enc.replies)
    device = out.logps.device
    c_idx, r_idx = (torch.tensor(x, dtype=torch.long, device=device) for x in (chosen, rejected))
    lp = LogpOutput(out.logps[c_idx], out.logps[r_idx], out.tokens[c_idx], out.tokens[r_idx],
                    out.logits_sum[c_idx], out.logits_sum[r_idx])
    if out.wpo_logps is not None:
        lp.chosen_wpo_logps, lp.rejected_wpo_logps = out.wpo_logps[c_idx], out.wpo_logps[r_idx]
    plain_chosen = lp.chosen_logps
    if ld is not None:
        lp.chosen_logps, lp.rejected_logps = ld_pair_sums(out, c_idx, r_idx, ld)
    host = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    listwise = _listwise_inputs(items, out.logps) if isinstance(loss, ListwiseLoss) else None
    return _losses(loss, lp, host(ref_c), host(ref_r), plain_chosen, listwise, prompts=len(items))


def _layout(cfg, model) -> tuple[int | None, str]:
    """(pack budget or None, attention): --pack puts a micro-batch's rows into sequences of at most
    --max-tokens-per-batch tokens (no budget: one sequence); the attention is what setup chose for the model
    (rowlayout.prepare_model), or --attention when the model was not prepared (functions called directly)."""
    attention = attention_of(model) if cfg.compute.attention == "auto" else cfg.compute.attention
    if not cfg.compute.pack:
        return None, attention
    return cfg.schedule.max_tokens_per_batch or NO_ROW_LIMIT, attention


def _listwise_inputs(items: list, policy: torch.Tensor):
    """(policy [R], reference [R], group [R], score [R], groups G, pair -> group [P]) of reply sets."""
    ref, group, score, pair_group = [], [], [], []
    for g, item in enumerate(items):
        ref += list(item.ref)
        group += [g] * len(item.ref)
        score += list(item.enc.scores)
        pair_group += [g] * len(item.pairs)
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=policy.device)  # noqa: E731
    return (policy, as_t(ref, torch.float64), as_t(group, torch.long), as_t(score, torch.float64), len(items),
            as_t(pair_group, torch.long))


def _pair_listwise(lp: LogpOutput, ref_c: torch.Tensor, ref_r: torch.Tensor):
    """Pair rows as prompts of two replies (chosen scored 1, rejected 0): plackett_luce equals sigmoid there."""
    b, device = lp.chosen_logps.shape[0], lp.chosen_logps.device
    groups = torch.arange(b, device=device)
    return (torch.cat([lp.chosen_logps, lp.rejected_logps]), torch.cat([ref_c, ref_r]).to(device),
            groups.repeat(2), torch.cat([torch.ones(b), torch.zeros(b)]).to(device, torch.float64), b, groups)


def _losses(loss, lp: LogpOutput, ref_c, ref_r, plain_chosen, listwise, prompts: int = 0) -> PolicyPass:
    """The loss of `lp` against the cached reference (host tensors ref_c, ref_r [P]); a listwise loss takes the
    reply-level `listwise` inputs (None for pair rows: two-reply prompts)."""
    device = lp.chosen_logps.device
    rc, rr = ref_c.to(device), ref_r.to(device)
    if isinstance(loss, ListwiseLoss):
        policy, ref, group, score, n_groups, pair_group = listwise or _pair_listwise(lp, rc, rr)
        per_prompt = loss(policy, ref, group, score, n_groups)
        rewards = (loss.beta * (lp.chosen_logps - rc)).detach(), (loss.beta * (lp.rejected_logps - rr)).detach()
        out = LossOutput(per_prompt[pair_group], *rewards)
        return PolicyPass(out.losses, lp, out, ref_c, ref_r, per_prompt.mean(), prompts)
    out = loss(lp.chosen_logps, lp.rejected_logps, rc, rr, chosen_tokens=lp.chosen_tokens,
               rejected_tokens=lp.rejected_tokens, chosen_sft_logps=plain_chosen,
               chosen_wpo_logps=lp.chosen_wpo_logps, rejected_wpo_logps=lp.rejected_wpo_logps)
    return PolicyPass(out.losses, lp, out, ref_c, ref_r, out.losses.mean(), prompts)
