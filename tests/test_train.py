"""Stage two (`dpo train --ref-cache`) on the tiny random models and real HH-RLHF rows.

What is pinned here: every metric the issue lists at every logging step, eval records, the step-0 drift record,
config/summary/adapter outputs (the adapter reloads to the trained policy's log-probs); exactly one model load and
no reference model anywhere (the cache's source folder is deleted before any training); the join by example id and
each cache mismatch as a one-line exit-2 error; the drift check (~0 for a matching NF4 cache, a WARNING for an fp32
cache against an NF4 policy); the CPU bitsandbytes fix (LoRA gradients through NF4 equal the dequantized model's
after an eval-mode forward); exact resume after a crash (in-process) and after kill -9 (CLI); checkpoint rotation;
every loss type; and (slow) a short real SmolLM2 run that learns.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from stages.cli import main as cli_main
from stages.model import models
from stages.model.logprobs import collate_pairs, sequence_logps
from stages.settings import yamlconfig as cfgmod
from stages.settings.options import replace
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import train
from stages.stage2.prepare import prepare
from stages.stage2.train import TrainConfig
from tests.bounds import logit_scale, logit_scale_of_files, loss_tol, pair_sequences, sum_tol, token_tol

REPO = Path(__file__).resolve().parents[1]
MAXLEN, MAXPROMPT = 256, 128
N_TRAIN, N_EVAL = 40, 12

TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate", "grad_norm",
              "tokens_per_second", "epoch", "step")
EVAL_KEYS = tuple("eval/" + k for k in TRAIN_KEYS[:9])


# ---------------------------------------------------------------------------------------------------- helpers
from tests.hhrows import hh_rows, write_jsonl  # noqa: E402  (shared with the other stage tests)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_cache(model: Path, data: list[Path], out: Path, load_in_4bit: bool) -> Path:
    precompute.run(PrecomputeConfig.flat(model=str(model), data=tuple(map(str, data)), output=str(out),
                                         load_in_4bit=load_in_4bit, max_length=MAXLEN, max_prompt_length=MAXPROMPT))
    return out


def tcfg(files: dict, out: Path, **kw) -> TrainConfig:
    """A short tiny-model run: NF4 policy against the NF4 cache unless told otherwise."""
    base = dict(model=str(files["model"]), data=(str(files["train"]),), ref_cache=str(files["nf4"]), output=str(out),
                max_steps=2, batch_size=2, eval_batch_size=4, lora_r=8, lora_alpha=16, learning_rate=1e-3)
    base.update(kw)
    return TrainConfig.flat(**base)


def prepare_of(cfg: TrainConfig):
    """`prepare` with a train config's groups (what train.run passes)."""
    return prepare(cfg.data, cfg.model, cfg.cache, cfg.lengths, cfg.loss.ld_alpha)


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def invoke(*args: str):
    """`dpo ARGS` in this process (no torch import per call); stderr kept apart from stdout."""
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=True)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line containing every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    text = result.stderr
    assert "Traceback" not in text and "Traceback" not in result.stdout, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def train_cli_args(files: dict, out: Path, *extra: str, cache: str = "nf4", data: str = "train") -> list[str]:
    return ["train", "--model", str(files["model"]), "--data", str(files[data]), "--ref-cache", str(files[cache]),
            "--output", str(out), "--max-steps", "1", "--batch-size", "2", *extra]


def logps_of(model, items, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of Prepared items, eval mode, no grad, one example at a time (no padding effects)."""
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for it in items:
            lp = sequence_logps(model, collate_pairs([it.enc], pad_id))
            chosen.append(float(lp.chosen_logps[0]))
            rejected.append(float(lp.rejected_logps[0]))
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def scaled_model(src: Path, dst: Path, scale: float) -> Path:
    """A copy of a tiny model with every matrix multiplied by `scale`: sharp logits, so NF4 rounding matters."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    model.save_pretrained(str(dst))
    return dst


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(hh_path: Path, tiny_llama: Path, tmp_path_factory) -> dict:
    """40 HH rows for training, 12 for eval; an NF4 cache over both, made from a COPY of the model folder that is
    deleted right after: no later test can read a reference model, because none exists."""
    d = tmp_path_factory.mktemp("train_data")
    files = {
        "model": tiny_llama,
        "train": write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, N_TRAIN)),
        "eval": write_jsonl(d / "eval.jsonl", hh_rows(hh_path, N_TRAIN, N_TRAIN + N_EVAL)),
        "extra": write_jsonl(d / "extra.jsonl", hh_rows(hh_path, 0, 20) + hh_rows(hh_path, 60, 62)),  # 2 uncached
    }
    ref = d / "reference_model"
    shutil.copytree(tiny_llama, ref)
    t0 = time.perf_counter()
    files["nf4"] = make_cache(ref, [files["train"], files["eval"]], d / "ref-nf4.parquet", load_in_4bit=True)
    print(f"\nNF4 cache of {N_TRAIN + N_EVAL} rows: {time.perf_counter() - t0:.1f}s")
    shutil.rmtree(ref)
    files["deleted_reference"] = ref
    return files


