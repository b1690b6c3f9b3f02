"""`dpo export` as a command: a run (or an adapter) in, a loadable model folder with its card out; every bad input
one line before anything is written; the output under a temporary name, renamed when complete, locked.

The merge's numbers are tests/test_export_merge.py's, the GGUF's tests/test_export_gguf.py's; here the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stages.base.fsio import OutputLock
from stages.cache.refcache import read_meta
from stages.cli import main
from stages.tools.modelcard import manifest_digest
from tests.bounds import merge_logit_tol, own_rounding

DEMO = Path(__file__).resolve().parents[1] / "stages" / "demo_data"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line(res, *needles: str) -> str:
    """The failure is ONE `error:` line on stderr naming what it must, exit 2, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= 210, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory) -> dict:
    """A QLoRA run of the tiny model on 16 demo rows: cache (NF4 reference), 2 steps with an eval."""
    root = tmp_path_factory.mktemp("export")
    rows = DEMO.joinpath("train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    (root / "eval.jsonl").write_text("\n".join(rows[16:24]) + "\n")
    data = ["--data", str(root / "train.jsonl")]
    res = invoke("precompute-ref", "--model", str(tiny_llama), *data, "--data", str(root / "eval.jsonl"),
                 "--output", str(root / "ref.parquet"), "--max-length", "96", "--load-in-4bit")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--model", str(tiny_llama), *data, "--eval-data", str(root / "eval.jsonl"), "--ref-cache",
                 str(root / "ref.parquet"), "--output", str(root / "run"), "--max-steps", "2", "--batch-size", "4",
                 "--lora-r", "4", "--learning-rate", "1e-2", "--no-gradient-checkpointing")
    assert res.exit_code == 0, res.output
    return {"root": root, "run": root / "run", "model": tiny_llama, "cache": root / "ref.parquet"}


@pytest.fixture(scope="module")
def exported(run) -> Path:
    out = run["root"] / "exported"
    res = invoke("export", str(run["run"]), "--output", str(out))
    assert res.exit_code == 0, res.output
    return out


