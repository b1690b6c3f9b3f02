"""Issue 20, item 5: under FSDP2 (torchrun's WORLD_SIZE > 1) only torch AdamW runs; the 8-bit bitsandbytes
optimizers are refused in one line before any data, cache or model is read and before the process group starts.
One process keeps them (on a GPU). The shipped multi-GPU config follows."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stages.cli import main as cli_main
from stages.settings import commands as settings, yamlconfig as cfgmod
from stages.settings.groups import FSDP2_OPTIMIZERS, Optimizer, OptimSettings
from stages.stage2 import train
from stages.tools import sweep

EIGHT_BIT = [o for o in typing.get_args(Optimizer) if o not in FSDP2_OPTIMIZERS]


class ReachedInit(Exception):
    """Raised by a stand-in for init_distributed: the run got past every check."""


def reached():
    raise ReachedInit


def _args(command: str, tmp_path: Path, optimizer: str) -> list[str]:
    """Paths that do not exist: a run that read anything before refusing would fail on them instead."""
    missing = tmp_path / "missing"
    beta = ["--beta", "0.1"] if command == "sweep" else []
    return [command, "--model", str(missing / "model"), "--data", str(missing / "rows.jsonl"),
            "--ref-cache", str(missing / "ref.parquet"), "--output", str(tmp_path / "run"), "--max-steps", "1",
            "--optimizer", optimizer, *beta]


@pytest.fixture
def two_processes(monkeypatch):
    """torchrun's environment for rank 0 of 2, with the process-group start replaced by a marker."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(train, "init_distributed", reached)
    monkeypatch.setattr(sweep, "init_distributed", reached)


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("optimizer", EIGHT_BIT)
def test_eight_bit_optimizers_are_refused_under_fsdp2_before_anything(command, optimizer, two_processes, tmp_path):
    res = CliRunner().invoke(cli_main, _args(command, tmp_path, optimizer))
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert f"--optimizer {optimizer}" in lines[0] and "2 processes" in lines[0], lines[0]
    assert "bitsandbytes #1633" in lines[0] and "--optimizer adamw" in lines[0], lines[0]
    assert len(lines[0]) <= 200 + len("error: "), lines[0]
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_adamw_passes_the_checks_under_fsdp2(command, two_processes, tmp_path):
    """Only the 8-bit ones are refused: adamw gets as far as starting the process group."""
    res = CliRunner().invoke(cli_main, _args(command, tmp_path, "adamw"))
    assert isinstance(res.exception, ReachedInit), (res.output, res.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU one process may use the 8-bit optimizers")
@pytest.mark.parametrize("optimizer", EIGHT_BIT)
def test_one_process_without_a_gpu_is_told_it_needs_one(optimizer, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(train, "init_distributed", reached)
    res = CliRunner().invoke(cli_main, _args("train", tmp_path, optimizer))
    assert res.exit_code == 2, (res.output, res.exception)
    assert "needs a GPU" in res.stderr and "1633" not in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_one_process_keeps_the_eight_bit_optimizers_on_a_gpu(monkeypatch):
    """The FSDP2 rule alone (no CUDA check in the way): one process may use them."""
    from stages.base.errors import UserError
    from stages.settings import groups

    monkeypatch.setattr(groups, "_cuda_available", lambda: True)
    for name in EIGHT_BIT:
        monkeypatch.setenv("WORLD_SIZE", "1")
        OptimSettings(optimizer=name).check()
        monkeypatch.setenv("WORLD_SIZE", "8")
        with pytest.raises(UserError, match="1633"):
            OptimSettings(optimizer=name).check()
    OptimSettings(optimizer="adamw").check()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_optimizer_help_says_fsdp2_takes_adamw_only(command):
    res = CliRunner().invoke(cli_main, [command, "--help"])
    text = re.sub(r"\s+", " ", res.output)
    match = re.search(r"--optimizer \[[^\]]*\] (.*?)\[default: adamw\]", text)
    assert match, text
    assert "torchrun (FSDP2) only adamw runs" in match.group(1) and "#1633" in match.group(1), match.group(1)


def test_multi_gpu_configs_use_adamw(repo_root):
    """Every shipped config meant for torchrun trains with an optimizer FSDP2 accepts."""
    checked = 0
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        if "torchrun" not in path.read_text():
            continue
        for section, cls in (("train", settings.TrainConfig), ("sweep", settings.SweepConfig)):
            if section in (yaml.safe_load(path.read_text()) or {}):
                cfg = cfgmod.build(cls, str(path), {}, section=section)
                assert cfg.optim.optimizer in FSDP2_OPTIMIZERS, (path.name, section, cfg.optim.optimizer)
                checked += 1
    assert checked >= 2  # configs/qwen2.5-72b-8xh100.yaml: train and sweep
