"""Shared helpers for the bench scripts: machine facts, HH-RLHF rows, subprocess workers, RESULTS.md sections.

Every bench script measures variants side by side in one invocation (interleaved in one process, or one fresh
subprocess per variant when peak RSS is the measure), reports medians and ratios, and rewrites only its own
section of bench/RESULTS.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"
SMOLLM2 = REPO / "cache" / "models" / "smollm2-135m-instruct"
RESULTS = REPO / "bench" / "RESULTS.md"
OUT = REPO / "bench" / "out"  # git-ignored scratch (worker temp files)
RESULT_TAG = "BENCH_RESULT "


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(names=("torch", "transformers", "peft", "bitsandbytes", "trl")) -> str:
    out = [f"python {platform.python_version()}"]
    for name in names:
        try:
            mod = __import__(name)
            out.append(f"{name} {mod.__version__}")
        except Exception:  # noqa: BLE001 - optional packages
            out.append(f"{name} -")
    return ", ".join(out)


def machine_line(threads: int | None = None) -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), {cpu_model()}, "
            f"torch threads {threads or torch.get_num_threads()}, load average at start {load} "
            f"(the cores are shared with other jobs)")


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], REPO)
    return " ".join([".venv/bin/python", rel] + [shlex.quote(a) for a in sys.argv[1:]])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Timer:
    """Wall-clock and process CPU seconds (user and system separately). With one torch thread, user CPU seconds
    measure the work done and barely move when other jobs steal the cores; system seconds are mostly page faults
    (they grow when the allocator hands memory back to the OS); wall seconds are what a user waits (noisy here).
    getrusage, not os.times: its microseconds, not 10 ms ticks, so sums over many short calls (vs_trl's profiles)
    stay right."""

    def __enter__(self):
        _sync()
        self.w0, self.t0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        _sync()
        t = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self.w0
        self.user, self.sys = t.ru_utime - self.t0.ru_utime, t.ru_stime - self.t0.ru_stime
        self.cpu = self.user + self.sys
        return False


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def reset_peak() -> None:
    """Start a new peak: VmHWM (Linux: write 5 to clear_refs) and, on GPU, torch's allocator peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def mem_status() -> dict:
    """GiB: rss, anon (heap, tensors), file (mapped files: safetensors weights are mmapped, so weights are file
    pages shared with the page cache and with any other mapping of the same file), pss (rss with shared pages
    divided among their mappings: two mappings of one weights file count once)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}.get(line.split(" ")[0].split("\t")[0])
            if key:
                out[key] = int(line.split()[1]) / 2**20
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


class PeakSampler:
    """Samples mem_status() every `interval` s on a thread (torch releases the GIL in its kernels); keeps maxima."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            for k, v in mem_status().items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def hwm_gib() -> float:
    """Peak RSS since the last reset_peak (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ------------------------------------------------------------------------------------------------ data
def load_encoded(model_dir: Path, max_length: int | None, max_prompt_length: int | None):
    """All HH-RLHF harmless-test rows, tokenized as both stages do. Returns (tokenizer, encoded list)."""
    from stages.data.encode import TokenizeSettings, encode_examples
    from stages.data.rows import load_examples
    from stages.model.models import load_tokenizer

    if not HH_PATH.is_file():
        sys.exit(f"HH-RLHF data not found at {HH_PATH}")
    examples, _ = load_examples([HH_PATH])
    tok = load_tokenizer(str(model_dir))
    encoded, _ = encode_examples(tok, examples, TokenizeSettings(max_length, max_prompt_length))
    return tok, encoded


def sample_rows(encoded: list, n: int, seed: int = 0) -> list:
    """A fixed random sample in data order (not sorted: sorting is one of the things measured)."""
    idx = sorted(random.Random(seed).sample(range(len(encoded)), min(n, len(encoded))))
    return [encoded[i] for i in idx]


def longest_rows(encoded: list, n: int) -> list:
    return sorted(encoded, key=lambda e: -(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)))[:n]


def ensure_model() -> Path:
    from stages.model.smollm import ensure_smollm2

    return ensure_smollm2(REPO / "cache" / "models")


# ------------------------------------------------------------------------------------------------ stats
def median(xs):
    """Median of the values that exist (None and NaN, e.g. a variant that failed, are left out); NaN if none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and x != x)]
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ workers
def emit(result: dict) -> None:
    """A worker's last word: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


# glibc raises its mmap threshold after big frees and then keeps freed tensor memory in the heap, so a CPU process's
# RSS stays at (and its peak is inflated by) memory torch already released. A fixed threshold hands big blocks
# back to the OS at once, so peak RSS follows the live tensors. Workers get it unless --glibc-default is given.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_worker(script: Path, args: list[str], timeout: float = 900, env: dict | None = None,
               log: Path | None = None) -> dict:
    """Run `python script args` in a fresh process; return its tagged JSON result (or an error record)."""
    cmd = [sys.executable, str(script)] + args
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if log is not None:
        log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"rc {proc.returncode} after {time.perf_counter() - start:.0f}s: {tail}"}


# ------------------------------------------------------------------------------------------------ RESULTS.md
HEADER = """# Benchmark results

Each section is rewritten by the script named in it (`bench/bench_*.py`); the exact command, machine, versions
and date are recorded with the numbers. CPU timings on this box are noisy (2 shared cores): variants are always
measured side by side in the same invocation and compared by ratios of medians.
"""


def update_results(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name:begin -->` and `<!-- name:end -->`."""
    replace_section(f"<!-- {name}:begin -->", f"<!-- {name}:end -->", body)


def replace_section(begin: str, end: str, body: str) -> None:
    """Replace (or append) the text between two marker lines of RESULTS.md, re-read right before writing (other
    scripts write their own sections)."""
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def provenance(threads: int | None = None) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"- command: `{command_line()}`\n- date: {now}\n- machine: {machine_line(threads)}\n"
            f"- versions: {versions()}\n")
