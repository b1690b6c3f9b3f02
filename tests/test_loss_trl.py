"""Parity with TRL 1.16 itself: our `dpo_loss` (and the LD-DPO / WPO sums of logprobs.py and prepare.py) against
TRL's own `DPOTrainer._compute_loss` run on the same float64 tensors.

TRL's loss code lives inside `_compute_loss(self, model, inputs)`, which reads per-token log-probs from the model's
fused LM head. We call that method unchanged with a stand-in `self` (only the attributes it reads) and a stand-in
model returning our random per-token log-probs; nothing of TRL's formulas is re-typed here. Both sides then see the
same numbers, so in float64 the only differences are rounding in a different order of additions: ≤ 1e-9
(relative to max(1, |value|)) is many orders above that (~1e-15 · the number of terms), and far below any formula
difference.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from stages.model.logprobs import ld_sums
from stages.objective.loss import F_DIVERGENCE_LOSSES, LOSS_TYPES, SMOOTHED, dpo_loss, format_loss_spec, parse_loss_spec
from stages.stage2.prepare import ld_reference

trl_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
DPOTrainer = trl_trainer.DPOTrainer
F64 = torch.float64
TOL = 1e-9
BETAS = (0.05, 0.5, 3.0)


# ------------------------------------------------------------------------------------------- the two sides
def random_batch(b: int, t: int, seed: int, dtype=F64) -> dict:
    """Completion masks [2B, T] (chosen rows then rejected rows, prompts of 1-3 tokens, replies of >= 1 token) and
    per-token log-probs [2B, T-1] of policy and reference (zero off the completion, as TRL's head returns), plus
    random log Σ_v p(v)^2 for WPO (<= log p, as a distribution forces: Σ p² >= p(y)² ... any value works here)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        p = int(torch.randint(1, 4, (), generator=g))
        n = int(torch.randint(1, t - p + 1, (), generator=g))
        mask[i, p:p + n] = 1
    shift = mask[:, 1:].to(dtype)
    policy = -3.0 * torch.rand(2 * b, t - 1, generator=g, dtype=dtype) * shift
    ref = (policy - torch.randn(2 * b, t - 1, generator=g, dtype=dtype) * 0.3).clamp(max=0) * shift
    log_sum_sq = -2.0 * torch.rand(2 * b, t - 1, generator=g, dtype=dtype)
    return {"mask": mask, "policy": policy, "ref": ref, "log_sum_sq": log_sum_sq, "b": b}


def trl(batch: dict, loss_types, weights=None, *, beta=0.1, eps=0.0, f_divergence="reverse_kl", f_alpha=0.5,
        tau=0.05, use_weighting=False, ld_alpha=None) -> tuple[float, dict]:
    """TRL 1.16's `_compute_loss` on the batch: (loss, its logged metrics). The reference comes from a stand-in
    reference model, so TRL applies LD-DPO to both sides itself."""
    def head_outputs(per_token):
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, aux_loss=None,
                                     is_top1=zeros.bool(), log_sum_sq_probs=batch["log_sum_sq"])

    policy_model = lambda **kw: head_outputs(batch["policy"])  # noqa: E731
    ref_model = lambda **kw: head_outputs(batch["ref"])  # noqa: E731
    policy_module = torch.nn.Module()  # what `self.model` must be for TRL's checks (training mode, no PEFT)
    policy_module.is_gradient_checkpointing = False
    fake = types.SimpleNamespace(
        model=policy_module, ref_model=ref_model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x),
        args=types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, precompute_ref_logps=False, ld_alpha=ld_alpha, f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_alpha, loss_types=list(loss_types), loss_weights=weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=eps, use_weighting=use_weighting, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    mask = batch["mask"]
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = DPOTrainer._compute_loss(fake, policy_model, inputs, False)
    return float(loss), {k: v[0] for k, v in fake._metrics["train"].items()}