@pytest.fixture(scope="module")
def fp32_files(files: dict, tmp_path_factory) -> dict:
    """The same data with an fp32 cache (for exact fp32 policies)."""
    d = tmp_path_factory.mktemp("train_fp32")
    return {**files, "fp32": make_cache(files["model"], [files["train"], files["eval"]], d / "ref-fp32.parquet", False)}


# ----------------------------------------------------------------------------------------- 1. end to end
@pytest.fixture(scope="module")
def e2e(fp32_files: dict, tmp_path_factory):
    """fp32 policy + fp32 cache: 5 steps, log every 2, eval every 2 (+ the end), checkpoint every 2 (keep 2)."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    cfg = tcfg(fp32_files, out, ref_cache=str(fp32_files["fp32"]), eval_data=(str(fp32_files["eval"]),),
               load_in_4bit=False, max_steps=5, logging_steps=2, eval_steps=2, save_steps=2, save_total_limit=2,
               learning_rate=1e-2, lora_dropout=0.0)
    held = []
    real = train.load_policy
    train.load_policy = lambda *a, **k: held.append(real(*a, **k)) or held[-1]
    try:
        t0 = time.perf_counter()
        summary = train.run(cfg)
        print(f"\ne2e train run (5 steps, 3 evals): {time.perf_counter() - t0:.1f}s")
    finally:
        train.load_policy = real
    return {"cfg": cfg, "out": out, "summary": summary, "policy": held[0], "records": read_jsonl(out / "metrics.jsonl")}


def test_e2e_metrics_every_logging_step(e2e):
    records = e2e["records"]
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 5]  # every 2 steps, and the last one
    for r in train_recs:
        missing = [k for k in TRAIN_KEYS if k not in r]
        assert not missing, (missing, r)
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS), r
        assert r["epoch"] == pytest.approx(r["step"] / (N_TRAIN // 2))
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-9)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
        assert r["grad_norm"] > 0 and r["tokens_per_second"] > 0
    assert train_recs[0]["learning_rate"] > 0


def test_e2e_eval_records_and_step0_drift(e2e, fp32_files):
    records = e2e["records"]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every eval_steps, and at the end
    for r in evals:
        assert set(r) == {"step", *EVAL_KEYS}, sorted(set(r) ^ {"step", *EVAL_KEYS})
        assert all(math.isfinite(r[k]) for k in EVAL_KEYS)
    first = records[0]
    assert first["step"] == 0 and "ref_drift" in first and "loss" not in first
    # fp32 policy (LoRA B = 0) against an fp32 cache of the same weights, batched otherwise: rounding only, each
    # sum within sum_tol(tokens, Z), so the token-weighted mean within token_tol(Z) (tests/bounds.py)
    z = logit_scale_of_files(fp32_files["model"], [fp32_files["train"]], MAXLEN, MAXPROMPT)
    assert first["ref_drift_per_token"] <= token_tol(z), (first, token_tol(z))


def test_e2e_config_and_summary(e2e):
    out, cfg = e2e["out"], e2e["cfg"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == cfgmod.to_dict(cfg)
    assert cfgmod.build(TrainConfig, str(out / "config.yaml"), {}) == cfg  # the saved config reruns as-is
    summary = json.loads((out / "summary.json").read_text())
    assert summary == e2e["summary"]
    evals = [r for r in e2e["records"] if "eval/loss" in r]
    assert summary["steps"] == 5 and summary["seconds"] > 0 and summary["peak_memory_gb"] > 0
    memory = summary["memory"]  # per phase and rank (stages/model/memory.py); peak_memory_gb: max over both
    assert list(memory) == ["load", "train"] and all(len(r["per_rank_gb"]) == 1 for r in memory.values())
    assert summary["peak_memory_gb"] == max(r["max_gb"] for r in memory.values())
    assert summary["final_eval"] == evals[-1]
    assert summary["best_eval"]["eval/rewards/accuracies"] == max(r["eval/rewards/accuracies"] for r in evals)
    assert summary["final_train"]["step"] == 5
    assert summary["ref_drift_step0"] == e2e["records"][0]["ref_drift"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob(".*")), "temporary files left behind"


def test_e2e_adapter_reloads_to_the_trained_policy(e2e, fp32_files):
    """adapter/ is a normal PEFT folder: on the base it gives the trained policy's log-probs (fp32, exact)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prep = prepare_of(replace(e2e["cfg"], data=(str(fp32_files["eval"]),), eval_data=()))
    items, pad = prep.train, prep.tokenizer.pad_token_id
    base = AutoModelForCausalLM.from_pretrained(str(fp32_files["model"]), dtype=torch.float32)
    base_c, _ = logps_of(base, items, pad)
    loaded = PeftModel.from_pretrained(base, str(e2e["out"] / "adapter"))
    got_c, got_r = logps_of(loaded, items, pad)
    from stages.model.packing import unuse_segments

    unuse_segments(e2e["policy"])  # --attention auto switched it to segments, which plain forwards cannot take
    want_c, want_r = logps_of(e2e["policy"], items, pad)
    # same weights in two module trees (maybe other kernels/layouts): rounding only, per example (tests/bounds.py)
    z = logit_scale(loaded.eval(), pair_sequences([it.enc for it in items]))
    n_c, n_r = (torch.tensor([len(getattr(it.enc, k)) for it in items], dtype=torch.float64)
                for k in ("chosen_ids", "rejected_ids"))
    assert ((got_c - want_c).abs() <= sum_tol(n_c, z)).all() and ((got_r - want_r).abs() <= sum_tol(n_r, z)).all()
    assert float((got_c - base_c).abs().max()) > 1e-2, "the adapter did not move the policy: test is vacuous"
    # ...and they are the numbers behind the final eval record (mean over the whole eval set, computed in padded
    # batches of 4): each example within sum_tol, so the mean within the mean of those bounds
    final = e2e["summary"]["final_eval"]
    assert abs(float(got_c.mean()) - final["eval/logps/chosen"]) <= float(sum_tol(n_c, z).mean())
    assert abs(float(got_r.mean()) - final["eval/logps/rejected"]) <= float(sum_tol(n_r, z).mean())


