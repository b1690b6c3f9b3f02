"""Issue 22: stage two trains only against a cache of ITS OWN reference, unless --allow-reference-mismatch.

Pinned here: a cache made from other weights, or an explicit --adapter/--load-in-4bit/--dtype other than the cache's,
is refused in one line before any model loads (`dpo train` and `dpo sweep`), and passes with the flag (a note says
so); the same weights reached by another path and explicit flags equal to the cache's pass; a policy whose weights
fingerprint like the reference's but are not is stopped by the step-0 drift check (the drift row written, nothing
else) unless the flag; a length mismatch never offers --allow-cache-mismatch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from stages.base.errors import UserError, one_line
from stages.cli import main as cli_main
from stages.settings.commands import TrainConfig
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import prepare as prepare_mod, train
from stages.stage2.prepare import prepare, tokenization_error
from stages.tools.sweep import SweepConfig, run_sweep
from tests.hhrows import hh_rows, write_jsonl
from tests.tiny import build_tiny_model

SMALL = dict(max_steps=1, batch_size=2, eval_batch_size=2, lora_r=4, lora_alpha=8, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def ref(tiny_llama: Path, hh_path: Path, tmp_path_factory) -> dict:
    """4 HH rows and an fp32 cache of them from the tiny Llama."""
    d = tmp_path_factory.mktemp("refmatch")
    rows = write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, 4))
    cache = d / "ref.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(rows),), output=str(cache),
                                         max_length=128, max_prompt_length=64))
    return {"model": tiny_llama, "train": rows, "cache": cache, "dir": d}


def cfg_of(ref: dict, out: Path, **kw) -> TrainConfig:
    return TrainConfig.flat(**{"model": str(ref["model"]), "data": (str(ref["train"]),), "ref_cache": str(ref["cache"]),
                               "output": str(out), **SMALL, **kw})


def prepare_of(cfg: TrainConfig):
    return prepare(cfg.data, cfg.model, cfg.cache, cfg.lengths)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """The tiny Llama's architecture and tokenizer with other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("other"), arch="llama", tie=True, seed=1)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(train, "load_policy", refuse)


