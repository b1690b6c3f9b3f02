"""Loss settings without torch: the loss-type names, the one-string mixture syntax and the checks of every loss
option. The CLI and the config dataclasses use this (`dpo --help` imports no torch); stages/objective/loss.py computes.

A loss is a mixture: ((type, weight), ...) from "sigmoid*0.8+bco_pair*0.2+sft" (weight 1 when left out; YAML also
takes a mapping {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}); TRL's `loss_type` list + `loss_weights`.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Mapping

from stages.base.errors import UserError

# TRL 1.16's reference-based loss types, in TRL's order (its error message lists them so)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # loss types that read label_smoothing (ε)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Only these are built on the chosen-rejected score difference h, so only they take another f-divergence (TRL too)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Listwise types (issue 23): a loss of a prompt's whole ranking of replies, not of pairs (stages/objective/ranking.py);
# accepted by the spec besides LOSS_TYPES, alone only (check_loss)
LISTWISE_LOSSES = ("plackett_luce",)

LossSpec_ = tuple[tuple[str, float], ...]


class LossSettingsError(UserError, ValueError):
    """Bad loss settings (loss type, β, ε, sft weight, ...). A UserError for the CLI and a ValueError for callers."""


class LossSpec(str):
    """The type of a loss option (`--loss`, `loss:`): a spec string, or in YAML a mapping {type: weight}.
    Configs store the canonical plain `str` (see `canonical_loss`); this class only lets the mapping through."""


# ------------------------------------------------------------------------------------------------ mixtures
_TERM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\*\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?))?\s*(\+|$)")


# Other spellings accepted for a loss type (configs store the canonical name): DPO's loss is TRL's "sigmoid"
LOSS_ALIASES = {"dpo": "sigmoid", "pl": "plackett_luce"}


def _loss_name(name: str) -> str:
    """The canonical loss type of a name as written: case-insensitive, aliases resolved ("DPO" -> "sigmoid")."""
    low = name.lower()
    return LOSS_ALIASES.get(low, low)


def _unknown(name: str, value) -> LossSettingsError:
    near = difflib.get_close_matches(name.lower(), LOSS_TYPES + LISTWISE_LOSSES, n=1, cutoff=0.5)
    where = f"--loss {name!r}: unknown loss type" if value == name else f"--loss: unknown loss type {name!r}"
    if near:
        return LossSettingsError(f"{where}; did you mean {near[0]!r}? (all types: dpo train --help)")
    return LossSettingsError(f"{where}; known: {', '.join(LOSS_TYPES + LISTWISE_LOSSES)}")


def _term_weight(name: str, weight, value) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise LossSettingsError(f"--loss {value!r}: the weight of {name!r} must be a number, got {weight!r}") from None
    if not (w > 0 and math.isfinite(w)):
        raise LossSettingsError(f"--loss {value!r}: the weight of {name!r} must be a positive number, got {weight!r}")
    return w


def parse_loss_spec(value) -> LossSpec_:
    """"sigmoid*0.8+bco_pair*0.2+sft" | {sigmoid: 0.8, ...} | ((name, weight), ...) -> ((name, weight), ...).

    Names must be LOSS_TYPES or LISTWISE_LOSSES, in any case, or an alias of one ("dpo" is "sigmoid", "pl" is
    "plackett_luce"); the result holds the canonical lower-case name. A typo names the nearest type; each type at
    most once; weights positive (default 1)."""
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        pairs = [(str(k), v) for k, v in value]
    elif isinstance(value, str):
        pairs, pos = [], 0
        while pos < len(value) or not pairs:
            m = _TERM.match(value, pos)
            if m is None or m.end() == pos:
                raise LossSettingsError(f"--loss {value!r}: expected TYPE or TYPE*WEIGHT joined by '+' (e.g. "
                                        f"'sigmoid*0.8+bco_pair*0.2+sft'), stuck at character {pos + 1}")
            pairs.append((m.group(1), m.group(2) if m.group(2) is not None else 1.0))
            pos = m.end()
            if m.group(3) == "" and pos < len(value):
                raise LossSettingsError(f"--loss {value!r}: unexpected text at character {pos + 1}")
            if m.group(3) == "+" and pos >= len(value):
                raise LossSettingsError(f"--loss {value!r}: a '+' must be followed by a loss type")
    else:
        raise LossSettingsError(f"--loss {value!r}: give a loss type, a mixture like 'sigmoid*0.8+sft', or a mapping")
    if not pairs:
        raise LossSettingsError(f"--loss {value!r}: give at least one loss type")
    out = []
    for written, weight in pairs:
        name = _loss_name(written)
        if name not in LOSS_TYPES and name not in LISTWISE_LOSSES:
            raise _unknown(written, value)
        if name in (n for n, _ in out):
            twice = f"{name!r} appears twice" if written == name else f"{written!r} is {name!r}, which appears twice"
            raise LossSettingsError(f"--loss {value!r}: {twice}; give it once with the summed weight")
        out.append((name, _term_weight(name, weight, value)))
    return tuple(out)


def _num(w: float) -> str:
    return repr(float(w)).removesuffix(".0") if float(w).is_integer() and abs(w) < 1e15 else repr(float(w))


def format_loss_spec(spec) -> str:
    """Canonical string: "sigmoid*0.8+bco_pair*0.2+sft" (weight 1 left out). parse(format(x)) == parse(x)."""
    return "+".join(name if w == 1.0 else f"{name}*{_num(w)}" for name, w in parse_loss_spec(spec))


def canonical_loss(value) -> str:
    """What a config stores for a loss option given as a string or a mapping (a plain str, YAML-safe)."""
    return format_loss_spec(value)


def is_listwise(spec) -> bool:
    """Whether a spec names a listwise type (LISTWISE_LOSSES: built by ranking.build_listwise, not loss.build_loss);
    `check_loss` makes such a type the spec's only one."""
    return any(name in LISTWISE_LOSSES for name, _ in parse_loss_spec(spec))


