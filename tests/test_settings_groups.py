"""Issue 21: each setting is declared once (a field of one group), checked once (that group's `check`), and one
number from the user wins over our default (`--max-length 256` alone works)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cli import main as cli_main
from stages.settings import commands, groups, yamlconfig
from stages.settings.options import Command, Group, from_flat, options, to_flat

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted((c for c in vars(commands).values() if isinstance(c, type) and c.__name__.endswith("Config")
                   and issubclass(c, (Command, Group))), key=lambda c: c.__name__)  # a command, or its one group
GROUPS = sorted({o.group for c in COMMANDS for o in options(c)}, key=lambda g: g.__name__)


def declarations() -> str:
    """`command option <- group` for every option of every command: the one place each is declared."""
    return "".join(f"{c.__name__} {o.name} <- {o.group.__module__}.{o.group.__name__}\n"
                   for c in COMMANDS for o in options(c))


def test_the_table_of_declarations():
    """Per command and option, the ONE group that declares it (tests/snapshots/declarations.txt; regenerate with
    UPDATE_SNAPSHOTS=1 after an intended change)."""
    import os

    path = REPO / "tests" / "snapshots" / "declarations.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(declarations())
    assert declarations() == path.read_text()


def test_a_setting_of_one_meaning_is_declared_in_one_group():
    """Two groups may use one name only for two different settings (e.g. `dpo sample`'s β of the implicit reward
    and the loss's β): their help texts differ. The same setting copied into a second group would repeat its help."""
    seen: dict[tuple[str, str], str] = {}
    for g in GROUPS:
        for f in dataclasses.fields(g):
            key = (f.name, f.metadata["help"])
            assert key not in seen, f"{f.name} is declared in {seen[key]} and again in {g.__name__}"
            seen[key] = g.__name__


def test_every_group_is_frozen_and_checks_itself():
    for g in GROUPS:
        assert issubclass(g, Group) and g.__dataclass_params__.frozen, g
        for f in dataclasses.fields(g):
            assert f.metadata.get("help"), f"{g.__name__}.{f.name} has no help text"


STAGES_CHECKS = re.compile(r"must be (>=|>|below|at most|in \[)|cannot exceed --|is not one of|def validate\(|"
                           r"_RANGES|def check_numbers|def check_optimizer")


def test_value_checks_live_only_in_the_settings():
    """The range/choice/cross-field rules of options are in stages/settings/ only (no second copy below)."""
    found = []
    for path in sorted((REPO / "stages").rglob("*.py")):
        if "settings" in path.relative_to(REPO / "stages").parts or path.name == "lossspec.py":
            continue  # lossspec.check_loss: the loss's rules, which LossSettings.check delegates to
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if STAGES_CHECKS.search(line) and "--" in line:
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def build(cls, **flags):
    return yamlconfig.build(cls, None, flags)


def test_max_length_alone_derives_the_prompt_length():
    cfg = build(commands.PrecomputeConfig, model="m", data=("d.jsonl",), max_length=256)
    assert (cfg.lengths.max_length, cfg.lengths.max_prompt_length) == (256, 256)
    assert cfg.notes and "--max-prompt-length 256" in cfg.notes[0] and "512" in cfg.notes[0]
    assert to_flat(cfg)["max_prompt_length"] == 256  # config.yaml holds the value used
    big = build(commands.PrecomputeConfig, model="m", data=("d.jsonl",), max_length=2048)
    assert big.lengths.max_prompt_length == 512 and big.notes == ()
    with pytest.raises(UserError, match="--max-prompt-length 300 cannot exceed --max-length 256"):
        build(commands.PrecomputeConfig, model="m", data=("d.jsonl",), max_length=256, max_prompt_length=300)


def test_cache_lengths_fill_unset_values_and_the_rule_holds_there_too():
    meta = {"tokenization": {"max_length": 1024, "max_prompt_length": 512}}
    unset = groups.Lengths(None, None).tokenize(meta)
    assert (unset.max_length, unset.max_prompt_length) == (1024, 512)
    short = groups.Lengths(256, None).tokenize(meta)
    assert (short.max_length, short.max_prompt_length) == (256, 256)
    own = groups.Lengths(None, 128).tokenize(meta)
    assert (own.max_length, own.max_prompt_length) == (1024, 128)


def test_the_rule_is_said_in_help_and_printed_once():
    res = CliRunner().invoke(cli_main, ["precompute-ref", "--help"], terminal_width=200)
    assert "when not given and above --max-length, it is --max-length" in res.output
    res = CliRunner().invoke(cli_main, ["train", "--help"], terminal_width=200)
    assert "or --max-length when that is lower" in res.output


@pytest.mark.parametrize("flags, message", [
    ({"lora_r": 0}, "--lora-r 0: must be >= 1"),
    ({"warmup_ratio": 2.0}, "--warmup-ratio at most 1"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"max_steps": -1, "epochs": 0.0}, "set --max-steps N or --epochs E"),
    ({"chunk_size": 0}, "--chunk-size 0: must be >= 1"),
    ({"max_length": 8, "max_prompt_length": 9}, "cannot exceed --max-length 8"),
])
def test_each_group_refuses_its_own_values(flags, message):
    base = {"model": "m", "data": ("d.jsonl",), "ref_cache": "c.parquet", "output": "run"}
    with pytest.raises(UserError, match=re.escape(message)):
        from_flat(commands.TrainConfig, {**base, **flags})
