"""Both stages under `torchrun --nproc-per-node 2` (gloo, CPU) with every torch.distributed collective wrapped
(tests/collective_guard.py): each tensor a collective is handed must be on the run's declared device (env.device)
and of a type the group's backend takes, and the stages must call collectives only through stages/model/distributed.py.
On NCCL the stages' collectives used to meet CPU tensors (stage one's stats, stage two's drift counts): the guard
flags that shape of call on CPU too (a direct call, or a tensor off env.device).

The same two runs check item 7's memory record: per phase, per rank, in summary.json and in the cache's metadata.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.cache import refcache
from tests.test_train_dist import free_port, hh_rows, write_jsonl

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
SHORT = ("--max-length", "256", "--max-prompt-length", "128")


def guarded_torchrun(log: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "tests.collective_guard", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "DPO_COLLECTIVE_LOG": str(log)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)


@pytest.fixture(scope="module")
def runs(hh_path: Path, tiny_llama: Path, tmp_path_factory) -> dict:
    """A tiny NF4 stage one (7 examples in one-example batches: rank 1 runs a dummy forward), then a stage two of two
    steps with an eval after each (3 eval rows: uneven across ranks), a checkpoint each step, and the step-0 drift
    report (a fresh LoRA: step 1's own forwards)."""
    d = tmp_path_factory.mktemp("collectives")
    train_f = write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, 7))
    eval_f = write_jsonl(d / "eval.jsonl", hh_rows(hh_path, 7, 10))
    cache = d / "ref.parquet"
    one = guarded_torchrun(d / "log-precompute", "precompute-ref", "--model", str(tiny_llama), "--data", str(train_f),
                           "--data", str(eval_f), "--output", str(cache), "--max-tokens-per-batch", "1",
                           "--load-in-4bit", *SHORT)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    two = guarded_torchrun(d / "log-train", "train", "--model", str(tiny_llama), "--data", str(train_f),
                           "--eval-data", str(eval_f), "--ref-cache", str(cache), "--output", str(d / "run"),
                           "--max-steps", "2", "--batch-size", "1", "--eval-batch-size", "1", "--eval-steps", "1",
                           "--save-steps", "1", "--lora-r", "4", "--lora-dropout", "0", *SHORT)  # NF4, as cached
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    return {"dir": d, "cache": cache, "out": d / "run", "precompute": one, "train": two}


def guard_logs(log: Path) -> list[dict]:
    found = sorted(log.glob("rank*.json"))
    assert [p.name for p in found] == ["rank0.json", "rank1.json"], "the guard did not run on both ranks"
    return [json.loads(p.read_text()) for p in found]


def calls_matching(logs: list[dict], prefix: str) -> int:
    return sum(n for log in logs for key, n in log["calls"].items() if key.startswith(prefix))


@pytest.mark.parametrize("stage", ["precompute", "train"])
def test_every_collective_tensor_on_the_run_device_through_the_helpers(runs, stage):
    logs = guard_logs(runs["dir"] / f"log-{stage}")
    assert all(log["declared"] == "cpu" for log in logs)
    violations = [v for log in logs for v in log["violations"]]
    assert not violations, violations[:10]
    # the guard saw the collectives that matter (so an empty violation list means something)
    expected = ["broadcast_object_list @ stages.model.runguard.guarded_output",
                "all_reduce @ stages.model.loading._fill_nf4",  # sharded NF4 loading: the absmax
                "all_reduce @ stages.model.memory.PhaseMemory.report"]
    if stage == "precompute":
        expected += ["all_reduce @ stages.stage1.precompute.reference_pass",  # the stats, after the whole pass
                     "all_reduce @ stages.model.runguard.StopSignal.requested < stages.stage1.precompute.score_batches",
                     "broadcast @ stages.stage1.precompute.open_cache_everywhere"]  # broadcast_object's own tensors
        fsdp = ("all_gather_single", "all_gather_into_tensor")
    else:
        expected += ["all_reduce @ stages.stage2.train.report_drift",  # the step-0 drift counts
                     "all_reduce @ stages.stage2.metrics.Accumulator.reduce < stages.stage2.train.report_drift",
                     "all_reduce @ stages.stage2.metrics.Accumulator.reduce < stages.stage2.train.evaluate",
                     "all_reduce @ stages.stage2.metrics.Accumulator.reduce < stages.stage2.train.train_loop",
                     "broadcast_object_list @ stages.stage2.checkpoint.save"]
        fsdp = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")
    missing = [p for p in expected if calls_matching(logs, p) == 0]
    assert not missing, (missing, sorted(logs[0]["calls"]))
    assert sum(calls_matching(logs, op + " @") for op in fsdp) > 0, "no FSDP2 all-gather seen"
    if stage == "train":
        assert sum(calls_matching(logs, op + " @") for op in fsdp[2:]) > 0, "no FSDP2 reduce-scatter seen"


def _check_phase(record: dict, world: int) -> None:
    assert record["kind"] == "rss"  # Linux: VmHWM reset per phase
    assert len(record["per_rank_gb"]) == world and all(v > 0 for v in record["per_rank_gb"]), record
    assert record["max_gb"] == max(record["per_rank_gb"])


def test_train_summary_memory_per_phase_and_rank(runs):
    summary = json.loads((runs["out"] / "summary.json").read_text())
    memory = summary["memory"]
    assert list(memory) == ["load", "train"]
    for record in memory.values():
        _check_phase(record, 2)
    assert summary["peak_memory_gb"] == max(r["max_gb"] for r in memory.values())
    out = runs["train"].stdout.splitlines()
    assert sum(line.startswith("memory (rss,") for line in out) == 1  # rank 0 only


def test_cache_metadata_memory_per_phase_and_rank(runs):
    meta = refcache.read_meta(runs["cache"])
    assert list(meta["memory"]) == ["load", "score"]
    for record in meta["memory"].values():
        _check_phase(record, 2)
    out = runs["precompute"].stdout.splitlines()
    assert sum(line.startswith("memory (rss,") for line in out) == 1
