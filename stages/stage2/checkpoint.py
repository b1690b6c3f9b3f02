"""Checkpoints of stage two: the LoRA adapter in PEFT format plus everything needed to continue exactly.

Layout: `<output>/checkpoint-<step>/` with `adapter/` (PeftModel.from_pretrained loads it), `trainer_state.pt`
(full, unsharded LoRA weights, optimizer and scheduler state: plain tensors, loadable with weights_only=True and
on any world size), `rng-rank<r>.pt` per rank, and `state.json` (step, time). Written into a temporary folder and
renamed, so a folder named checkpoint-N is always whole; the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from stages.base.errors import UserError
from stages.base.fsio import TMP_MARK
from stages.model.distributed import DistEnv, barrier, broadcast_object


def list_checkpoints(output: Path) -> list[Path]:
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    """Plain tensors and lists only (Python's state as [version, [625 ints], gauss]): loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_plain(path: Path):
    """torch.load that never runs code: anything but tensors and plain containers is refused with one line."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds objects other than tensors and plain values (it could run code), so it is "
                        "not loaded; delete this checkpoint folder or use --no-resume") from None


def save_adapter(model, path: Path, env: DistEnv) -> None:
    """Gather the (possibly sharded) LoRA weights and write a normal PEFT adapter folder on rank 0."""
    from peft import get_peft_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full, _ = get_state_dict(model, [], options=options)
    if env.is_main:
        lora = get_peft_model_state_dict(model, state_dict=full)
        model.save_pretrained(str(path), state_dict=lora, safe_serialization=True)


def save(output: Path, step: int, model, optimizer, scheduler, env: DistEnv, extra: dict, keep: int,
         rank_state: dict | None = None) -> Path:
    """`extra` goes to state.json (rank 0); `rank_state` is this rank's own (e.g. its metrics window)."""
    final = output / f"checkpoint-{step}"
    # rank 0's pid names the folder for every rank; whoever holds the run's lock later removes a stale one
    tmp = broadcast_object(output / f".checkpoint-{step}{TMP_MARK}{os.getpid()}", env)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    save_adapter(model, tmp / "adapter", env)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, [optimizer], options=opts)
    model_sd = _trainable_only(model, model_sd)
    torch.save({**_rng_state(), "rank_state": rank_state or {}}, tmp / f"rng-rank{env.rank}.pt")
    barrier(env)  # every rank's file is in the folder before rank 0 renames it
    if env.is_main:
        torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict()},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": env.world_size, **extra}, indent=1))
        if final.exists():  # the same step saved again (a resumed final save): move the old one away first
            remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
            remove(old)
    barrier(env)
    return final


def remove(checkpoint: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a temporary (removed by the next run), never a torn checkpoint."""
    trash = checkpoint.with_name(f".{checkpoint.name}-old{TMP_MARK}{os.getpid()}")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


def _trainable_only(model, state: dict) -> dict:
    """Frozen bitsandbytes quant state (absmax, quant_map, ...) is not a parameter, so ignore_frozen_params keeps
    it; the base is reloaded from the model folder anyway, so a checkpoint holds trainable tensors only."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


def load(path: Path, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns state.json. Rank 0 reads, then broadcasts."""
    blob = _load_plain(path / "trainer_state.pt") if env.is_main else {"model": {}, "optimizer": {}}
    blob["model"] = _trainable_only(model, blob["model"])
    opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, broadcast_from_rank0=env.enabled)
    set_state_dict(model, [optimizer], model_state_dict=blob["model"], optim_state_dict=blob["optimizer"], options=opts)
    scheduler.load_state_dict(broadcast_object(blob.get("scheduler"), env))
    state = json.loads((path / "state.json").read_text())
    rng = path / f"rng-rank{env.rank}.pt"
    if rng.is_file():
        saved = _load_plain(rng)
        _set_rng_state(saved)
        state["rank_state"] = saved.get("rank_state", {})
    return state
