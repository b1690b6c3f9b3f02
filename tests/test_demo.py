"""The demo: its shipped data are what the generator makes, and `dpo demo --quick` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.data import demodata
from stages.data.rows import load_examples

REPO = Path(__file__).resolve().parents[1]


def test_shipped_demo_data_equal_the_generator_output():
    train, evaluation = demodata.generate()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        shipped = [json.loads(line) for line in (demodata.OUT / name).read_text().splitlines()]
        assert shipped == rows, f"{name} differs from `python -m stages.data.demodata`; regenerate it"


def test_demo_train_and_eval_questions_are_disjoint():
    train, _ = load_examples([demodata.OUT / "train.jsonl"])
    evaluation, report = load_examples([demodata.OUT / "eval.jsonl"])
    assert report.read == report.kept == 64 and len(train) >= 200
    question = lambda e: e.prompt[-1]["content"]  # noqa: E731
    assert not {question(e) for e in train} & {question(e) for e in evaluation}


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    from stages.tools.demo import run_demo

    summary = run_demo(quick=True, cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
                       models_dir=str(REPO / "cache" / "models"))
    out = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    # it ends by showing what training changed: two held-out prompts, reference | policy, with rewards
    assert out.count("reference (reward ") == 2 and out.count("│ policy (reward ") == 2
    assert Path(summary["samples"]).is_file()
    assert "(* = best eval reward accuracy)" in out
    png = Path(summary["png"])
    assert png.is_file() and png.stat().st_size > 10_000
    assert summary["best_eval_accuracy"] is not None and 0.0 <= summary["best_eval_accuracy"] <= 1.0
    run = Path(summary["runs"][0])
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "summary.json").is_file()