def ours(batch: dict, spec, *, beta=0.1, eps=0.0, f_divergence="reverse_kl", f_alpha=0.5, tau=0.05,
         use_weighting=False, ld_alpha=None):
    """Our side: the per-reply sums our head delivers (plain, LD-DPO via logprobs.ld_sums, WPO), the reference
    from per-token lists as prepare.py reads them from a cache, then `dpo_loss`."""
    b, shift = batch["b"], batch["mask"][:, 1:].bool()
    rows, pos = shift.nonzero(as_tuple=True)  # the token order sequence_logps scores in
    token_logps = batch["policy"][rows, pos]
    sums = batch["policy"].sum(1)
    counts = shift.sum(1)
    if ld_alpha is None:
        pol, ref = sums, batch["ref"].sum(1)
    else:
        pol = ld_sums(rows, token_logps, 2 * b, ld_alpha)
        lists = [batch["ref"][i][shift[i]].tolist() for i in range(2 * b)]
        pairs = [ld_reference(lists[i], lists[b + i], ld_alpha) for i in range(b)]
        ref = torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], dtype=sums.dtype)
    wpo = {}
    if use_weighting:
        aligned = ((batch["policy"] - batch["log_sum_sq"]) * shift).sum(1)
        wpo = {"chosen_wpo_logps": aligned[:b], "rejected_wpo_logps": aligned[b:]}
    out = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], loss_type=spec, beta=beta, label_smoothing=eps,
                   chosen_tokens=counts[:b], rejected_tokens=counts[b:], f_divergence=f_divergence, f_alpha=f_alpha,
                   discopop_tau=tau, chosen_sft_logps=sums[:b], **wpo)
    return out, pol


def assert_same(batch, spec, **kw):
    """Loss, rewards, margins, accuracies and logps of both sides on one batch."""
    components = parse_loss_spec(spec)
    theirs, metrics = trl(batch, [n for n, _ in components], [w for _, w in components], **kw)
    out, pol = ours(batch, spec, **kw)
    b = batch["b"]
    pairs = {"loss": (out.losses.mean(), theirs),
             "rewards/chosen": (out.chosen_rewards.mean(), metrics["rewards/chosen"]),
             "rewards/rejected": (out.rejected_rewards.mean(), metrics["rewards/rejected"]),
             "rewards/margins": ((out.chosen_rewards - out.rejected_rewards).mean(), metrics["rewards/margins"]),
             "logps/chosen": (pol[:b].mean(), metrics["logps/chosen"]),
             "logps/rejected": (pol[b:].mean(), metrics["logps/rejected"])}
    for key, (mine, want) in pairs.items():
        tol = TOL * max(1.0, abs(want)) + (exo_float32_slack(components, kw.get("eps", 0.0)) if key == "loss" else 0)
        assert abs(float(mine) - want) <= tol, (spec, kw, key, float(mine), want)
    accuracy = float((out.chosen_rewards > out.rejected_rewards).double().mean())
    assert accuracy == pytest.approx(metrics["rewards/accuracies"], abs=1e-7)  # TRL logs it as float32
    return out


def exo_float32_slack(components, eps: float) -> float:
    """TRL's exo_pair takes log ε and log(1 − ε) of `torch.tensor(ε)`, a float32 tensor, so its loss carries each
    constant rounded to float32 (≤ 2^-24 relative, after ε itself is rounded: 2^-24 more on log ε's argument);
    the two weights σ(βh) + σ(−βh) = 1, so the loss moves by at most this much. Ours uses the exact constants."""
    w = sum(wt for n, wt in components if n == "exo_pair")
    if not w:
        return 0.0
    return w * 2 ** -24 * (abs(math.log(eps)) + abs(math.log1p(-eps)) + 2.0)


def eps_values(name: str) -> tuple[float, ...]:
    if name == "exo_pair":
        return (1e-3, 0.2)  # EXO needs ε > 0
    if name in SMOOTHED and name != "sigmoid":  # sigmoid + ε is cDPO here, plain DPO in TRL: see the test below
        return (0.0, 0.1, 0.3)
    return (0.0,)


