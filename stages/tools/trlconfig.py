"""`dpo config from-trl FILE`: our YAML (shared / precompute-ref / train sections) for a TRL DPOConfig file.

The input is the flat YAML `trl dpo --config` reads: DPOConfig / TrainingArguments keys, plus the script's
dataset keys (dataset_name, dataset_config, dataset_train_split, dataset_test_split) and ModelConfig keys
(model_name_or_path, dtype, use_peft, lora_*, load_in_4bit). Keys of older TRL releases (rpo_alpha,
max_prompt_length) map too. Every key that does not map is listed, with why, as comments at the top, so the output
stays valid YAML: `dpo config from-trl dpo.yaml > ours.yaml`. TRL defaults that differ from ours and change what a
run does (checkpoints every 500 steps) are written out and listed there too.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stages.base.errors import UserError

DEFAULT_CACHE = "cache/ref.parquet"

# TRL key -> (our section, our key): same meaning, value copied
RENAMES = {
    "model_name_or_path": ("shared", "model"), "trust_remote_code": ("shared", "trust_remote_code"),
    "max_length": ("shared", "max_length"), "max_prompt_length": ("shared", "max_prompt_length"),
    "per_device_train_batch_size": ("train", "batch_size"), "per_device_eval_batch_size": ("train", "eval_batch_size"),
    "gradient_accumulation_steps": ("train", "gradient_accumulation_steps"),
    "learning_rate": ("train", "learning_rate"), "beta": ("train", "beta"), "num_train_epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"), "warmup_ratio": ("train", "warmup_ratio"),
    "weight_decay": ("train", "weight_decay"), "max_grad_norm": ("train", "max_grad_norm"),
    "logging_steps": ("train", "logging_steps"), "eval_steps": ("train", "eval_steps"),
    "save_steps": ("train", "save_steps"), "save_total_limit": ("train", "save_total_limit"),
    "output_dir": ("train", "output"), "seed": ("train", "seed"), "label_smoothing": ("train", "label_smoothing"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"), "lora_r": ("train", "lora_r"),
    "activation_checkpointing": ("train", "gradient_checkpointing"),
    "lora_alpha": ("train", "lora_alpha"), "lora_dropout": ("train", "lora_dropout"),
    "lora_target_modules": ("train", "target_modules"), "load_in_4bit": ("train", "load_in_4bit"),
    "f_divergence_type": ("train", "f_divergence"), "f_alpha_divergence_coef": ("train", "f_alpha"),
    "discopop_tau": ("train", "discopop_tau"), "use_weighting": ("train", "use_weighting"),
    "ld_alpha": ("train", "ld_alpha"), "dataset_train_split": ("shared", "data_split"),
}
# read by a handler below (together with others), so never "not mapped"
HANDLED = {"loss_type", "loss_weights", "rpo_alpha", "report_to", "lr_scheduler_type", "optim", "bf16", "fp16",
           "dtype", "torch_dtype", "dataset_name", "dataset_config", "dataset_test_split", "warmup_steps",
           "eval_strategy", "evaluation_strategy", "save_strategy", "use_peft", "precompute_ref_log_probs"}
# keys that do not map, and why (anything else: "no equivalent option")
WHY = {
    "ref_model_init_kwargs": "no reference model is loaded in training: stage one caches it",
    "model_adapter_name": "one adapter per run; pass --adapter to continue one",
    "ref_adapter_name": "the reference is the stage-one cache (precompute-ref --adapter for an SFT adapter)",
    "sync_ref_model": "the reference is a fixed cache; TR-DPO's reference updates need a live reference model",
    "ref_model_mixup_alpha": "the reference is a fixed cache (TR-DPO)", "ref_model_sync_steps": "the reference is a "
    "fixed cache (TR-DPO)", "precompute_ref_batch_size": "stage one batches by --max-tokens-per-batch",
    "padding_free": "replies are packed per pair already (--share-prompt)", "truncation_mode": "prompts always keep "
    "their end (keep_end); replies are cut at --max-length", "pad_to_multiple_of": "not needed: no padding-free "
    "kernels", "disable_dropout": "LoRA dropout is --lora-dropout; the base runs in eval mode",
    "dataset_num_proc": "tokenization runs in-process", "use_logits_to_keep": "only reply positions reach the LM "
    "head anyway", "run_name": "the run is named after --output", "logging_dir": "trackers write inside --output",
    "push_to_hub": "no Hub uploads; push the adapter folder yourself", "hub_model_id": "no Hub uploads",
    "hub_strategy": "no Hub uploads", "hub_private_repo": "no Hub uploads", "hub_token": "no Hub uploads",
    "model_init_kwargs": "set --dtype / --load-in-4bit / --trust-remote-code instead",
    "use_liger_kernel": "not used", "use_cpu": "the device is chosen by torchrun / CUDA availability",
    "ddp_find_unused_parameters": "FSDP2 under torchrun, no DDP", "fsdp": "FSDP2 is always used under torchrun",
    "fsdp_config": "FSDP2 is always used under torchrun", "deepspeed": "FSDP2 under torchrun, no DeepSpeed",
    "do_train": "always trains", "do_eval": "evaluates when --eval-data is given", "overwrite_output_dir":
    "reruns resume; use --no-resume to start again", "remove_unused_columns": "extra columns are always ignored",
    "dataloader_num_workers": "data are tokenized once up front", "lora_task_type": "always CAUSAL_LM",
    "use_rslora": "plain LoRA scaling only", "use_dora": "plain LoRA only", "bnb_4bit_quant_type": "always NF4",
    "use_bnb_nested_quant": "fixed NF4 settings", "attn_implementation": "sdpa (prompt sharing needs a custom mask)",
    "gradient_checkpointing_kwargs": "non-reentrant checkpointing always", "lr_scheduler_kwargs": "not configurable",
    "adam_beta1": "AdamW uses torch's defaults (0.9, 0.999, eps 1e-8)", "adam_beta2": "AdamW uses torch's defaults",
    "adam_epsilon": "AdamW uses torch's defaults", "logging_strategy": "metrics are logged every --logging-steps",
    "project": "set WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME / TRACKIO_PROJECT", "trackio_space_id": "trackio logs "
    "locally (TRACKIO_DIR); set TRACKIO_SPACE_ID to sync a Space", "resume_from_checkpoint": "reruns into the "
    "same --output resume from its newest checkpoint", "eval_on_start": "step 0 logs ref_drift, not an eval",
    "load_best_model_at_end": "the final adapter is the last step's; summary.json names the best eval step",
}
TRL_SAVE_STEPS = 500  # TrainingArguments.save_steps (save_strategy "steps" is the default)
TRL_LOGGING_STEPS = 10  # DPOConfig.logging_steps
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant_with_warmup": "constant_with_warmup"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_8bit": "adamw_8bit",
              "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def read_trl_yaml(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read YAML ({str(e).splitlines()[0]}); "
                        "pass a TRL DPOConfig YAML file") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of DPOConfig key: value at the top level")
    return loaded


def loss_string(loss_type, loss_weights, rpo_alpha) -> str:
    """TRL's loss_type (a name or a list) + loss_weights (+ an old rpo_alpha, which TRL now spells as an `sft`
    term) -> our one-string mixture "sigmoid*0.8+bco_pair*0.2+sft" (weight 1 left out)."""
    from stages.objective.loss import format_loss_spec

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type or ["sigmoid"])
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    if len(weights) != len(types):
        raise UserError(f"loss_weights has {len(weights)} values for {len(types)} loss types; give one per type")
    pairs = dict(zip(types, weights))
    if rpo_alpha:
        pairs["sft"] = pairs.get("sft", 0.0) + float(rpo_alpha)
    return format_loss_spec(pairs)


def convert(trl: dict, source: str = "DPOConfig.yaml", filled: dict | None = None) -> tuple[dict, dict[str, str]]:
    """(our sectioned config, {unmapped key: why}). `filled` (optional) receives {our key: why} for the TRL
    defaults written out because ours differ (TRL checkpoints every 500 steps unless told otherwise)."""
    out = {"shared": {}, "precompute-ref": {}, "train": {}}
    unmapped: dict[str, str] = {}
    filled = {} if filled is None else filled
    for key, value in trl.items():
        if key in RENAMES and value is None:
            unmapped[key] = "null: our default applies"
        elif key in RENAMES:
            section, ours = RENAMES[key]
            out[section][ours] = value
        elif key not in HANDLED:
            unmapped[key] = WHY.get(key, "no equivalent option in dpo precompute-ref / dpo train")
    _loss(trl, out, unmapped)
    _schedule(trl, out, unmapped)
    _trl_defaults(trl, out, filled)
    _data(trl, out)
    _precision(trl, out, unmapped)
    train, shared = out["train"], out["shared"]
    if "max_length" in shared and "max_prompt_length" not in shared:
        shared["max_prompt_length"] = shared["max_length"]  # TRL 1.16 cuts prompt + reply only at max_length
    if trl.get("use_peft") is False:
        unmapped["use_peft"] = "training is always (Q)LoRA; the full model is never updated"
    if trl.get("precompute_ref_log_probs") is False:
        unmapped["precompute_ref_log_probs"] = "the reference is always precomputed (stage one)"
    train.setdefault("ref_cache", DEFAULT_CACHE)
    train.setdefault("output", "runs/dpo")
    out["precompute-ref"].setdefault("output", train["ref_cache"])
    if train.get("load_in_4bit"):
        out["precompute-ref"]["load_in_4bit"] = True  # the reference as the policy's base sees it (no drift)
    if "model" not in shared:
        unmapped["(model)"] = "no model_name_or_path in the file; add `model:` under shared"
    return {k: v for k, v in out.items() if v}, unmapped


def _loss(trl: dict, out: dict, unmapped: dict) -> None:
    if any(k in trl for k in ("loss_type", "loss_weights", "rpo_alpha")):
        out["train"]["loss"] = loss_string(trl.get("loss_type"), trl.get("loss_weights"), trl.get("rpo_alpha"))
    if "report_to" in trl:
        value = trl["report_to"]
        out["train"]["report_to"] = [value] if isinstance(value, str) else list(value or ["none"])
    if "optim" in trl:
        if trl["optim"] in OPTIMIZERS:
            out["train"]["optimizer"] = OPTIMIZERS[trl["optim"]]
        else:
            unmapped["optim"] = f"{trl['optim']!r}: the optimizers are {', '.join(sorted(set(OPTIMIZERS.values())))}"


def _schedule(trl: dict, out: dict, unmapped: dict) -> None:
    train = out["train"]
    sched = trl.get("lr_scheduler_type")
    if sched is not None:
        if sched in SCHEDULERS:
            train["lr_scheduler"] = SCHEDULERS[sched]
        else:
            unmapped["lr_scheduler_type"] = f"{sched!r}: the schedules are {', '.join(SCHEDULERS)}"
    if trl.get("warmup_steps"):
        if trl.get("max_steps", -1) > 0 and "warmup_ratio" not in trl:
            train["warmup_ratio"] = trl["warmup_steps"] / trl["max_steps"]
        else:
            unmapped["warmup_steps"] = "warm-up is a ratio (--warmup-ratio); with max_steps set it converts"
    for key in ("eval_strategy", "evaluation_strategy", "save_strategy"):
        strategy = trl.get(key)
        target = "eval_steps" if key != "save_strategy" else "save_steps"
        if strategy in (None, "steps"):
            continue
        if strategy == "no":
            train[target] = 0
        else:
            unmapped[key] = f"{strategy!r}: only every N steps (--{target.replace('_', '-')}; 0 = at the end)"


def _trl_defaults(trl: dict, out: dict, filled: dict) -> None:
    """TRL's step defaults where ours differ: save_strategy `steps` (TRL's default) without save_steps saves every
    500 steps; eval_strategy `steps` without eval_steps evaluates every logging_steps (TRL's default 10)."""
    if trl.get("save_strategy", "steps") == "steps" and "save_steps" not in trl:
        out["train"]["save_steps"] = TRL_SAVE_STEPS
        filled["save_steps"] = f"{TRL_SAVE_STEPS}, TRL's default with save_strategy steps (ours: 0, only at the end)"
    strategy = trl.get("eval_strategy", trl.get("evaluation_strategy"))
    if strategy == "steps" and not trl.get("eval_steps"):
        steps = trl.get("logging_steps") or TRL_LOGGING_STEPS
        out["train"]["eval_steps"] = steps
        filled["eval_steps"] = f"{steps}, TRL's logging_steps (what eval_strategy steps uses without eval_steps)"


def _data(trl: dict, out: dict) -> None:
    name = trl.get("dataset_name")
    if not name:
        return
    base = f"{name}@{trl['dataset_config']}" if trl.get("dataset_config") else name
    out["train"]["data"] = [base]
    data = [base]
    test = trl.get("dataset_test_split")
    if test and (trl.get("eval_strategy") or trl.get("evaluation_strategy") or "no") != "no":
        out["train"]["eval_data"] = [f"{base}:{test}"]
        data.append(f"{base}:{test}")
    out["precompute-ref"]["data"] = data


def _precision(trl: dict, out: dict, unmapped: dict) -> None:
    dtype = trl.get("dtype", trl.get("torch_dtype"))
    if trl.get("bf16"):
        out["shared"]["dtype"] = "bf16"
    elif trl.get("fp16"):
        out["shared"]["dtype"] = "fp16"
    elif dtype is not None:
        names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}
        if dtype in names:
            out["shared"]["dtype"] = names[dtype]
        else:
            unmapped["dtype"] = f"{dtype!r}: use auto, bfloat16, float16 or float32"


def from_trl(path: str) -> str:
    """Our YAML, with every unmapped key and why as comments at the top."""
    trl = read_trl_yaml(path)
    filled: dict[str, str] = {}
    ours, unmapped = convert(trl, path, filled)
    head = [f"# from TRL config {path} by `dpo config from-trl`",
            "# run: dpo precompute-ref --config THIS.yaml && dpo train --config THIS.yaml"]
    if unmapped:
        head.append(f"# not mapped ({len(unmapped)}):")
        head += [f"#   {k}: {why}" for k, why in unmapped.items()]
    else:
        head.append("# every key mapped")
    if filled:
        head.append(f"# TRL defaults written out ({len(filled)}):")
        head += [f"#   {k}: {why}" for k, why in filled.items()]
    return "\n".join(head) + "\n" + yaml.safe_dump(ours, sort_keys=False)
