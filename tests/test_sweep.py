"""`dpo sweep` and `dpo compare` on the tiny Llama and a few HH-RLHF rows (seconds each).

Pinned here: a 3-β sweep trains three runs from ONE cache read and ONE data preparation, never touches stage one
and loads exactly one model per run; the runs share seed and data order (identical step-1 policy log-probs) and
differ in β; compare gives three ranked rows, a CSV and a non-blank PNG; an interrupted sweep skips finished runs
(summary.json untouched) and resumes the unfinished one from its checkpoint to the uninterrupted result; the
CLI/YAML forms; compare's errors and a run without eval metrics.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cache import refcache
from stages.cli import main as cli_main
from stages.data import replies
from stages.model.models import LOAD_COUNT
from stages.settings import yamlconfig as config
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import prepare, train
from stages.tools.compare import compare, format_table
from stages.tools.sweep import SweepConfig, run_name, run_sweep

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.01, 0.1, 0.5)
SMALL = dict(load_in_4bit=False, gradient_checkpointing=False, batch_size=2, eval_batch_size=4, max_steps=4,
             eval_steps=2, save_steps=2, logging_steps=1)  # tiny and fast; checkpoints at step 2 for resume


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tiny_llama: Path, hh_path: Path, tmp_path_factory) -> dict:
    """Stage one, run once for the module BEFORE any sweep: 16 train + 4 eval HH rows."""
    d = tmp_path_factory.mktemp("sweep_data")
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    files = {"train": write_jsonl(d / "train.jsonl", rows[:16]), "eval": write_jsonl(d / "eval.jsonl", rows[16:])}
    out = d / "ref.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(files["train"]), str(files["eval"])),
                                         output=str(out), max_length=128, max_prompt_length=64))
    return {"model": str(tiny_llama), "cache": str(out), **{k: str(v) for k, v in files.items()}}


def sweep_config(cache: dict, output: Path, betas=BETAS, **kw) -> SweepConfig:
    return SweepConfig.flat(model=cache["model"], data=(cache["train"],), eval_data=(cache["eval"],),
                            ref_cache=cache["cache"], output=str(output), betas=tuple(betas), **{**SMALL, **kw})


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def no_stage_one(*args, **kwargs):
    raise AssertionError("the sweep called stage one")


@pytest.fixture(scope="module")
def swept(cache: dict, tmp_path_factory) -> dict:
    """One 3-β sweep in this process, with counters on the cache read, data reads and model loads."""
    mp = pytest.MonkeyPatch()
    counters = {"read_cache": Counter(refcache.read_cache), "load_examples": Counter(replies.load_data),
                "prepare": Counter(prepare.prepare)}
    mp.setattr(refcache, "read_cache", counters["read_cache"])
    mp.setattr(replies, "load_data", counters["load_examples"])  # every command's data read (DataSpec.load)
    mp.setattr(prepare, "prepare", counters["prepare"])
    for name in ("run", "score_batches", "open_cache_everywhere", "reference_pass"):
        mp.setattr(precompute, name, no_stage_one)
    loads = LOAD_COUNT["models"]
    cfg = sweep_config(cache, tmp_path_factory.mktemp("sweep") / "sweep-tiny")
    try:
        result = run_sweep(cfg)
    finally:
        mp.undo()
    return {"cfg": cfg, "result": result, "counts": {k: c.calls for k, c in counters.items()},
            "model_loads": LOAD_COUNT["models"] - loads}


# --------------------------------------------------------------------------------------------- the sweep
def test_three_betas_train_three_runs_from_one_cache_read(swept):
    out = Path(swept["cfg"].run.output)
    dirs = [out / run_name(b, "sigmoid") for b in BETAS]
    assert swept["result"].run_dirs == dirs
    assert [d.name for d in dirs] == ["beta-0.01-sigmoid", "beta-0.1-sigmoid", "beta-0.5-sigmoid"]
    for d, b in zip(dirs, BETAS):
        summary = json.loads((d / "summary.json").read_text())
        assert (summary["beta"], summary["loss_type"], summary["steps"]) == (b, "sigmoid", 4)
        assert (d / "adapter" / "adapter_config.json").is_file()
    assert swept["counts"] == {"read_cache": 1, "prepare": 1, "load_examples": 2}  # train + eval files, once
    assert swept["model_loads"] == 3  # one policy per run; the reference is never loaded


def test_runs_share_settings_seed_and_data_order(swept):
    dirs = swept["result"].run_dirs
    cfgs = [yaml.safe_load((d / "config.yaml").read_text()) for d in dirs]
    assert [c.pop("beta") for c in cfgs] == list(BETAS)
    for c, d in zip(cfgs, dirs):
        assert c.pop("output") == str(d)
    assert cfgs[0] == cfgs[1] == cfgs[2] and cfgs[0]["seed"] == 42
    # step 1's forward runs before any update: same data order => same policy log-probs in every run
    firsts = [next(json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
              for d in dirs]
    assert firsts[0]["logps/chosen"] == firsts[1]["logps/chosen"] == firsts[2]["logps/chosen"]
    assert firsts[0]["step"] == 1


def test_sweep_yaml_saved_and_round_trips(swept):
    saved = Path(swept["cfg"].run.output) / "sweep.yaml"
    assert config.build(SweepConfig, str(saved), {}) == swept["cfg"]


def test_importing_sweep_does_not_import_stage_one():
    code = ("import sys, stages.tools.sweep, stages.tools.compare; "
            "assert 'stages.stage1.precompute' not in sys.modules, 'stage one imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------- compare
def test_compare_three_rows_csv_and_png(swept, tmp_path):
    out = Path(swept["cfg"].run.output)
    assert (out / "compare.png").is_file() and (out / "compare.csv").is_file()  # written by the sweep itself
    rows, png, csv_path = compare(swept["result"].run_dirs, tmp_path)
    assert len(rows) == 3 and sorted(r.beta for r in rows) == list(BETAS)
    best = [r.best_accuracy for r in rows]
    assert best == sorted(best, reverse=True) and [r.best for r in rows] == [True, False, False]
    for r in rows:
        assert r.loss == "sigmoid" and r.steps == 4 and r.missing == () and r.name == run_name(r.beta, "sigmoid")
        assert r.final_accuracy is not None and r.final_margin is not None and r.wall_seconds is not None
        assert r.reward_drift >= 0 and r.best_step in (2, 4)
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {float(t["beta"]) for t in table} == set(BETAS)
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (450, 1500)
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert img.std() > 0.01 and len(colours) > 10
    text = format_table(rows)
    lines = text.splitlines()
    assert sum(line.endswith("-sigmoid") for line in lines) == 3 and lines[1].startswith("*")


def test_compare_cli_on_a_sweep_folder(swept, tmp_path):
    res = CliRunner().invoke(cli_main, ["compare", swept["cfg"].run.output, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("*") for line in res.output.splitlines()) == 1
    for b in BETAS:
        assert f"beta-{b}-sigmoid" in res.output
    assert (tmp_path / "compare.png").is_file()


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a training run"):
        compare([tmp_path / "empty"])
    res = CliRunner().invoke(cli_main, ["compare", str(tmp_path / "empty"), str(tmp_path / "nope")])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    # a path that does not exist is the error (a typo); folders without runs beside it would only be skipped
    assert len(errors) == 1 and "nope: no such folder" in errors[0] and "Traceback" not in res.output


def test_run_without_eval_is_still_compared(swept, tmp_path):
    src = swept["result"].run_dirs[0]
    bare = tmp_path / "no-eval"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("checkpoint-*", "adapter"))
    kept = [x for x in (bare / "metrics.jsonl").read_text().splitlines() if "eval/" not in x]
    (bare / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (bare / "summary.json").unlink()  # and unfinished: no wall time
    rows, png, _ = compare([bare, src], tmp_path / "cmp")
    assert [Path(r.run).name for r in rows] == [src.name, "no-eval"]  # runs without eval sort last
    row = rows[1]
    assert row.best_accuracy is None and row.final_margin is None and row.wall_seconds is None
    assert row.steps == 4 and not row.best
    assert any("no eval metrics" in m for m in row.missing) and any("unfinished" in m for m in row.missing)
    assert "no-eval: no eval metrics" in format_table(rows) and rows[1].name.endswith("no-eval")
    assert png.is_file()


# --------------------------------------------------------------------------------------------- resume
def test_interrupted_sweep_skips_finished_runs_and_resumes_the_unfinished_one(cache, swept, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "sweep-resume"
    run_sweep(sweep_config(cache, out, betas=BETAS[:2]))
    done = {b: (out / run_name(b, "sigmoid") / "summary.json").stat().st_mtime_ns for b in BETAS[:2]}

    steps = {"n": 0}
    real_clip = train.clip

    def interrupt(*args):  # dies inside the third run's step 3, after checkpoint-2 was written
        steps["n"] += 1
        if steps["n"] == 3:
            raise KeyboardInterrupt
        return real_clip(*args)

    monkeypatch.setattr(train, "clip", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_config(cache, out))
    third = out / run_name(BETAS[2], "sigmoid")
    assert (third / "checkpoint-2").is_dir() and not (third / "summary.json").exists()
    monkeypatch.setattr(train, "clip", real_clip)

    reads = Counter(refcache.read_cache)
    monkeypatch.setattr(refcache, "read_cache", reads)
    capsys.readouterr()
    run_sweep(sweep_config(cache, out))
    log = capsys.readouterr().out
    assert log.count("already finished") == 2 and "(step 2)" in log and reads.calls == 1
    assert {b: (out / run_name(b, "sigmoid") / "summary.json").stat().st_mtime_ns for b in BETAS[:2]} == done
    steps_logged = [json.loads(x)["step"] for x in (third / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps_logged == [1, 2, 3, 4]
    # the resumed run ends where the uninterrupted one of the first sweep ended
    resumed = json.loads((third / "summary.json").read_text())["final_eval"]
    straight = json.loads((swept["result"].run_dirs[2] / "summary.json").read_text())["final_eval"]
    assert resumed.keys() == straight.keys()
    for k in resumed:
        assert resumed[k] == pytest.approx(straight[k], rel=1e-5, abs=1e-7), k


# --------------------------------------------------------------------------------------------- CLI / YAML
def test_cli_yaml_config_and_flags(swept, tmp_path):
    """`dpo sweep --config` on the finished sweep folder: everything is skipped, nothing is read or trained."""
    cfg = swept["cfg"]
    doc = {k: v for k, v in config.to_dict(cfg).items() if k != "betas"}
    path = tmp_path / "sweep-tiny.yaml"
    path.write_text(yaml.safe_dump({**doc, "betas": list(BETAS[:1])}))
    runner = CliRunner()
    res = runner.invoke(cli_main, ["sweep", "--config", str(path), "--beta", "0.1", "--beta", "0.5"])
    assert res.exit_code == 0, res.output
    assert res.output.count("already finished") == 2 and "beta-0.01" not in res.output  # flags win over YAML
    assert "compare.png" in res.output

    shared = {k: v for k, v in doc.items() if k not in ("output", "losses")}  # one file, sections per command
    path.write_text(yaml.safe_dump({"shared": shared, "sweep": {"output": doc["output"], "betas": [0.5]}}))
    res = runner.invoke(cli_main, ["sweep", "--config", str(path)])
    assert res.exit_code == 0 and res.output.count("already finished") == 1, res.output

    res = runner.invoke(cli_main, ["sweep", "--config", str(path), "--learning-rate", "0.1"])
    assert res.exit_code == 2 and "other settings (learning_rate differ)" in res.output

    path.write_text(yaml.safe_dump({**doc, "beta": 0.1}))
    res = runner.invoke(cli_main, ["sweep", "--config", str(path)])
    assert res.exit_code == 2 and "unknown key 'beta'" in res.output

    path.write_text(yaml.safe_dump(doc))
    res = runner.invoke(cli_main, ["sweep", "--config", str(path)])
    assert res.exit_code == 2 and "at least one --beta" in res.output

    res = runner.invoke(cli_main, ["sweep", "--config", str(path), "--beta", "0.1", "--loss", "nope"])
    assert res.exit_code == 2 and "--loss 'nope'" in res.output


def test_example_config_is_valid(repo_root):
    cfg = config.build(SweepConfig, str(repo_root / "configs" / "sweep-smollm2-135m-cpu.yaml"), {})
    assert len(cfg.grid.betas) >= 3 and cfg.grid.losses


# --------------------------------------------------------------------------------------------- torchrun
@pytest.mark.dist
def test_sweep_under_torchrun_two_ranks(cache, tmp_path):
    """Two runs in ONE process group (gloo, FSDP2 on CPU): the group must outlive each run; ~25 s."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sweep-dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "stages.cli", "sweep", "--model", cache["model"], "--data", cache["train"],
           "--eval-data", cache["eval"], "--ref-cache", cache["cache"], "--output", str(out), "--beta", "0.1",
           "--beta", "0.5", "--no-load-in-4bit", "--no-gradient-checkpointing", "--batch-size", "2",
           "--max-steps", "3", "--eval-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for b in (0.1, 0.5):
        assert json.loads((out / run_name(b, "sigmoid") / "summary.json").read_text())["steps"] == 3
    assert (out / "compare.png").is_file() and proc.stdout.count("(* = best") == 1  # rank 0 only