# ----------------------------------------------------------------------------- 2. no reference model loaded
def test_exactly_one_model_load_and_no_reference_anywhere(files, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    from stages.model import loading

    loads: list[str] = []
    real, hf = loading.index_checkpoint, PreTrainedModel.from_pretrained.__func__

    def counting(folder):
        loads.append(str(folder))
        return real(folder)

    def hf_load(cls, path, *args, **kwargs):
        loads.append(f"from_pretrained {path}")
        return hf(cls, path, *args, **kwargs)

    monkeypatch.setattr(loading, "index_checkpoint", counting)  # every weight read starts here
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(hf_load))
    assert not files["deleted_reference"].exists()  # the folder the cache was made from is gone
    before = models.LOAD_COUNT["models"]
    summary = train.run(tcfg(files, tmp_path / "run", eval_data=(str(files["eval"]),)))
    assert models.LOAD_COUNT["models"] - before == 1
    assert loads == [str(files["model"])], loads  # one model's weights read: the policy's base
    assert "WARNING" not in capsys.readouterr().out
    # an NF4 cache of the same weights, though its source folder is gone: rounding only (tests/bounds.py)
    z = logit_scale_of_files(files["model"], [files["train"]], MAXLEN, MAXPROMPT, load_in_4bit=True)
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["ref_drift"] == summary["ref_drift_step0"] and first["ref_drift_per_token"] <= token_tol(z), first


