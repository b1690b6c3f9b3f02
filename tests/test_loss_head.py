"""The log-prob head's extra sums for the loss family: WPO's Σ_t (log p(y_t) − log Σ_v p(v)²) and LD-DPO's
weighted sums, each against a naive [2B, T, V] full-logits reference on the tiny models, in both layouts (plain
pairs and the shared prompt), and LD-DPO's gradients against autograd through that reference.

Tolerances: fp32 logits in both; the naive side computes the same quantities over the full vocabulary with
`log_softmax` / `logsumexp` in another order, so they agree to fp32 rounding of sums of tens of terms of size
≤ ~20 nats: 1e-5 relative to the largest value (as tests/test_logprobs.py, issue 8).
"""

from __future__ import annotations

import pytest
import torch

from stages.model.logprobs import PairBatch, collate_pairs, sequence_logps, shared_prompt_logps
from tests.test_logprobs import _assert_rel, _encode, _load, _lora

torch.set_num_threads(1)
REL = 1e-5  # see the module docstring


def naive_extras(model, batch: PairBatch, ld_alpha: float) -> dict:
    """Full logits -> per-token log p, log Σ p² -> WPO sums and LD sums (shared length = min of the pair's counts)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()                                   # [2B, T-1, V]
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [2B, T-1]
    log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)                    # log Σ_v p(v)² [2B, T-1]
    mask = batch.score_mask[:, 1:]
    n = mask.sum(-1)
    b = n.shape[0] // 2
    shared = torch.minimum(n[:b], n[b:]).repeat(2)                        # [2B]
    position = mask.long().cumsum(-1) - 1                                 # 0-based index within the reply
    weight = torch.where(position < shared[:, None], 1.0, ld_alpha)
    ld = torch.where(mask, logp * weight, 0.0).double().sum(-1)
    wpo = torch.where(mask, logp - log_sum_sq, 0.0).double().sum(-1)
    return {"ld": ld, "wpo": wpo.detach(), "b": b}


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_wpo_and_ld_sums_match_full_logits(tiny_llama, ld_alpha):
    encoded, pad = _encode(tiny_llama)
    model = _load(tiny_llama)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        want = naive_extras(model, batch, ld_alpha)
        plain = sequence_logps(model, batch, chunk_size=3, ld_alpha=ld_alpha, wpo=True)
        shared = shared_prompt_logps(model, encoded, pad, chunk_size=5, ld_alpha=ld_alpha, wpo=True)
    b = want["b"]
    for got in (plain, shared):
        _assert_rel(torch.cat([got.chosen_ld_logps, got.rejected_ld_logps]), want["ld"], REL, what="LD sums")
        _assert_rel(torch.cat([got.chosen_wpo_logps, got.rejected_wpo_logps]), want["wpo"], REL, what="WPO sums")
    if ld_alpha == 1.0:  # α = 1 is plain DPO: the LD sums are the plain sums
        torch.testing.assert_close(plain.chosen_ld_logps, plain.chosen_logps, rtol=1e-12, atol=0)
    # replies of different lengths in both directions, so the shared length cuts chosen AND rejected somewhere
    assert any(len(e.chosen_ids) > len(e.rejected_ids) for e in encoded[:b])
    assert any(len(e.chosen_ids) < len(e.rejected_ids) for e in encoded[:b])


def test_ld_sums_gradients_match_full_logits(tiny_qwen2):
    """LoRA gradients of an objective of the LD sums: chunked head (checkpointed chunks) vs autograd through the
    naive full logits. WPO sums carry no gradient (TRL computes them under no_grad)."""
    encoded, pad = _encode(tiny_qwen2)
    batch = collate_pairs(encoded, pad)
    grads = []
    for naive in (False, True):
        model = _lora(_load(tiny_qwen2), ["q_proj", "v_proj", "down_proj"])
        model.train()
        if naive:
            ld = naive_extras(model, batch, 0.3)["ld"]
            b = ld.shape[0] // 2
            c, r = ld[:b], ld[b:]
        else:
            out = sequence_logps(model, batch, chunk_size=4, ld_alpha=0.3, wpo=True)
            c, r = out.chosen_ld_logps, out.rejected_ld_logps
            assert not out.chosen_wpo_logps.requires_grad
        (c.sum() - 0.5 * r.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        _assert_rel(grads[0][k], grads[1][k], rel=1e-4, what=k)
