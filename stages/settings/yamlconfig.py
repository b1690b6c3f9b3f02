"""A command's settings from a YAML file and then CLI flags (flags win). Unknown keys are errors; the resolved
settings are saved next to every output as flat YAML (the keys users write)."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml

from stages.base.errors import UserError
from stages.base.fsio import write_text_atomic
from stages.settings.options import from_flat, options, to_flat


def _check_type(name: str, value, hint, where: str):
    """Accept value for a field typed int/float/bool/str/tuple[...]/X | None; lists become tuples."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in args:
            hint = nearest(str(value), map(str, args)).replace("; see `dpo COMMAND --help` for the options", "")
            raise UserError(f"{where}: {name} must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _check_type(name, value, hint, where)
    if origin is tuple or hint is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return tuple(_check_type(name, v, inner, where) for v in items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int) and not isinstance(value, bool):  # `shard_index: 3` in YAML
        return str(value)
    if hint is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string; HF/TRL users write it
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, bool, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise UserError(f"{where}: {name} must be {hint.__name__}, got {value!r}")
    return value


SECTIONS = ("shared", "precompute-ref", "train", "sweep", "plan", "sample")
# `dpo plan` reads the stages' own file: these sections in this order (later wins), keeping the keys it knows
PLAN_SECTIONS = ("shared", "precompute-ref", "train", "plan")


def nearest(name: str, known) -> str:
    """"; did you mean 'beta'?" for a misspelled key, or a short hint when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; see `dpo COMMAND --help` for the options"


# Keys only a TRL DPOConfig / TrainingArguments / TRL script file has (all known to stages/tools/trlconfig.py):
# a --config with any of them unknown is pointed to `dpo config from-trl`
TRL_KEYS = frozenset({
    "per_device_train_batch_size", "per_device_eval_batch_size", "output_dir", "num_train_epochs",
    "model_name_or_path", "loss_type", "loss_weights", "rpo_alpha", "lr_scheduler_type", "optim", "bf16", "fp16",
    "torch_dtype", "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "eval_strategy",
    "evaluation_strategy", "save_strategy", "logging_strategy", "warmup_steps", "use_peft", "lora_target_modules",
    "f_divergence_type", "f_alpha_divergence_coef", "push_to_hub", "hub_model_id", "precompute_ref_log_probs",
    "ref_model_init_kwargs", "model_init_kwargs", "sync_ref_model", "run_name", "logging_dir", "overwrite_output_dir",
    "remove_unused_columns", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_epsilon",
})
SHOWN_UNKNOWN = 3  # unknown keys named in one message; the rest are counted


def _unknown_keys(unknown: list[str], offered, config_path: str | None) -> UserError:
    """One line naming the unknown keys (a few, then "and N more"): a typo gets its nearest option; keys of a TRL
    file point to `dpo config from-trl`."""
    where = f"--config {config_path}" if config_path else "options"
    trl = config_path is not None and bool(set(unknown) & TRL_KEYS)
    if len(unknown) == 1 and not trl:
        return UserError(f"{where}: unknown key {unknown[0]!r}{nearest(unknown[0], offered)}")
    shown = ", ".join(repr(k) for k in unknown[:SHOWN_UNKNOWN])
    more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
    head = f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {shown}{more}"
    if trl:
        return UserError(f"{head}; TRL DPOConfig keys: convert with `dpo config from-trl {config_path}`")
    return UserError(f"{head}{nearest(unknown[0], offered)}")


def _missing(option) -> UserError:
    """The missing required option, with the start of its help (where its value comes from)."""
    name = option.name
    about = option.metadata.get("help", "").split(". ")[0].rstrip(".")
    about = about.split(":")[0] if len(about) > 80 else about
    about = f": {about}" if about else ""
    return UserError(f"missing required option --{name.replace('_', '-')} (or `{name}:` in the YAML config){about}")


def read_yaml(config_path: str, section: str | None) -> dict:
    """A flat mapping, or a sectioned one (`shared:` plus one block per command) used by several commands."""
    try:
        loaded = yaml.safe_load(Path(config_path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {config_path}: cannot read YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {config_path}: expected a mapping of option: value at the top level")
    if set(loaded) & set(SECTIONS) and isinstance(loaded.get(next(iter(set(loaded) & set(SECTIONS)))), dict):
        stray = sorted(set(loaded) - set(SECTIONS))
        if stray:
            raise UserError(f"--config {config_path}: unknown section {stray[0]!r}{nearest(stray[0], SECTIONS)}")
        if section == "plan":
            loaded = {k: v for s in PLAN_SECTIONS for k, v in (loaded.get(s) or {}).items()}
        elif section not in loaded:
            raise UserError(f"--config {config_path}: no `{section}:` section (it has {', '.join(loaded)})")
        else:
            loaded = {**(loaded.get("shared") or {}), **(loaded[section] or {})}
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def build(cls, config_path: str | None, overrides: dict, section: str | None = None):
    """A command (stages/settings/commands.py) from YAML (optional) then overrides (None means 'not given').
    Unknown or ill-typed keys are errors; then every group checks itself (options.from_flat)."""
    offered = {o.name: o for o in options(cls)}
    aliases = {a: o.name for o in offered.values() for a in o.metadata.get("aliases", ())}
    values = {aliases.get(k, k): v for k, v in (read_yaml(config_path, section) if config_path else {}).items()}
    if section == "plan":  # the stages' file: plan takes what it knows from it
        values = {k: v for k, v in values.items() if k in offered}
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    unknown = sorted(set(values) - set(offered))
    if unknown:
        raise _unknown_keys(unknown, offered, config_path)
    where = config_path or "command line"
    checked = {k: _check_type(k, v, offered[k].hint, where) for k, v in values.items()}
    missing = [o for o in offered.values() if o.name not in checked and o.required]
    if missing:
        raise _missing(missing[0])
    return from_flat(cls, checked)


def to_dict(cfg) -> dict:
    """What config.yaml holds: the flat {setting: value} users wrote."""
    return to_flat(cfg)


def save(cfg, path: Path) -> None:
    """Write the resolved config as YAML (atomically), so every output says how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
