"""Issue 11: nothing lost, nothing corrupted, nothing executed — crashes, concurrency and filesystem faults.

Each test reproduces one fault on the tiny random model and a few real HH rows: a kill at a chosen point of stage
one's end game (patched rename/delete raising a BaseException that nothing catches, as SIGKILL would stop it),
a temporary left by a kill, a second writer, read-only / full / not-a-directory outputs, a planted pickle, a stop
signal mid-run, a kill while metrics.jsonl is rewritten, and an incremental rerun after new rows are added.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from stages.base import fsio
from stages.base.errors import MAX_CHARS, Interrupted, UserError
from stages.cache import refcache
from stages.cli import main as cli_main
from stages.model import models
from stages.stage1 import precompute, units
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import checkpoint, train
from stages.stage2.train import TrainConfig
from tests.hhrows import hh_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
MAXLEN, MAXPROMPT = 192, 96
VALUES = ("example_id", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens", "prompt_tokens")


class SimulatedKill(BaseException):
    """Raised at a chosen point: like SIGKILL, nothing in our code catches it (no clean-up runs)."""


def invoke(*args: str):
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=True)


def one_line(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one error line (<= 200 characters) containing every needle."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(("error:", "stopped:"))]
    assert len(lines) == 1, result.stderr
    assert len(lines[0]) <= len("error: ") + MAX_CHARS, lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def pc(model, data, out, **kw) -> PrecomputeConfig:
    kw = {"max_length": MAXLEN, "max_prompt_length": MAXPROMPT, "max_tokens_per_batch": 1, **kw}
    return PrecomputeConfig.flat(model=str(model), data=tuple(map(str, data)), output=str(out), **kw)


def pc_args(model, data, out, *extra) -> list[str]:
    args = ["precompute-ref", "--model", str(model), "--out", str(out), "--max-length", str(MAXLEN),
            "--max-prompt-length", str(MAXPROMPT), "--max-tokens-per-batch", "1", *extra]
    for d in data:
        args += ["--data", str(d)]
    return args


def table(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).select(VALUES).sort("example_id")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def rows(hh_path, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("fault_rows")
    return {"twelve": write_jsonl(d / "twelve.jsonl", hh_rows(hh_path, 0, 12)),
            "four": write_jsonl(d / "four.jsonl", hh_rows(hh_path, 12, 16)), "dir": d}


@pytest.fixture(scope="module")
def baseline(tiny_llama, rows, tmp_path_factory) -> pl.DataFrame:
    """One uninterrupted run over the 12 rows: what every interrupted run must end equal to."""
    out = tmp_path_factory.mktemp("baseline") / "ref.parquet"
    precompute.run(pc(tiny_llama, [rows["twelve"]], out))
    return table(out)


# ------------------------------------------------------------------------------------- 1. kill during the end game
def _kill_when(monkeypatch, module, name, predicate):
    real = getattr(module, name)

    def patched(*args, **kwargs):
        if predicate(*args):
            raise SimulatedKill(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, patched)


KILL_POINTS = {
    "writing the settings file": ("replace", lambda src, dst: str(dst).endswith(".config.yaml")),
    "renaming the cache into place": ("replace", lambda src, dst: str(dst).endswith("ref.parquet")),
    "renaming the parts folder away": ("replace", lambda src, dst: str(dst).endswith(".parts.done")),
    "deleting the renamed parts": ("rmtree",
                                   lambda path, *a: str(path).endswith(".parts.done") and Path(path).exists()),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_anywhere_in_the_end_game_then_rerun_finishes_without_recomputing(point, tiny_llama, rows, baseline,
                                                                               tmp_path, monkeypatch):
    out = tmp_path / "ref.parquet"
    name, predicate = KILL_POINTS[point]
    with monkeypatch.context() as m:
        _kill_when(m, os if name == "replace" else refcache.shutil, name, predicate)  # the modules every caller uses
        with pytest.raises(SimulatedKill):
            precompute.run(pc(tiny_llama, [rows["twelve"]], out))
    loads = models.LOAD_COUNT["models"]
    res = invoke(*pc_args(tiny_llama, [rows["twelve"]], out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert models.LOAD_COUNT["models"] == loads, "the rerun loaded the model: it recomputed finished work"
    assert listing(tmp_path) == ["ref.parquet", "ref.parquet.config.yaml"], listing(tmp_path)
    assert table(out).equals(baseline)


def test_stale_temporaries_of_dead_runs_are_removed(tiny_llama, rows, tmp_path, monkeypatch):
    """A kill between a write and its rename leaves `.NAME.tmp-PID` (full size, hidden): the next run, holding the
    lock, removes every one of them, next to the cache, in its parts folder, and in a training run's folder."""
    out = tmp_path / "ref.parquet"
    with monkeypatch.context() as m:
        _kill_when(m, os, "replace", lambda src, dst: str(dst).endswith("ref.parquet"))
        with pytest.raises(SimulatedKill):
            precompute.run(pc(tiny_llama, [rows["twelve"]], out))
    for left in (tmp_path / ".ref.parquet.tmp-999999", tmp_path / ".ref.parquet.config.yaml.tmp-999999",
                 tmp_path / "ref.parquet.parts" / ".part-r0000-000099.parquet.tmp-999999"):
        left.write_bytes(b"what a SIGKILL between write and rename leaves")
    assert invoke(*pc_args(tiny_llama, [rows["twelve"]], out)).exit_code == 0
    assert listing(tmp_path) == ["ref.parquet", "ref.parquet.config.yaml"]
    run = tmp_path / "run"
    (run / ".checkpoint-1.tmp-999999" / "adapter").mkdir(parents=True)
    for name in (".summary.json.tmp-999999", ".metrics.jsonl.tmp-999999"):
        (run / name).write_text("{")
    train.run(tc(tiny_llama, rows, out, run, max_steps=1))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], listing(run)


