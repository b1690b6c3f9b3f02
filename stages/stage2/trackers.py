"""Experiment trackers for `--report-to` (Trainer's names): none, tensorboard, wandb, mlflow, trackio, all.

Each tracker is one small class over its own library (an optional extra: `pip install 'dpo-stages[wandb]'`):
`open(run_dir, run_name, config)` -> `log(metrics, step)` ... -> `close()`. Metric names are those of
metrics.jsonl (TRL's: `loss`, `rewards/chosen`, `eval/rewards/accuracies`, ...), values the same floats; the
resolved config is logged once as hyperparameters; the run is named after the output folder. Only rank 0 opens
trackers (MetricsWriter decides). Local/offline modes come from each library's own settings: `WANDB_MODE=offline`,
`MLFLOW_TRACKING_URI` (default: a file store in RUN/mlruns), `TRACKIO_DIR`; projects from `WANDB_PROJECT`,
`MLFLOW_EXPERIMENT_NAME`, `TRACKIO_PROJECT` (default `dpo-stages`).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from stages.settings.groups import check_installed, parse_report_to  # noqa: F401  (the names are settings)

DEFAULT_PROJECT = "dpo-stages"
STATE_FILE = "trackers.json"  # run ids, so a resumed training continues the same tracker run


def _numeric(metrics: dict) -> dict[str, float]:
    """Finite numbers except the step itself (it is the x axis)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat_params(config: dict) -> dict[str, str | float | int | bool]:
    """Hyperparameters as scalars (lists/None become text): what every tracker's params table accepts."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in config.items()}


class _State:
    """run ids kept in RUN/trackers.json."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self, key: str, value: str) -> None:
        self.data[key] = value
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class TensorBoard:
    package = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: _State):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
        for summary in hparams(_flat_params(config), {}):  # the HPARAMS tab, in the same event file
            self.writer.file_writer.add_summary(summary)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in _numeric(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    package = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: _State):
        import wandb

        run_id = state.data.get("wandb") or uuid.uuid4().hex[:8]  # W&B run ids: 8 lowercase alphanumerics
        state.save("wandb", run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name, id=run_id,
                              resume="allow", config=config, dir=str(run_dir), reinit="create_new")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    package = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: _State):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 refuses file stores unless told: this is one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = state.data.get("mlflow")
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            state.save("mlflow", self.run_id)
            params = [Param(k, str(v)[:6000]) for k, v in _flat_params(config).items()]
            self.client.log_batch(self.run_id, params=params)

    def log(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in _numeric(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio:
    package = "trackio"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: _State):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT), name=run_name,
                                config=config, resume="allow", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)  # only our metrics

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}
def open_trackers(names, run_dir: Path, config: dict, run_name: str | None = None) -> list:
    """The trackers, opened (call on rank 0 only). The run name defaults to the output folder's name."""
    check_installed(names)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _State(run_dir)
    name = run_name or run_dir.resolve().name
    return [TRACKERS[n](run_dir, name, config, state) for n in names]
