"""Stage two: `dpo train --ref-cache`. Train a QLoRA policy against cached reference log-probs.

  read the cache -> read + tokenize the data exactly as the cache says, join by example id (fails before any
  model loads) -> load ONE model (NF4 base + LoRA), shard with FSDP2 -> resume if a checkpoint exists ->
  step-0 drift check -> for each step: policy log-probs (one forward for chosen+rejected) -> DPO loss against the
  cached values -> backward, clip, AdamW -> metrics, eval, checkpoints -> adapter + summary.json.
No reference model is ever loaded: the reference exists only as two float64 columns of a Parquet file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from stages.base import fsio
from stages.base.errors import Interrupted, UserError
from stages.base.progress import Progress, say
from stages.model.distributed import DistEnv, all_reduce_sum, init_distributed
from stages.model.memory import PhaseMemory, memory_line, peak_memory_gb
from stages.model.models import ModelSpec, dtype_name, load_policy, resolve_dtype
from stages.model.rowlayout import prepare_model
from stages.model.runguard import StopSignal, guarded_output, rerun_hint
from stages.objective.loss import DPOLoss, build_loss
from stages.objective.lossspec import is_listwise
from stages.objective.ranking import ListwiseLoss, build_listwise
from stages.settings import yamlconfig as config
from stages.settings.commands import TrainConfig
from stages.settings.groups import ModelSettings, Schedule
from stages.stage2 import checkpoint
from stages.stage2.forward import PolicyPass, policy_forward
from stages.stage2.metrics import Accumulator, MetricsWriter, read_metrics, readable
from stages.stage2.prepare import Item, Prepared, SetItem, prepare
from stages.stage2.resume import check_resumable, resume_or_start
from stages.stage2.trainutil import (
    batches_for_epoch,
    build_optimizer,
    build_scheduler,
    cost_of,
    seed_everything,
    token_batches,
    width_of,
)

DRIFT_WARN = 0.05  # mean |policy - ref| per token above this at step 0 means rewards will not start at 0


def run(cfg: TrainConfig, prepared: Prepared | None = None) -> dict:
    """Train one policy; returns the summary. A sweep passes `prepared` so the data and cache are read once. The
    settings' groups have checked themselves (stages/settings) before anything is read."""
    env = init_distributed()
    for note in cfg.notes:  # defaults derived from what the user gave
        say(env, f"note: {note}")
    out = Path(cfg.run.output)
    if (out / "summary.json").is_file() and cfg.run.resume:
        say(env, f"{out}: already finished (summary.json exists); nothing to do")
        return json.loads((out / "summary.json").read_text())
    with guarded_output(out / ".lock", out, "--output", env), StopSignal() as stop:
        if env.is_main:
            fsio.remove_stale_temporaries(out)  # what a killed run left: checkpoint/summary/metrics temporaries
        return train_run(cfg, prepared, env, out, stop)