# ------------------------------------------------------------------------------------------- 3. a second writer
HOLD = ("import sys, time; from pathlib import Path; from stages.base.fsio import OutputLock; "
        "OutputLock(Path(sys.argv[1]), Path(sys.argv[1]), '--out').__enter__(); print('held', flush=True); "
        "time.sleep(600)")


def hold_lock(lock_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_stops_at_once_and_a_dead_holder_is_taken_over(tiny_llama, rows, tmp_path):
    out = tmp_path / "ref.parquet"
    holder = hold_lock(tmp_path / ".ref.parquet.lock")
    try:
        t0 = time.perf_counter()
        line = one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], out)), "is being written by process",
                        str(holder.pid), "use another --out")
        assert time.perf_counter() - t0 < 30, "the second run did work before refusing"
        assert not out.exists() and not (tmp_path / "ref.parquet.parts").exists(), line
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock; the lock file stays behind with a dead pid in it
        holder.wait()
    assert (tmp_path / ".ref.parquet.lock").exists()
    assert invoke(*pc_args(tiny_llama, [rows["twelve"]], out)).exit_code == 0
    assert listing(tmp_path) == ["ref.parquet", "ref.parquet.config.yaml"]


def test_two_runs_started_together_one_wins_one_refuses(tiny_llama, rows, baseline, tmp_path):
    out = tmp_path / "ref.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    slow = ("import sys, time; from stages.stage1 import units; from stages import cli; "
            "real = units.pair_logps; "
            "units.pair_logps = lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1]; "
            "sys.argv = ['dpo'] + sys.argv[1:]; cli.main()")
    cmd = [sys.executable, "-c", slow, *pc_args(tiny_llama, [rows["twelve"]], out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and "is being written by process" in loser, loser
    assert table(out).equals(baseline)


def test_train_and_sweep_folders_are_locked(tiny_llama, rows, baseline, tmp_path):
    cache = tmp_path / "ref.parquet"
    precompute.run(pc(tiny_llama, [rows["twelve"]], cache))
    common = ["--model", str(tiny_llama), "--data", str(rows["twelve"]), "--ref-cache", str(cache),
              "--max-steps", "1", "--batch-size", "2", "--no-load-in-4bit"]
    run = tmp_path / "run"
    holder = hold_lock(run / ".lock")
    try:
        one_line(invoke("train", *common, "--output", str(run)), "is being written by process", "--output")
        one_line(invoke("sweep", *common, "--beta", "0.1", "--output", str(run)), "is being written", "--output")
    finally:
        holder.kill()
        holder.wait()
    res = invoke("train", *common, "--output", str(run))
    assert res.exit_code == 0, (res.output, res.exception)
    assert not (run / ".lock").exists()


# ------------------------------------------------------------------------------------------ 4. filesystem errors
def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_output_under_a_regular_file_is_one_line_in_both_stages(tiny_llama, rows, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], blocker / "ref.parquet")), "a-file", "Not a directory")
    cache = tmp_path / "ref.parquet"
    precompute.run(pc(tiny_llama, [rows["twelve"]], cache))
    one_line(invoke("train", "--model", str(tiny_llama), "--data", str(rows["twelve"]), "--ref-cache", str(cache),
                    "--output", str(blocker / "run"), "--max-steps", "1"), "a-file", "Not a directory")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_os_errors_while_writing_parts_are_one_line_and_keep_the_work(err, tiny_llama, rows, baseline, tmp_path,
                                                                      monkeypatch):
    """A write failing after some parts are saved (disk full, permission denied, read-only): one line naming the
    path and the reason; the saved parts stay; a rerun (space freed) continues from them."""
    out = tmp_path / "ref.parquet"
    real, calls = refcache.pq.write_table, []

    def failing(table_, where, *a, **kw):
        calls.append(where)
        if len(calls) == 4:
            raise OSError(err, os.strerror(err), str(where))
        return real(table_, where, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(refcache.pq, "write_table", failing)
        one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], out, "--batches-per-part", "1")), os.strerror(err),
                 ".parquet.tmp-")
    parts = tmp_path / "ref.parquet.parts"
    assert len(list(parts.glob("part-*.parquet"))) == 3 and not list(parts.glob(".*tmp*"))
    res = invoke(*pc_args(tiny_llama, [rows["twelve"]], out))
    assert res.exit_code == 0 and "3 of 12 examples already in" in res.stdout, res.output
    assert table(out).equals(baseline)


