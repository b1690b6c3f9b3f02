"""Plackett-Luce DPO (issue 23, stages/objective/ranking.py) against numbers worked out by hand with math.log /
math.exp, against `sigmoid_loss` at K = 2, and the loss spec's rules for it (lossspec.py).

Notation: z = β·ρ, ρ = π − r per reply; lse(a, b, ...) = log(e^a + e^b + ...). A reply i adds lse(z_i, z of every
reply of its prompt with a lower score) − z_i.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from stages.objective.loss import LOSS_TYPES, TERMS, dpo_loss, sigmoid_loss
from stages.objective.lossspec import (
    LISTWISE_LOSSES,
    LossSettingsError,
    check_loss,
    format_loss_spec,
    is_listwise,
    parse_loss_spec,
)
from stages.objective.ranking import ListwiseLoss, build_listwise, plackett_luce_loss
from stages.settings.groups import LossSettings

torch.set_num_threads(1)

F64 = torch.float64


def t(*xs, dtype=F64):
    return torch.tensor(xs, dtype=dtype)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def pl(rho, scores, beta=1.0, group=None, dtype=F64, n_groups=None):
    group = torch.zeros(len(rho), dtype=torch.long) if group is None else torch.tensor(group)
    return plackett_luce_loss(t(*rho, dtype=dtype), group, t(*scores), beta, n_groups)


# ------------------------------------------------------------------------------------------------ K = 2: DPO
def test_two_replies_are_sigmoid_values_and_gradients():
    """Several prompts of two replies each, in a shuffled order, float64: per prompt exactly −log σ(β(ρ_c − ρ_r))."""
    g = torch.Generator().manual_seed(0)
    n, beta = 6, 0.3
    rho_c = (torch.randn(n, generator=g, dtype=F64) * 3).requires_grad_()
    rho_r = (torch.randn(n, generator=g, dtype=F64) * 3).requires_grad_()
    score_r = torch.randn(n, generator=g, dtype=F64)
    score_c = score_r + torch.rand(n, generator=g, dtype=F64) + 0.1  # chosen scores higher
    perm = torch.randperm(2 * n, generator=g)
    rho = torch.cat([rho_c, rho_r])[perm]
    group = torch.cat([torch.arange(n), torch.arange(n)])[perm]
    score = torch.cat([score_c, score_r])[perm]
    got = plackett_luce_loss(rho, group, score, beta, n)
    (gc, gr) = torch.autograd.grad(got.sum(), (rho_c, rho_r))
    want = sigmoid_loss(rho_c - rho_r, beta)
    (wc, wr) = torch.autograd.grad(want.sum(), (rho_c, rho_r))
    assert got.dtype == F64 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gc, wc, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gr, wr, rtol=1e-13, atol=1e-15)


def test_the_callable_at_two_replies_is_dpo_loss():
    """ListwiseLoss from π and r equals dpo_loss's sigmoid from the same four log-probs."""
    pc, pr, rc, rr = t(-5.0, -10.0, -3.0), t(-7.0, -8.0, -3.0), t(-6.0, -9.0, -3.0), t(-6.0, -9.0, -3.0)
    want = dpo_loss(pc, pr, rc, rr, beta=0.1).losses
    loss = build_listwise(SimpleNamespace(loss="plackett_luce", beta=0.1))
    got = loss(torch.cat([pr, pc]), torch.cat([rr, rc]), torch.tensor([0, 1, 2, 0, 1, 2]), t(0, 0, 0, 1, 1, 1), 3)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    # by hand (test_loss.py's rows): h = 2, −2, 0 at β = 0.1
    assert got.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2)), math.log(2.0)],
                                         abs=1e-12)


def test_a_tied_pair_gives_zero():
    out = pl([3.0, -2.0], [1.0, 1.0])
    assert out.tolist() == [0.0]
    rho = t(3.0, -2.0).requires_grad_()
    plackett_luce_loss(rho, torch.tensor([0, 0]), t(5, 5), 0.5).sum().backward()
    assert rho.grad.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------ by hand
def test_three_replies_by_hand():
    # scores 3, 2, 1; β = 0.5, ρ = 2, 1, −1 → z = 1, 0.5, −0.5
    # best:   lse(1, 0.5, −0.5) − 1;  middle: lse(0.5, −0.5) − 0.5;  worst: 0 (nothing left below it)
    want = (math.log(math.exp(1.0) + math.exp(0.5) + math.exp(-0.5)) - 1.0
            + math.log(math.exp(0.5) + math.exp(-0.5)) - 0.5)
    assert pl([2.0, 1.0, -1.0], [3, 2, 1], beta=0.5).item() == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.9174, abs=1e-4)  # ≈ log 4.9733 − 1 + log 2.2552 − 0.5 = 0.6041 + 0.3133


