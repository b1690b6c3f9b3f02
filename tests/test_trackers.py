"""`--report-to`: every tracker in its offline/local mode logs exactly what metrics.jsonl holds, with the config and
the run name; rank 0 only; a missing package is one line naming the extra."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.base.errors import UserError
from stages.model.distributed import DistEnv
from stages.settings import groups
from stages.stage2 import trackers
from stages.stage2.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[1]
ALL = ("tensorboard", "wandb", "mlflow", "trackio")
RECORDS = [  # what train.py writes: a step-0 drift record, train windows, eval records (a NaN is not logged)
    {"step": 0, "ref_drift": 0.0, "ref_drift_per_token": 0.0},
    {"step": 2, "epoch": 0.5, "loss": 0.6931, "rewards/chosen": 0.01, "rewards/rejected": -0.02,
     "rewards/accuracies": 0.75, "rewards/margins": 0.03, "grad_norm": 1.5, "learning_rate": 1e-4},
    {"step": 2, "eval/loss": 0.69, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.001},
    {"step": 4, "epoch": 1.0, "loss": 0.5, "rewards/chosen": 0.2, "rewards/rejected": -0.3, "rewards/accuracies": 1.0,
     "rewards/margins": 0.5, "grad_norm": float("nan"), "learning_rate": 0.0},
]
CONFIG = {"model": "m", "beta": 0.1, "data": ["train.jsonl"], "adapter": None, "report_to": ["wandb"]}


def cpu_env(rank: int = 0) -> DistEnv:
    return DistEnv(rank, 1, 0, torch.device("cpu"))


def test_parse_report_to():
    assert trackers.parse_report_to(()) == ()
    assert trackers.parse_report_to(["none"]) == ()
    assert trackers.parse_report_to("wandb") == ("wandb",)
    assert trackers.parse_report_to(["wandb, MLflow", "trackio", "wandb"]) == ("wandb", "mlflow", "trackio")
    assert trackers.parse_report_to(["mlflow"], tensorboard=True) == ("mlflow", "tensorboard")
    assert set(trackers.parse_report_to(["all"])) <= set(ALL)
    with pytest.raises(UserError, match=r"--report-to 'comet' is not a tracker; use none, tensorboard, wandb"):
        trackers.parse_report_to(["wandb,comet"])


def test_missing_package_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(groups, "_installed", lambda name: name != "wandb")
    with pytest.raises(UserError) as info:
        MetricsWriter(tmp_path / "metrics.jsonl", cpu_env(), ("tensorboard", "wandb"))
    assert str(info.value) == "--report-to wandb needs the wandb package: pip install 'dpo-stages[wandb]'"
    assert not (tmp_path / "tensorboard").exists()  # checked before any tracker opens


def test_only_rank_0_logs(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", cpu_env(rank=1), ("tensorboard",), CONFIG)
    writer.write(RECORDS[1])
    writer.close()
    assert list(tmp_path.iterdir()) == []


def read_wandb_records(path: Path) -> list[bytes]:
    """The records of an offline .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, records
    with a 7-byte header: crc32c, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    data, block, pos, out, buf = path.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of a block
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(buf)
    return out


WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from stages.model.distributed import DistEnv
from stages.stage2.metrics import MetricsWriter

run, records, config = Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
writer = MetricsWriter(run / "metrics.jsonl", DistEnv(0, 1, 0, torch.device("cpu")), [",".join(sys.argv[5:])], config)
for r in records:
    writer.write(r)
writer.close()

from trackio.sqlite_storage import SQLiteStorage  # TRACKIO_DIR is read at import: here, in this process
logs = SQLiteStorage.get_logs("dpo-stages", run.name)
print("TRACKIO " + json.dumps({"logs": logs, "config": SQLiteStorage.get_run_config("dpo-stages", run.name)},
                              default=str))
"""


def run_worker(tmp_path: Path, names=ALL) -> tuple[Path, str]:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    run = tmp_path / "beta-0.1-sigmoid"
    run.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(REPO), str(run), json.dumps(RECORDS), json.dumps(CONFIG),
                           *names], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc.stdout


def expected_points() -> dict[str, dict[int, float]]:
    """metrics.jsonl as key -> {step: value}, finite numbers only (what a tracker can plot)."""
    out: dict[str, dict[int, float]] = {}
    for r in RECORDS:
        for k, v in r.items():
            if k != "step" and math.isfinite(v):
                out.setdefault(k, {})[r["step"]] = v
    return out


def test_every_tracker_logs_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the file store back here
    run, stdout = run_worker(tmp_path)
    written = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert written == [r for r in json.loads(json.dumps(RECORDS))]  # NaN round-trips as NaN; compare below
    want = expected_points()

    # TensorBoard: scalars under the same names, the config as text and hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = {k: {e.step: e.value for e in acc.Scalars(k)} for k in acc.Tags()["scalars"]}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6)  # TensorBoard stores float32
    assert "config/text_summary" in acc.Tags()["tensors"]

    # MLflow (file store): every metric's history, params = the resolved config, run name = the output folder
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("dpo-stages").experiment_id])
    assert mrun.info.run_name == "beta-0.1-sigmoid" and mrun.data.params["beta"] == "0.1"
    assert mrun.data.params["data"] == '["train.jsonl"]' and mrun.info.status == "FINISHED"
    for k in want:
        assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, k)} == want[k]

    # trackio (local SQLite store)
    trackio = json.loads(next(line for line in stdout.splitlines() if line.startswith("TRACKIO "))[8:])
    got = {}
    for row in trackio["logs"]:
        for k, v in row.items():
            if k in want:
                got.setdefault(k, {})[row["step"]] = v
    assert got == want
    assert trackio["config"]["beta"] == 0.1

    # W&B offline: the .wandb file's history records, config and run name
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    got, config, name = {}, {}, None
    for data in read_wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if k in want:
                    got.setdefault(k, {})[items["_step"]] = v
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "run":
            name = rec.run.display_name
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    assert got == want and name == "beta-0.1-sigmoid"
    assert config["beta"] == 0.1 and config["data"] == ["train.jsonl"]
    assert json.loads((run / trackers.STATE_FILE).read_text()).keys() == {"wandb", "mlflow"}