def test_a_real_full_disk_and_a_real_read_only_folder(tiny_llama, rows, baseline, tmp_path):
    """The same on real filesystems where this machine lets us mount them (root; skipped elsewhere)."""
    small, ro = tmp_path / "small", tmp_path / "ro"
    small.mkdir()
    ro.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=40k", "tmpfs", str(small)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = small / "ref.parquet"
        line = one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], out, "--batches-per-part", "1")),
                        "No space left on device", "rerun")
        saved = len(list((small / "ref.parquet.parts").glob("part-*.parquet")))
        assert saved > 0, line
        assert _mount("-o", "remount,size=4m", str(small))
        res = invoke(*pc_args(tiny_llama, [rows["twelve"]], out))
        assert res.exit_code == 0 and f"{saved} of 12 examples already in" in res.stdout, res.output
        assert table(out).equals(baseline)
        assert _mount("--bind", "-o", "ro", str(small), str(ro))
        try:
            one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], ro / "other.parquet")), "Read-only file system")
        finally:
            subprocess.run(["umount", str(ro)], capture_output=True)
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# --------------------------------------------------------------------------------------- 5. no code in checkpoints
class Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cache12(tiny_llama, rows, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache12") / "ref.parquet"
    precompute.run(pc(tiny_llama, [rows["twelve"]], out))
    return out


def tc(tiny_llama, rows, cache, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_llama), data=(str(rows["twelve"]),), ref_cache=str(cache), output=str(out),
                max_steps=3, batch_size=2, load_in_4bit=False, lora_r=4, lora_alpha=8, learning_rate=1e-3)
    return TrainConfig.flat(**{**base, **kw})