def test_stage_two_never_imports_stage_one():
    code = ("import stages.stage2.train, stages.cli, sys; "
            "assert 'stages.stage1.precompute' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- 3. trusting the cache
def test_join_by_example_id_shuffled_subset(files, tmp_path):
    rows = read_jsonl(files["train"])
    random.Random(7).shuffle(rows)
    subset = write_jsonl(tmp_path / "subset.jsonl", rows[:25])
    full = prepare_of(tcfg(files, tmp_path / "a"))
    part = prepare_of(tcfg(files, tmp_path / "b", data=(str(subset),)))
    df = pl.read_parquet(files["nf4"])
    cached = {r["example_id"]: r for r in df.iter_rows(named=True)}
    assert len(part.train) == 25
    by_id = {it.enc.example_id: it for it in full.train}
    for it in part.train:
        c = cached[it.enc.example_id]
        assert (it.ref_chosen, it.ref_rejected) == (c["ref_chosen_logps"], c["ref_rejected_logps"])
        assert (len(it.enc.prompt_ids), len(it.enc.chosen_ids), len(it.enc.rejected_ids)) == (
            c["prompt_tokens"], c["chosen_tokens"], c["rejected_tokens"])
        assert it == by_id[it.enc.example_id]  # same tokens and reference values as in the unshuffled file
    # the file's order is kept (not the cache's), so the join cannot have been by position
    from stages.data.rows import load_examples

    examples, _ = load_examples([subset])
    assert [it.enc.example_id for it in part.train] == [e.example_id for e in examples]
    assert [it.enc.example_id for it in part.train] != sorted(it.enc.example_id for it in part.train)


def test_error_example_missing_from_cache(files, tmp_path):
    before = models.LOAD_COUNT["models"]
    line = assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r", data="extra")),
                                 "2 of 22 examples are not in the cache", "precompute-ref")
    assert str(files["nf4"]) in line
    line = assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r2"), "--eval-data", str(files["extra"])),
                                 "eval data", "not in the cache")
    assert models.LOAD_COUNT["models"] == before, "a bad cache must fail before any model is loaded"
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_error_other_max_length(files, tmp_path):
    assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r"), "--max-length", "200"),
                          "max_length: cache 256, now 200", "precompute-ref")
    assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r"), "--max-prompt-length", "64"),
                          "max_prompt_length")
    # the waiver is for the tokenizer fingerprint only, never for lengths
    assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r"), "--max-length", "200",
                                 "--allow-cache-mismatch"), "max_length")


@pytest.fixture(scope="module")
def other_template_model(files, tmp_path_factory) -> Path:
    """The same weights with a different chat template: fingerprint differs, plain-text token ids do not."""
    d = tmp_path_factory.mktemp("tpl") / "model"
    shutil.copytree(files["model"], d)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text("{# another template #}" + jinja.read_text())
    else:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = "{# another template #}" + tc["chat_template"]
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def test_error_other_tokenizer_and_waiver(files, other_template_model, tmp_path, capsys):
    other = {**files, "model": other_template_model}
    assert_one_line_error(invoke(*train_cli_args(other, tmp_path / "r")), "chat_template_hash",
                          "--allow-cache-mismatch")
    # --allow-cache-mismatch waives exactly this (HH rows are plain text: the token ids are unchanged)
    result = invoke(*train_cli_args(other, tmp_path / "ok"), "--allow-cache-mismatch")
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "ok" / "summary.json").is_file()


def test_error_non_finite_cache_value(files, tmp_path):
    table = pq.read_table(files["nf4"])
    values = table.column("ref_rejected_logps").to_pylist()
    values[3] = float("nan")
    bad_id = table.column("example_id")[3].as_py()
    table = table.set_column(table.schema.get_field_index("ref_rejected_logps"), "ref_rejected_logps",
                             pa.array(values, pa.float64()))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(files["nf4"]).metadata), tmp_path / "nan.parquet")
    bad = {**files, "nan": tmp_path / "nan.parquet"}
    assert_one_line_error(invoke(*train_cli_args(bad, tmp_path / "r", cache="nan")), "non-finite", bad_id[:12])


