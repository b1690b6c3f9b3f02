"""DPO losses against numbers worked out by hand with math.log / math.exp (never by calling the code under test).

Notation: h = (π_c − r_c) − (π_r − r_r); log σ(x) = −log(1 + e^−x).
"""

import math

import pytest
import torch

from stages.base.errors import UserError
from stages.objective.loss import LOSS_TYPES, LossOutput, dpo_loss

torch.set_num_threads(1)

F64 = torch.float64


def t(*xs, dtype=F64):
    return torch.tensor(xs, dtype=dtype)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_required_vector():
    # π_c=−5, π_r=−7, r_c=−6, r_r=−6: h = (−5+6) − (−7+6) = 1 − (−1) = 2; β = 1 → −log σ(2) = log(1 + e^−2)
    expected = math.log(1.0 + math.exp(-2.0))
    assert expected == pytest.approx(0.126928, abs=1e-6)
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=1.0)
    assert isinstance(out, LossOutput)
    assert out.losses.item() == pytest.approx(0.126928, abs=1e-5)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    # rewards β·(π − r): chosen 1·(−5+6) = 1, rejected 1·(−7+6) = −1
    assert out.chosen_rewards.tolist() == pytest.approx([1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-1.0])


def test_beta_multiplies_not_divides():
    # same logps (h = 2), β = 2: paper form −log σ(β·h) = −log σ(4) = log(1 + e^−4) ≈ 0.01815;
    # the δ/β form would give −log σ(1) = log(1 + e^−1) ≈ 0.31326
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=2.0)
    assert out.losses.item() == pytest.approx(math.log(1.0 + math.exp(-4.0)), abs=1e-12)
    assert out.losses.item() != pytest.approx(math.log(1.0 + math.exp(-1.0)), abs=1e-3)
    # rewards scale with β: 2·1, 2·(−1)
    assert out.chosen_rewards.tolist() == pytest.approx([2.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-2.0])


def test_sigmoid_batch_beta_0_1():
    # row 0: h = 2 → β·h = 0.2 → log(1 + e^−0.2)
    # row 1: π_c=−10, π_r=−8, r_c=−9, r_r=−9: h = (−1) − (1) = −2 → β·h = −0.2 → log(1 + e^0.2)
    # row 2: all equal → h = 0 → log 2
    pc, pr, rc, rr = t(-5.0, -10.0, -3.0), t(-7.0, -8.0, -3.0), t(-6.0, -9.0, -3.0), t(-6.0, -9.0, -3.0)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2)), math.log(2.0)]
    assert out.losses.shape == (3,)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1, 0.0])


def test_label_smoothing_cdpo():
    # h = 2, β = 0.5 → z = 1, ε = 0.1:
    # −(1−ε) log σ(1) − ε log σ(−1) = 0.9·log(1 + e^−1) + 0.1·log(1 + e^1)
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.41326, abs=1e-5)  # 0.9·0.31326 + 0.1·1.31326 = 0.28194 + 0.13133


def test_robust_rdpo():
    # h = 2, β = 0.5 → z = 1, ε = 0.2:
    # (−(1−ε) log σ(1) + ε log σ(−1)) / (1 − 2ε) = (0.8·log(1+e^−1) − 0.2·log(1+e^1)) / 0.6
    expected = (0.8 * math.log(1 + math.exp(-1.0)) - 0.2 * math.log(1 + math.exp(1.0))) / 0.6
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), loss_type="robust", beta=0.5, label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    # at ε = 0 robust is plain DPO: log(1 + e^−1)
    out0 = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), loss_type="robust", beta=0.5)
    assert out0.losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-12)


def test_ipo_uses_length_normalised_logps():
    # chosen 2 tokens, rejected 4 tokens. Normalised: π_c = −4/2 = −2, r_c = −6/2 = −3, π_r = −8/4 = −2,
    # r_r = −8/4 = −2 → h = (−2+3) − (−2+2) = 1. β = 0.25 → 1/(2β) = 2 → (1 − 2)² = 1.
    # (Without normalisation h would be 2 and the loss (2 − 2)² = 0, so this catches a missing division.)
    out = dpo_loss(t(-4.0), t(-8.0), t(-6.0), t(-8.0), loss_type="ipo", beta=0.25,
                   chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    assert out.losses.item() == pytest.approx(1.0, abs=1e-12)
    # rewards are TRL's β·(π − r) of the SUMMED log-probs for every loss type, ipo too (issue 14, 5a):
    # 0.25·(−4+6) = 0.5, 0.25·(−8+8) = 0  (the per-token form would give 0.25·(−2+3) = 0.25)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([0.0])


def test_ipo_batch():
    # row 0: tokens 1/1, h = (−1+2) − (−3+2) = 2, β = 0.5 → 1/(2β) = 1 → (2 − 1)² = 1
    # row 1: tokens 3/3, π_c=−3, r_c=−3, π_r=−6, r_r=−3 → normalised h = (−1+1) − (−2+1) = 1 → (1 − 1)² = 0
    out = dpo_loss(t(-1.0, -3.0), t(-3.0, -6.0), t(-2.0, -3.0), t(-2.0, -3.0), loss_type="ipo", beta=0.5,
                   chosen_tokens=torch.tensor([1, 3]), rejected_tokens=torch.tensor([1, 3]))
    assert out.losses.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)