def test_the_export_loads_without_peft_and_is_the_trained_policy(run, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "README.md",
            "dpo_config.yaml", "export.json"} <= names
    assert not [n for n in names if "adapter" in n]  # nothing PEFT
    assert not list(exported.parent.glob(".exported.*"))  # no temporary, no lock left
    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for dtype in (torch.float32, torch.float64):  # float64: the exact function, for the bound (tests/bounds.py)
        base = AutoModelForCausalLM.from_pretrained(str(run["model"]), dtype=dtype)
        peft = PeftModel.from_pretrained(base, str(run["run"] / "adapter")).eval()
        with torch.no_grad():
            logits[dtype] = peft(ids).logits
            with peft.disable_adapter():
                logits["base"] = peft(ids).logits
    with torch.no_grad():
        got = model(ids).logits
    tol = merge_logit_tol(own_rounding(logits[torch.float32], logits[torch.float64]))
    assert float((got - logits[torch.float32]).abs().max()) <= tol
    assert float((logits[torch.float64] - logits["base"]).abs().max()) > 100 * tol, "the adapter moved nothing"
    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_the_model_card_says_how_it_was_made(run, exported):
    text = (exported / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == str(run["model"]) and front["library_name"] == "transformers"
    assert {"dpo", "lora", "qlora", "merged"} <= set(front["tags"]) and "license" not in front  # the base has none
    summary = json.loads((run["run"] / "summary.json").read_text())
    meta = read_meta(run["cache"])
    for needle in (f"weights fingerprint `{meta['model']['weights']['hash']}`", "NF4 base (QLoRA)",
                   f"fingerprint `{manifest_digest(meta['manifest'])}`", "(16 rows)", "(8 rows)",
                   "loss sigmoid, beta 0.1", f"; {summary['steps']} steps", "lora_r 4", "SFT adapter: none",
                   f"loss {summary['final_eval']['eval/loss']:.4g}", "Best eval", "dpo train --config dpo_config.yaml",
                   f"dpo precompute-ref --model {run['model']}", f"dpo export {run['run']} --output"):
        assert needle in text, needle
    assert yaml.safe_load((exported / "dpo_config.yaml").read_text()) == \
        yaml.safe_load((run["run"] / "config.yaml").read_text())
    record = json.loads((exported / "export.json").read_text())
    assert record["dtype"] == "fp32" and record["merge_into"] == "original" and record["base_nf4_in_training"]


def test_dpo_sample_takes_the_export_as_its_model(run, exported, tmp_path):
    res = invoke("sample", "--model", str(exported), "--data", str(run["root"] / "eval.jsonl"), "-n", "1",
                 "--max-new-tokens", "4", "--output", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output


def test_an_adapter_folder_alone_and_base_license(run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(run["model"], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = tmp_path / "out"
    res = invoke("export", str(run["run"] / "adapter"), "--output", str(out), "--base", str(base), "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["license"] == "apache-2.0"
    assert json.loads((out / "config.json").read_text()).get("dtype", json.loads(
        (out / "config.json").read_text()).get("torch_dtype")) == "bfloat16"


# ------------------------------------------------------------------------------------------ bad input, one line
def test_bad_sources_are_one_line_and_write_nothing(run, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "half").mkdir()
    shutil.copy(run["run"] / "config.yaml", tmp_path / "half" / "config.yaml")
    one_line(invoke("export", str(tmp_path / "half"), "--output", str(out)), "without an adapter", "rerun")
    one_line(invoke("export", str(tmp_path), "--output", str(out)), "neither a `dpo train` output")
    one_line(invoke("export", str(tmp_path / "nope"), "--output", str(out)), "no such folder")
    lost = tmp_path / "lost"
    shutil.copytree(run["run"] / "adapter", lost)
    cfg = json.loads((lost / "adapter_config.json").read_text())
    (lost / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/gone/model"}))
    one_line(invoke("export", str(lost), "--output", str(out)), "/gone/model", "--base")
    one_line(invoke("export", str(run["run"]), "--output", str(out), "--max-shard-size", "lots"), "--max-shard-size")
    for inside in (run["run"], run["root"]):  # the run itself, or a folder holding it (--overwrite would delete it)
        one_line(invoke("export", str(run["run"]), "--output", str(inside), "--overwrite"), "would replace")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_existing_output_needs_overwrite_and_survives_a_failed_one(run, exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "mine.txt").write_text("keep")
    one_line(invoke("export", str(run["run"]), "--output", str(out)), "exists", "--overwrite")

    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(out))
    monkeypatch.setattr("stages.tools.export.write_model_files", broken)
    one_line(invoke("export", str(run["run"]), "--output", str(out), "--overwrite"), "No space left")
    assert (out / "mine.txt").read_text() == "keep" and not (tmp_path / ".out.lock").exists()
    monkeypatch.undo()
    assert invoke("export", str(run["run"]), "--output", str(out), "--overwrite").exit_code == 0
    assert not (out / "mine.txt").exists() and (out / "README.md").is_file() and not list(tmp_path.glob(".out*"))


def test_too_little_disk_is_refused_before_writing(run, tmp_path, monkeypatch):
    monkeypatch.setattr("stages.tools.export.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    line = one_line(invoke("export", str(run["run"]), "--output", str(tmp_path / "out")), "GiB free", "--output")
    assert "needs" in line and not (tmp_path / "out").exists()


def test_gguf_for_an_architecture_it_cannot_write_is_refused_first(run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(run["model"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "olmo"}))
    one_line(invoke("export", str(run["run"]), "--output", str(tmp_path / "out"), "--base", str(base), "--gguf"),
             "--gguf", "olmo")
    assert not (tmp_path / "out").exists()


def test_dequantized_needs_an_nf4_run(run, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(run["run"] / "adapter", plain)
    one_line(invoke("export", str(plain), "--output", str(tmp_path / "o"), "--merge-into", "dequantized"),
             "not trained on an NF4 base", "--merge-into original")


def test_a_second_writer_is_refused_and_a_killed_ones_temporary_removed(run, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    with OutputLock(tmp_path / ".out.lock", out, "--output"):
        one_line(invoke("export", str(run["run"]), "--output", str(out)), "is being written by process")
    assert invoke("export", str(run["run"]), "--output", str(out)).exit_code == 0
    assert not stale.exists() and not (tmp_path / ".out.lock").exists()


def test_gguf_through_the_command(run, tmp_path):
    out = tmp_path / "out"
    res = invoke("export", str(run["run"]), "--output", str(out), "--gguf", "--gguf-type", "f16")
    assert res.exit_code == 0, res.output
    assert (out / "model.f16.gguf").is_file()
    assert "llama-server -m" in (out / "README.md").read_text()
    assert json.loads((out / "export.json").read_text())["gguf"] == "model.f16.gguf"


class Killed(BaseException):
    """Nothing catches it: as if the process died there."""


def test_a_crashed_export_resumes_without_redoing_whole_files(run, exported, tmp_path, monkeypatch):
    """Killed after the first of three shards: the same command keeps that shard (not written again), writes the
    rest, and the result is byte for byte the export of an uninterrupted run; another job starts afresh."""
    from stages.model import merge

    out, written = tmp_path / "out", []
    real = merge._write_shard

    def dying(out_dir, shard, *a):
        if written:
            raise Killed("kill -9")  # the process ends here, after the first shard
        written.append(shard.file)
        return real(out_dir, shard, *a)
    args = ["export", str(run["run"]), "--output", str(out), "--max-shard-size", "150KB"]
    monkeypatch.setattr(merge, "_write_shard", dying)
    with pytest.raises(Killed):
        invoke(*args)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / written[0]).is_file() and not (tmp_path / ".out.lock").exists()
    first = (partial / written[0]).stat().st_ino
    monkeypatch.setattr(merge, "_write_shard", lambda o, shard, *a: written.append(shard.file) or real(o, shard, *a))
    res = invoke(*args)
    assert res.exit_code == 0 and "1 of 3 shard(s) already written" in res.output, res.output
    assert written[1:] == ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert (out / written[0]).stat().st_ino == first and not partial.exists()
    clean = tmp_path / "clean"
    assert invoke("export", str(run["run"]), "--output", str(clean), "--max-shard-size", "150KB").exit_code == 0
    for f in sorted(p.name for p in clean.glob("*.safetensors*")):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    assert not (out / ".export-job.json").exists()


def test_the_settings_name_what_the_writers_take():
    """--merge-into and --gguf-type are declared in the settings (torch-free); the writers take exactly those."""
    import typing

    from stages.model.ggufwrite import GGUF_TYPES
    from stages.model.merge import MERGE_INTO
    from stages.settings.commands import GgufType, MergeInto
    from stages.tools.export import GGUF_OF_DTYPE

    assert set(typing.get_args(MergeInto)) == set(MERGE_INTO)
    assert set(typing.get_args(GgufType)) - {"auto"} == set(GGUF_TYPES) == set(GGUF_OF_DTYPE.values())
