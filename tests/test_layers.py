"""One-way layers: which part of stages/ may import which (ARCHITECTURE.md draws the same table).

Every module under stages/ is parsed with `ast`: top-level imports, imports inside functions, under TYPE_CHECKING
and `importlib.import_module("stages...")` alike. Each import of a `stages` module is an arrow from the importing
module's part (its subpackage; stages/cli.py is `cli`, stages/__init__.py is `root`) to the imported one's.
MAY_IMPORT is the whole table: an arrow it does not list is forbidden, and an arrow it lists that no module uses
fails too, so the table stays the real graph (tighten it, and ARCHITECTURE.md, when an arrow goes away).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"

# ---------------------------------------------------------------------------------------------------- the table
# Lowest first. `root` is stages/__init__.py (the version only).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "root": frozenset(),
    "base": frozenset(),
    "objective": frozenset({"base"}),
    "data": frozenset({"base"}),
    # the objective only through ONLY_THROUGH's torch-free module; data and model inside the one method of a group
    # that builds their value type (DataSpec.fields, Lengths.tokenize, ModelSettings.spec, LoraSettings.lora)
    "settings": frozenset({"base", "objective", "data", "model"}),
    "model": frozenset({"base", "data", "objective"}),
    "cache": frozenset({"base", "data"}),
    "stage1": frozenset({"root", "base", "data", "model", "cache", "settings"}),
    "stage2": frozenset({"base", "data", "objective", "model", "cache", "settings"}),
    "tools": frozenset({"root", "base", "data", "objective", "model", "cache", "settings", "stage1", "stage2"}),
    "cli": frozenset({"base", "model", "cache", "settings", "stage1", "stage2", "tools"}),
}
# An allowed arrow that may land only on these modules of the imported part.
ONLY_THROUGH = {("settings", "objective"): frozenset({"stages.objective.lossspec"})}
# No import of these libraries anywhere in these parts/modules (`dpo --help` and the settings stay torch-free).
HEAVY = frozenset({"torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl"})
TORCH_FREE_PARTS = frozenset({"root", "base", "settings", "data", "cache"})
TORCH_FREE_MODULES = frozenset({"stages.objective.lossspec"})
# Arrows that break the table today, pinned by (file, imported module) until their owner moves them; an entry that
# no longer occurs fails the test, so this list only shrinks.
# The torch-free rule's exceptions are pinned here too, by the library's name.
KNOWN_VIOLATIONS = {
    ("stages/settings/groups.py", "torch"): "_cuda_available() for an 8-bit optimizer",
}
# Module-level circles (a imports b imports a, at any depth, function-level imports included), pinned the same way.
KNOWN_MODULE_CYCLES = [
]


# ---------------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Arrow:
    file: str    # stages/x/y.py, relative to the repo
    line: int
    source: str  # the importing module
    target: str  # the imported module (a submodule where `from pkg import name` names one), or a library


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(STAGES.rglob("*.py"))}


def part_of(module: str) -> str | None:
    """`stages` -> root, `stages.cli` -> cli, `stages.<sub>...` -> <sub> when it is a part, else None."""
    names = module.split(".")
    if names == ["stages"]:
        return "root"
    if names[:2] == ["stages", "cli"]:
        return "cli"
    return names[1] if len(names) > 1 and names[1] in MAY_IMPORT and names[1] not in ("root", "cli") else None


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules (or library roots) one import node brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved here, and reported by test_imports_are_absolute
            anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def arrows() -> list[Arrow]:
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py"):
                out.append(Arrow(rel, getattr(node, "lineno", 0), module, target))
    return out


ARROWS = arrows()
OURS = [a for a in ARROWS if a.target == "stages" or a.target.startswith("stages.")]


def violations() -> list[tuple[Arrow, str]]:
    """Every arrow the table forbids, with the reason, the pinned KNOWN_VIOLATIONS left out."""
    out = []
    for a in OURS:
        src, dst = part_of(a.source), part_of(a.target)
        if src is None or dst is None or src == dst:
            continue  # unknown parts fail test_every_module_belongs_to_a_part
        if dst not in MAY_IMPORT[src]:
            out.append((a, f"part {src} -> part {dst} is forbidden"))
        elif (src, dst) in ONLY_THROUGH and a.target not in ONLY_THROUGH[(src, dst)]:
            only = ", ".join(sorted(ONLY_THROUGH[(src, dst)]))
            out.append((a, f"part {src} -> part {dst} is allowed only through {only}"))
    return [(a, why) for a, why in out if (a.file, a.target) not in KNOWN_VIOLATIONS]


def fmt(a: Arrow, why: str) -> str:
    return f"{a.file}:{a.line} imports {a.target} ({why})"


# ---------------------------------------------------------------------------------------------------- the tests
def test_every_module_belongs_to_a_part():
    unknown = [str(p.relative_to(REPO)) for m, p in MODULES.items() if part_of(m) is None]
    assert not unknown, f"modules in no part (add the subpackage to MAY_IMPORT and ARCHITECTURE.md): {unknown}"


def test_no_forbidden_arrow():
    found = violations()
    for a, why in found:
        print(fmt(a, why))
    assert not found, "\n".join(fmt(a, why) for a, why in found)


def test_known_violations_still_occur():
    """A pinned exception that was fixed must leave KNOWN_VIOLATIONS (the list only shrinks)."""
    present = {(a.file, a.target) for a in ARROWS}
    stale = [k for k in KNOWN_VIOLATIONS if k not in present]
    assert not stale, f"fixed, drop from KNOWN_VIOLATIONS: {stale}"


def test_every_allowed_arrow_is_used():
    """The table is the real graph: an allowed arrow no module uses is dropped (here and in ARCHITECTURE.md)."""
    used = {(part_of(a.source), part_of(a.target)) for a in OURS}
    unused = [(src, dst) for src, dsts in MAY_IMPORT.items() for dst in sorted(dsts) if (src, dst) not in used]
    assert not unused, f"allowed but unused (tighten MAY_IMPORT): {unused}"


def test_the_table_has_no_cycle():
    """Arrows only go down: the parts sort topologically, so no two parts import each other at any depth."""
    order, left = [], dict(MAY_IMPORT)
    while left:
        ready = [p for p, deps in left.items() if deps <= set(order)]
        assert ready, f"cycle among parts: {sorted(left)}"
        order += sorted(ready)
        left = {p: d for p, d in left.items() if p not in ready}
    assert not [p for p, deps in MAY_IMPORT.items() if "cli" in deps], "nothing imports cli"


def _module_cycles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import of a stages module."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a in OURS:
        if a.target in MODULES and a.target != a.source:
            graph[a.source].add(a.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                out.append(frozenset(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(MODULES)))
    try:
        for m in graph:
            if m not in index:
                visit(m)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_no_module_cycle():
    cycles = _module_cycles()
    new = [sorted(c) for c in cycles if c not in KNOWN_MODULE_CYCLES]
    stale = [sorted(c) for c in KNOWN_MODULE_CYCLES if c not in cycles]
    assert not new, f"modules that import each other (move the shared piece down): {new}"
    assert not stale, f"fixed, drop from KNOWN_MODULE_CYCLES: {stale}"


@pytest.mark.parametrize("part", sorted(TORCH_FREE_PARTS) + sorted(TORCH_FREE_MODULES))
def test_torch_free(part):
    bad = [a for a in ARROWS if a.target.split(".")[0] in HEAVY and (part_of(a.source) == part or a.source == part)
           and (a.file, a.target) not in KNOWN_VIOLATIONS]
    lines = [f"{a.file}:{a.line} imports {a.target} ({part} stays torch-free)" for a in bad]
    assert not lines, "\n".join(lines)


def test_imports_are_absolute():
    rel = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                rel.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not rel, f"relative imports (write `from stages.x.y import ...`): {rel}"


def test_every_folder_is_a_package_the_wheel_ships():
    """Each folder of stages/ with .py files has an __init__.py, and pyproject's package find includes it."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(where=str(REPO), include=find.get("include", ("*",)), exclude=find.get("exclude", ())))
    folders = sorted({p.parent for p in STAGES.rglob("*.py") if "__pycache__" not in p.parts})
    missing_init = [str(d.relative_to(REPO)) for d in folders if not (d / "__init__.py").is_file()]
    assert not missing_init, f"folders without __init__.py: {missing_init}"
    not_shipped = [d for d in (".".join(d.relative_to(REPO).parts) for d in folders) if d not in shipped]
    assert not not_shipped, f"packages pyproject's [tool.setuptools.packages.find] leaves out: {not_shipped}"
