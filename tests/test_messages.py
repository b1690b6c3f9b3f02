"""Messages that lead to the fix (issue 22): one row per message, the command line (or call) and the fragments
the one line must hold. Error rows exit != 0 with one line; accepted rows exit 0. No model is loaded anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cli import main
from stages.settings import yamlconfig as cfgmod
from stages.settings.commands import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRL_FILE = "model_name_or_path: m\noutput_dir: runs/x\nper_device_train_batch_size: 2\nnum_train_epochs: 1\n" \
           "learning_rate: 1.0e-6\nlr_scheduler_type: cosine\nbf16: true\nloss_type: sigmoid\ndataset_name: a/b\n"


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """The files the rows name: data, an empty model folder, TRL files, a finished sweep folder, a run folder."""
    w = tmp_path_factory.mktemp("messages")
    (w / "d.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (w / "model").mkdir()
    (w / "trl.yaml").write_text(TRL_FILE)
    (w / "trl-save.yaml").write_text("model_name_or_path: m\nsave_strategy: steps\n")
    (w / "typos.yaml").write_text("betta: 0.1\nlerning_rate: 1.0e-6\n")
    for beta in ("0.1", "0.5"):
        run = w / "sweep" / f"beta-{beta}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"beta": float(beta), "loss": "sigmoid"}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    (w / "sweep" / "compare.csv").write_text("run\n")
    (w / "sweep" / "compare.png").write_bytes(b"")
    (w / "run" / "adapter").mkdir(parents=True)
    (w / "run" / "adapter" / "adapter_config.json").write_text("{}")
    return w


TRAIN = ["train", "--model", "{w}/model", "--data", "{w}/d.jsonl", "--output", "{w}/out"]
SAMPLE = ["sample", "--model", "{w}/model", "--data", "{w}/d.jsonl"]
PLAN8B = ["plan", "--model", "configs/models/llama-3.1-8b-instruct", "--gpu-memory", "24GB", "--gpus", "1"]

# (id, argv ({w}: the fixture folder, a trailing * globs), fragments that must appear, fragments that must not,
#  exit 0?)
ROWS = [
    ("missing-ref-cache", TRAIN, ["missing required option --ref-cache", "`dpo precompute-ref`"], [], False),
    ("missing-cache-file", ["cache", "info", "{w}/nope.parquet"],
     ["no such cache file", "dpo precompute-ref --output"], ["--out "], False),
    ("trl-keys-at-once", ["train", "--config", "{w}/trl.yaml"],
     ["unknown keys 'bf16', 'dataset_name', 'loss_type' and 5 more", "dpo config from-trl"], [], False),
    ("typos-at-once", ["train", "--config", "{w}/typos.yaml"],
     ["unknown keys 'betta', 'lerning_rate'", "did you mean 'beta'?"], ["from-trl"], False),
    ("loss-typo", TRAIN + ["--ref-cache", "c", "--loss", "sigmod"], ["did you mean 'sigmoid'?"], [], False),
    ("plan-hub-path", ["plan", "--config", "configs/qwen2.5-72b-8xh100.yaml"],
     ["no such folder or config JSON", "--model configs/models/qwen2.5-72b-instruct"], [], False),
    ("plan-unknown-model", ["plan", "--model", "org/some-model"],
     ["--model configs/models/NAME", "llama-3.1-70b-instruct", "more)"], [], False),
    ("plan-advice-batch", PLAN8B + ["--batch-size", "16"],
     ["stage 2: --batch-size 2 with more gradient-accumulation steps"], ["--batch ", "--seq-len"], True),
    ("plan-advice-length", PLAN8B[:-4] + ["--gpu-memory", "16GB", "--gpus", "1", "--max-length", "8192"],
     ["stage 2: --max-length 2048 fits"], ["--batch ", "--seq-len"], True),
    ("sample-adapter-missing", SAMPLE + ["--adapter", "{w}/nope"], ["--adapter", "no such folder"],
     ["adapter_config.json"], False),
    ("sample-adapter-run-folder", SAMPLE + ["--adapter", "{w}/run"], ["a run folder", "run/adapter"], [], False),
    ("sample-top-p", SAMPLE + ["--top-p", "1.5"], ["--top-p must be in (0, 1]", "got 1.5"], [], False),
    ("sample-temperature", SAMPLE + ["--temperature", "0"], ["--temperature must be > 0"], [], False),
    ("compare-after-sweep", ["compare", "{w}/sweep/*"],
     ["skipped 2 path(s) that are not run folders", "compare.csv", "compare.png"], [], True),
    ("compare-only-a-file", ["compare", "{w}/sweep/compare.csv"], ["a file", "dpo train"], [], False),
    ("from-trl-save-steps", ["config", "from-trl", "{w}/trl-save.yaml"],
     ["save_steps: 500", "TRL's default with save_strategy steps"], [], True),
]


def _argv(argv: list[str], w: Path) -> list[str]:
    out = []
    for a in (x.format(w=w) for x in argv):
        out += sorted(str(p) for p in Path(a[:-1]).iterdir()) if a.endswith("/*") else [a]
    return out


@pytest.mark.parametrize("argv, present, absent, ok", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_message(w, monkeypatch, argv, present, absent, ok):
    monkeypatch.chdir(REPO)  # configs/ as users in a checkout see it
    res = CliRunner().invoke(main, _argv(argv, w))
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code != 0 and res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    for fragment in present:
        assert fragment in res.output, res.output
    for fragment in absent:
        assert fragment not in res.output, res.output


# (id, YAML keys beyond model/data/ref_cache/output, the error fragment or None, {setting path: value} when built)
CALLS = [
    ("loss-dpo-is-sigmoid", {"loss": "dpo"}, None, {"loss": "sigmoid"}),
    ("loss-case-insensitive", {"loss": "IPO"}, None, {"loss": "ipo"}),
    ("loss-mixture-aliases", {"loss": "DPO*0.5+SFT"}, None, {"loss": "sigmoid*0.5+sft"}),
    ("loss-alias-twice", {"loss": "sigmoid+DPO"}, "'DPO' is 'sigmoid', which appears twice", None),
    ("optimizer-8bit-on-cpu", {"optimizer": "paged_adamw_8bit"}, "needs a GPU", None),
]


@pytest.mark.parametrize("extra, error, saved", [c[1:] for c in CALLS], ids=[c[0] for c in CALLS])
def test_build(tmp_path, monkeypatch, extra, error, saved):
    """Fails (or not) at config build: before any model or data is read."""
    monkeypatch.setattr("stages.settings.groups._cuda_available", lambda: False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": ["d.jsonl"], "ref_cache": "c", "output": "o", **extra}))
    if error is not None:
        with pytest.raises(UserError, match=error):
            cfgmod.build(TrainConfig, str(path), {})
        return
    flat = cfgmod.to_dict(cfgmod.build(TrainConfig, str(path), {}))  # what config.yaml stores: the canonical name
    assert {k: flat[k] for k in saved} == saved


def test_trl_keys_are_known_to_from_trl():
    """The keys that point `dpo train --config` to `dpo config from-trl` are keys from-trl converts or explains."""
    from stages.tools.trlconfig import HANDLED, RENAMES, WHY

    assert cfgmod.TRL_KEYS <= set(RENAMES) | HANDLED | set(WHY)
