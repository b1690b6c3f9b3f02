"""Issue 12: one source of truth per command (stages/settings/commands.py), checks before any side effect, help
without torch, the drift from the first step's own forward, progress bars with real tokens/s."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main as cli_main
from stages.settings import commands as settings, yamlconfig as cfgmod
from stages.settings.options import options, resume_free
from stages.stage2 import resume, train
from tests.hhrows import hh_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
GENERATED = {"precompute-ref": settings.PrecomputeConfig, "train": settings.TrainConfig,
             "sweep": settings.SweepConfig, "plan": settings.PlanConfig, "sample": settings.SampleConfig,
             "cache info": settings.CacheInfoConfig, "cache verify": settings.CacheVerifyConfig,
             "cache export-trl": settings.ExportTrlConfig, "cache merge": settings.CacheMergeConfig,
             "compare": settings.CompareConfig, "demo": settings.DemoConfig,
             "config from-trl": settings.FromTrlConfig, "export": settings.ExportConfig}


def command(path: str):
    cmd = cli_main
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


def invoke(*args):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=True)


def test_help_imports_no_torch_transformers_or_polars():
    code = ("import sys; from click.testing import CliRunner; from stages.cli import main; "
            "[CliRunner().invoke(main, [*c, '--help']) for c in ([], ['train'], ['precompute-ref'], ['sweep'], "
            "['plan'], ['sample'], ['cache', 'info'], ['demo'])]; "
            "print(sorted(m for m in ('torch', 'transformers', 'polars', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", list(GENERATED))
def test_every_option_comes_from_the_dataclass_with_help_and_its_real_default(name):
    cls = GENERATED[name]
    cmd = command(name)
    by_dest = {p.name: p for p in cmd.params}
    for f in options(cls):
        assert f.name in by_dest, f"--{f.name} missing from `dpo {name}`"
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        if f.metadata.get("argument"):
            continue
        text = by_dest[f.name].help
        if f.default is not dataclasses.MISSING and f.default not in (None, ()):
            shown = (("on" if f.default else "off") if f.hint is bool else
                     ", ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default))
            assert f"[default: {shown}]" in text, (f.name, text)
        assert "[default: (" not in text, text  # no tuple reprs
    assert set(by_dest) - {"config_path"} == {f.name for f in options(cls)}


def test_every_command_is_generated():
    """No hand-written option is left: every leaf command is in GENERATED."""
    import click

    def leaves(group, prefix=""):
        for n, c in group.commands.items():
            yield from leaves(c, f"{prefix}{n} ") if isinstance(c, click.Group) else [f"{prefix}{n}"]
    assert sorted(leaves(cli_main)) == sorted(GENERATED)


def test_literal_fields_are_choices_and_one_line_errors():
    res = invoke("train", "--optimizer", "sgd")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: Invalid value for '--optimizer'") and "adamw" in res.stderr


def test_resume_free_fields_are_declared_once_and_agree():
    free_train, free_sweep = resume_free(settings.TrainConfig), resume_free(settings.SweepConfig)
    assert set(free_train) <= set(free_sweep) and {"betas", "losses"} <= set(free_sweep)
    assert "logging_steps" in free_train and resume.RESUME_FREE == free_train


def test_yaml_numbers_in_any_spelling_and_old_option_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 1e-4\n  warmup_ratio: 2.0e-2\n  beta: 1\n"
                   "precompute-ref:\n  out: x/ref.parquet\n  shard_index: 3\n  num_shards: 4\n")
    t = cfgmod.build(settings.TrainConfig, str(cfg), {"model": "m", "data": ("d",), "ref_cache": "r", "output": "o"},
                     section="train")
    assert (t.optim.learning_rate, t.optim.warmup_ratio, t.loss.beta) == (1e-4, 0.02, 1.0)
    p = cfgmod.build(settings.PrecomputeConfig, str(cfg), {"model": "m", "data": ("d",)}, section="precompute-ref")
    assert p.scoring.output == "x/ref.parquet"  # `out:` still read as `output`
    assert p.scoring.shard_index == "3"  # a YAML integer for a string field (which also takes `auto`)
    parsed = cli_main.commands["precompute-ref"].make_context("precompute-ref", ["--out", "y.parquet"])
    assert parsed.params["output"] == "y.parquet"
    parsed = cli_main.commands["plan"].make_context("plan", ["--seq-len", "512", "--batch", "2"])
    assert (parsed.params["max_length"], parsed.params["batch_size"]) == (512, 2)


def test_plan_reads_the_stages_config_file(repo_root):
    res = invoke("plan", "--config", str(repo_root / "configs" / "qwen2.5-72b-8xh100.yaml"),
                 "--model", str(repo_root / "configs" / "models" / "qwen2.5-72b-instruct"))
    assert res.exit_code == 0, res.output
    assert "stage 1 32,768 tokens per forward" in res.output  # from the precompute-ref section
    assert "seq_len 2048" in res.output                       # from shared
    default = invoke("plan", "--model", str(repo_root / "configs" / "models" / "qwen2.5-72b-instruct"))
    budget = {o.name: o.default for o in options(settings.PrecomputeConfig)}["max_tokens_per_batch"]
    assert f"stage 1 {budget:,} tokens" in default.output  # same default


# ------------------------------------------------------------------- checks before any side effect, in < 1 s
@pytest.fixture(scope="module")
def finished(tiny_llama, hh_path, tmp_path_factory) -> dict:
    from stages.stage1 import precompute

    d = tmp_path_factory.mktemp("settings")
    data = write_jsonl(d / "rows.jsonl", hh_rows(hh_path, 0, 8))
    cache = d / "ref.parquet"
    precompute.run(settings.PrecomputeConfig.flat(model=str(tiny_llama), data=(str(data),), output=str(cache),
                                                  max_length=160, max_prompt_length=96))
    run = d / "run"
    args = ["--model", str(tiny_llama), "--data", str(data), "--ref-cache", str(cache), "--output", str(run),
            "--max-steps", "1", "--batch-size", "2", "--lora-r", "4"]
    res = invoke("train", *args)
    assert res.exit_code == 0, res.output
    return {"args": args, "run": run, "stderr": res.stderr, "stdout": res.stdout}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


BAD = [("--beta", "0"), ("--beta", "-1"), ("--label-smoothing", "0.7"), ("--loss", "sigmoidd"),
       ("--lr-scheduler", "warmup"), ("--max-length", "0"), ("--max-prompt-length", "-3"), ("--lora-r", "0"),
       ("--chunk-size", "0"), ("--learning-rate", "0"), ("--ld-alpha", "2"), ("--f-divergence", "kl"),
       ("--save-total-limit", "-1"), ("--dtype", "int8")]


@pytest.mark.parametrize("flag,value", BAD)
def test_invalid_values_fail_fast_in_one_line_and_touch_nothing(flag, value, finished):
    before = _snapshot(finished["run"])
    t0 = time.perf_counter()
    res = invoke("train", *finished["args"], "--no-resume", flag, value)
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert elapsed < 1.0, f"{flag} {value}: {elapsed:.2f}s"
    assert _snapshot(finished["run"]) == before, "a rejected run changed the finished run's folder"


# ------------------------------------------------------------------------------ drift, progress
def test_drift_comes_from_the_first_step_without_an_extra_pass(finished, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "drift_check", lambda *a, **k: calls.append(1))
    res = invoke("train", *finished["args"][:-6], "--output", str(tmp_path / "r"), "--max-steps", "1",
                 "--batch-size", "2", "--lora-r", "4")
    assert res.exit_code == 0, res.output
    assert calls == [], "a fresh LoRA must not pay an extra drift forward"
    assert "step 0: ref_drift" in res.stdout
    first = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"step": 0' in first and "ref_drift_per_token" in first


def test_training_progress_bar_shows_real_tokens_per_second(finished):
    rates = [float(x) for x in re.findall(r"tok_s=(\d+(?:\.\d+)?)", finished["stderr"])]
    assert rates and rates[-1] > 0, finished["stderr"][-500:]
