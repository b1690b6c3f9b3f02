"""`dpo config from-trl`: a TRL DPOConfig YAML becomes our sectioned YAML that builds both stages' configs, and
every key that does not map is listed with a reason."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cli import main
from stages.settings import yamlconfig as cfgmod
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2.train import TrainConfig
from stages.tools.trlconfig import HANDLED, RENAMES, convert, from_trl, loss_string

TRL_YAML = """\
# as `trl dpo --config dpo.yaml` reads it (script + model + DPOConfig keys in one flat mapping)
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
dataset_test_split: test
output_dir: runs/qwen-dpo
per_device_train_batch_size: 2
per_device_eval_batch_size: 4
gradient_accumulation_steps: 8
learning_rate: 5.0e-7
beta: 0.05
loss_type: [sigmoid, bco_pair, sft]
loss_weights: [0.8, 0.2, 1.0]
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
max_steps: 1000
lr_scheduler_type: cosine
warmup_steps: 100
weight_decay: 0.01
max_grad_norm: 1.0
logging_steps: 25
eval_strategy: steps
eval_steps: 100
save_steps: 500
save_total_limit: 3
seed: 7
label_smoothing: 0.0
bf16: true
gradient_checkpointing: true
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
load_in_4bit: true
optim: paged_adamw_8bit
report_to: [wandb, trackio]
push_to_hub: true
hub_model_id: me/qwen-dpo
sync_ref_model: true
padding_free: true
dataloader_num_workers: 4
"""


def test_a_trl_config_becomes_ours_and_builds(tmp_path, monkeypatch):
    monkeypatch.setattr("stages.settings.groups._cuda_available", lambda: True)  # paged_adamw_8bit: checked at build
    src = tmp_path / "dpo.yaml"
    src.write_text(TRL_YAML)
    text = from_trl(str(src))
    ours = yaml.safe_load(text)
    assert ours["shared"] == {"model": "Qwen/Qwen2.5-0.5B-Instruct", "max_length": 1024, "max_prompt_length": 512,
                              "dtype": "bf16"}
    train = ours["train"]
    assert train["loss"] == "sigmoid*0.8+bco_pair*0.2+sft"
    assert (train["batch_size"], train["eval_batch_size"], train["gradient_accumulation_steps"]) == (2, 4, 8)
    assert (train["learning_rate"], train["beta"], train["max_steps"], train["epochs"]) == (5e-7, 0.05, 1000, 1)
    assert train["warmup_ratio"] == pytest.approx(0.1) and train["lr_scheduler"] == "cosine"
    assert train["data"] == ["trl-lib/ultrafeedback_binarized"]
    assert train["eval_data"] == ["trl-lib/ultrafeedback_binarized:test"]
    assert train["optimizer"] == "paged_adamw_8bit" and train["report_to"] == ["wandb", "trackio"]
    assert train["target_modules"] == ["q_proj", "v_proj"] and train["output"] == "runs/qwen-dpo"
    assert ours["precompute-ref"]["data"] == ["trl-lib/ultrafeedback_binarized", "trl-lib/ultrafeedback_binarized:test"]
    assert ours["precompute-ref"]["load_in_4bit"] is True  # the reference as the NF4 policy sees it
    # every unmapped key is listed with a reason, as YAML comments
    for key in ("push_to_hub", "hub_model_id", "sync_ref_model", "padding_free", "dataloader_num_workers"):
        assert any(line.startswith(f"#   {key}: ") and len(line) > len(key) + 8 for line in text.splitlines()), key
    assert "#   sync_ref_model: the reference is a fixed cache" in text
    out = tmp_path / "ours.yaml"
    out.write_text(text)
    t = cfgmod.build(TrainConfig, str(out), {}, section="train")
    p = cfgmod.build(PrecomputeConfig, str(out), {}, section="precompute-ref")
    assert t.loss.loss == "sigmoid*0.8+bco_pair*0.2+sft" and t.run.report_to == ("wandb", "trackio")
    assert t.model.dtype == "bf16"
    assert p.data.data == t.data.data + t.data.eval_data and p.scoring.output == t.cache.ref_cache


def test_every_dpoconfig_key_is_mapped_or_listed():
    """All of TRL 1.16's DPOConfig / TrainingArguments fields at their defaults: nothing is silently dropped."""
    trl = pytest.importorskip("trl")
    fields = {}
    for f in dataclasses.fields(trl.DPOConfig):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = f.default_factory()
    fields = {k: v for k, v in fields.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    fields["model_name_or_path"] = "m"
    ours, unmapped = convert(fields)
    for key in fields:
        assert key in RENAMES or key in HANDLED or key in unmapped, key
    assert {"loss_type", "beta", "max_length", "learning_rate"} <= set(fields)


@pytest.mark.parametrize("loss_type, weights, rpo, expected", [
    ("sigmoid", None, None, "sigmoid"),
    (["sigmoid", "bco_pair"], [0.8, 0.2], None, "sigmoid*0.8+bco_pair*0.2"),
    ("sigmoid", None, 0.5, "sigmoid+sft*0.5"),  # TRL's old rpo_alpha is its sft term now
    (["ipo"], [2.0], None, "ipo*2"),
])
def test_loss_string(loss_type, weights, rpo, expected):
    assert loss_string(loss_type, weights, rpo) == expected


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        from_trl(str(bad))
    with pytest.raises(UserError, match="loss_weights has 1 values for 2 loss types"):
        loss_string(["sigmoid", "ipo"], [1.0], None)
    res = CliRunner().invoke(main, ["config", "from-trl", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1


def test_cli_prints_the_yaml(tmp_path):
    src = tmp_path / "dpo.yaml"
    src.write_text("model_name_or_path: m\nbeta: 0.2\nrpo_alpha: 1.0\nrun_name: x\n")
    res = CliRunner().invoke(main, ["config", "from-trl", str(src)])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["train"]["loss"] == "sigmoid+sft"
    assert "#   run_name: the run is named after --output" in res.output
