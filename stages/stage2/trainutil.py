"""Stage-two plumbing: data order, optimizer, schedule, seeds (memory: stages/model/memory.py)."""

from __future__ import annotations

import random

import torch

from stages.base.errors import UserError

MEGABATCH = 16  # length grouping: sort within groups of 16 micro-batches, so batches stay shuffled overall

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
FSDP2_OPTIMIZERS = ("adamw",)  # tested under FSDP2 (more than one process); torch AdamW: LoRA-sized state, small
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batches_for_epoch(items: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """Micro-batches of exactly `batch_size` examples, the same on every rank and for every world size:
    shuffle (seeded by seed and epoch), sort each megabatch by length (little padding), drop the remainder."""
    order = list(range(len(items)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    usable = len(order) - len(order) % batch_size
    batches = []
    span = batch_size * MEGABATCH
    for start in range(0, usable, span):
        group = sorted(order[start:min(start + span, usable)], key=lambda i: -items[i].length)
        batches += [[items[i] for i in group[k:k + batch_size]] for k in range(0, len(group), batch_size)]
    return batches


def check_optimizer(name: str, world_size: int) -> None:
    """The optimizer rules, checked before any data, cache or model is read (world_size: torchrun's WORLD_SIZE)."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if world_size > 1 and name not in FSDP2_OPTIMIZERS:
        raise UserError(f"--optimizer {name} is refused with {world_size} processes: bitsandbytes' 8-bit state on "
                        "FSDP2 DTensors is untested (bitsandbytes #1633); use --optimizer adamw (LoRA-sized state)")
    if name != "adamw" and not torch.cuda.is_available():
        raise UserError(f"--optimizer {name} needs a GPU (bitsandbytes); use adamw on CPU")


def build_optimizer(model, cfg):
    """The optimizer `check_optimizer` accepted (train.check_numbers ran it before anything was read)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the policy has no trainable parameters; check --target-modules")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise UserError(f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    if cfg.lr_scheduler not in SCHEDULERS:
        raise UserError(f"--lr-scheduler {cfg.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

