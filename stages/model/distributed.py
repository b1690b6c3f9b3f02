"""torchrun environment and FSDP2 sharding. One process needs no launcher; under torchrun (one node or many)
every rank shards the model per decoder layer with `fully_shard` (gloo on CPU; on GPU one process group with
two backends, CUDA tensors over nccl and CPU tensors over gloo).

Rule for callers: every rank must run the same number of forwards, or the all-gathers hang.
Rule for collectives: the stages call them only through the helpers at the end of this file, which hand the
collective a tensor on env.device (NCCL refuses CPU tensors) and give the result back where the caller had it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stages.base.constants import launched_world_size  # torchrun's WORLD_SIZE, declared there
from stages.base.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if cuda:  # one group: CUDA tensors over NCCL, CPU ones over gloo (torch's object collectives, a stray tensor)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timedelta(minutes=30))
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    return DistEnv(rank, world, local, device)


def end_process_group() -> None:
    """Called once by the CLI when a command ends (a sweep trains several runs in one process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks (Llama/Qwen/Mistral/Gemma: model.model.layers), through PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UserError(f"{type(base).__name__}: no decoder-layer list (model.layers, transformer.h, ...) to shard with "
                    "FSDP2; run it in one process, or open an issue for this architecture")


def shard_model(model, env: DistEnv, reshard_after_forward: bool = True, replicas: int = 1):
    """FSDP2: one unit per decoder layer, the rest (embeddings, final norm, head) in the root unit.

    replicas R > 1 is HSDP: a 2-D mesh [R replica groups, world/R shards]; weights are sharded inside a group
    (a group is S = world/R consecutive ranks, i.e. one node under torchrun) and replicated across groups;
    gradients are reduce-scattered inside a group, then all-reduced across groups (averaged over all ranks,
    as with plain FSDP). The root stays gathered after forward: the log-prob head runs its chunks inside the
    forward but recomputes them in backward (checkpointed), when the head's weight must still be whole."""
    if not env.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh(env, replicas)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def device_mesh(env: DistEnv, replicas: int = 1):
    """1-D mesh [world] for FSDP, or 2-D [replicas, world/replicas] named (replicate, shard) for HSDP.
    Rank r sits in replica group r // (world/R): torchrun numbers ranks node by node."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicas == 1:
        return init_device_mesh(env.device.type, (env.world_size,))
    return init_device_mesh(env.device.type, (replicas, env.world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, reduced on env.device; returned on t's device (in place when t is already there)."""
    if not env.enabled:
        return t
    on_device = t.to(env.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.to(t.device)


def gather_rows(row: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """[world, n]: every rank's 1-D `row` at its rank's index (a sum of zero-padded tables), on row's device."""
    table = torch.zeros(env.world_size, row.numel(), dtype=row.dtype, device=row.device)
    table[env.rank] = row
    return all_reduce_sum(table, env)


def all_reduce_max_(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In place, elementwise max over all ranks, reduced on env.device (loading's NF4 absmax lives there)."""
    if env.enabled:
        on_device = t.to(env.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
        if on_device is not t:
            t.copy_(on_device)
    return t


def all_reduce_max(value: int, env: DistEnv) -> int:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, env: DistEnv):
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device)  # its size and bytes tensors on env.device
    return box[0]