def train_run(cfg: TrainConfig, prepared: Prepared | None, env: DistEnv, out: Path, stop: StopSignal) -> dict:
    """The run itself, holding the output folder's lock: setup (data, model, optimizer, schedule, loss, resume),
    the loop, then the final eval, the last checkpoint, the adapter and summary.json."""
    # setup
    check_resumable(cfg, out)  # before any model loads
    prep = prepared or prepare(cfg.data, cfg.model, cfg.cache, cfg.lengths, cfg.loss.ld_alpha)
    for note in prep.notes:
        say(env, note)
    seed_everything(cfg.run.seed)
    total_steps, steps_per_epoch = plan_steps(cfg.schedule, prep.train, env, cost_of(cfg.compute))
    spec = policy_spec(cfg.model, prep.cache_meta, env, prep.reference_differs)
    memory = PhaseMemory(env)  # peaks per phase, every rank: "load" (load + shard), then "train"
    model = load_policy(spec, cfg.lora.lora(), env.device, cfg.lora.gradient_checkpointing, env=env,
                        replicas=cfg.compute.replicas)  # sharded load
    memory.end("load")
    say(env, prepare_model(model, cfg.compute.attention)[1])  # segments: the model's attention switched for good
    t = Trainer.build(model, cfg, total_steps)  # optimizer, LR schedule and loss: once per run
    start_step, prior_seconds, window = resume_or_start(cfg.run.resume, out, t.model, t.optimizer, t.scheduler, env)
    if env.is_main:
        config.save(cfg, out / "config.yaml")
    writer = MetricsWriter(out / "metrics.jsonl", env, cfg.run.trackers(), config=config.to_dict(cfg))
    if start_step == 0 and spec.adapter is not None:  # from an adapter: its dropout would perturb step 1
        drift_check(t, prep, cfg, env, writer)
    at = Position(start_step, total_steps, steps_per_epoch, prior_seconds, window,
                  drift_at_step_one=start_step == 0 and spec.adapter is None)
    # train
    train_loop(t, at, prep, cfg, env, writer, stop)
    # final eval (unless an interrupted attempt logged it), last checkpoint, adapter, summary
    logged = any("eval/loss" in r and r["step"] == total_steps for r in read_metrics(out / "metrics.jsonl"))
    if prep.eval and not logged:
        log_eval(t, prep, total_steps, cfg, env, writer, "final eval")
    checkpoint.save(out, total_steps, t.model, t.optimizer, t.scheduler, env, {"seconds": at.seconds()},
                    cfg.schedule.save_total_limit)
    checkpoint.save_adapter(t.model, out / "adapter", env)
    memory.end("train")
    summary = write_summary(out, cfg, total_steps, at.seconds(), env, memory.report())
    writer.close()
    return summary


def policy_spec(model: ModelSettings, meta: dict, env: DistEnv, differs: tuple[str, ...] = ()) -> ModelSpec:
    """The policy's base loaded as the cache's reference was (quantization, dtype, SFT adapter) where no flag says
    otherwise. `differs`: what prepare found not the reference (only with --allow-reference-mismatch; prepare refuses
    it otherwise, and has said it in a note); named in the one model line."""
    spec = as_the_cache({"load_in_4bit": model.load_in_4bit, "dtype": model.dtype, "adapter": model.adapter}, meta)
    dtype = dtype_name(resolve_dtype(spec["dtype"], env.device))
    say(env, f"model: {'NF4' if spec['load_in_4bit'] else dtype} base, adapter {spec['adapter'] or 'none'} "
             f"({'as the cache' if not differs else 'cache differs in ' + ', '.join(differs)})")
    return model.spec(**spec)


def as_the_cache(given: dict, meta: dict) -> dict:
    """{load_in_4bit, dtype, adapter} of the policy's base: each given value, or the cache's reference's where it is
    None (the one rule; `dpo export` reads a run's base with it)."""
    cached = {"load_in_4bit": meta["quantization"] != "none", "dtype": meta["dtype"],
              "adapter": (meta.get("adapter") or {}).get("path")}
    return {k: cached[k] if v is None else v for k, v in given.items()}