# ----------------------------------------------------------------------------------------------- each type
@pytest.mark.parametrize("name", LOSS_TYPES)
def test_each_loss_type_equals_trl(name):
    for seed, (b, t) in enumerate([(1, 6), (5, 9), (8, 12)]):
        batch = random_batch(b, t, seed)
        for beta in BETAS:
            for eps in eps_values(name):
                assert_same(batch, name, beta=beta, eps=eps)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_tau_equals_trl(tau):
    assert_same(random_batch(6, 10, 3), "discopop", beta=0.7, tau=tau)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
def test_f_divergences_equal_trl(name, f_divergence):
    eps = 1e-3 if name == "exo_pair" else 0.1 if name == "robust" else 0.0
    for seed, beta in enumerate(BETAS):
        assert_same(random_batch(5, 9, 10 + seed), name, beta=beta, eps=eps, f_divergence=f_divergence)


@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
def test_alpha_divergence_equals_trl_in_float32(name):
    """TRL 1.16's alpha_divergence has clamp limits for fp16/bf16/fp32 only (float64 raises KeyError there), so this
    one runs in float32 on both sides: the same operations in the same order, so they agree to a few float32
    roundings of values of size ~ max(1, |loss|): 1e-5 relative is 80 ulps."""
    eps = 1e-3 if name == "exo_pair" else 0.1 if name == "robust" else 0.0
    for seed, f_alpha in enumerate((0.3, 0.5, 1.0, 1.5)):
        batch = random_batch(5, 9, 20 + seed, dtype=torch.float32)
        theirs, metrics = trl(batch, [name], beta=0.5, eps=eps, f_divergence="alpha_divergence", f_alpha=f_alpha)
        out, _ = ours(batch, name, beta=0.5, eps=eps, f_divergence="alpha_divergence", f_alpha=f_alpha)
        assert float(out.losses.mean()) == pytest.approx(theirs, rel=1e-5, abs=1e-5)
        assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------- WPO and LD
@pytest.mark.parametrize("name", [n for n in LOSS_TYPES if n not in ("aot", "aot_unpaired", "sft")])
def test_wpo_weighting_equals_trl(name):
    for seed, beta in enumerate(BETAS):
        assert_same(random_batch(5, 9, 30 + seed), name, beta=beta, eps=eps_values(name)[-1], use_weighting=True)


