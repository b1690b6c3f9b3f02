"""Stage-two plumbing: data order, optimizer, schedule, seeds (memory: stages/model/memory.py)."""

from __future__ import annotations

import random

import torch

from stages.base.errors import UserError
from stages.model.quiet import import_bitsandbytes
from stages.settings.groups import OptimSettings

MEGABATCH = 16  # length grouping: sort within groups of 16 micro-batches, so batches stay shuffled overall


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


def build_optimizer(model, optim: OptimSettings):
    """The optimizer OptimSettings.check accepted before anything was read (8-bit: one process, a GPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the policy has no trainable parameters; check --target-modules")
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    bnb = import_bitsandbytes()  # quietly (stages/model/quiet.py)

    cls = bnb.optim.PagedAdamW8bit if optim.optimizer.startswith("paged") else bnb.optim.AdamW8bit
    return cls(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)


def build_scheduler(optimizer, optim: OptimSettings, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(optim.warmup_ratio * total_steps))
    return get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