def test_hinge():
    # β = 0.5; rows with h = 2, −2, 1 → relu(1 − 0.5h) = relu(0) = 0, relu(2) = 2, relu(0.5) = 0.5
    pc, pr = t(-5.0, -7.0, -5.0), t(-7.0, -5.0, -6.0)
    rc, rr = t(-6.0, -6.0, -6.0), t(-6.0, -6.0, -6.0)
    out = dpo_loss(pc, pr, rc, rr, loss_type="hinge", beta=0.5)
    assert out.losses.tolist() == pytest.approx([0.0, 2.0, 0.5], abs=1e-12)


def test_sft_term_added_per_example():
    # required vector plus sft_weight 0.5 with 5 chosen tokens: 0.126928 + 0.5·(5/5) = 0.626928
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=1.0, sft_weight=0.5, chosen_tokens=torch.tensor([5]))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-2.0)) + 0.5, abs=1e-12)
    # hinge (0 here since β·h = 1·2 ≥ 1) + 0.2·(10/4) = 0.5 ; the sft term uses the UN-normalised sum / tokens
    out = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), loss_type="hinge", beta=1.0, sft_weight=0.2,
                   chosen_tokens=torch.tensor([4]))
    assert out.losses.item() == pytest.approx(0.5, abs=1e-12)