def test_wpo_with_sft_trl_crashes_ours_weights_the_batch_term():
    """TRL 1.16 multiplies the expanded sft tensor in place and raises; ours weights the batch term per pair,
    what TRL computes once that tensor is cloned: mean_i(NLL_batch · w_i)."""
    batch = random_batch(4, 8, 40)
    with pytest.raises(RuntimeError, match="memory location"):
        trl(batch, ["sft"], use_weighting=True)
    weighted, _ = ours(batch, "sft", use_weighting=True)
    plain, _ = ours(batch, "sft")
    b, shift = batch["b"], batch["mask"][:, 1:].bool()
    mean_logp = ((batch["policy"] - batch["log_sum_sq"]) * shift).sum(1) / shift.sum(1)
    w = torch.exp(mean_logp[:b]) * torch.exp(mean_logp[b:])
    assert torch.allclose(weighted.losses, plain.losses * w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sigmoid_norm", "sft", "bco_pair", "aot", "apo_down"])
def test_ld_dpo_equals_trl(name, ld_alpha):
    """LD-DPO on both sides (policy: logprobs.ld_sums; reference: prepare.ld_reference from per-token lists)."""
    for seed, beta in enumerate(BETAS):
        assert_same(random_batch(6, 11, 50 + seed), name, beta=beta, ld_alpha=ld_alpha)


def test_ld_and_wpo_and_mixture_together():
    assert_same(random_batch(6, 11, 60), "sigmoid*0.8+bco_pair*0.2+sft", beta=0.2, ld_alpha=0.5)
    assert_same(random_batch(6, 11, 61), "ipo*0.5+robust*2", beta=0.2, eps=0.1, ld_alpha=0.2, use_weighting=True,
                f_divergence="js_divergence")


# ------------------------------------------------------------------------------------------------- mixtures
@pytest.mark.parametrize("spec", ["sigmoid*0.8+bco_pair*0.2+sft", "sigmoid+sft", "hinge*0.5+ipo*0.25+nca_pair",
                                  "aot*0.3+apo_zero*1.7+sppo_hard*0.01", "exo_pair+discopop+sigmoid_norm*3",
                                  "robust+aot_unpaired+apo_down"])
def test_mixtures_equal_trl(spec):
    for seed, beta in enumerate(BETAS):
        eps = 0.1 if any(n in ("exo_pair", "robust") for n, _ in parse_loss_spec(spec)) else 0.0
        out = assert_same(random_batch(7, 10, 70 + seed), spec, beta=beta, eps=eps)
        if len(parse_loss_spec(spec)) > 1:  # the per-type terms, weighted, add up to the loss
            total = sum(w * out.components[n] for n, w in parse_loss_spec(spec))
            assert torch.allclose(total, out.losses, rtol=1e-12, atol=1e-12)


def test_mixture_syntax_round_trip():
    assert parse_loss_spec("sigmoid*0.8+bco_pair*0.2+sft") == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    assert parse_loss_spec({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}) == parse_loss_spec(
        " sigmoid * 0.8 + bco_pair*0.2 + sft ")
    assert format_loss_spec({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1}) == "sigmoid*0.8+bco_pair*0.2+sft"
    assert format_loss_spec("ipo*2+sft*1e-05") == "ipo*2+sft*1e-05"


# ------------------------------------------------------------------------------------ the documented differences
def test_sigmoid_label_smoothing_is_cdpo_here_and_ignored_by_trl():
    """Issue 14, 5b: ε with sigmoid is conservative DPO here (kept on purpose); TRL 1.16's sigmoid ignores ε."""
    batch = random_batch(5, 9, 80)
    theirs_eps, _ = trl(batch, ["sigmoid"], beta=0.5, eps=0.2)
    theirs_plain, _ = trl(batch, ["sigmoid"], beta=0.5)
    assert theirs_eps == theirs_plain
    ours_eps, _ = ours(batch, "sigmoid", beta=0.5, eps=0.2)
    ours_plain, _ = ours(batch, "sigmoid", beta=0.5)
    assert abs(float(ours_plain.losses.mean()) - theirs_plain) <= TOL
    h = (ours_plain.chosen_rewards - ours_plain.rejected_rewards) / 0.5
    cdpo = -0.8 * torch.nn.functional.logsigmoid(0.5 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.5 * h)
    assert torch.allclose(ours_eps.losses, cdpo, rtol=1e-12, atol=0)


def test_sft_weight_is_per_example_sft_type_is_trls_token_mean():
    """Issue 14, 5c: `sft` = TRL's NLL over all chosen tokens of the batch (equal to TRL above); --sft-weight w
    adds w · mean over pairs of each reply's per-token NLL. Chosen replies of 1 and 3 tokens: NLL sums 2 and 9."""
    pc, n = torch.tensor([-2.0, -9.0], dtype=F64), torch.tensor([1, 3])
    zero = torch.zeros(2, dtype=F64)
    trl_style = dpo_loss(pc, zero, pc, zero, loss_type="sft", chosen_tokens=n, rejected_tokens=n)
    assert trl_style.losses.tolist() == pytest.approx([11 / 4, 11 / 4], abs=1e-12)  # (2 + 9) / (1 + 3)
    per_example = dpo_loss(pc, zero, pc, zero, loss_type="sigmoid", sft_weight=1.0, chosen_tokens=n)
    assert (per_example.losses - math.log(2)).tolist() == pytest.approx([2.0, 3.0], abs=1e-12)  # 2/1, 9/3
    assert float((per_example.losses - math.log(2)).mean()) == pytest.approx(2.5)  # vs 2.75: another number


def test_ipo_rewards_are_trls_summed_log_ratios():
    """Issue 14, 5a: ipo's logged rewards are β × the summed log-ratio (TRL's), like every other type."""
    batch = random_batch(4, 10, 90)
    out = assert_same(batch, "ipo", beta=0.5)
    b = batch["b"]
    want = 0.5 * (batch["policy"].sum(1) - batch["ref"].sum(1))
    assert torch.allclose(out.chosen_rewards, want[:b]) and torch.allclose(out.rejected_rewards, want[b:])