@pytest.mark.parametrize("victim", ["rng-rank0.pt", "trainer_state.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(victim, tiny_llama, rows, cache12, tmp_path):
    out = tmp_path / "run"
    train.run(tc(tiny_llama, rows, cache12, out, save_steps=1, save_total_limit=5))
    (out / "summary.json").unlink()
    checkpoint.remove(out / "checkpoint-3")
    marker = tmp_path / "pwned"
    torch.save({"torch": Planted(str(marker))}, out / "checkpoint-2" / victim)
    line = one_line(invoke("train", "--config", str(out / "config.yaml")), victim, "could run code")
    assert not marker.exists(), "the planted pickle ran"
    assert line


def test_checkpoint_rng_state_loads_with_weights_only(tiny_llama, rows, cache12, tmp_path):
    out = tmp_path / "run"
    train.run(tc(tiny_llama, rows, cache12, out, max_steps=1))
    saved = torch.load(out / "checkpoint-1" / "rng-rank0.pt", weights_only=True)
    assert isinstance(saved["python"], list) and len(saved["python"][1]) == 625


# ---------------------------------------------------------------------------------- 6. stop signals, timed parts
def test_sigterm_in_stage_one_saves_the_current_part_and_says_how_to_continue(tiny_llama, rows, baseline, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "ref.parquet"
    real, calls = units.PairUnits.forward, []

    def signalling(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before it kills the job
        return real(*a, **kw)
    with monkeypatch.context() as m:
        m.setattr(units.PairUnits, "forward", staticmethod(signalling))
        line = one_line(invoke(*pc_args(tiny_llama, [rows["twelve"]], out)), "3 examples are safe", "to continue",
                        code=128 + signal.SIGTERM)
    assert line.startswith("stopped:")
    assert len(calls) == 3, "the run went on after the signal"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler was not restored"
    res = invoke(*pc_args(tiny_llama, [rows["twelve"]], out))
    assert res.exit_code == 0 and "3 of 12 examples already in" in res.stdout, res.output
    assert table(out).equals(baseline)


def test_parts_are_saved_by_time_as_well_as_by_count(tiny_llama, rows, tmp_path, monkeypatch):
    """--batches-per-part 1000 would save nothing before the end; --part-seconds saves anyway (here: every batch)."""
    out = tmp_path / "ref.parquet"
    real, calls = units.PairUnits.forward, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise SimulatedKill("kill -9")
        return real(*a, **kw)
    with monkeypatch.context() as m:
        m.setattr(units.PairUnits, "forward", staticmethod(dying))
        with pytest.raises(SimulatedKill):
            precompute.run(pc(tiny_llama, [rows["twelve"]], out, batches_per_part=1000, part_seconds=1e-9))
    assert len(refcache.done_ids(tmp_path / "ref.parquet.parts")) == 4


def test_sigterm_in_stage_two_checkpoints_then_resumes_exactly(tiny_llama, rows, cache12, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.run(tc(tiny_llama, rows, cache12, straight))
    out = tmp_path / "stopped"
    real, calls = train.clip, []

    def signalling(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    with monkeypatch.context() as m:
        m.setattr(train, "clip", signalling)
        with pytest.raises(Interrupted) as info:
            train.run(tc(tiny_llama, rows, cache12, out))
    assert info.value.exit_code == 128 + signal.SIGTERM and "at step 1 of 3" in str(info.value)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    train.run(tc(tiny_llama, rows, cache12, out))
    got = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "loss" in r}
    want = {r["step"]: r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    assert got == want


# ---------------------------------------------------------------------------- 7. metrics.jsonl rewritten on resume
def test_a_kill_while_metrics_are_rewritten_loses_no_row(tiny_llama, rows, cache12, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.run(tc(tiny_llama, rows, cache12, out, save_steps=1, save_total_limit=5))
    before = (out / "metrics.jsonl").read_text()
    (out / "summary.json").unlink()
    checkpoint.remove(out / "checkpoint-3")
    with monkeypatch.context() as m:
        _kill_when(m, os, "replace", lambda src, dst: str(dst).endswith("metrics.jsonl"))
        with pytest.raises(SimulatedKill):
            train.run(tc(tiny_llama, rows, cache12, out, save_steps=1, save_total_limit=5))
    assert (out / "metrics.jsonl").read_text() == before
    train.run(tc(tiny_llama, rows, cache12, out, save_steps=1, save_total_limit=5))
    assert not [p for p in out.iterdir() if fsio.TMP_MARK in p.name]


# ------------------------------------------------------------------------------------------ 8. incremental cache
def test_new_rows_are_the_only_work_of_a_rerun(tiny_llama, rows, baseline, tmp_path):
    out = tmp_path / "ref.parquet"
    precompute.run(pc(tiny_llama, [rows["twelve"]], out))
    res = invoke(*pc_args(tiny_llama, [rows["twelve"], rows["four"]], out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert "12 of 16 examples already in" in res.stdout and "4 to go" in res.stdout, res.stdout
    both = table(out)
    assert both.height == 16 and both.filter(pl.col("example_id").is_in(baseline["example_id"])).equals(baseline)
    scratch = tmp_path / "scratch.parquet"  # singleton batches in both runs: the same arithmetic, equal bits
    precompute.run(pc(tiny_llama, [rows["twelve"], rows["four"]], scratch))
    assert both.equals(table(scratch))
    loads = models.LOAD_COUNT["models"]
    res = invoke(*pc_args(tiny_llama, [rows["twelve"], rows["four"]], out))
    assert res.exit_code == 0 and "already holds all 16 examples" in res.stdout, res.output
    assert models.LOAD_COUNT["models"] == loads
    one_line(invoke(*pc_args(tiny_llama, [rows["four"]], out, "--max-length", "160")),
             "other settings", "max_length: 192 -> 160", "--overwrite")
    assert table(out).equals(both)
    assert invoke(*pc_args(tiny_llama, [rows["four"]], out, "--max-length", "160", "--overwrite")).exit_code == 0
    assert pl.read_parquet(out).height == 4


# ---------------------------------------------------------------------------------------- bad input: one line
def _rewrite(src: Path, dst: Path, edit) -> Path:
    t = pq.read_table(src)
    meta = json.loads(t.schema.metadata[refcache.META_KEY])
    t, meta = edit(t, meta)
    pq.write_table(t.replace_schema_metadata({refcache.META_KEY: json.dumps(meta).encode()}), dst)
    return dst


def _damage(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    for i in range(200, len(data) // 2):  # data pages sit before the footer; the footer stays intact
        data[i] ^= 0x5A
    dst.write_bytes(bytes(data))
    return dst


def _set(t, name, values, keep_type=True):
    import pyarrow as pa

    i = t.schema.get_field_index(name)
    column = pa.array(values, type=t.schema.field(i).type if keep_type else None)
    return t.set_column(i, t.schema.field(i).with_type(column.type), column)


BAD_CACHES = {
    "missing column": (lambda t, m: (t.drop(["prompt_tokens"]), m), "column 'prompt_tokens' is missing"),
    "wrong column type": (lambda t, m: (_set(t, "chosen_tokens", [float(v) for v in t["chosen_tokens"].to_pylist()],
                                             False), m), "column 'chosen_tokens' has type"),
    "duplicate ids": (lambda t, m: (_set(t, "example_id", [t["example_id"][0].as_py()] * t.num_rows), m),
                      "appears twice"),
    "infinite value": (lambda t, m: (_set(t, "ref_rejected_logps", [float("inf")] * t.num_rows), m), "non-finite"),
    "negative count": (lambda t, m: (_set(t, "chosen_tokens", [-3] * t.num_rows), m), "chosen_tokens is -3"),
    "missing metadata": (lambda t, m: (t, {k: v for k, v in m.items() if k != "manifest"}), "lacks 'manifest'"),
}


@pytest.mark.parametrize("case", [*BAD_CACHES, "damaged pages"])
@pytest.mark.parametrize("command", ["train", "sweep", "info", "verify", "export-trl"])
def test_a_cache_stage_one_would_never_write_is_one_line_everywhere(case, command, tiny_llama, rows, cache12,
                                                                    tmp_path):
    bad = tmp_path / "bad.parquet"
    if case == "damaged pages":
        _damage(cache12, bad)
        needle = "damaged"
    else:
        edit, needle = BAD_CACHES[case]
        _rewrite(cache12, bad, edit)
    common = ["--model", str(tiny_llama), "--data", str(rows["twelve"]), "--ref-cache", str(bad),
              "--output", str(tmp_path / "run"), "--max-steps", "1"]
    args = {"train": ["train", *common], "sweep": ["sweep", *common, "--beta", "0.1"],
            "info": ["cache", "info", str(bad)], "verify": ["cache", "verify", str(bad), "--data", str(rows["twelve"])],
            "export-trl": ["cache", "export-trl", str(bad), "--data", str(rows["twelve"]), "--out",
                           str(tmp_path / "x.parquet")]}[command]
    one_line(invoke(*args), "bad.parquet", needle)
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.parquet").exists()


BAD_OPTIONS = [
    (["--max-length", "0"], "--max-length 0"),
    (["--max-length", "-5"], "--max-length -5"),
    (["--max-length", "64", "--max-prompt-length", "128"], "--max-prompt-length 128 cannot exceed --max-length 64"),
    (["--chunk-size", "0"], "--chunk-size 0"),
]


@pytest.mark.parametrize("extra,needle", BAD_OPTIONS + [(["--max-tokens-per-batch", "0"], "--max-tokens-per-batch 0"),
                                                       (["--batches-per-part", "0"], "--batches-per-part 0")])
def test_bad_numbers_in_stage_one(extra, needle, tiny_llama, rows, tmp_path):
    args = ["precompute-ref", "--model", str(tiny_llama), "--data", str(rows["twelve"]),
            "--out", str(tmp_path / "c" / "ref.parquet"), *extra]
    t0 = time.perf_counter()
    one_line(invoke(*args), needle)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "c").exists()


@pytest.mark.parametrize("extra,needle", BAD_OPTIONS + [(["--lora-r", "0"], "--lora-r 0"),
                                                       (["--learning-rate", "-1"], "--learning-rate -1"),
                                                       (["--logging-steps", "0"], "--logging-steps 0")])
def test_bad_numbers_in_stage_two(extra, needle, tiny_llama, rows, cache12, tmp_path):
    args = ["train", "--model", str(tiny_llama), "--data", str(rows["twelve"]), "--ref-cache", str(cache12),
            "--output", str(tmp_path / "run"), *extra]
    one_line(invoke(*args), needle)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_names_the_nearest(tiny_llama, rows, cache12, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_llama}\nbetta: 0.2\n")
    one_line(invoke("train", "--config", str(cfg)), "unknown key 'betta'; did you mean 'beta'?")
    cfg.write_text("trian:\n  beta: 0.2\nshared:\n  seed: 1\n")
    one_line(invoke("train", "--config", str(cfg)), "unknown section 'trian'; did you mean 'train'?")


def test_model_folder_that_does_not_exist(rows, tmp_path):
    one_line(invoke("precompute-ref", "--model", str(tmp_path / "nope"), "--data", str(rows["twelve"]),
                    "--out", str(tmp_path / "ref.parquet")), "nope", "no such folder")


def test_an_architecture_without_decoder_layers_or_head_call_is_one_line():
    from stages.model.distributed import decoder_layers
    from stages.model.logprobs import tapped_forward

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.head

        def forward(self, **kw):
            return None
    with pytest.raises(UserError, match="no decoder-layer list"):
        decoder_layers(Odd())
    with pytest.raises(UserError, match="never calls the output head"):
        tapped_forward(Odd(), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                       torch.zeros(1, dtype=torch.long))


def test_the_cli_keeps_tracebacks_for_bugs(monkeypatch):
    """Only UserError and OSError become one line; anything else is a bug and keeps its traceback."""
    from stages import cli

    @cli.user_errors
    def buggy():
        raise KeyError("bug")
    with pytest.raises(KeyError):
        buggy()


def test_every_command_goes_through_the_one_error_path():
    """The property, not a promise: every leaf command's callback is wrapped by cli.user_errors."""
    import click

    def leaves(group, prefix=""):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from leaves(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd
    found = dict(leaves(cli_main))
    assert {"precompute-ref", "train", "sweep", "cache info", "cache verify", "cache export-trl"} <= set(found)
    assert [n for n, c in found.items() if not getattr(c.callback, "one_line_errors", False)] == []