def test_four_replies_by_hand():
    # scores 4, 3, 2, 1; β = 1, ρ = z = 0.3, −0.1, 0.8, −1.2 (the best reply is not the policy's favourite)
    z1, z2, z3, z4 = 0.3, -0.1, 0.8, -1.2
    want = ((math.log(math.exp(z1) + math.exp(z2) + math.exp(z3) + math.exp(z4)) - z1)
            + (math.log(math.exp(z2) + math.exp(z3) + math.exp(z4)) - z2)
            + (math.log(math.exp(z3) + math.exp(z4)) - z3))
    assert pl([z1, z2, z3, z4], [4, 3, 2, 1]).item() == pytest.approx(want, abs=1e-12)
    # the same ranking given as ranks (1 = best) turned into scores −rank
    assert pl([z1, z2, z3, z4], [-1, -2, -3, -4]).item() == pytest.approx(want, abs=1e-12)


Z = (0.3, -0.1, 0.8, -1.2)


@pytest.mark.parametrize("scores, want", [
    # top tie 3, 3, 2, 1: each of the two best competes with the two below it, not with the other
    ((3, 3, 2, 1), (lse(Z[0], Z[2], Z[3]) - Z[0]) + (lse(Z[1], Z[2], Z[3]) - Z[1]) + (lse(Z[2], Z[3]) - Z[2])),
    # bottom tie 3, 2, 1, 1: the last tier adds 0
    ((3, 2, 1, 1), (lse(*Z) - Z[0]) + (lse(Z[1], Z[2], Z[3]) - Z[1])),
    # middle tie 3, 2, 2, 1: the two middle replies each compete with the last only
    ((3, 2, 2, 1), (lse(*Z) - Z[0]) + (lse(Z[1], Z[3]) - Z[1]) + (lse(Z[2], Z[3]) - Z[2])),
    # all tied: no reply beats another
    ((1, 1, 1, 1), 0.0),
], ids=["top-tie", "bottom-tie", "middle-tie", "all-tied"])
def test_ties_by_hand(scores, want):
    assert pl(list(Z), list(scores)).item() == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------------------------ properties
def test_the_order_of_replies_does_not_matter():
    g = torch.Generator().manual_seed(1)
    rho = torch.randn(9, generator=g, dtype=F64)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    score = torch.tensor([2.0, 1.0, 2.0, 0.5, 0.1, 4.0, 3.0, 3.0, 1.0], dtype=F64)
    base = plackett_luce_loss(rho, group, score, 0.7, 3)
    for seed in range(5):
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(plackett_luce_loss(rho[perm], group[perm], score[perm], 0.7, 3), base,
                                   rtol=1e-14, atol=1e-15)


def test_prompts_are_independent():
    """Two prompts in one call give what two calls give; a reply's score never ranks it against another prompt."""
    a_rho, a_score = [0.3, -0.1, 0.8, -1.2], [4, 3, 2, 1]
    b_rho, b_score = [1.5, -0.4, 0.2], [-10, 10, 0]  # scores far above and below prompt a's
    both = pl(a_rho + b_rho, a_score + b_score, beta=0.4, group=[1, 1, 1, 1, 0, 0, 0])
    assert both.shape == (2,)
    assert both[1].item() == pytest.approx(pl(a_rho, a_score, beta=0.4).item(), abs=1e-14)
    assert both[0].item() == pytest.approx(pl(b_rho, b_score, beta=0.4).item(), abs=1e-14)


def test_groups_default_and_an_empty_prompt():
    assert pl([1.0, 0.0], [2, 1], group=[1, 1]).tolist() == [0.0, pytest.approx(math.log(1 + math.exp(-1.0)))]
    assert pl([1.0, 0.0], [2, 1], n_groups=3).tolist() == [pytest.approx(math.log(1 + math.exp(-1.0))), 0.0, 0.0]
    assert plackett_luce_loss(t(), torch.tensor([], dtype=torch.long), t(), 0.1).shape == (0,)


