"""Issue 21, item 2: users see no change. Every command's `--help` and the resolved config.yaml of a few runs
(flat YAML, sectioned YAML + flags, old option names) are snapshots taken before the settings became groups.

The comparison is per option (its flags, help text and shown default) and per YAML key (its value), not per byte:
the order of options in `--help` follows the groups. Regenerate a snapshot only for an intended change:
`UPDATE_SNAPSHOTS=1 pytest tests/test_snapshots.py`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main as cli_main

HERE = Path(__file__).resolve().parent / "snapshots"
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"


def leaves(group=cli_main, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield from leaves(cmd, (*prefix, name)) if isinstance(cmd, click.Group) else [(*prefix, name)]


COMMANDS = [(), ("cache",), ("config",), *leaves()]


def help_entries(text: str) -> dict[str, str]:
    """{first flag: its whole help, whitespace-normalised} plus the usage line and the command's description."""
    head, _, options = text.partition("\nOptions:\n")
    entries, key = {"(description)": " ".join(head.split())}, None
    for line in options.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:  +(.*))?$", line)
        if m:
            key = m.group(1).split(",")[0].split()[0].split("/")[0]
            entries[key] = " ".join((m.group(1) + " " + (m.group(2) or "")).split())
        elif key and line.strip():
            entries[key] += " " + " ".join(line.split())
    return entries


def check(name: str, actual, parse):
    path = HERE / name
    if UPDATE or not path.exists():
        path.write_text(actual)
        if not UPDATE:
            pytest.fail(f"wrote the new snapshot {path.name}; run again")
    assert parse(actual) == parse(path.read_text()), name


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c) or "dpo")
def test_help_is_unchanged(cmd):
    result = CliRunner().invoke(cli_main, [*cmd, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    check(f"help-{'-'.join(cmd) or 'dpo'}.txt", result.output, help_entries)


FLAT = """model: m
data: [a.jsonl, b.jsonl]
ref_cache: c.parquet
output: runs/x
beta: 0.2
loss: {sigmoid: 0.8, sft: 0.2}
learning_rate: 1e-4
max_steps: 3
"""
SECTIONED = """shared:
  model: m
  data: a.jsonl
  max-length: 256
  max_prompt_length: 128
precompute-ref:
  out: cache/r.parquet
  load_in_4bit: true
train:
  ref_cache: cache/r.parquet
  output: runs/y
  report_to: tensorboard
sweep:
  ref_cache: cache/r.parquet
  output: runs/sweep
  betas: [0.1, 0.5]
  losses: [sigmoid, ipo]
"""
SAMPLE = """model: m
data: [h.jsonl]
out: samples
n: 2
max_prompt_length: 64
"""
RUNS = {  # name: (command, yaml text, flags, module and function the command calls)
    "train-flat": (["train"], FLAT, ["--epochs", "2"], "stages.stage2.train", "run"),
    "train-sectioned": (["train"], SECTIONED, ["--beta", "0.3", "--eval-data", "e.jsonl"], "stages.stage2.train",
                        "run"),
    "precompute-sectioned": (["precompute-ref"], SECTIONED, ["--num-shards", "2"], "stages.stage1.precompute", "run"),
    "sweep-sectioned": (["sweep"], SECTIONED, ["--loss", "robust", "--label-smoothing", "0.1"], "stages.tools.sweep",
                        "run_sweep"),
    "sample-flat": (["sample"], SAMPLE, ["--seed", "3"], "stages.tools.sample", "run"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_resolved_config_is_unchanged(name, tmp_path, monkeypatch):
    import importlib

    from stages.settings import yamlconfig as cfgmod

    command, text, flags, module, function = RUNS[name]
    (tmp_path / "c.yaml").write_text(text)
    seen = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda cfg, *a, **k: seen.append(cfg))
    result = CliRunner().invoke(cli_main, [*command, "--config", str(tmp_path / "c.yaml"), *flags])
    assert result.exit_code == 0 and len(seen) == 1, result.output
    cfgmod.save(seen[0], tmp_path / "config.yaml")
    check(f"config-{name}.yaml", (tmp_path / "config.yaml").read_text(), yaml.safe_load)
