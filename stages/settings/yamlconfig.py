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
        where = f"--config {config_path}" if config_path else "options"
        raise UserError(f"{where}: unknown key {unknown[0]!r}{nearest(unknown[0], offered)}")
    where = config_path or "command line"
    checked = {k: _check_type(k, v, offered[k].hint, where) for k, v in values.items()}
    missing = [o.name for o in offered.values() if o.name not in checked and o.required]
    if missing:
        name = missing[0]
        raise UserError(f"missing required option --{name.replace('_', '-')} (or `{name}:` in the YAML config)")
    return from_flat(cls, checked)


def to_dict(cfg) -> dict:
    """What config.yaml holds: the flat {setting: value} users wrote."""
    return to_flat(cfg)


def save(cfg, path: Path) -> None:
    """Write the resolved config as YAML (atomically), so every output says how it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
