"""DPO metrics with TRL's names and meanings, reduced across ranks, written to metrics.jsonl (+ TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.model.distributed import DistEnv, all_reduce_sum
from stages.objective.loss import LOSS_TYPES

# Sums kept per batch; means are taken over examples (tokens for logits/*), after the all-reduce.
SUM_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "ref_drift")


class Accumulator:
    """Per-example sums over any number of micro-batches; `reduce` gives global means. A mixture's terms are
    summed per loss type in a fixed [len(LOSS_TYPES)] vector (every rank reduces the same shape, even a rank that
    added nothing) and logged as `loss/<type>` when the loss has two or more terms."""

    def __init__(self):
        self.sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
        self.terms = torch.zeros(2 * len(LOSS_TYPES), dtype=torch.float64)  # per type: sum, examples
        self.examples = 0  # pairs
        self.prompts = 0   # reply sets' prompts (0 for pair rows)
        self.chosen_tokens = 0
        self.rejected_tokens = 0

    def add(self, result) -> None:
        """result: stages.stage2.forward.PolicyPass (losses [B], the policy's LogpOutput, the LossOutput, ref_* [B]
        cached). ONE device->host copy per batch: the [B] vectors are stacked on the device, copied once,
        summed here."""
        losses, lp, loss_out = result.losses, result.logps, result.loss
        ref_chosen, ref_rejected = result.ref_chosen, result.ref_rejected
        components = getattr(loss_out, "components", {})
        rows = [losses, loss_out.chosen_rewards, loss_out.rejected_rewards, lp.chosen_logps, lp.rejected_logps,
                lp.chosen_logits_sum, lp.rejected_logits_sum, lp.chosen_tokens, lp.rejected_tokens,
                *components.values()]
        host = torch.stack([v.detach().to(torch.float64) for v in rows]).cpu()  # [rows, B], float64 holds all
        per_loss, c, r, pc, pr, logits_c, logits_r, tokens_c, tokens_r = host[:9]
        drift = ((pc - ref_chosen).abs() + (pr - ref_rejected).abs()) / 2
        values = [per_loss.sum(), c.sum(), r.sum(), (c > r).double().sum(), (c - r).sum(), pc.sum(), pr.sum(),
                  logits_c.sum(), logits_r.sum(), drift.sum()]
        self.sums += torch.stack(values)
        for name, term in zip(components, host[9:]):
            k = LOSS_TYPES.index(name)
            self.terms[k] += term.sum()
            self.terms[len(LOSS_TYPES) + k] += term.shape[0]
        self.examples += int(losses.shape[0])
        self.prompts += int(getattr(result, "prompts", 0))
        self.chosen_tokens += int(tokens_c.sum())
        self.rejected_tokens += int(tokens_r.sum())

    def state(self) -> dict:
        """JSON-able, so a checkpoint taken mid logging window resumes the same window."""
        return {"sums": self.sums.tolist(), "examples": self.examples, "prompts": self.prompts,
                "chosen_tokens": self.chosen_tokens,
                "rejected_tokens": self.rejected_tokens, "terms": self.terms.tolist()}

    @classmethod
    def from_state(cls, state: dict | None) -> "Accumulator":
        acc = cls()
        if state:
            acc.sums = torch.tensor(state["sums"], dtype=torch.float64)
            acc.examples, acc.chosen_tokens = state["examples"], state["chosen_tokens"]
            acc.rejected_tokens, acc.prompts = state["rejected_tokens"], state.get("prompts", 0)
            if "terms" in state:  # checkpoints from before mixtures have none
                acc.terms = torch.tensor(state["terms"], dtype=torch.float64)
        return acc

    def reduce(self, env: DistEnv, prefix: str = "", per_step: int | None = None) -> dict:
        """Global means (TRL's names, per pair). `per_step`: the optimizer steps the sums cover; with reply sets
        the record also says the pairs and prompts of one step (all ranks)."""
        counts = torch.tensor([self.examples, self.chosen_tokens, self.rejected_tokens, self.prompts],
                              dtype=torch.float64)
        both = all_reduce_sum(torch.cat([self.sums, counts, self.terms]), env)  # reduced on env.device, back here
        k = len(SUM_KEYS)
        sums, (n, ct, rt, prompts), terms = both[:k], both[k:k + 4].tolist(), both[k + 4:].tolist()
        out = {}
        for key, value in zip(SUM_KEYS, sums.tolist()):
            denom = ct if key == "logits/chosen" else rt if key == "logits/rejected" else n
            out[prefix + key] = value / max(denom, 1)
        seen = [(name, terms[i], terms[len(LOSS_TYPES) + i]) for i, name in enumerate(LOSS_TYPES)
                if terms[len(LOSS_TYPES) + i] > 0]
        if len(seen) > 1:  # a mixture: each term's mean (before its weight), e.g. loss/sigmoid, loss/sft
            out.update({f"{prefix}loss/{name}": total / count for name, total, count in seen})
        if prompts and per_step:  # reply sets: how many pairs and prompts one step trained on
            out.update({"pairs_per_step": n / per_step, "prompts_per_step": prompts / per_step})
        return out


class MetricsWriter:
    """Appends one JSON object a line to metrics.jsonl and hands the same record to each `--report-to` tracker
    (stages/stage2/trackers.py). Rank 0 only."""

    def __init__(self, path: Path, env: DistEnv, report_to=(), config: dict | None = None, run_name: str | None = None):
        from stages.stage2.trackers import open_trackers, parse_report_to

        self.path, self.enabled = path, env.is_main
        names = parse_report_to((), tensorboard=True) if report_to is True else parse_report_to(report_to or ())
        self.trackers = open_trackers(names, path.parent, config or {}, run_name) if self.enabled and names else []

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record, record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def readable(record: dict) -> str:
    keys = ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "grad_norm", "learning_rate", "tokens_per_second")
    parts = []
    evals = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
    for k in keys + tuple(k for k in record if k.startswith("eval/") and k in evals):
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def read_metrics(path: Path, upto_step: int | None = None) -> list[dict]:
    """Records of a metrics.jsonl, optionally only those at or before a step (for resume)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write; it is logged again after resume
            continue
    return [r for r in records if upto_step is None or r.get("step", 0) <= upto_step]