def test_large_log_ratios_do_not_overflow():
    # float32, |βρ| = 2e4: log(1 + e^±2e4) is 2e4 or 0, never inf/nan
    out = pl([-1e4, 1e4, 1e4, -1e4], [2, 1, 2, 1], beta=2.0, group=[0, 0, 1, 1], dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([4e4, 0.0], abs=1e-3)
    rho = t(1e4, 0.0, -1e4, dtype=torch.float32).requires_grad_()
    plackett_luce_loss(rho, torch.tensor([0, 0, 0]), t(1, 2, 3), 1.0).sum().backward()
    assert torch.isfinite(rho.grad).all()
    # z = 1e4, 0, −1e4, the ranking 3 ≻ 2 ≻ 1 the reverse of z: each term's softmax sits on z_1, so
    # reply 3's term lse(z_3, z_2, z_1) − z_3 gives (+1, 0, −1), reply 2's lse(z_2, z_1) − z_2 gives (+1, −1, 0)
    assert rho.grad.tolist() == pytest.approx([2.0, -1.0, -1.0], abs=1e-4)


def test_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(2)
    rho = torch.randn(12, generator=g, dtype=F64) * 5
    group = torch.arange(12) % 3
    score = torch.randint(0, 4, (12,), generator=g).to(F64)
    want = plackett_luce_loss(rho, group, score, 0.1, 3)
    got = plackett_luce_loss(rho.float(), group, score, 0.1, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="score has shape"):
        plackett_luce_loss(t(1.0, 2.0), torch.tensor([0, 0]), t(1.0), 0.1)
    with pytest.raises(ValueError, match="one-dimensional"):
        plackett_luce_loss(t(1.0, 2.0).reshape(1, 2), torch.tensor([[0, 0]]), t(1.0, 2.0).reshape(1, 2), 0.1)


# ------------------------------------------------------------------------------------------------ the spec
def settings(**kw) -> SimpleNamespace:
    base = dict(loss="plackett_luce", beta=0.1, label_smoothing=0.0, sft_weight=0.0, f_divergence="reverse_kl",
                f_alpha=0.5, discopop_tau=0.05, use_weighting=False, ld_alpha=None)
    return SimpleNamespace(**{**base, **kw})


def test_the_names_parse():
    assert LISTWISE_LOSSES == ("plackett_luce",)
    assert len(LOSS_TYPES) == 15 and tuple(TERMS) == LOSS_TYPES and "plackett_luce" not in LOSS_TYPES
    for spelling in ("plackett_luce", "PLACKETT_LUCE", "pl", "PL", "Plackett_Luce"):
        assert parse_loss_spec(spelling) == (("plackett_luce", 1.0),)
        assert is_listwise(spelling)
    assert format_loss_spec("pl*0.5") == "plackett_luce*0.5"
    assert LossSettings(loss="PL").loss == "plackett_luce"
    assert not is_listwise("sigmoid") and not is_listwise("sigmoid*0.8+sft")
    with pytest.raises(LossSettingsError, match="did you mean 'plackett_luce'"):
        parse_loss_spec("plackett_lice")
    with pytest.raises(LossSettingsError, match="appears twice"):
        parse_loss_spec("pl+plackett_luce")


def test_alone_it_passes_the_checks():
    check_loss(settings())
    check_loss(settings(loss="pl*2", beta=0.5, f_alpha=0.3, discopop_tau=0.1))  # knobs it does not read: ignored
    LossSettings(loss="plackett_luce").check()


@pytest.mark.parametrize("kw, message", [
    (dict(loss="plackett_luce+sigmoid"), "cannot be mixed with pair losses"),
    (dict(loss="sft*0.1+pl"), "cannot be mixed with pair losses"),
    (dict(use_weighting=True), "--use-weighting"),
    (dict(ld_alpha=0.5), "--ld-alpha"),
    (dict(sft_weight=0.1), "--sft-weight"),
    (dict(label_smoothing=0.1), "--label-smoothing"),
    (dict(f_divergence="js_divergence"), "--f-divergence js_divergence: plackett_luce takes only reverse_kl"),
])
def test_the_pair_options_are_refused(kw, message):
    with pytest.raises(LossSettingsError, match=message) as e:
        check_loss(settings(**kw))
    assert "\n" not in str(e.value)


def test_build_listwise():
    loss = build_listwise(settings(loss="pl*2", beta=0.25))
    assert loss == ListwiseLoss(beta=0.25, weight=2.0)
    pi, ref = t(-3.0, -4.0, -5.0), t(-3.5, -3.5, -3.5)
    group, score = torch.tensor([0, 0, 0]), t(3, 2, 1)
    want = 2 * plackett_luce_loss(pi - ref, group, score, 0.25, 1)
    torch.testing.assert_close(loss(pi, ref, group, score, 1), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="build_listwise needs one listwise loss"):
        build_listwise(settings(loss="sigmoid"))