def loss_slug(spec) -> str:
    """Readable, filesystem-safe name of a mixture for a folder: "0.8sigmoid+0.2bco_pair+sft" (only
    [A-Za-z0-9_.+-]); a single loss of weight 1 is its name."""
    return "+".join(name if w == 1.0 else f"{_num(w)}{name}" for name, w in parse_loss_spec(spec))


# ------------------------------------------------------------------------------------------------ the rules
def check_loss(s) -> None:
    """The one check of the loss settings (`s`: the LossSettings group of stages/settings/groups.py, or any object
    with its attributes loss, beta, label_smoothing, sft_weight, f_divergence, f_alpha, discopop_tau, use_weighting,
    ld_alpha): refuses what would fail later or silently differ. The group's `check` and `dpo_loss` call it."""
    names = [n for n, _ in parse_loss_spec(s.loss)]
    _check_numbers(s)
    _check_listwise(s, names)
    if s.label_smoothing > 0 and not set(names) & set(SMOOTHED):
        raise LossSettingsError(f"--label-smoothing applies only to loss types {', '.join(SMOOTHED)}, not "
                                f"{s.loss!r}; set it to 0")
    if "exo_pair" in names and s.label_smoothing == 0:
        raise LossSettingsError("--loss exo_pair needs --label-smoothing > 0 (the EXO paper recommends 1e-3)")
    if s.f_divergence not in F_DIVERGENCES:
        raise LossSettingsError(f"--f-divergence {s.f_divergence!r} is not one of {', '.join(F_DIVERGENCES)}")
    other = [n for n in names if n not in F_DIVERGENCE_LOSSES]
    if s.f_divergence != "reverse_kl" and other:
        raise LossSettingsError(f"--f-divergence {s.f_divergence} works only with {', '.join(F_DIVERGENCE_LOSSES)}"
                                f", not {other[0]!r}; use reverse_kl with it")
    if s.use_weighting and set(names) & {"aot", "aot_unpaired"}:
        raise LossSettingsError("--use-weighting cannot weight aot/aot_unpaired: they sort the batch, so per-pair "
                                "weights would land on other pairs; drop one of the two")


def _check_listwise(s, names: list[str]) -> None:
    """A listwise type ranks all of a prompt's replies: no pair, so none of the per-pair options applies to it."""
    listwise = [n for n in names if n in LISTWISE_LOSSES]
    if not listwise:
        return
    name = listwise[0]
    if len(names) > 1:
        raise LossSettingsError(f"--loss {s.loss!r}: {name} uses the whole ranking of a prompt's replies, so it "
                                f"cannot be mixed with pair losses; give it alone")
    if s.use_weighting:
        raise LossSettingsError(f"--use-weighting (WPO) weights pairs; {name} has none, so drop one of the two")
    if s.ld_alpha is not None:
        raise LossSettingsError(f"--ld-alpha needs a pair's shared length; {name} has no pairs, so leave it unset")
    if s.sft_weight > 0:
        raise LossSettingsError(f"--sft-weight reads each pair's chosen reply; {name} has no pairs, so set it to 0")
    if s.label_smoothing > 0:
        raise LossSettingsError(f"--label-smoothing applies only to loss types {', '.join(SMOOTHED)}, not {name!r}; "
                                f"set it to 0")
    if s.f_divergence != "reverse_kl":
        raise LossSettingsError(f"--f-divergence {s.f_divergence}: {name} takes only reverse_kl (plain log-ratios); "
                                f"use reverse_kl with it")


def _check_numbers(s) -> None:
    if not (s.beta > 0 and math.isfinite(s.beta)):
        raise LossSettingsError(f"beta must be > 0, got {s.beta}")
    if not 0.0 <= s.label_smoothing < 0.5:
        raise LossSettingsError(f"label_smoothing must be in [0, 0.5), got {s.label_smoothing}")
    if not s.sft_weight >= 0:
        raise LossSettingsError(f"sft_weight must be >= 0, got {s.sft_weight}")
    if not math.isfinite(s.f_alpha):
        raise LossSettingsError(f"--f-alpha must be a finite number, got {s.f_alpha}")
    if not (s.discopop_tau > 0 and math.isfinite(s.discopop_tau)):
        raise LossSettingsError(f"--discopop-tau must be > 0, got {s.discopop_tau}")
    if s.ld_alpha is not None and not 0.0 <= s.ld_alpha <= 1.0:
        raise LossSettingsError(f"--ld-alpha must be in [0, 1] (1: plain DPO, 0: only the shared length counts), "
                                f"got {s.ld_alpha}")