def test_sigmoid_gradients_match_hand_formula():
    # dL/dπ_c = −β σ(−βh), dL/dπ_r = +β σ(−βh); references get no gradient.
    beta = 0.1
    pc = t(-5.0, -10.0).requires_grad_()
    pr = t(-7.0, -8.0).requires_grad_()
    rc, rr = t(-6.0, -9.0), t(-6.0, -9.0)
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    out.losses.sum().backward()
    hs = [2.0, -2.0]
    assert pc.grad.tolist() == pytest.approx([-beta * sig(-beta * h) for h in hs], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([beta * sig(-beta * h) for h in hs], abs=1e-12)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_ipo_and_sft_gradients():
    # ipo: L = (h − 1/(2β))², h = π_c/n_c − r_c/n_c − π_r/n_r + r_r/n_r
    # dL/dπ_c = 2(h − 1/(2β))/n_c. With the ipo vector above: h = 1, 1/(2β) = 2, n_c = 2 → 2·(−1)/2 = −1;
    # dL/dπ_r = −2(h − 1/(2β))/n_r = −2·(−1)/4 = 0.5.  sft (w = 0.3): adds −w/n_c = −0.15 to dL/dπ_c.
    pc, pr = t(-4.0).requires_grad_(), t(-8.0).requires_grad_()
    out = dpo_loss(pc, pr, t(-6.0), t(-8.0), loss_type="ipo", beta=0.25, sft_weight=0.3,
                   chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-1.0 - 0.15, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.5, abs=1e-12)


def test_float32_dtype_kept_and_stable():
    out = dpo_loss(t(-5.0, 0.0, -2000.0, dtype=torch.float32), t(-7.0, -2000.0, 0.0, dtype=torch.float32),
                   t(-6.0, 0.0, 0.0, dtype=torch.float32), t(-6.0, 0.0, 0.0, dtype=torch.float32), beta=1.0)
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    # h = 2, 2000, −2000 → log(1+e^−2), ≈ 0, ≈ 2000 (no inf/nan from exp overflow)
    assert out.losses.tolist() == pytest.approx([math.log(1 + math.exp(-2.0)), 0.0, 2000.0], rel=1e-6, abs=1e-6)
    assert torch.isfinite(out.losses).all()


def test_errors():
    a = t(-1.0)
    with pytest.raises(ValueError, match="unknown loss type"):
        dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(UserError, match="unknown loss type"):  # the same error is a UserError for the CLI
        dpo_loss(a, a, a, a, loss_type="kto")
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(a, a, a, a, loss_type="robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="label-smoothing"):
        dpo_loss(a, a, a, a, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(a, a, a, a, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_tokens"):
        dpo_loss(a, a, a, a, loss_type="ipo", chosen_tokens=torch.tensor([1]))
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(a, a, a, a, sft_weight=0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t(-1.0, -2.0), a, a, a)
    assert set(LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


# ------------------------------------------------------------------------------- issue 14: the rest of the family
# Required vector again: π_c=−5, π_r=−7, r_c=−6, r_r=−6 → ρ_c = 1, ρ_r = −1, h = 2; β = 1 unless said.
def one(loss_type, **kw):
    return dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), loss_type=loss_type, **{"beta": 1.0, **kw}).losses.item()


def lsig(x: float) -> float:  # log σ(x)
    return -math.log(1.0 + math.exp(-x))


def test_absolute_reward_losses_by_hand():
    # bco_pair: −log σ(βρ_c) − log σ(−βρ_r) = −log σ(1) − log σ(1) = 2·log(1 + e^−1)
    assert one("bco_pair") == pytest.approx(2 * math.log(1 + math.exp(-1.0)), abs=1e-12)
    # nca_pair: −log σ(1) − ½ log σ(−1) − ½ log σ(1)
    assert one("nca_pair") == pytest.approx(-lsig(1) - 0.5 * lsig(-1) - 0.5 * lsig(1), abs=1e-12)
    # sppo_hard, β = 0.5: (1 − 1)² + (−1 + 1)² = 0; β = 1: (1 − 0.5)² + (−1 + 0.5)² = 0.5
    assert one("sppo_hard", beta=0.5) == pytest.approx(0.0, abs=1e-12)
    assert one("sppo_hard") == pytest.approx(0.5, abs=1e-12)
    # apo_zero: 1 − σ(1) + σ(−1) = 2σ(−1);  apo_down: σ(1) + 1 − σ(2)
    assert one("apo_zero") == pytest.approx(2 * sig(-1.0), abs=1e-12)
    assert one("apo_down") == pytest.approx(sig(1.0) + 1 - sig(2.0), abs=1e-12)


def test_difference_losses_by_hand():
    # exo_pair, ε = 0.1: σ(2)(log σ(2) − log 0.9) + σ(−2)(log σ(−2) − log 0.1)
    want = sig(2) * (lsig(2) - math.log(0.9)) + sig(-2) * (lsig(-2) - math.log(0.1))
    assert one("exo_pair", label_smoothing=0.1) == pytest.approx(want, abs=1e-12)
    # discopop, τ = 0.05: m = σ(2/0.05) = σ(40); (1 − m)(−log σ(2)) + m·e^−2
    m = sig(40.0)
    assert one("discopop") == pytest.approx((1 - m) * -lsig(2) + m * math.exp(-2.0), abs=1e-12)
    # sigmoid_norm with 2 chosen and 4 rejected tokens: h̄ = 1/2 − (−1)/4 = 0.75 → −log σ(0.75)
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), loss_type="sigmoid_norm", beta=1.0,
                   chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    assert out.losses.item() == pytest.approx(-lsig(0.75), abs=1e-12)


def test_aot_sorts_the_batch():
    # π_c − π_r = [2, −1], r_c − r_r = [0, 1] → sorted [−1, 2] − sorted [0, 1] = [−1, 1]; β = 1, ε = 0
    out = dpo_loss(t(-1.0, -3.0), t(-3.0, -2.0), t(-1.0, -1.0), t(-1.0, -2.0), loss_type="aot", beta=1.0)
    assert sorted(out.losses.tolist()) == pytest.approx(sorted([-lsig(-1.0), -lsig(1.0)]), abs=1e-12)


def test_mixture_and_f_divergence_by_hand():
    # sigmoid*0.8 + bco_pair*0.2 + sft on the required vector with 5 chosen tokens: sft = 5/5 = 1
    got = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), loss_type="sigmoid*0.8+bco_pair*0.2+sft", beta=1.0,
                   chosen_tokens=torch.tensor([5]))
    assert got.losses.item() == pytest.approx(0.8 * -lsig(2) + 0.2 * 2 * -lsig(1) + 1.0, abs=1e-12)
    assert set(got.components) == {"sigmoid", "bco_pair", "sft"}
    # forward_kl scores 1 − e^−ρ: s_c = 1 − e^−1, s_r = 1 − e^1 → h = e − e^−1 = 2 sinh 1
    assert one("sigmoid", f_divergence="forward_kl") == pytest.approx(-lsig(2 * math.sinh(1.0)), abs=1e-12)
    # js: s = log 2 + log σ(ρ) → h = log σ(1) − log σ(−1) = 1
    assert one("sigmoid", f_divergence="js_divergence") == pytest.approx(-lsig(1.0), abs=1e-12)


def test_wpo_weights_by_hand():
    # aligned sums 0 and −2 over 1 and 2 tokens: w = e^0 · e^(−1) → loss = e^−1 · log(1 + e^−2)
    out = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=1.0, chosen_tokens=torch.tensor([1]),
                   rejected_tokens=torch.tensor([2]), chosen_wpo_logps=t(0.0), rejected_wpo_logps=t(-2.0))
    assert out.losses.item() == pytest.approx(math.exp(-1.0) * math.log(1 + math.exp(-2.0)), abs=1e-12)