def test_other_weights_refused_before_any_model_loads(ref, other, tmp_path, no_model_load):
    with pytest.raises(UserError, match="other weights than the cache's") as e:
        train.run(cfg_of(ref, tmp_path / "run", model=str(other)))
    assert "--allow-reference-mismatch" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    # the CLI: one line, exit 2
    result = CliRunner().invoke(cli_main, ["train", "--model", str(other), "--data", str(ref["train"]),
                                           "--ref-cache", str(ref["cache"]), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--allow-reference-mismatch" in errors[0], result.stderr
    # the sweep prepares once, before anything is written or trained
    sweep = SweepConfig.flat(model=str(other), data=(str(ref["train"]),), ref_cache=str(ref["cache"]),
                             output=str(tmp_path / "sweep"), betas=(0.1, 0.5), **SMALL)
    with pytest.raises(UserError, match="other weights"):
        run_sweep(sweep)
    assert not (tmp_path / "sweep" / "sweep.yaml").exists()


def test_other_weights_train_with_the_flag(ref, other, tmp_path, capsys):
    summary = train.run(cfg_of(ref, tmp_path / "run", model=str(other), allow_reference_mismatch=True))
    out = capsys.readouterr().out
    assert "other weights than the cache's" in out and "allowed by --allow-reference-mismatch" in out, out
    assert "cache differs in weights" in out, out
    assert summary["steps"] == 1 and (tmp_path / "run" / "summary.json").is_file()


def test_same_weights_by_another_path_pass(ref, tmp_path):
    copy = shutil.copytree(ref["model"], tmp_path / "copy")
    link = tmp_path / "link"
    link.symlink_to(ref["model"], target_is_directory=True)
    for folder in (copy, link):
        prep = prepare_of(cfg_of(ref, tmp_path / "run", model=str(folder)))
        assert prep.reference_differs == () and not any("reference" in n for n in prep.notes), prep.notes


@pytest.fixture(scope="module")
def adapter(ref) -> Path:
    """A fresh LoRA adapter of the tiny Llama (the cache has none)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ref["model"]), dtype=torch.float32)
    out = ref["dir"] / "adapter"
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("flag", ["load_in_4bit", "dtype", "adapter"])
def test_explicit_model_flags_other_than_the_caches(ref, adapter, tmp_path, flag):
    value = {"load_in_4bit": True, "dtype": "bf16", "adapter": str(adapter)}[flag]
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} .* differs from the cache's reference") as e:
        prepare_of(cfg_of(ref, tmp_path / "run", **{flag: value}))
    assert "--allow-reference-mismatch" in str(e.value)
    prep = prepare_of(cfg_of(ref, tmp_path / "run", allow_reference_mismatch=True, **{flag: value}))
    assert prep.reference_differs == (flag,) and "allowed by --allow-reference-mismatch" in prep.notes[0]


def test_explicit_model_flags_equal_to_the_caches_pass(ref, tmp_path):
    explicit = [{"load_in_4bit": False}, {"dtype": "fp32"}] + ([] if torch.cuda.is_available() else [{"dtype": "auto"}])
    for kw in explicit:
        assert prepare_of(cfg_of(ref, tmp_path / "run", **kw)).reference_differs == (), kw


@pytest.fixture
def lookalike(ref, tmp_path, monkeypatch) -> Path:
    """Other weights (every matrix x20: sharp logits) that prepare's fingerprint takes for the reference's: what the
    drift check is the last guard against (the fingerprint hashes headers and a sample of the bytes only)."""
    out = shutil.copytree(ref["model"], tmp_path / "lookalike")
    for f in out.glob("*.safetensors"):
        save_file({k: v * 20 if v.ndim == 2 else v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    real = prepare_mod.folder_fingerprint

    def fingerprint(path, full_hash=False):
        return real(str(ref["model"]) if Path(path) == out else path, full_hash)
    monkeypatch.setattr(prepare_mod, "folder_fingerprint", fingerprint)
    return out


def test_high_step0_drift_stops_the_run_unless_the_flag(ref, lookalike, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"ref_drift .* per token \(> 0\.05\)") as e:
        train.run(cfg_of(ref, out, model=str(lookalike)))
    assert "--allow-reference-mismatch" in one_line(str(e.value))  # what the CLI prints: the flag survives the cap
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["ref_drift_per_token"] > train.DRIFT_WARN, rows
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert not list(out.glob("checkpoint*")), list(out.iterdir())
    assert "step 0: ref_drift" in capsys.readouterr().out  # the value is printed before the stop
    # the same folder, deliberately: the run trains, with one warning
    summary = train.run(cfg_of(ref, out, model=str(lookalike), allow_reference_mismatch=True))
    printed = capsys.readouterr().out
    assert summary["steps"] == 1 and sum(line.startswith("WARNING") for line in printed.splitlines()) == 1, printed


def test_length_mismatch_never_offers_the_hash_waiver(ref, tmp_path):
    for waive in (False, True):
        with pytest.raises(UserError, match="max_length: cache 128, now 100") as e:
            prepare_of(cfg_of(ref, tmp_path / "run", max_length=100, allow_cache_mismatch=waive))
        assert "--allow-cache-mismatch" not in str(e.value) and "drop --max-length" in str(e.value), str(e.value)
    # a hash only: the waiver is offered
    cache = type("Cache", (), {"ref_cache": "ref.parquet"})()
    meta = {"tokenization": {"max_length": 8, "tokenizer_hash": "a"}}
    assert "(a hash only: --allow-cache-mismatch)" in tokenization_error(cache, meta, {"max_length": 8,
                                                                                       "tokenizer_hash": "b"})
