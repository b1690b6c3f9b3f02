"""The loss family in stage two and the sweep (issue 14): mixtures logged per term, LD-DPO from a cache with
per-token values (and refused without them), WPO, the option plumbing (CLI, YAML mapping), sweep folder names of
mixtures, and `dpo compare` showing each run's loss. Tiny fp32 model against an fp32 cache, so before the first
update the policy IS the reference (h = 0) and the step-1 values are known by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from stages.settings import yamlconfig as cfgmod
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import train
from stages.stage2.train import TrainConfig
from stages.tools import sweep
from stages.tools.compare import compare, format_table
from tests.hhrows import hh_rows, write_jsonl
from tests.test_train import assert_one_line_error, invoke, read_jsonl

MAXLEN, MAXPROMPT = 192, 96


@pytest.fixture(scope="module")
def data(hh_path: Path, tiny_llama: Path, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("loss_train")
    train_file = write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, 16))
    out = {"model": tiny_llama, "train": train_file}
    for name, tokens in (("plain", False), ("tokens", True)):
        out[name] = d / f"ref-{name}.parquet"
        precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(train_file),), output=str(out[name]),
                                             max_length=MAXLEN, max_prompt_length=MAXPROMPT, store_token_logps=tokens))
    return out


def cfg(data: dict, out: Path, cache: str = "plain", **kw) -> TrainConfig:
    base = dict(model=str(data["model"]), data=(str(data["train"]),), ref_cache=str(data[cache]), output=str(out),
                max_steps=2, batch_size=2, lora_r=8, lora_alpha=16, learning_rate=1e-3, load_in_4bit=False,
                lora_dropout=0.0)
    return TrainConfig.flat(**{**base, **kw})


def train_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_mixture_logs_each_term(data, tmp_path):
    train.run(cfg(data, tmp_path / "run", loss="sigmoid*0.8+bco_pair*0.2+sft"))
    records = train_records(tmp_path / "run")
    for r in records:  # the logged terms, weighted, add up to the logged loss
        assert r["loss"] == pytest.approx(0.8 * r["loss/sigmoid"] + 0.2 * r["loss/bco_pair"] + r["loss/sft"], rel=1e-9)
    first = records[0]  # h = 0 and ρ = 0: sigmoid = log 2, bco_pair = 2 log 2 (the fp32 cache is this very model)
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-4)
    assert first["loss/sft"] > 1.0  # NLL per token of a random tiny model
    plain = cfg(data, tmp_path / "plain", max_steps=1)
    train.run(plain)
    assert not any(k.startswith("loss/") for k in train_records(tmp_path / "plain")[0])  # one term: no loss/<type>


def test_ld_alpha_one_is_plain_dpo_and_alpha_half_trains(data, tmp_path):
    train.run(cfg(data, tmp_path / "plain", cache="tokens"))
    train.run(cfg(data, tmp_path / "ld1", cache="tokens", ld_alpha=1.0))
    train.run(cfg(data, tmp_path / "ld05", cache="tokens", ld_alpha=0.5))
    plain, ld1, ld05 = (train_records(tmp_path / n) for n in ("plain", "ld1", "ld05"))
    for a, b in zip(plain, ld1):  # α = 1 weights every token 1: the same run up to summation order (fp32 tokens)
        for key in ("loss", "rewards/chosen", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    drift = next(r for r in read_jsonl(tmp_path / "ld05" / "metrics.jsonl") if r["step"] == 0)
    assert drift["ref_drift_per_token"] < 1e-4  # LD-weighted policy sums equal the LD-weighted cached sums
    assert ld05[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    both = lambda r: r["logps/chosen"] + r["logps/rejected"]  # noqa: E731
    assert both(ld05[0]) > both(plain[0])  # the longer reply's tail counts half: a less negative sum


def test_ld_alpha_refused_without_token_logps(data, tmp_path):
    args = ["train", "--model", str(data["model"]), "--data", str(data["train"]), "--ref-cache", str(data["plain"]),
            "--output", str(tmp_path / "r"), "--max-steps", "1", "--no-load-in-4bit", "--ld-alpha", "0.5"]
    assert_one_line_error(invoke(*args), "--ld-alpha", "--store-token-logps")
    assert_one_line_error(invoke(*args[:-1], "1.5"), "--ld-alpha must be in [0, 1]")


def test_use_weighting_trains(data, tmp_path):
    train.run(cfg(data, tmp_path / "wpo", use_weighting=True, loss="sigmoid+ipo*0.01"))
    records = train_records(tmp_path / "wpo")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    # WPO weights are probabilities-like products (< 1 here): the weighted sigmoid term is below log 2 at h = 0
    assert 0 < records[0]["loss/sigmoid"] < math.log(2)


def test_options_cli_and_yaml(data, tmp_path):
    res = invoke("train", "--model", str(data["model"]), "--data", str(data["train"]), "--ref-cache",
                 str(data["plain"]), "--output", str(tmp_path / "r"), "--max-steps", "1", "--loss", "sigmoid+bco_par")
    assert_one_line_error(res, "unknown loss type 'bco_par'", "did you mean 'bco_pair'")
    for bad, needle in ((("--loss", "exo_pair"), "--label-smoothing > 0"),
                        (("--loss", "hinge", "--label-smoothing", "0.1"), "--label-smoothing applies only"),
                        (("--loss", "bco_pair", "--f-divergence", "js_divergence"), "works only with"),
                        (("--loss", "aot", "--use-weighting"), "--use-weighting cannot weight")):
        res = invoke("train", "--model", str(data["model"]), "--data", str(data["train"]), "--ref-cache",
                     str(data["plain"]), "--output", str(tmp_path / "r"), "--max-steps", "1", *bad)
        assert_one_line_error(res, needle)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": ["d"], "ref_cache": "r", "output": "o",
                                    "loss": {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1}}, sort_keys=False))
    built = cfgmod.build(TrainConfig, str(path), {}, section="train")
    assert built.loss.loss == "sigmoid*0.8+bco_pair*0.2+sft"
    cfgmod.save(built, tmp_path / "saved.yaml")  # the canonical plain string is what a run folder records
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["loss"] == "sigmoid*0.8+bco_pair*0.2+sft"


def test_sweep_over_mixtures_names_folders_and_compare_shows_the_loss(data, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"losses": ["sigmoid", {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0},
                                               "sigmoid*1"]}, sort_keys=False))
    scfg = cfgmod.build(sweep.SweepConfig, str(path), {
        "model": str(data["model"]), "data": (str(data["train"]),), "ref_cache": str(data["plain"]),
        "output": str(tmp_path / "sweep"), "betas": (0.1,), "max_steps": 1, "batch_size": 2, "load_in_4bit": False,
        "lora_r": 8, "lora_alpha": 16}, section="sweep")
    assert scfg.grid.losses == ("sigmoid", "sigmoid*0.8+bco_pair*0.2+sft", "sigmoid")
    result = sweep.run_sweep(scfg)
    names = [p.name for p in result.run_dirs]
    assert names == ["beta-0.1-sigmoid", "beta-0.1-0.8sigmoid+0.2bco_pair+sft"]  # duplicates dropped
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.+-") for n in names)
    rows, _, _ = compare([tmp_path / "sweep"])
    assert {r.loss for r in rows} == {"sigmoid", "sigmoid*0.8+bco_pair*0.2+sft"}
    assert all(r.final_train_loss is not None for r in rows)
    table = format_table(rows)
    assert "sigmoid*0.8+bco_pair*0.2+sft" in table and "train loss" in table
    saved = json.loads((result.run_dirs[1] / "summary.json").read_text())
    assert saved["loss_type"] == "sigmoid*0.8+bco_pair*0.2+sft"
