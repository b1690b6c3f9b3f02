"""Resuming stage two from its checkpoints (stages/stage2/checkpoint.py holds the format): may this run continue the
folder's checkpoints, continue from the newest one, or start fresh in a used folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.base import fsio
from stages.base.errors import UserError
from stages.base.progress import say
from stages.model.distributed import barrier
from stages.settings import yamlconfig as config
from stages.settings.commands import TrainConfig
from stages.settings.options import resume_free
from stages.stage2 import checkpoint
from stages.stage2.metrics import read_metrics

RESUME_FREE = resume_free(TrainConfig)  # declared on the settings (stages/settings/groups.py)


def check_resumable(cfg: TrainConfig, out: Path) -> None:
    """A checkpoint continues only the run that made it: other settings would silently mix two runs."""
    import yaml

    saved_path = out / "config.yaml"
    if not (cfg.run.resume and checkpoint.list_checkpoints(out)) or not saved_path.is_file():
        return
    saved, now = yaml.safe_load(saved_path.read_text()) or {}, config.to_dict(cfg)
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k, now[k]) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{out}: has checkpoints of a run with {k}={saved[k]!r}, this run has {k}={now[k]!r}; "
                        "use another --output, the same settings, or --no-resume to start again")


def resume_or_start(resume: bool, out: Path, model, optimizer, scheduler, env) -> tuple[int, float, dict]:
    """(step, wall seconds so far, this rank's metrics window) from the newest checkpoint (`resume`: --resume), or
    a fresh start."""
    found = checkpoint.list_checkpoints(out) if resume else []
    if not found:
        fresh_start(out, env)
        return 0, 0.0, {}
    state = checkpoint.load(found[-1], model, optimizer, scheduler, env)
    if env.is_main:  # drop records logged after the checkpoint: they will be logged again
        kept = read_metrics(out / "metrics.jsonl", upto_step=state["step"])
        fsio.write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    say(env, f"resumed from {found[-1]} (step {state['step']})")
    return state["step"], state.get("seconds", 0.0), state.get("rank_state", {}).get("window", {})


def fresh_start(out: Path, env) -> None:
    """A new run in a used folder: nothing of the old run may survive to be resumed or reported."""
    if env.is_main:
        for old in checkpoint.list_checkpoints(out):
            checkpoint.remove(old)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    barrier(env)
