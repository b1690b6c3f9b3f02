"""`dpo sweep`: one training per (loss type, β) against ONE reference cache, then `dpo compare` over them.

The cache is read and the data are read, validated, tokenized and joined with it once; every run gets the same
prepared items, seed, data order and settings, and only β / loss type differ. The reference model is never loaded
(stage one is not even imported). Runs go to `<output>/beta-<β>-<loss>/`; a rerun skips finished runs
(summary.json) and resumes an unfinished one from its checkpoint, exactly as `dpo train` does. Under torchrun
every rank runs the same loop; the process group lives for the whole sweep (the CLI ends it once).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from stages.base.errors import UserError
from stages.base.progress import say
from stages.cache import refcache
from stages.model.distributed import barrier, init_distributed
from stages.model.runguard import guarded_output
from stages.objective.loss import loss_slug
from stages.settings import yamlconfig as config
from stages.settings.commands import SweepConfig, SweepGrid, TrainConfig
from stages.settings.options import resume_free, to_flat
from stages.stage2 import prepare as prepare_mod, train
from stages.tools.compare import Row, compare, format_table

FREE_ON_RESUME = resume_free(SweepConfig)  # may change between reruns of one sweep folder
SWEEP_ONLY = ("betas", "losses")  # the grid; every other setting is a `dpo train` setting



@dataclass(frozen=True)
class SweepResult:
    run_dirs: list[Path]
    summaries: list[dict]
    rows: list[Row]            # compare's rows, best first (empty on ranks other than 0)
    png: Path | None
    csv: Path | None


def run_name(beta: float, loss: str) -> str:
    """beta-0.1-sigmoid, beta-0.1-0.8sigmoid+0.2bco_pair+sft: repr(β) is exact and unique (0.1 -> "0.1", 1e-05 ->
    "1e-05"); a mixture reads as its formula, in filesystem-safe characters (loss.loss_slug)."""
    return f"beta-{float(beta)!r}-{loss_slug(loss)}"


def combinations(grid: SweepGrid) -> list[tuple[str, float]]:
    """(loss, β) in order: loss types outer, β inner; duplicates dropped (the grid has checked itself)."""
    return list(dict.fromkeys((loss, float(b)) for loss in grid.losses for b in grid.betas))


def train_config(cfg: SweepConfig, beta: float, loss: str) -> TrainConfig:
    """One run's `dpo train` settings: the sweep's, with this β and loss and the run's own folder; checked as
    `dpo train` checks them (the loss settings of each combination too)."""
    shared = {k: tuple(v) if isinstance(v, list) else v for k, v in to_flat(cfg).items() if k not in SWEEP_ONLY}
    return TrainConfig.flat(**{**shared, "beta": beta, "loss": loss,
                               "output": str(Path(cfg.run.output) / run_name(beta, loss))})


def check_same_settings(cfg, path: Path) -> None:
    """A sweep folder is resumed only with the settings it was started with (β and loss lists may change)."""
    if not cfg.run.resume or not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = config.to_dict(cfg)
    diff = sorted(k for k in set(old) | set(new) if k not in FREE_ON_RESUME and old.get(k) != new.get(k))
    if diff:
        raise UserError(f"{path}: this sweep folder was started with other settings ({', '.join(diff)} differ); "
                        "rerun with the same settings, use another --output, or pass --no-resume to retrain every run")


def free_memory() -> None:
    """The previous run's model is unreferenced once train.run returns; give its memory back before the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(cfg: SweepConfig) -> SweepResult:
    combos = combinations(cfg.grid)
    configs = [train_config(cfg, beta, loss) for loss, beta in combos]  # each checked before anything is read
    env = init_distributed()
    out = Path(cfg.run.output)
    with guarded_output(out / ".lock", out, "--output", env):  # each run also locks its own folder
        return sweep_runs(cfg, combos, configs, env, out)


def sweep_runs(cfg: SweepConfig, combos: list[tuple[str, float]], configs: list[TrainConfig], env,
               out: Path) -> SweepResult:
    check_same_settings(cfg, out / "sweep.yaml")
    unfinished = [c for c in configs if not (cfg.run.resume and (Path(c.run.output) / "summary.json").is_file())]
    # read + join once, only if some run still has work to do, and before anything is written
    prep = None
    if unfinished:
        prep = prepare_mod.prepare(cfg.data, cfg.model, cfg.cache, cfg.lengths, cfg.loss.ld_alpha,
                                   loaded=refcache.read_cache(cfg.cache.ref_cache))
    barrier(env)  # every rank has checked before rank 0 overwrites sweep.yaml
    if env.is_main:
        config.save(cfg, out / "sweep.yaml")
    say(env, f"sweep: {len(combos)} runs into {out}/ ({', '.join(run_name(b, lo) for lo, b in combos)})")
    run_dirs, summaries = [], []
    for i, ((loss, beta), tcfg) in enumerate(zip(combos, configs), 1):
        say(env, f"sweep: run {i}/{len(combos)}: β={beta:g} loss={loss} -> {tcfg.run.output}")
        summaries.append(train.run(tcfg, prepared=prep))
        if prep is not None and prep.notes:  # the data notes were printed by the first run; not again
            prep = dataclasses.replace(prep, notes=[])
        run_dirs.append(Path(tcfg.run.output))
        free_memory()
    barrier(env)
    rows, png, csv_path = [], None, None
    if env.is_main:
        rows, png, csv_path = compare(run_dirs, out)
        say(env, format_table(rows))
        say(env, f"sweep: done; plot {png}, table {csv_path}")
    return SweepResult(run_dirs, summaries, rows, png, csv_path)
