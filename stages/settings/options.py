"""How a setting is declared, how groups of settings make a command, and the flat view users see.

A setting is a field of a frozen *group* (stages/settings/groups.py), declared once with `opt`: its name is its YAML
key and (with dashes) its `--option`; its type gives the option's type (`Literal[...]` a choice, `bool` a
--x/--no-x flag, `tuple[...]` a repeatable option); its default is the default `--help` shows; its metadata holds
the help text, whether it may change when a run is resumed (`resume=True`), older spellings still accepted
(`aliases`), other flags (`flags`) and positional arguments (`argument`). A group's `check()` is the ONE place its
values are checked (one-line UserErrors).

A *command* (stages/settings/commands.py) is a frozen dataclass whose fields are groups, each declared with `part`:
the command may leave some of a group's settings out (`omit`) and word a setting's help (`words`: {name: help})
or its default and help ({name: (default, help)}) for itself; it never re-declares a type or a check. Users see
the flat union of the parts' settings (`options`): the CLI's options and the YAML keys, unique per command.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass


def opt(default=MISSING, help: str = "", *, resume: bool = False, aliases: tuple[str, ...] = (),
        flags: tuple[str, ...] = (), argument: bool = False):
    """A setting: default, help text, `resume` = may differ from the run being resumed, `aliases` = older option
    names also accepted as YAML keys, `flags` = other option names only (--beta for betas), `argument` = a
    positional command-line argument."""
    meta = {"help": help, "resume": resume, "aliases": aliases, "flags": flags, "argument": argument}
    return dataclasses.field(default=default, metadata=meta)


class Group:
    """A frozen dataclass of settings that belong together. `check` raises the one-line UserErrors of its values;
    `fill` derives the defaults that depend on what the user gave (`given`: the keys the user set)."""

    def check(self) -> None:
        pass

    @classmethod
    def fill(cls, values: dict, given: set[str]) -> tuple[dict, list[str]]:
        return values, []


def part(group: type, *, omit: tuple[str, ...] = (), words: dict | None = None):
    """A command's field holding one group. `omit`: settings of the group this command does not offer (they keep
    the group's default); `words`: {setting: help} or {setting: (default, help)} where this command words it
    otherwise."""
    names = {f.name for f in dataclasses.fields(group)}
    unknown = (set(omit) | set(words or {})) - names
    assert not unknown, f"{group.__name__} has no setting {sorted(unknown)}"
    return dataclasses.field(metadata={"group": group, "omit": tuple(omit), "words": dict(words or {})})


@dataclass(frozen=True)
class Option:
    """One setting as a command offers it: the flat view (CLI option, YAML key)."""

    name: str
    hint: object
    default: object
    metadata: dict
    group: type
    part: str | None  # the command's field holding the group (None: the command is this one group)

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _parts(command: type) -> list[tuple[str | None, type, tuple, dict]]:
    """(field, group, omit, words) per part; a command of one group may be that group itself (field None)."""
    if issubclass(command, Group):
        return [(None, command, (), {})]
    return [(p.name, p.metadata["group"], p.metadata["omit"], p.metadata["words"]) for p in dataclasses.fields(command)]


def options(command: type) -> list[Option]:
    """The settings a command offers, in part order then declaration order; names are unique per command."""
    out = []
    for name, group, omit, words in _parts(command):
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            if f.name in omit:
                continue
            worded = words.get(f.name, f.metadata.get("help", ""))
            default, help = (f.default, worded) if isinstance(worded, str) else worded
            out.append(Option(f.name, _hint(hints[f.name], default), default, {**f.metadata, "help": help}, group,
                              name))
    names = [o.name for o in out]
    assert len(names) == len(set(names)), f"{command.__name__}: a setting is offered twice"
    return out


def _hint(hint, default):
    """A setting that may be None in its group (None: "decided later", e.g. from the cache) is not None where the
    command's default is a value: there None is refused like any other wrong value."""
    args = typing.get_args(hint)
    if default is None or default is MISSING or type(None) not in args or typing.get_origin(hint) is typing.Literal:
        return hint
    rest = tuple(a for a in args if a is not type(None))
    return rest[0] if len(rest) == 1 else typing.Union[rest]


def resume_free(command: type) -> tuple[str, ...]:
    """The settings that may change between a run and its resume (declared on the settings, listed here)."""
    return tuple(o.name for o in options(command) if o.metadata.get("resume"))


def from_flat(command: type, values: dict, given: set[str] | None = None):
    """The command from flat {setting: value} (already type-checked); unset settings take their defaults. Each
    group fills its derived defaults, then checks itself; then the command checks what spans groups. The
    notes of derived values ride on the command (`notes`), for the stage to print once."""
    given = set(values) if given is None else given
    by_part: dict[str, dict] = {}
    for o in options(command):
        if o.name in values:
            by_part.setdefault(o.part, {})[o.name] = values[o.name]
        elif not o.required:
            by_part.setdefault(o.part, {})[o.name] = o.default
    groups, notes = {}, []
    for name, group, _, _ in _parts(command):
        filled, said = group.fill(by_part.get(name, {}), given)
        groups[name] = group(**filled)
        groups[name].check()
        notes += said
    if issubclass(command, Group):
        return groups[None]
    cfg = command(**groups)
    object.__setattr__(cfg, "notes", tuple(notes))
    cfg.check()
    return cfg


def to_flat(cfg) -> dict:
    """{setting: value} of a command (what config.yaml holds), tuples as lists."""
    out = {}
    for o in options(type(cfg)):
        value = getattr(cfg if o.part is None else getattr(cfg, o.part), o.name)
        out[o.name] = list(value) if isinstance(value, tuple) else value
    return out


def replace(cfg, **values):
    """The command with some settings changed (flat names), checked again."""
    flat = {**to_flat(cfg), **values}
    return from_flat(type(cfg), {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}, set(flat))


class Command:
    """Base of the commands: `check` spans groups (a group checks its own settings); `flat` builds one from flat
    settings (tests, the sweep); `notes` are what deriving defaults said (printed once by the stage)."""

    notes: tuple[str, ...] = ()

    def check(self) -> None:
        pass

    @classmethod
    def flat(cls, **values):
        return from_flat(cls, values)
