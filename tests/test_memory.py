"""stages/model/memory.py: per-phase peaks, reset at each phase start (CPU: VmHWM; CUDA: the allocator's peaks).
The per-rank / max-over-ranks record of a 2-process run is checked in tests/test_collectives_dist.py."""

from __future__ import annotations

import mmap

import pytest
import torch

from stages.model import memory
from stages.model.distributed import DistEnv
from stages.model.memory import GB, PhaseMemory, memory_line, peak_memory_gb

BUFFER = 256 * 2**20  # bytes held in phase one only; far above glibc's mmap threshold, so freed back to the OS


def _hold_and_free(device: str) -> None:
    if device == "cpu":  # an anonymous mapping of its own: resident once written, gone at close, whatever the heap
        with mmap.mmap(-1, BUFFER) as buf:  # holds (malloc could reuse freed, still-resident heap in a long run)
            buf.write(b"\1" * BUFFER)
        return
    buf = torch.ones(BUFFER // 4, dtype=torch.float32, device=device)  # written: every page resident
    assert float(buf[-1]) == 1.0
    del buf


def cpu_env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.skipif(not memory.reset_rss_peak(), reason="/proc/self/clear_refs cannot reset VmHWM here")
def test_cpu_peak_is_reset_per_phase():
    mem = PhaseMemory(cpu_env())
    _hold_and_free("cpu")
    mem.end("one")
    mem.end("two")
    report = mem.report()
    assert mem.kind == "rss" and list(report) == ["one", "two"]
    one, two = report["one"]["max_gb"], report["two"]["max_gb"]
    # phase one held the buffer on top of what phase two holds; rounding to 1e-3 GiB and small allocations of the
    # interpreter between the phases are far below half the buffer
    assert one - two >= 0.5 * BUFFER / GB, report
    assert report["one"]["per_rank_gb"] == [one] and report["one"]["kind"] == "rss"
    assert peak_memory_gb(report) == one
    assert memory_line(report).startswith("memory (rss, peak per phase, max over 1 rank(s)")


def test_cpu_without_reset_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    mem = PhaseMemory(cpu_env())
    _hold_and_free("cpu")
    mem.end("one")
    mem.end("two")
    report = mem.report()
    assert {r["kind"] for r in report.values()} == {"rss_since_start"}
    # ru_maxrss never goes down: phase two shows at least phase one's peak, the buffer included
    assert report["two"]["max_gb"] >= report["one"]["max_gb"] >= BUFFER / GB
    assert peak_memory_gb({}) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_peak_is_reset_per_phase():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    mem = PhaseMemory(env)
    _hold_and_free("cuda")
    mem.end("load")
    small = torch.ones(1024, device="cuda")
    mem.end("train")
    del small
    report = mem.report()
    assert {r["kind"] for r in report.values()} == {"cuda_allocated"}
    assert report["load"]["max_gb"] >= BUFFER / GB - 1e-3
    assert report["train"]["max_gb"] < report["load"]["max_gb"] - 0.5 * BUFFER / GB
    for record in report.values():
        assert record["reserved_per_rank_gb"][0] >= record["per_rank_gb"][0]
        assert record["reserved_max_gb"] == max(record["reserved_per_rank_gb"])
