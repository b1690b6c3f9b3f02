"""`dpo compare RUN_DIR ...`: one table row per training run, a CSV of the same, and a picture.

A run is a folder written by `dpo train` (or one `beta-*` folder of `dpo sweep`): `config.yaml` (β, loss type),
`metrics.jsonl` (train records with `loss`, eval records with `eval/...`), and `summary.json` once finished.
A sweep folder (no run files itself, but run subfolders) stands for all its runs. Runs without eval records or
unfinished runs are still compared with what they have; the table says what is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.base.errors import UserError
from stages.base.progress import say
from stages.settings.groups import LossSettings
from stages.stage2.metrics import read_metrics

ACC, MARGIN, CHOSEN, REJECTED, EVAL_LOSS = (
    "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen", "eval/rewards/rejected", "eval/loss")
RUN_FILES = ("config.yaml", "metrics.jsonl")


@dataclass(frozen=True)
class Run:
    path: Path
    beta: float | None
    loss: str | None
    summary: dict | None    # summary.json, None while unfinished
    records: list[dict]     # metrics.jsonl in order

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if ACC in r]

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]


@dataclass(frozen=True)
class Row:
    """One line of the table / CSV. None = not available (see `missing`)."""

    run: str                     # the folder as found
    name: str                    # short: relative to the folder holding all the runs
    label: str                   # the plot's legend: "β=0.1 sigmoid"
    beta: float | None
    loss: str | None
    steps: int | None
    final_accuracy: float | None
    best_accuracy: float | None
    best_step: int | None
    final_margin: float | None
    final_eval_loss: float | None
    final_train_loss: float | None  # the last logged train loss (its meaning depends on the loss column)
    reward_drift: float | None   # final eval: (|rewards/chosen| + |rewards/rejected|) / 2, how far the policy moved
    wall_seconds: float | None
    best: bool
    missing: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ reading
def is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def expand(run_dirs, skipped: list[str] | None = None) -> list[Path]:
    """The folders as given; a sweep folder becomes its run subfolders. Duplicates dropped, order kept. A path
    that does not exist is an error; files and folders without runs (a sweep's own compare.csv after `DIR/*`) are
    skipped into `skipped` when some run is found, else the first of them is the error."""
    found: list[Path] = []
    refused: list[UserError] = []
    for given in run_dirs:
        p = Path(given)
        if not p.exists():
            raise UserError(f"{given}: no such folder; pass run folders written by `dpo train` or `dpo sweep`")
        subs = [] if not p.is_dir() or is_run(p) else sorted(s for s in p.iterdir() if s.is_dir() and is_run(s))
        if not p.is_dir() or (not is_run(p) and not subs):
            what = "a file" if not p.is_dir() else "not a training run (no config.yaml or metrics.jsonl there)"
            refused.append(UserError(f"{given}: {what}; pass folders written by `dpo train` or `dpo sweep`"))
            if skipped is not None:
                skipped.append(str(given))
            continue
        found += subs or [p]
    if not found and refused:
        raise refused[0]
    unique = {p.resolve(): p for p in reversed(found)}  # first occurrence wins
    return [p for p in found if unique.get(p.resolve()) is p]


def _read_json_or_yaml(path: Path, loader) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = loader(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read it ({str(e).splitlines()[0]}); is the run folder damaged?") from None
    return value if isinstance(value, dict) else None


def load_run(path: Path) -> Run:
    cfg = _read_json_or_yaml(path / "config.yaml", yaml.safe_load) or {}
    summary = _read_json_or_yaml(path / "summary.json", json.loads)
    try:
        records = read_metrics(path / "metrics.jsonl")
    except ValueError as e:
        raise UserError(f"{path / 'metrics.jsonl'}: not JSON lines ({e})") from None
    beta = cfg.get("beta", (summary or {}).get("beta"))
    loss = cfg.get("loss", (summary or {}).get("loss_type"))
    if "loss" in cfg:  # the whole loss: mixture, ε, f-divergence, LD, WPO ("sigmoid*0.8+sft ld=0.5 wpo")
        try:
            loss = LossSettings.from_saved(cfg).describe()
        except (UserError, TypeError, ValueError):
            loss = str(cfg["loss"])
    return Run(path, float(beta) if beta is not None else None, loss, summary, records)


# ------------------------------------------------------------------------------------------------ rows
def label_of(run: Run) -> str:
    beta = "?" if run.beta is None else f"{run.beta:g}"
    return f"β={beta} {run.loss or '?'}"


def summarize(run: Run, name: str, label: str) -> Row:
    evals, train, s = run.evals, run.train, run.summary
    missing = []
    if not run.records:
        missing.append("no metrics.jsonl records (not started?)")
    elif not evals:
        missing.append("no eval metrics (trained without --eval-data?): eval columns empty")
    if s is None:
        missing.append("unfinished (no summary.json): steps so far, no wall time")
    last, best = (evals[-1], max(evals, key=lambda r: r[ACC])) if evals else ({}, {})
    steps = s.get("steps") if s else max((r.get("step", 0) for r in train), default=None)
    drift = (abs(last[CHOSEN]) + abs(last[REJECTED])) / 2 if CHOSEN in last and REJECTED in last else None
    return Row(run=str(run.path), name=name, label=label, beta=run.beta, loss=run.loss, steps=steps,
               final_accuracy=last.get(ACC), best_accuracy=best.get(ACC), best_step=best.get("step"),
               final_margin=last.get(MARGIN), final_eval_loss=last.get(EVAL_LOSS),
               final_train_loss=train[-1]["loss"] if train else None, reward_drift=drift,
               wall_seconds=s.get("seconds") if s else None, best=False, missing=tuple(missing))


def rank_rows(rows: list[Row]) -> list[Row]:
    """Best eval accuracy first (ties: higher final accuracy, then lower final eval loss); runs without eval
    last. Marks the first one."""
    def key(r: Row):
        return (r.best_accuracy is None, -(r.best_accuracy or 0.0), -(r.final_accuracy or 0.0),
                r.final_eval_loss if r.final_eval_loss is not None else math.inf)

    ordered = sorted(rows, key=key)
    if ordered and ordered[0].best_accuracy is not None:
        ordered[0] = dataclasses.replace(ordered[0], best=True)
    return ordered


def unique_labels(runs: list[Run]) -> list[str]:
    """'β=0.1 sigmoid', plus the folder name where two runs would otherwise share a label."""
    labels = [label_of(r) for r in runs]
    return [f"{lab} ({r.path.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


# ------------------------------------------------------------------------------------------------ output
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """Aligned text table, one line per run, then one note per missing part."""
    head = ["", "β", "loss", "steps", "acc final", "acc best", "margin final", "eval loss", "train loss",
            "|reward| drift", "wall s", "run"]
    body = [["*" if r.best else "", _fmt(r.beta, "g"), r.loss or "-", _fmt(r.steps, "d"),
             _fmt(r.final_accuracy, ".3f"), _fmt(r.best_accuracy, ".3f") + (f" @{r.best_step}" if r.best_step else ""),
             _fmt(r.final_margin, ".4g"), _fmt(r.final_eval_loss, ".4f"), _fmt(r.final_train_loss, ".4f"),
             _fmt(r.reward_drift, ".4g"),
             _fmt(r.wall_seconds, ".1f"), r.name] for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines += [f"note: {r.name}: {m}" for r in rows for m in r.missing]
    if any(r.best for r in rows):
        lines.append("(* = best eval reward accuracy)")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    names = [f.name for f in dataclasses.fields(Row)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({**dataclasses.asdict(r), "missing": "; ".join(r.missing)})
    os.replace(tmp, path)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["step"], r[key]) for r in records if key in r and "step" in r)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: list[Run], labels: list[str], path: Path) -> None:
    """Three panels against step: eval reward accuracy, eval reward margin, train loss; one line per run.
    Matplotlib's object API with the Agg canvas: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    panels = [(ACC, "eval reward accuracy", "no eval metrics", "fraction of pairs, chosen reward > rejected"),
              (MARGIN, "eval reward margin", "no eval metrics", "reward margin  β·(ρ_chosen − ρ_rejected)"),
              ("loss", "train loss", "no train loss logged", "loss (mean over the logging window)")]
    for i, (key, title, empty, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        drawn: list[tuple[list, list]] = []
        for k, (run, label) in enumerate(zip(runs, labels)):
            steps, values = _series(run.records, key)
            if steps:
                ax.plot(steps, values, label=label, **_line_style(k, (steps, values), drawn, key != "loss"))
                drawn.append((steps, values))
        if not drawn:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=8)
        if key == ACC:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"dpo compare: {len(runs)} run{'' if len(runs) == 1 else 's'}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _line_style(k: int, series: tuple[list, list], drawn: list, markers: bool) -> dict:
    """Run k's style. A line that coincides with one already drawn (same steps, values within 1e-9) gets a larger
    hollow marker and a dashed line, so both runs stay visible instead of one hiding the other."""
    same = sum(1 for s, v in drawn if s == series[0] and all(abs(a - b) <= 1e-9 for a, b in zip(v, series[1])))
    style = {"marker": MARKERS[k % len(MARKERS)] if markers or same else None, "markersize": 3 + 3 * same}
    if same:
        style.update(markerfacecolor="none", linestyle=(0, (4, 2 + 2 * same)), linewidth=1.0)
    return style


