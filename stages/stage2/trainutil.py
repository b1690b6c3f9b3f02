"""Stage-two plumbing: data order, optimizer, schedule, seeds (memory: stages/model/memory.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from stages.base.errors import UserError
from stages.model.quiet import import_bitsandbytes
from stages.settings.groups import OptimSettings

MEGABATCH = 16  # length grouping: sort within groups of 16 micro-batches, so batches stay shuffled overall


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batches_for_epoch(items: list, batch_size: int, seed: int, epoch: int, budget: int | None = None,
                      cost=None, width=None) -> list[list]:
    """Micro-batches of exactly `batch_size` examples, the same on every rank and for every world size:
    shuffle (seeded by seed and epoch), sort each megabatch by `width` (default: length; `width_of`: the row the
    forward pads to, so little padding), drop the remainder.
    With a token `budget`: the micro-batches of `token_batches` (built once, the same every epoch; `cost` as there)
    in an order shuffled by seed and epoch."""
    if budget is not None:
        batches = token_batches(items, batch_size, budget, cost)
        order = list(range(len(batches)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        return [batches[i] for i in order]
    width = width or (lambda item: item.length)
    order = list(range(len(items)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    usable = len(order) - len(order) % batch_size
    batches = []
    span = batch_size * MEGABATCH
    for start in range(0, usable, span):
        group = sorted(order[start:min(start + span, usable)], key=lambda i: -width(items[i]))
        batches += [[items[i] for i in group[k:k + batch_size]] for k in range(0, len(group), batch_size)]
    return batches


def batch_cost(batch: list) -> int:
    """Padded tokens of a micro-batch: its examples times the longest one's forward (`tokens`: two padded rows of a
    pair, one [prompt | replies] row of a prompt)."""
    return len(batch) * max(item.tokens for item in batch)


def token_batches(items: list, batch_size: int, budget: int, cost=None) -> list[list]:
    """Whole examples (pairs, or prompts with all their replies), longest first, greedily into micro-batches of at
    most `batch_size` examples and `budget` tokens as `cost` counts them (default `batch_cost`: padded rows;
    --pack: `PackCost`, the real tokens of the one packed sequence); an example over the budget alone is a
    micro-batch of its own. Deterministic (the same on every rank and every epoch)."""
    cost = cost or batch_cost
    order = sorted(range(len(items)), key=lambda i: (-items[i].tokens, i))
    batches: list[list] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and cost(batches[-1] + [items[i]]) <= budget:
            batches[-1].append(items[i])
        else:
            batches.append([items[i]])
    return batches


@dataclass(frozen=True)
class PackCost:
    """--pack: a micro-batch is one sequence of its real tokens (`packed_tokens`: the shared or plain layout), so
    the budget counts those, not padded rows (which would fill packed sequences about half)."""

    share: bool

    def __call__(self, batch: list) -> int:
        return sum(item.packed_tokens(self.share) for item in batch)


def cost_of(compute) -> object:
    """How --max-tokens-per-batch counts a micro-batch under these Compute settings (one rule for all callers)."""
    return PackCost(compute.share_prompt) if compute.pack else batch_cost


def width_of(compute):
    """What length grouping sorts by: the row a shared forward pads to ([prompt | chosen | rejected], one
    [prompt | replies] row: `packed_tokens(True)`), or the longer prompt + reply of the plain layout's rows."""
    return (lambda item: item.packed_tokens(True)) if compute.share_prompt else (lambda item: item.length)


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