def test_error_through_the_real_cli_process(files, tmp_path):
    """What a user sees from `dpo train`: exit 2, one line, no traceback."""
    args = train_cli_args(files, tmp_path / "r", "--max-length", "200")
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "max_length" in lines[0], proc.stderr


# -------------------------------------------------------------------------------------------- 4. drift check
@pytest.fixture(scope="module")
def sharp(files, tmp_path_factory) -> dict:
    """A tiny model with 20x weights (confident logits) and NF4 + fp32 caches of it over the training rows."""
    d = tmp_path_factory.mktemp("sharp")
    model = scaled_model(files["model"], d / "model", 20.0)
    return {**files, "model": model, "nf4": make_cache(model, [files["train"]], d / "nf4.parquet", True),
            "fp32": make_cache(model, [files["train"]], d / "fp32.parquet", False)}


def test_drift_zero_for_matching_nf4_cache(sharp, tmp_path, capsys):
    cfg = tcfg(sharp, tmp_path / "run", max_steps=1)
    train.run(cfg)
    out = capsys.readouterr().out
    assert "step 0: ref_drift" in out and "WARNING" not in out
    first, step1 = read_jsonl(tmp_path / "run" / "metrics.jsonl")[:2]
    # NF4 policy (B = 0) against an NF4 cache of the same weights: rounding only, per token (tests/bounds.py);
    # the fp32 cache of the next test is off by > DRIFT_WARN per token, far above token_tol(z)
    z = logit_scale_of_files(sharp["model"], [sharp["train"]], MAXLEN, MAXPROMPT, load_in_4bit=True)
    assert first["ref_drift_per_token"] <= token_tol(z) < train.DRIFT_WARN, (first, token_tol(z))
    # rewards start at 0: each pair's h moves by <= beta * sum_tol(chosen + rejected tokens), the loss no more
    pair_tokens = pl.read_parquet(sharp["nf4"]).select(pl.col("chosen_tokens") + pl.col("rejected_tokens")).max()
    assert abs(step1["loss"] - math.log(2)) <= loss_tol(pair_tokens.item(), z, cfg.loss.beta), step1


def test_drift_warns_for_fp32_cache_against_nf4_policy(sharp, tmp_path, capsys):
    """An explicit contrary flag is allowed with --allow-reference-mismatch: one note says rewards will not start at
    0, the drift check warns (without it: refused before loading, tests/test_reference_match.py)."""
    summary = train.run(tcfg(sharp, tmp_path / "run", ref_cache=str(sharp["fp32"]), max_steps=1, load_in_4bit=True,
                             allow_reference_mismatch=True))
    out = capsys.readouterr().out
    assert "note: --load-in-4bit True differs from the cache's reference" in out, out
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert summary["ref_drift_step0"] > 1.0, summary["ref_drift_step0"]
    assert first["ref_drift_per_token"] > train.DRIFT_WARN
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "--load-in-4bit" in warnings[0], out


def test_no_model_flags_inherit_the_caches_model_settings(sharp, tmp_path, capsys):
    """Issue 12: precompute-ref (fp32 here, or NF4), then train with NO model flags: the policy is loaded as the
    reference was, so at step 0 it equals the reference (drift at fp32 rounding, far below the warning)."""
    for cache, label in (("fp32", "fp32 base"), ("nf4", "NF4 base")):
        cfg = TrainConfig.flat(model=str(sharp["model"]), data=(str(sharp["train"]),), ref_cache=str(sharp[cache]),
                               output=str(tmp_path / cache), max_steps=1, batch_size=2, lora_r=4, lora_alpha=8)
        assert cfg.model.load_in_4bit is None and cfg.model.dtype is None and cfg.model.adapter is None
        train.run(cfg)
        out = capsys.readouterr().out
        assert f"model: {label}, adapter none (as the cache)" in out, out
        first = read_jsonl(tmp_path / cache / "metrics.jsonl")[0]
        assert first["step"] == 0 and first["ref_drift_per_token"] < train.DRIFT_WARN / 100, first
        assert "WARNING" not in out


