"""`python -m tests.collective_guard <dpo arguments>`: the `dpo` CLI with every torch.distributed collective wrapped
(tests/test_collectives_dist.py runs it under torchrun).

Each call is checked, then passed on unchanged:
- every tensor it is handed is on the device the run declared (env.device, as init_distributed returned it), and
  of a device type the group's backend accepts (NCCL: CUDA only; gloo: CPU and CUDA);
- an object collective's own tensors (`device=`) are on that device too;
- it is called from torch itself or from stages/model/distributed.py, the one place the stages' collectives go through:
  a direct call from another stages module is flagged.
Nothing is raised inside a collective (a rank that stopped would leave the others waiting in theirs): each rank
writes what it saw to $DPO_COLLECTIVE_LOG/rank<r>.json when it exits, and the test reads that.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"
HELPERS = STAGES / "model" / "distributed.py"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "broadcast_object_list",
               "all_gather_object", "gather_object", "scatter_object_list", "reduce", "gather", "scatter",
               "all_to_all", "all_to_all_single", "all_reduce_coalesced", "barrier", "monitored_barrier", "send",
               "recv", "isend", "irecv")
BACKEND_DEVICES = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}}
OBJECT_ARGS = {"object_list", "object_gather_list", "obj", "scatter_object_input_list", "scatter_object_output_list"}


def accepted_devices(backend_config: str) -> set[str]:
    """'cpu:gloo,cuda:nccl' -> {cpu, cuda}; 'cuda:nccl' -> {cuda}; a bare 'gloo' / 'nccl' by what it takes."""
    if ":" not in backend_config:
        return BACKEND_DEVICES.get(backend_config, set())
    return {pair.split(":")[0] for pair in backend_config.split(",")}


def tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def device_problems(op: str, tensors: list[torch.Tensor], declared: torch.device | None,
                    accepted: set[str]) -> list[str]:
    """What is wrong with the tensors handed to one collective (empty: nothing)."""
    if declared is None:
        return [f"{op}: called before init_distributed declared the run's device"]
    problems = []
    for t in tensors:
        if t.device != declared:
            problems.append(f"{op}: a {tuple(t.shape)} {t.dtype} tensor on {t.device}, the run's device is {declared}")
        if t.device.type not in accepted:
            problems.append(f"{op}: a tensor on {t.device.type}; the group's backend takes {sorted(accepted)}")
    return problems


def caller_problem(op: str, filename: str, line: int) -> str | None:
    """A collective called straight from a stages module other than stages/model/distributed.py."""
    path = Path(filename).resolve()
    if STAGES in path.parents and path != HELPERS:
        return f"{op}: called directly from {path.relative_to(REPO)}:{line}, not through stages/model/distributed.py"
    return None


def site(frame) -> str:
    """The two nearest stages frames outside stages/model/distributed.py, e.g.
    'stages.stage2.metrics.Accumulator.reduce < stages.stage2.train.evaluate' (empty: no stages code on the stack)."""
    names = []
    while frame is not None and len(names) < 2:
        path = Path(frame.f_code.co_filename)
        if STAGES in path.parents and path != HELPERS:
            module = ".".join(path.resolve().relative_to(REPO).with_suffix("").parts)
            names.append(f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}")
        frame = frame.f_back
    return " < ".join(names)


class Guard:
    def __init__(self):
        self.declared: torch.device | None = None
        self.calls: Counter = Counter()
        self.violations: list[str] = []

    def check(self, op: str, original, args: tuple, kwargs: dict, frame) -> None:
        import torch.distributed as dist

        self.calls[f"{op} @ {site(frame)}"] += 1
        try:
            bound = inspect.signature(original).bind(*args, **kwargs).arguments
        except TypeError:  # not our business: the real call raises its own error
            return
        tensors = [t for name, v in bound.items() if name not in OBJECT_ARGS for t in tensors_of(v)]
        try:
            accepted = accepted_devices(dist.get_backend_config(bound.get("group")))
        except (ValueError, RuntimeError, AttributeError):
            accepted = set()
        problems = device_problems(op, tensors, self.declared, accepted)
        if "device" in bound and bound["device"] is not None and torch.device(bound["device"]) != self.declared:
            problems.append(f"{op}: device={bound['device']}, the run's device is {self.declared}")
        problem = caller_problem(op, frame.f_code.co_filename, frame.f_lineno)
        self.violations += problems + ([problem] if problem else [])

    def wrap(self, op: str, original):
        @functools.wraps(original)
        def guarded(*args, **kwargs):
            self.check(op, original, args, kwargs, sys._getframe(1))
            return original(*args, **kwargs)

        guarded.__wrapped_collective__ = True
        return guarded

    def record(self) -> dict:
        return {"declared": str(self.declared), "calls": dict(self.calls), "violations": self.violations[:200]}


def install(log_dir: Path) -> Guard:
    """Wrap the collectives where both torch.distributed users and torch's own c10d module look them up, and
    init_distributed (to learn the declared device); write rank<r>.json at exit."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import stages.model.distributed as sd

    guard = Guard()
    for op in COLLECTIVES:
        original = getattr(c10d, op, None)
        if original is None or getattr(original, "__wrapped_collective__", False):
            continue
        guarded = guard.wrap(op, original)
        for module in (dist, c10d):
            if getattr(module, op, None) is original:
                setattr(module, op, guarded)
    init = sd.init_distributed

    def declaring_init():
        env = init()
        guard.declared = env.device
        return env

    sd.init_distributed = declaring_init  # before stages.stage2.train / stages.stage1.precompute import it by name
    rank = os.environ.get("RANK", "0")
    log_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: (log_dir / f"rank{rank}.json").write_text(json.dumps(guard.record(), indent=1)))
    return guard


if __name__ == "__main__":
    install(Path(os.environ["DPO_COLLECTIVE_LOG"]))
    from stages.cli import main

    main()
