"""Faults (issue 11): what a rerun costs after a finished run, after new rows, and after SIGTERM mid-run.

Runs the real CLI (`python -m stages.cli`) on SmolLM2-135M-Instruct (fp32, CPU) and HH-RLHF rows, one fresh process
per command, and writes the `faults` section of bench/RESULTS.md next to a table of the other faults and the test
that reproduces each.

  .venv/bin/python bench/bench_faults.py [--rows 64] [--new 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from _common import HH_PATH, OUT, REPO, ensure_model, provenance, table, update_results

LEN = ("--max-length", "512", "--max-prompt-length", "384", "--dtype", "fp32")


def write_rows(path, start, stop):
    import gzip

    with gzip.open(HH_PATH, "rt") as f:
        lines = [line for i, line in enumerate(f) if start <= i < stop]
    path.write_text("".join(lines))
    return path


def dpo(*args, sigterm_after: float | None = None):
    """(seconds, exit code, stdout, stderr) of one `dpo` command in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if sigterm_after is not None:
        deadline = time.perf_counter() + 600
        while proc.poll() is None and time.perf_counter() < deadline:  # wait for the reference pass to start
            time.sleep(0.5)
            parts = list((OUT / "faults").glob("ref.parquet.parts/manifest.json"))
            if parts and time.perf_counter() - t0 > sigterm_after:
                proc.send_signal(signal.SIGTERM)
                break
    out, err = proc.communicate(timeout=1800)
    return time.perf_counter() - t0, proc.returncode, out, err


def last_line(text: str, prefix: str) -> str:
    return next((ln for ln in reversed(text.splitlines()) if ln.startswith(prefix)), "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    model = ensure_model()
    d = OUT / "faults"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    first = write_rows(d / "first.jsonl", 0, args.rows)
    new = write_rows(d / "new.jsonl", args.rows, args.rows + args.new)
    out = d / "ref.parquet"
    base = ["precompute-ref", "--model", str(model), "--out", str(out), *LEN, "--data", str(first)]
    rows = []

    t, code, so, _ = dpo(*base)
    rows.append(["first run", args.rows, f"{t:.1f}", code, last_line(so, "done:")[:90]])
    t, code, so, _ = dpo(*base)
    rows.append(["same command again", args.rows, f"{t:.1f}", code, last_line(so, "done:")[:90]])
    t, code, so, _ = dpo(*base, "--data", str(new))
    rows.append([f"+{args.new} new rows", args.rows + args.new, f"{t:.1f}", code, last_line(so, "cache:")[:90]])

    out.unlink()
    out.with_name(out.name + ".config.yaml").unlink()
    t, code, _, se = dpo(*base, "--data", str(new), sigterm_after=25)
    stop = last_line(se, "stopped:")
    rows.append(["SIGTERM after ~25 s", args.rows + args.new, f"{t:.1f}", code, stop[:90]])
    t, code, so, _ = dpo(*base, "--data", str(new))
    rows.append(["rerun after SIGTERM", args.rows + args.new, f"{t:.1f}", code, last_line(so, "cache:")[:90]])
    saved = re.search(r"(\d+) examples are safe", stop)

    body = "\n".join([
        "## Faults (issue 11)",
        "",
        provenance(),
        f"- workload: smollm2-135m-instruct fp32, {args.rows} HH-RLHF harmless-test rows, then {args.new} more; "
        "max_length 512, max_prompt_length 384; every command a fresh `python -m stages.cli` process "
        "(times include start-up and the model load, when there is one)",
        "",
        table(["command", "examples", "seconds", "exit", "what it printed"], rows),
        "",
        f"Before this change the second command recomputed all {args.rows} rows (the issue measured 54 s on 64 "
        "rows); now it loads no model. New rows cost only themselves. SIGTERM saved "
        f"{saved.group(1) if saved else '?'} examples, and the rerun computed only the rest.",
        "",
        "| fault | before | now | test |",
        "|---|---|---|---|",
        "| kill during stage one's final clean-up | `*.parts.done` left; every rerun recomputed, then `OSError: "
        "Directory not empty` | rerun finishes without loading the model; exactly the cache + its config remain | "
        "`test_faults.py::test_kill_anywhere_in_the_end_game_then_rerun_finishes_without_recomputing` (4 kill "
        "points) |",
        "| kill between write and rename | full-size hidden `.*.tmp-<pid>` left for good | removed by the next run "
        "(cache, parts, config, checkpoints, metrics, summary) | `test_stale_temporaries_of_dead_runs_are_removed` |",
        "| two runs into one output | a traceback, or duplicated ids that broke every rerun | the second stops at "
        "once: `… is being written by process N on HOST` (stage one, train, sweep); a dead holder's lock is taken "
        "over | `test_two_runs_started_together_one_wins_one_refuses`, `test_second_writer_…`, "
        "`test_train_and_sweep_folders_are_locked` |",
        "| read-only dir, disk full, permission denied, path under a file | 36–47-line tracebacks | one line: "
        "path + OS reason + fix; saved parts kept; rerun continues | `test_os_errors_while_writing_parts_…`, "
        "`test_a_real_full_disk_and_a_real_read_only_folder` (tmpfs + ro bind mount), "
        "`test_output_under_a_regular_file_…` |",
        "| pickle planted in a checkpoint | ran on `dpo train` resume | refused in one line, not run "
        "(`weights_only=True` everywhere) | `test_a_planted_pickle_in_a_checkpoint_is_refused_not_run` |",
        "| Ctrl-C / SIGTERM | click's `Aborted!`; 3 batches saved nothing | current part/step saved, one line with "
        "what is safe and how to continue; parts also saved every `--part-seconds` | "
        "`test_sigterm_in_stage_one_…`, `test_sigterm_in_stage_two_…`, `test_parts_are_saved_by_time_…` |",
        "| kill while metrics.jsonl is rewritten on resume | earlier rows lost | write-then-rename: old file intact | "
        "`test_a_kill_while_metrics_are_rewritten_loses_no_row` |",
        "| bad caches / options / config keys / model path / architecture | tracebacks or late, long errors | one "
        "line each, before anything is written | `test_a_cache_stage_one_would_never_write_…` (7 kinds × 5 "
        "commands), `test_bad_numbers_…`, `test_unknown_config_key_…` |",
    ])
    update_results("faults", body)
    print(body)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
