"""What a launcher (`torchrun`, `accelerate launch`) asked for, read from the environment it gives its processes,
before any setting is built: each of its settings is honoured, refused in one line, or named as not used; never
silently half-used. Torch-free, so the CLI checks it before anything is read or loaded.

`accelerate launch` (1.x) passes its settings to the processes as environment variables (accelerate/utils/launch.py):
ACCELERATE_MIXED_PRECISION always; ACCELERATE_USE_CPU only from its simple launcher (one process, no torchrun);
ACCELERATE_USE_FSDP and FSDP_* with an FSDP config (then torchrun starts the processes and sets WORLD_SIZE);
ACCELERATE_USE_DEEPSPEED / _MEGATRON_LM / _PARALLELISM_CONFIG for the others. It does not pass --num_processes;
the one trace of a count above one is MASTER_ADDR, which it sets only then. What this tool does with them:

- mixed_precision bf16 / fp16: the weights' dtype (--dtype) when the user left it at auto (stage one, sample) or
  unset (train, sweep), said once; an explicit --dtype wins, also said. fp8: refused. There is no autocast here.
- FSDP: this tool always shards each decoder layer with its own FSDP2 under more than one process. Offload
  (fsdp_offload_params, fsdp_activation_checkpointing_offload) and non-sharding strategies (NO_SHARD, HYBRID_SHARD)
  are refused; wrapping, prefetch, state-dict and activation-checkpointing values other than what this tool does
  anyway (FSDP_AS_HERE) are named, in one line, as not used.
- DeepSpeed, Megatron-LM, tensor/context/sequence parallelism, replicated data parallelism: refused.
- A process count that did not happen: the simple launcher given --num_processes N > 1 (or --cpu, a MULTI_CPU config,
  no GPU found) starts ONE process without WORLD_SIZE; MASTER_ADDR set without WORLD_SIZE says so: refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from stages.base.errors import UserError

TORCHRUN = "torchrun --nproc-per-node N -m stages.cli ..."
# FSDP options that would change what happens, with the values that are what this tool does anyway; a value
# outside them is named as not used. The rest (transformer_cls_to_wrap, min_num_params, use_orig_params,
# sync_module_states, cpu_ram_efficient_loading) have no bearing: layers are found and loaded per rank here.
OFF = ("", "false", "0", "none", "no")
FSDP_AS_HERE = {"VERSION": ("2",), "AUTO_WRAP_POLICY": ("TRANSFORMER_BASED_WRAP",),
                "STATE_DICT_TYPE": ("FULL_STATE_DICT",), "BACKWARD_PREFETCH": ("BACKWARD_PRE",),
                "FORWARD_PREFETCH": (), "ACTIVATION_CHECKPOINTING": (), "IGNORED_MODULES": ()}
MIXED_TO_DTYPE = {"bf16": "bf16", "fp16": "fp16"}


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def under_accelerate(env: Mapping[str, str] | None = None) -> bool:
    """True in a process started by `accelerate launch` (it always sets ACCELERATE_MIXED_PRECISION)."""
    return "ACCELERATE_MIXED_PRECISION" in (os.environ if env is None else env)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Rank 0, or no launcher: the one process that speaks (RANK, else LOCAL_RANK, as torchrun sets them)."""
    env = os.environ if env is None else env
    return env.get("RANK", env.get("LOCAL_RANK", "0")).strip() in ("", "0")


def check_launcher(env: Mapping[str, str] | None = None) -> list[str]:
    """Refuse (UserError, one line) what the launcher asked for and this tool would not do; return the notes to
    print once (settings of the launcher that are not used here). Nothing without `accelerate launch`."""
    env = os.environ if env is None else env
    if not under_accelerate(env):
        return []
    _check_count(env)
    _check_backends(env)
    precision = env["ACCELERATE_MIXED_PRECISION"].strip().lower()
    if precision not in ("no", "", *MIXED_TO_DTYPE):
        raise UserError(f"accelerate launch: mixed_precision {precision} is not supported here; use bf16, fp16 or "
                        "no (it sets --dtype), or give --dtype")
    return _check_fsdp(env) if _on(env, "ACCELERATE_USE_FSDP") else []


def _check_count(env: Mapping[str, str]) -> None:
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise UserError("accelerate launch asked for several processes, but its simple launcher (--cpu, MULTI_CPU, "
                        f"no GPU) started one; use {TORCHRUN} (or unset MASTER_ADDR for one)")


def _check_backends(env: Mapping[str, str]) -> None:
    for flag, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if _on(env, flag):
            raise UserError(f"accelerate launch: {what} is not supported here (this tool shards with its own FSDP2); "
                            f"use {TORCHRUN}")
    if _on(env, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        for size, what in (("TP_SIZE", "tensor"), ("CP_SIZE", "context"), ("SP_SIZE", "sequence"),
                           ("DP_REPLICATE_SIZE", "replicated data")):
            value = env.get(f"PARALLELISM_CONFIG_{size}", "1").strip()
            if value not in ("", "1", "None"):
                fix = "use --replicas R (HSDP)" if size == "DP_REPLICATE_SIZE" else f"use {TORCHRUN}"
                raise UserError(f"accelerate launch: {what} parallelism ({size.lower()} {value}) is not supported "
                                f"here; {fix}")


def _check_fsdp(env: Mapping[str, str]) -> list[str]:
    for key in ("OFFLOAD_PARAMS", "ACTIVATION_CHECKPOINTING_OFFLOAD"):
        if _on(env, f"FSDP_{key}"):
            raise UserError(f"accelerate launch: fsdp_{key.lower()} true is not supported (no CPU offload here); set "
                            "it to false, or fit the model with more processes, NF4 (--load-in-4bit) or fewer tokens")
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy in ("3", "NO_SHARD"):
        raise UserError(f"accelerate launch: fsdp_sharding_strategy {strategy} is not supported (this tool always "
                        f"shards); use FULL_SHARD, or {TORCHRUN}")
    if strategy in ("4", "5", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"):
        raise UserError(f"accelerate launch: fsdp_sharding_strategy {strategy}: give --replicas R (HSDP: weights "
                        "sharded within a group, replicated across) with FULL_SHARD instead")
    values = {k: env.get(f"FSDP_{k}", "").strip() for k in FSDP_AS_HERE}
    unused = [f"fsdp_{k.lower()} {v}" for k, v in values.items() if v.lower() not in OFF and v not in FSDP_AS_HERE[k]]
    if strategy in ("2", "SHARD_GRAD_OP") or env.get("FSDP_RESHARD_AFTER_FORWARD", "").strip().lower() == "false":
        unused.append("no reshard after forward")
    if not unused:
        return []
    return [f"note: accelerate's FSDP settings not used: {', '.join(unused)}; this tool shards each decoder layer "
            "with FSDP2 itself (reshards after forward, saves whole LoRA checkpoints; train: --gradient-checkpointing)"]


def launched_dtype(current: str | None, env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(dtype, note): accelerate's mixed precision as the weights' dtype when `current` is auto or unset (None),
    with the line that says so; (None, note) when an explicit --dtype differs from it; (None, None) otherwise."""
    env = os.environ if env is None else env
    wanted = MIXED_TO_DTYPE.get(env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower())
    if wanted is None:
        return None, None
    if current in (None, "auto"):
        return wanted, (f"accelerate: mixed_precision {wanted} -> --dtype {wanted} (weights and compute in {wanted}; "
                        "no autocast here; give --dtype to choose)")
    if current != wanted:
        return None, f"note: accelerate's mixed_precision {wanted} not applied: --dtype {current} was given"
    return None, None