def samples_tables(run_dirs) -> str:
    """One markdown table of samples per run (RUN/samples.jsonl from `dpo sample`), or a note where none."""
    from stages.tools.sample import markdown

    parts = []
    for path in expand(run_dirs):
        f = path / "samples.jsonl"
        if not f.is_file():
            parts.append(f"note: {path}: no samples.jsonl; run `dpo sample --adapter {path / 'adapter'} --data ...`")
            continue
        try:
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise UserError(f"{f}: not JSON lines ({e}); rerun `dpo sample`") from None
        parts.append(markdown(rows, f"Samples: {path}"))
    return "\n".join(parts)


def common_parent(paths: list[Path]) -> Path:
    """The folder holding all the runs: where compare.png goes without --output, and what names are relative to."""
    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


def compare(run_dirs, out_dir: str | Path | None = None) -> tuple[list[Row], Path, Path]:
    """Rows sorted best first, and the paths of compare.png and compare.csv written into out_dir."""
    skipped: list[str] = []
    paths = expand(run_dirs, skipped)
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        say(None, f"note: skipped {len(skipped)} path(s) that are not run folders: {', '.join(skipped[:3])}{more}")
    runs = [load_run(p) for p in paths]
    parent = common_parent(paths)
    names = [str(p.resolve().relative_to(parent)) for p in paths]
    rows = rank_rows([summarize(r, n, lab) for r, n, lab in zip(runs, names, unique_labels(runs))])
    out = Path(out_dir) if out_dir is not None else parent
    out.mkdir(parents=True, exist_ok=True)
    png, csv_path = out / "compare.png", out / "compare.csv"
    write_csv(rows, csv_path)
    plot(runs, unique_labels(runs), png)
    return rows, png, csv_path
