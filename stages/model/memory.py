"""Peak memory per phase of a run ("load": the model loaded and sharded; then "score" in stage one, "train" in
stage two), measured on every rank; reported per rank and as the max over ranks.

kind "cuda_allocated": torch's CUDA allocator peaks (max_memory_allocated, and max_memory_reserved), reset at each
phase start, so training's peak is its own and not the loading peak.
kind "rss": the process's peak resident set on CPU (Linux VmHWM, reset at each phase start by writing 5 to
/proc/self/clear_refs).
kind "rss_since_start": where that reset is refused (not Linux, a locked-down /proc), ru_maxrss: the process's peak
since it started, which cannot be reset, so a phase shows at least the peaks of the phases before it.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

from stages.model.distributed import DistEnv, gather_rows

GB = 2**30  # the summary's *_gb fields are GiB, as peak_memory_gb always was
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PhaseMemory:
    """`mem = PhaseMemory(env)` starts the first phase; `mem.end(name)` records its peak and starts the next;
    `mem.report()` (every rank, one collective) gives {phase: record}."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.cuda = env.device.type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> this rank's (peak, reserved peak) in bytes
        self._start()

    def _start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)
        elif self.kind == "rss" and not reset_rss_peak():
            self.kind = "rss_since_start"

    def _peak(self) -> tuple[int, int]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.env.device), torch.cuda.max_memory_reserved(self.env.device)
        rss = rss_peak_bytes() if self.kind == "rss" else maxrss_bytes()
        return rss, rss

    def end(self, phase: str) -> None:
        self.peaks[phase] = self._peak()
        self._start()

    def report(self) -> dict:
        """{phase: {"max_gb", "per_rank_gb", "kind"}} (+ "reserved_max_gb", "reserved_per_rank_gb" on CUDA),
        the per-rank values gathered with one collective on env.device."""
        names = list(self.peaks)
        mine = torch.tensor([float(v) for name in names for v in self.peaks[name]], dtype=torch.float64)
        table = gather_rows(mine, self.env)  # [world, 2 x phases]
        out = {}
        for i, name in enumerate(names):
            per_rank = [round(v / GB, 3) for v in table[:, 2 * i].tolist()]
            record = {"max_gb": max(per_rank), "per_rank_gb": per_rank, "kind": self.kind}
            if self.cuda:
                reserved = [round(v / GB, 3) for v in table[:, 2 * i + 1].tolist()]
                record.update(reserved_max_gb=max(reserved), reserved_per_rank_gb=reserved)
            out[name] = record
        return out


def peak_memory_gb(report: dict) -> float:
    """summary.json's peak_memory_gb: the max over ranks and phases of a PhaseMemory report."""
    return max((record["max_gb"] for record in report.values()), default=0.0)


def memory_line(report: dict) -> str:
    """One line for the end of a run, e.g. 'memory (rss, max over 2 ranks): load 1.21 GiB [1.21, 1.2], ...'."""
    if not report:
        return "memory: no phase measured"
    first = next(iter(report.values()))
    phases = ", ".join(f"{name} {r['max_gb']:.3g} GiB [{', '.join(f'{v:.3g}' for v in r['per_rank_gb'])}]"
                       for name, r in report.items())
    ranks = len(first["per_rank_gb"])
    return f"memory ({first['kind']}, peak per phase, max over {ranks} rank(s) [per rank]): {phases}"


def reset_rss_peak() -> bool:
    """Linux: VmHWM := current RSS. False where /proc refuses it (then the peak is ru_maxrss, never reset)."""
    try:
        _CLEAR_REFS.write_text("5")
        return rss_peak_bytes() > 0
    except (OSError, ValueError):
        return False


def rss_peak_bytes() -> int:
    """VmHWM of /proc/self/status (peak RSS since the last reset), in bytes."""
    found = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError("no VmHWM in /proc/self/status")
    return int(found.group(1)) * 1024


def maxrss_bytes() -> int:
    """The process's peak RSS since it started (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
