"""The loss built once per run (`build_loss`, issue 21): any object with the loss settings' attribute names builds it,
the spec is parsed and the settings checked at build time, and each call gives exactly (bit for bit, gradients too)
what `dpo_loss` gives for the same settings.
"""

from types import SimpleNamespace

import pytest
import torch

from stages.objective.loss import LOSS_TYPES, TERMS, DPOLoss, LossSettingsError, build_loss, dpo_loss
from stages.objective.lossspec import check_loss
from stages.settings.groups import LossSettings

torch.set_num_threads(1)

F64 = torch.float64
B = 5


def settings(**kw) -> SimpleNamespace:
    """Duck-typed settings: the attribute names of the config's loss group, nothing else."""
    base = dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, sft_weight=0.0, f_divergence="reverse_kl", f_alpha=0.5,
                discopop_tau=0.05, use_weighting=False, ld_alpha=None)
    return SimpleNamespace(**{**base, **kw})


def inputs(seed: int, dtype=F64) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda shift: (torch.randn(B, generator=g, dtype=F64) * 4 + shift).to(dtype)  # noqa: E731
    return {"pi": (r(-20).requires_grad_(), r(-22).requires_grad_()), "ref": (r(-20), r(-22)),
            "n": (torch.randint(1, 30, (B,), generator=g), torch.randint(1, 30, (B,), generator=g)),
            "wpo": (r(0), r(0)), "sft": r(-21)}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().view(torch.int64 if x.dtype == F64 else torch.int32)


CASES = [dict(loss=name) for name in LOSS_TYPES if name != "exo_pair"] + [
    dict(loss="exo_pair", label_smoothing=1e-3),
    dict(loss="robust", label_smoothing=0.2, beta=0.5),
    dict(loss="sigmoid*0.8+bco_pair*0.2+sft", sft_weight=0.3),
    dict(loss="ipo*0.5+sigmoid_norm*2+hinge", f_divergence="js_divergence"),
    dict(loss="discopop+sigmoid", f_divergence="alpha_divergence", f_alpha=0.7, discopop_tau=0.07, use_weighting=True),
    dict(loss="sigmoid+sft", use_weighting=True, ld_alpha=0.5),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_built_loss_is_dpo_loss_bit_for_bit(kw, dtype):
    s = settings(**kw)
    loss = build_loss(s)
    for seed in (0, 1):  # one loss, called again and again
        got_in, want_in = inputs(seed, dtype), inputs(seed, dtype)
        extras = lambda x: dict(chosen_tokens=x["n"][0], rejected_tokens=x["n"][1],  # noqa: E731
                                chosen_sft_logps=x["sft"] if s.ld_alpha is not None else None,
                                **({"chosen_wpo_logps": x["wpo"][0], "rejected_wpo_logps": x["wpo"][1]}
                                   if s.use_weighting else {}))
        got = loss(*got_in["pi"], *got_in["ref"], **extras(got_in))
        want = dpo_loss(*want_in["pi"], *want_in["ref"], loss_type=s.loss, beta=s.beta,
                        label_smoothing=s.label_smoothing, sft_weight=s.sft_weight, f_divergence=s.f_divergence,
                        f_alpha=s.f_alpha, discopop_tau=s.discopop_tau, **extras(want_in))
        got.losses.sum().backward()
        want.losses.sum().backward()
        for a, b in [(got.losses, want.losses), (got.chosen_rewards, want.chosen_rewards),
                     (got.rejected_rewards, want.rejected_rewards)] + list(zip(
                         [p.grad for p in got_in["pi"] if p.grad is not None],
                         [p.grad for p in want_in["pi"] if p.grad is not None], strict=True)):
            assert torch.equal(bits(a), bits(b))
        assert list(got.components) == list(want.components)
        assert all(torch.equal(bits(got.components[k]), bits(want.components[k])) for k in got.components)


def test_the_table_covers_every_type_and_the_spec_is_parsed_once():
    assert tuple(TERMS) == LOSS_TYPES
    loss = build_loss(settings(loss="sigmoid*0.8+bco_pair*0.2+sft", beta=0.25))
    assert isinstance(loss, DPOLoss)
    assert [(name, w) for name, w, _, _ in loss.terms] == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert [params for _, _, _, params in loss.terms] == [(0.25, 0.0), (0.25,), ()]
    assert loss.wants_n_c and not loss.wants_n_r  # sft reads n_c only
    plain = build_loss(settings())
    assert not plain.wants_n_c and not plain.wants_n_r and plain.needs == {"h"}
    assert build_loss(settings(loss="ipo")).wants_n_r and build_loss(settings(use_weighting=True)).wants_n_r


def test_the_settings_are_checked_once_by_check_loss():
    """build_loss takes checked settings (the group's check, or dpo_loss's): check_loss is the one check."""
    with pytest.raises(LossSettingsError, match="unknown loss type"):
        build_loss(settings(loss="kto"))  # the spec cannot even be parsed
    with pytest.raises(LossSettingsError, match="ld-alpha"):
        check_loss(settings(ld_alpha=1.5))
    with pytest.raises(LossSettingsError, match="use-weighting"):
        check_loss(settings(loss="aot", use_weighting=True))
    with pytest.raises(LossSettingsError, match="use-weighting"):
        LossSettings(loss="aot", use_weighting=True).check()  # the group delegates to it
    with pytest.raises(AttributeError):  # every attribute is needed: no silent default
        build_loss(SimpleNamespace(loss="sigmoid", beta=0.1))


def test_a_call_asks_for_what_the_loss_needs():
    a = torch.tensor([-1.0], dtype=F64)
    with pytest.raises(ValueError, match="chosen_wpo_logps is required"):
        build_loss(settings(use_weighting=True))(a, a, a, a, chosen_tokens=torch.tensor([1]),
                                                 rejected_tokens=torch.tensor([1]))
    with pytest.raises(ValueError, match="rejected_tokens"):
        build_loss(settings(loss="sigmoid_norm"))(a, a, a, a, chosen_tokens=torch.tensor([1]))
    out = build_loss(settings())(a, a, a, a, chosen_wpo_logps=a)  # WPO sums without use_weighting: not read
    assert out.losses.item() == pytest.approx(0.6931471805599453)