# ------------------------------------------------------------------------------ 5. bitsandbytes CPU fix
def _nf4_policy(model_dir: Path):
    from stages.model.models import LoraSettings, ModelSpec, load_policy

    torch.manual_seed(0)
    policy = load_policy(ModelSpec(str(model_dir), "fp32", True), LoraSettings(4, 8, 0.0), torch.device("cpu"), False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B too, so every LoRA gradient depends on the base weights
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return policy


def _dequantized_twin(model_dir: Path, policy):
    """Plain fp32 model whose Linear weights are the NF4 policy's dequantized weights, with the same LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    quantized = {n.replace(".base_layer", ""): m for n, m in policy.get_base_model().named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    replaced = 0
    for name, module in base.named_modules():
        if name in quantized:
            w = quantized[name].weight
            weight = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            module.weight.data = weight.reshape(module.weight.shape)
            replaced += 1
    assert replaced == len(quantized) > 0
    twin = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    result = set_peft_model_state_dict(twin, get_peft_model_state_dict(policy))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return twin


def _lora_grads(model, ids: torch.Tensor, eval_forward_first: bool) -> dict[str, torch.Tensor]:
    if eval_forward_first:  # the forward that repacks NF4 weights on AVX512-BF16 CPUs without the fix
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[:, :-1].float()
    logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def test_bnb_cpu_fix_lora_grads_equal_dequantized(files):
    import bitsandbytes as bnb

    policy = _nf4_policy(files["model"])
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    got = _lora_grads(policy, ids, eval_forward_first=True)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    want = _lora_grads(_dequantized_twin(files["model"], policy), ids, eval_forward_first=False)
    # exact on any CPU: with the fix, bitsandbytes (0.50) computes an NF4 layer with grad as dequantize_4bit, then
    # F.linear forward and matmul(grad, W) backward -- the same torch ops on the same values as the twin, which runs
    # on the same machine with the same kernels. Without the fix: > 1e-2 (next test).
    assert _worst_rel(got, want) == 0.0


def test_bnb_cpu_fix_matters_on_this_cpu(files):
    """Without the fix (flag back on), the eval-mode forward repacks the weights and the gradients go wrong."""
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, the fix is a no-op")
    policy = _nf4_policy(files["model"])
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    want = _lora_grads(_dequantized_twin(files["model"], policy), ids, eval_forward_first=False)
    got = _lora_grads(policy, ids, eval_forward_first=True)
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert _worst_rel(got, want) > 1e-2


# ------------------------------------------------------------------------------------------ 6. exact resume
class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def resume_runs(fp32_files, tmp_path_factory) -> dict:
    """Run A: 8 uninterrupted fp32 steps, LoRA dropout 0.1 (so RNG state matters), checkpoint every 2."""
    d = tmp_path_factory.mktemp("resume")
    make = lambda name: tcfg(fp32_files, d / name, ref_cache=str(fp32_files["fp32"]), load_in_4bit=False,  # noqa: E731
                             max_steps=8, save_steps=2, lora_dropout=0.1, learning_rate=1e-2)
    t0 = time.perf_counter()
    train.run(make("a"))
    print(f"\nuninterrupted 8 steps: {time.perf_counter() - t0:.1f}s")
    return {"make": make, "dir": d, "a": read_jsonl(d / "a" / "metrics.jsonl")}


def _assert_same_run(resumed: Path, uninterrupted: list[dict]) -> None:
    """Exact on any CPU (0.0 measured; the bounds are slack only): the resumed run replays the same ops on the same
    machine and kernels, one thread each (conftest, cli_env), from state restored bit for bit (fp32 safetensors
    adapter, optimizer state, RNG states)."""
    records = read_jsonl(resumed / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9)), steps  # each step exactly once
    got, want = losses_by_step(records), losses_by_step(uninterrupted)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= 1e-6, (got, want)
    norms = {r["step"]: r["grad_norm"] for r in records if "loss" in r}
    assert all(abs(norms[r["step"]] - r["grad_norm"]) <= 1e-5 * r["grad_norm"] for r in uninterrupted if "loss" in r)
    assert len({r["loss"] for r in uninterrupted if "loss" in r}) > 4  # the losses do change between steps


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_after_crash_is_exact(resume_runs, monkeypatch, capsys):
    cfg = resume_runs["make"]("b")
    real_write = train.MetricsWriter.write

    def crash_after_step_3(self, record):
        real_write(self, record)
        if record.get("step") == 3 and "loss" in record:
            raise Crash("simulated kill after step 3")

    with monkeypatch.context() as m:
        m.setattr(train.MetricsWriter, "write", crash_after_step_3)
        with pytest.raises(Crash):
            train.run(cfg)
    out = Path(cfg.run.output)
    assert [p.name for p in train.checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert 3 in losses_by_step(read_jsonl(out / "metrics.jsonl"))
    capsys.readouterr()
    train.run(cfg)  # same folder: continues from checkpoint-2
    assert "resumed from" in capsys.readouterr().out
    _assert_same_run(out, resume_runs["a"])
    a, b = _adapter_tensors(resume_runs["dir"] / "a" / "adapter"), _adapter_tensors(out / "adapter")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # exact, as above


def test_resume_after_kill_9_through_cli_is_exact(resume_runs, tmp_path):
    """A real `dpo train` process killed with SIGKILL once checkpoint-2 exists, then the same command again."""
    cfg = resume_runs["make"]("c")
    cfgmod.save(cfg, tmp_path / "c.yaml")
    cmd = [sys.executable, "-m", "stages.cli", "train", "--config", str(tmp_path / "c.yaml")]
    out = Path(cfg.run.output)
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before the kill: nothing was tested"
    second = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    _assert_same_run(out, resume_runs["a"])


# ------------------------------------------------------------------------------- 7. checkpoints, finished runs
def test_checkpoint_rotation_and_finished_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tcfg(files, out, max_steps=4, save_steps=1, save_total_limit=2)
    first = train.run(cfg)
    found = train.checkpoint.list_checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-3", "checkpoint-4"]
    for p in found:
        assert (p / "adapter" / "adapter_config.json").is_file()
        assert (p / "adapter" / "adapter_model.safetensors").is_file()
        assert (p / "trainer_state.pt").is_file() and (p / "rng-rank0.pt").is_file()
        assert json.loads((p / "state.json").read_text())["step"] == int(p.name.split("-")[1])
    assert not list(out.glob(".*")), "temporary checkpoint folders left behind"
    capsys.readouterr()
    metrics = (out / "metrics.jsonl").read_text()
    before = models.LOAD_COUNT["models"]
    again = train.run(cfg)
    assert "already finished" in capsys.readouterr().out
    assert again == first and models.LOAD_COUNT["models"] == before
    assert (out / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------------------------------------- 8. loss types
@pytest.mark.parametrize("loss,extra,at_init", [
    ("ipo", {}, 25.0),                                  # (0 - 1/(2*0.1))^2
    ("hinge", {}, 1.0),                                 # relu(1 - 0)
    ("robust", {"label_smoothing": 0.1}, math.log(2)),  # ((1-e) log 2 - e log 2) / (1 - 2e)
    ("sigmoid", {"sft_weight": 0.5}, None),
])
def test_loss_types_train(files, tmp_path, loss, extra, at_init):
    train.run(tcfg(files, tmp_path / "run", loss=loss, max_steps=2, **extra))
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    if at_init is not None:  # NF4 cache and NF4 policy: h = 0 at step 1
        assert records[0]["loss"] == pytest.approx(at_init, rel=1e-4)
    else:  # the sft term adds w * per-token NLL of the chosen reply
        assert records[0]["loss"] > math.log(2) + 0.5 * 5.0


def test_bad_loss_type_is_a_user_error(files, tmp_path):
    assert_one_line_error(invoke(*train_cli_args(files, tmp_path / "r"), "--loss", "nope"), "--loss")


# ---------------------------------------------------------------------------------- 9. slow: real SmolLM2
SLOW_ROWS, SLOW_STEPS = 40, 30  # 3 epochs of 10 steps: the last 10 revisit rows seen twice


@pytest.mark.slow
def test_smollm2_slice_learns(smollm2_slice: Path, hh_path: Path, tmp_path):
    """SmolLM2 (first 2 layers) on HH rows, NF4 + LoRA, batch 4: train reward accuracy well above 0.5."""
    data = write_jsonl(tmp_path / "train.jsonl", hh_rows(hh_path, 0, SLOW_ROWS))
    t0 = time.perf_counter()
    cache = make_cache(smollm2_slice, [data], tmp_path / "ref.parquet", load_in_4bit=True)
    t1 = time.perf_counter()
    cfg = TrainConfig.flat(model=str(smollm2_slice), data=(str(data),), ref_cache=str(cache),
                           output=str(tmp_path / "run"), max_steps=SLOW_STEPS, batch_size=4, learning_rate=2e-3,
                           lora_dropout=0.0, warmup_ratio=0.1, gradient_checkpointing=False)
    summary = train.run(cfg)
    t2 = time.perf_counter()
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    acc = [r["rewards/accuracies"] for r in records]
    print(f"\nSmolLM2 slice: cache {t1 - t0:.1f}s, train {SLOW_STEPS} steps {t2 - t1:.1f}s; "
          f"accuracy first 10 {sum(acc[:10]) / 10:.2f}, last 10 {sum(acc[-10:]) / 10:.2f}; "
          f"drift {summary['ref_drift_step0']:.3g}")
    z = logit_scale_of_files(smollm2_slice, [data], MAXLEN, MAXPROMPT, load_in_4bit=True)  # tests/bounds.py
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["ref_drift_per_token"] <= token_tol(z), (first, token_tol(z))  # NF4 cache == NF4 policy at step 0
    assert sum(acc[-10:]) / 10 >= 0.7, acc
    assert sum(r["loss"] for r in records[-10:]) / 10 < math.log(2) - 0.1


# ------------------------------------------------------------------------- regressions (bugs found and fixed)
def _crash_then_resume(cfg: TrainConfig, monkeypatch, when) -> None:
    real_write = train.MetricsWriter.write

    def crashing(self, record):
        real_write(self, record)
        if when(record):
            raise Crash("simulated kill")

    with monkeypatch.context() as m:
        m.setattr(train.MetricsWriter, "write", crashing)
        with pytest.raises(Crash):
            train.run(cfg)
    train.run(cfg)


def test_resume_nf4_after_crash_is_exact(files, tmp_path, monkeypatch):
    make = lambda name: tcfg(files, tmp_path / name, max_steps=6, save_steps=2, lora_dropout=0.1,  # noqa: E731
                             learning_rate=1e-2)
    train.run(make("a"))
    _crash_then_resume(make("b"), monkeypatch, lambda r: r.get("step") == 3 and "loss" in r)
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b if "loss" in r] == list(range(1, 7))
    got, want = losses_by_step(b), losses_by_step(a)
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6  # exact on any CPU: see _assert_same_run


def test_resume_mid_logging_window_logs_the_same_loss(fp32_files, tmp_path, monkeypatch):
    make = lambda name: tcfg(fp32_files, tmp_path / name, ref_cache=str(fp32_files["fp32"]),  # noqa: E731
                             load_in_4bit=False, max_steps=6, save_steps=3, logging_steps=2, lora_dropout=0.0,
                             learning_rate=1e-2)
    train.run(make("a"))
    _crash_then_resume(make("b"), monkeypatch, lambda r: r.get("step") == 4 and "loss" in r)
    got = losses_by_step(read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    want = losses_by_step(read_jsonl(tmp_path / "a" / "metrics.jsonl"))
    assert got.keys() == want.keys() == {2, 4, 6}
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (got, want)  # exact on any CPU: see _assert_same_run


def test_crash_before_summary_does_not_duplicate_final_eval(fp32_files, tmp_path, monkeypatch):
    cfg = tcfg(fp32_files, tmp_path / "run", eval_data=(str(fp32_files["eval"]),), max_steps=2, load_in_4bit=False,
               ref_cache=str(fp32_files["fp32"]))

    def crash(*args, **kwargs):
        raise Crash("simulated kill before summary.json")

    with monkeypatch.context() as m:
        m.setattr(train, "write_summary", crash)
        with pytest.raises(Crash):
            train.run(cfg)
    train.run(cfg)
    evals = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/loss" in r]
    assert evals == [2]


def test_no_resume_into_used_folder_leaves_no_stale_checkpoints(files, tmp_path):
    out = tmp_path / "run"
    train.run(tcfg(files, out, max_steps=6, save_steps=2))
    train.run(tcfg(files, out, max_steps=2, save_steps=1, resume=False))
    steps = [int(p.name.split("-")[1]) for p in train.checkpoint.list_checkpoints(out)]
    assert steps == [1, 2], steps
