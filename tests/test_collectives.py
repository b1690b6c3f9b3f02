"""Collectives that cannot meet the wrong device, in one process (the 2-process run is tests/test_collectives_dist.py).

- init_distributed starts ONE process group for both device types on CUDA ("cpu:gloo,cuda:nccl", bound to the
  rank's GPU), plain gloo on CPU; checked with CUDA mocked, so it runs on any machine.
- Every helper in stages/model/distributed.py hands its collective a tensor on env.device: with a fake env.device
  ("meta", the one other device a CPU-only torch has), the mocked collective must see "meta", not the CPU tensor
  the caller made (the shape of the NCCL failure: a CPU tensor handed to a CUDA-only backend).
- The guard the 2-process test installs does flag a tensor off the run's device and a direct call from a stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import stages.model.distributed as sd
from stages.model.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_max_,
    all_reduce_sum,
    broadcast_object,
    gather_rows,
)
from stages.stage2.metrics import Accumulator
from tests import collective_guard as guard


class Reached(Exception):
    """Raised by a mocked collective once it has seen its arguments."""


def _launch(monkeypatch, cuda: bool, world: int = 2, rank: int = 1) -> list:
    for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    return calls


def test_cuda_gets_one_group_for_cpu_and_cuda_tensors(monkeypatch):
    calls = _launch(monkeypatch, cuda=True)
    env = sd.init_distributed()
    assert env.device == torch.device("cuda", 1) and (env.rank, env.world_size) == (1, 2)
    assert calls[0] == ("set_device", torch.device("cuda", 1))
    (_, args, kwargs), = [c for c in calls if c[0] == "init"]
    assert args == ("cpu:gloo,cuda:nccl",)
    assert kwargs["device_id"] == torch.device("cuda", 1)


def test_cpu_gets_gloo_and_one_process_no_group(monkeypatch):
    calls = _launch(monkeypatch, cuda=False)
    assert sd.init_distributed().device == torch.device("cpu")
    (_, args, kwargs), = calls
    assert args == ("gloo",) and "device_id" not in kwargs
    calls = _launch(monkeypatch, cuda=False, world=1, rank=0)
    assert not sd.init_distributed().enabled and calls == []


def test_every_helper_hands_its_collective_a_tensor_on_env_device(monkeypatch):
    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("meta"))
    seen = []

    def collective(name):
        def fake(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            seen.append((name, [t.device.type for t in tensors], kwargs.get("device")))
            raise Reached

        return fake

    monkeypatch.setattr(dist, "all_reduce", collective("all_reduce"))
    monkeypatch.setattr(dist, "broadcast_object_list", collective("broadcast_object_list"))
    calls = {"all_reduce_sum": lambda: all_reduce_sum(torch.zeros(3, dtype=torch.float64), env),
             "all_reduce_max": lambda: all_reduce_max(3, env),
             "all_reduce_max_": lambda: all_reduce_max_(torch.zeros(4), env),  # loading's NF4 absmax
             "gather_rows": lambda: gather_rows(torch.ones(2, dtype=torch.float64), env),
             "Accumulator.reduce": lambda: Accumulator().reduce(env),  # train/eval metrics, the drift report's
             "broadcast_object": lambda: broadcast_object({"a": 1}, env)}
    for name, call in calls.items():
        try:
            call()
        except Reached:
            continue
        raise AssertionError(f"{name} did not reach its collective")
    assert [s[0] for s in seen] == ["all_reduce"] * 5 + ["broadcast_object_list"]
    for name, devices, device in seen[:5]:
        assert devices == ["meta"], (name, devices)
    assert seen[5][2] == torch.device("meta")


def test_guard_flags_a_tensor_off_the_run_device_and_a_direct_call():
    cpu, meta = torch.zeros(2), torch.device("meta")
    assert guard.device_problems("all_reduce", [cpu], torch.device("cpu"), {"cpu", "cuda"}) == []
    assert "the run's device is meta" in guard.device_problems("all_reduce", [cpu], meta, {"cpu", "meta"})[0]
    assert "backend takes ['cuda']" in guard.device_problems("all_reduce", [cpu], torch.device("cpu"), {"cuda"})[0]
    assert guard.accepted_devices("nccl") == {"cuda"}
    assert guard.accepted_devices("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert guard.caller_problem("all_reduce", str(guard.STAGES / "precompute.py"), 7) is not None
    assert guard.caller_problem("all_reduce", str(guard.HELPERS), 7) is None
    assert guard.caller_problem("all_reduce", torch.__file__, 7) is None