def plan_steps(schedule: Schedule, train: list, env: DistEnv, cost=None) -> tuple[int, int]:
    """Optimizer steps: each takes accumulation x world_size micro-batches of batch_size examples (with
    --max-tokens-per-batch: of trainutil.token_batches counted by `cost`, the same every epoch)."""
    per_step = schedule.gradient_accumulation_steps * env.world_size
    if schedule.max_tokens_per_batch is None:
        steps_per_epoch = len(train) // (per_step * schedule.batch_size)
        need = f"{per_step * schedule.batch_size} = batch size x accumulation x processes"
    else:
        batches = token_batches(train, schedule.batch_size, schedule.max_tokens_per_batch, cost)
        steps_per_epoch = len(batches) // per_step
        need = f"{per_step} micro-batches = accumulation x processes, each up to --max-tokens-per-batch"
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} training examples are fewer than one optimizer step needs ({need}); lower "
                        "--batch-size")
    total = schedule.max_steps if schedule.max_steps > 0 else max(1, math.ceil(schedule.epochs * steps_per_epoch))
    return total, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What setup builds once and every step uses: the sharded policy, its optimizer and LR schedule, and the loss
    (stages/objective/loss.py: its spec parsed once per run; the settings checked themselves before)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: DPOLoss | ListwiseLoss

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> Trainer:
        optimizer = build_optimizer(model, cfg.optim)
        loss = build_listwise(cfg.loss) if is_listwise(cfg.loss.loss) else build_loss(cfg.loss)
        return cls(model, optimizer, build_scheduler(optimizer, cfg.optim, total_steps), loss)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the run stands: the optimizer steps done (a checkpoint's, else 0) and in all, the epoch length, the wall
    seconds of earlier attempts and the logging window a checkpoint saved ({} when none)."""

    start_step: int
    total_steps: int
    steps_per_epoch: int
    prior_seconds: float
    window: dict
    drift_at_step_one: bool  # a new LoRA from step 0: step 1's own forwards give the step-0 drift row
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def seconds(self) -> float:  # wall time of the run, across resumes
        return self.prior_seconds + time.perf_counter() - self.started


class Window:
    """The logging window: metric sums, tokens and wall time since the last train record. Checkpoints save it
    (`state`) and a resume continues it, so an interrupted run logs the same records as an uninterrupted one."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.acc, self.tokens = Accumulator.from_state(state.get("acc")), state.get("tokens", 0)
        self.steps = state.get("steps", 0)
        self.started = time.perf_counter() - state.get("elapsed", 0.0)

    def add(self, result: PolicyPass, items: list) -> None:
        self.acc.add(result)
        self.tokens += sum(i.tokens for i in items)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def state(self) -> dict:
        return {"acc": self.acc.state(), "tokens": self.tokens, "elapsed": self.elapsed(), "steps": self.steps}


def drift_check(t: Trainer, prep: Prepared, cfg, env, writer) -> None:
    """An extra no-grad eval-mode pass on the first batch, only when the policy starts from a trained adapter (its
    LoRA dropout would add noise to the first step's own forward); a fresh LoRA reads the drift from step 1."""
    items = batches_for_epoch(prep.train, cfg.schedule.batch_size, cfg.run.seed, 0,
                              cfg.schedule.max_tokens_per_batch, cost_of(cfg.compute), width_of(cfg.compute))[env.rank]
    t.model.eval()
    with torch.no_grad():
        result = policy_forward(t.model, items, prep.tokenizer.pad_token_id, cfg, t.loss)
    acc = Accumulator()
    acc.add(result)
    report_drift(acc, env, writer, cfg.cache.allow_reference_mismatch)
    t.model.train()


def report_drift(acc: Accumulator, env, writer, allow_mismatch: bool = False) -> None:
    """Step 0: before any update the policy should equal the reference. acc holds forwards made before the first
    optimizer step (step 1's own, or drift_check's); logs mean |policy - reference| of summed log-probs. Above
    DRIFT_WARN per token the run stops here (the drift row written, no step taken, nothing saved) unless
    --allow-reference-mismatch (`allow_mismatch`): then one warning. Every rank reads the same reduced drift."""
    m = acc.reduce(env)
    counts = all_reduce_sum(torch.tensor([acc.chosen_tokens + acc.rejected_tokens, 2 * acc.examples],
                                         dtype=torch.float64), env)
    per_token = m["ref_drift"] / max(float(counts[0] / counts[1]), 1.0)
    writer.write({"step": 0, "ref_drift": m["ref_drift"], "ref_drift_per_token": per_token})
    say(env, f"step 0: ref_drift {m['ref_drift']:.4g} (mean |policy - reference| of summed log-probs, "
             f"{per_token:.3g} per token)")
    if per_token > DRIFT_WARN and not allow_mismatch:
        writer.close()  # the trackers get the drift row too
        raise UserError(f"step 0: ref_drift {per_token:.3g} per token (> {DRIFT_WARN}): the policy is not the cached "
                        "reference, rewards would not start at 0; pass --allow-reference-mismatch if meant, else "
                        "rerun `dpo precompute-ref` for this policy")
    if per_token > DRIFT_WARN:
        say(env, f"WARNING: the policy differs from the cached reference before training (ref_drift {per_token:.3g} "
                 "per token). Rewards will not start at 0. Was the cache made with another base, quantization "
                 "or adapter? For NF4 training, cache with `dpo precompute-ref --load-in-4bit`.")


def train_loop(t: Trainer, at: Position, prep: Prepared, cfg: TrainConfig, env: DistEnv, writer: MetricsWriter,
               stop: StopSignal) -> None:
    """Optimizer steps at.start_step + 1 .. at.total_steps; a stop signal saves the step just done, then stops."""
    pad_id, accum, total = prep.tokenizer.pad_token_id, cfg.schedule.gradient_accumulation_steps, at.total_steps
    params = [p for p in t.model.parameters() if p.requires_grad]
    progress = Progress(env, total=total, unit="step", desc="train")
    progress.bar.update(at.start_step)
    t.model.train()
    window = Window(at.window)  # continues across a resume
    # batch
    listwise = isinstance(t.loss, ListwiseLoss)
    even = cfg.schedule.max_tokens_per_batch is None and not isinstance(prep.train[0], SetItem)
    for step, micro_batches, count in step_batches(prep.train, cfg, env, at):
        done = step + 1
        for items in micro_batches:
            # forward, loss
            result = policy_forward(t.model, items, pad_id, cfg, t.loss)
            # backward
            step_objective(result, accum, count, env.world_size, listwise, even).backward()
            window.add(result, items)
        window.steps += 1
        if step == 0 and at.drift_at_step_one:  # the step-0 row: the window (fresh at step 0) holds step 1's forwards
            report_drift(window.acc, env, writer, cfg.cache.allow_reference_mismatch)
        # clip
        grad_norm = clip(params, cfg.optim.max_grad_norm)
        # step
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        # log
        if done % cfg.schedule.logging_steps == 0 or done == total:
            elapsed, tokens = window.elapsed(), window.tokens * env.world_size
            record = {"step": done, "epoch": round(done / at.steps_per_epoch, 4),
                      **window.acc.reduce(env, per_step=window.steps),
                      "learning_rate": t.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_second": tokens / max(elapsed, 1e-9)}
            writer.write(record)
            every = cfg.schedule.logging_steps
            progress.update(done % every or every, tokens=tokens, loss=f"{record['loss']:.4f}",
                            acc=f"{record['rewards/accuracies']:.2f}")  # by the steps since the last record
            say(env, readable(record))
            window = Window()
        # eval
        if cfg.schedule.eval_steps and done % cfg.schedule.eval_steps == 0 and done < total and prep.eval:
            log_eval(t, prep, done, cfg, env, writer)
        # save
        stopping = done < total and stop.requested(env)  # a stop signal: save this step, then stop
        if (cfg.schedule.save_steps and done % cfg.schedule.save_steps == 0 and done < total) or stopping:
            saved = save_checkpoint(t, at, done, window, cfg, env)
        # stop?
        if stopping:
            progress.close()
            raise Interrupted(f"at step {done} of {total}: checkpoint in {saved}; {rerun_hint()} to continue",
                              stop.signum)
    progress.close()


def step_batches(train: list[Item | SetItem], cfg, env: DistEnv,
                 at: Position) -> Iterator[tuple[int, list[list], StepCount]]:
    """(step, this rank's micro-batches, the pairs of the whole step on all ranks) for each step still to do. The
    batch order is built once per epoch (after a resume: the epoch resumed); micro-batch m of the epoch's step k on
    rank r is batch (k·accum + m)·world + r, so every rank knows every rank's batches (and the step's pairs)."""
    accum, order_epoch, batches = cfg.schedule.gradient_accumulation_steps, None, []
    for step in range(at.start_step, at.total_steps):
        epoch, in_epoch = divmod(step, at.steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, batches = epoch, batches_for_epoch(train, cfg.schedule.batch_size, cfg.run.seed, epoch,
                                                            cfg.schedule.max_tokens_per_batch, cost_of(cfg.compute),
                                                            width_of(cfg.compute))
        first = in_epoch * accum * env.world_size
        step_items = [item for b in batches[first:first + accum * env.world_size] for item in b]
        count = StepCount(sum(len(getattr(item, "pairs", (None,))) for item in step_items), len(step_items))
        yield step, [batches[(in_epoch * accum + micro) * env.world_size + env.rank] for micro in range(accum)], count


@dataclasses.dataclass(frozen=True)
class StepCount:
    """The pairs and the examples (pair rows, or prompts) of one optimizer step, over all its micro-batches on all
    ranks (every rank knows them: the batch order is the same everywhere)."""

    pairs: int
    examples: int


def step_objective(result: PolicyPass, accum: int, count: StepCount, world_size: int, listwise: bool,
                   even: bool) -> torch.Tensor:
    """What backward takes for one micro-batch, so that a step is the mean over ALL its pairs (its prompts, for a
    listwise loss) across micro-batches and ranks (FSDP2 averages the gradients over ranks). `even`: every
    micro-batch holds --batch-size pair rows, so the micro-batch mean / accum (as always); otherwise (reply sets,
    micro-batches filled by tokens) the micro-batch's sum x world / the step's count (the same value when the
    micro-batches are even)."""
    if even:
        return result.objective / accum
    if listwise:  # the objective is the mean over the micro-batch's prompts (pair rows: each pair its own prompt)
        return result.objective * ((result.prompts or result.losses.shape[0]) * world_size / count.examples)
    return result.losses.sum() * (world_size / count.pairs)


def log_eval(t: Trainer, prep: Prepared, step: int, cfg, env, writer: MetricsWriter, label: str = "eval") -> None:
    record = {"step": step, **evaluate(t, prep.eval, prep.tokenizer.pad_token_id, cfg, env)}
    writer.write(record)
    say(env, f"{label}: " + readable(record))


def save_checkpoint(t: Trainer, at: Position, done: int, window: Window, cfg, env) -> Path:
    """Step `done`'s checkpoint, with the run's wall seconds and this rank's logging window (a resume continues it)."""
    return checkpoint.save(Path(cfg.run.output), done, t.model, t.optimizer, t.scheduler, env,
                           {"seconds": at.seconds()}, cfg.schedule.save_total_limit,
                           rank_state={"window": window.state()})


def clip(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def evaluate(t: Trainer, items: list[Item | SetItem], pad_id: int, cfg, env) -> dict:
    """The whole eval set, split across ranks; every rank runs the same number of forwards."""
    batches = [items[i:i + cfg.schedule.eval_batch_size] for i in range(0, len(items), cfg.schedule.eval_batch_size)]
    steps = math.ceil(len(batches) / env.world_size)
    acc = Accumulator()
    t.model.eval()
    with torch.no_grad():
        for k in range(steps):
            index = k * env.world_size + env.rank
            batch = batches[index] if index < len(batches) else batches[0]
            result = policy_forward(t.model, batch, pad_id, cfg, t.loss)
            if index < len(batches):
                acc.add(result)
    t.model.train()
    m = acc.reduce(env, prefix="eval/")
    m.pop("eval/ref_drift", None)
    return m


def write_summary(out: Path, cfg, steps: int, seconds: float, env, memory: dict) -> dict:
    """memory: PhaseMemory.report() (per phase, per rank); peak_memory_gb is its max over ranks and phases."""
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval/rewards/accuracies" in r]
    train = [r for r in records if "loss" in r]
    summary = {
        "steps": steps, "seconds": round(seconds, 2), "peak_memory_gb": peak_memory_gb(memory),
        "beta": cfg.loss.beta, "loss_type": cfg.loss.loss, "final_train": train[-1] if train else None,
        "final_eval": evals[-1] if evals else None,
        "best_eval": max(evals, key=lambda r: r["eval/rewards/accuracies"]) if evals else None,
        # before any update (step 0); final_train.ref_drift is the last logging window's: how far the policy moved
        "ref_drift_step0": next((r["ref_drift"] for r in records if r.get("step") == 0 and "ref_drift" in r), None),
        "memory": memory,
    }
    if env.is_main:
        fsio.write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
        say(env, memory_line(memory))
        say(env, f"done: adapter in {out / 'adapter'}, metrics in {out / 'metrics.jsonl'}, "
                 f"summary in {out / 'summary.json'}")
    return summary
