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
from pathlib import Path

import torch

from stages.base import fsio
from stages.base.errors import Interrupted, UserError
from stages.base.progress import Progress, say
from stages.base.runguard import StopSignal, guarded_output, rerun_hint
from stages.model.distributed import DistEnv, all_reduce_sum, init_distributed, launched_world_size
from stages.model.logprobs import LogpOutput, pair_logps
from stages.model.memory import PhaseMemory, memory_line, peak_memory_gb
from stages.model.models import LoraSettings, ModelSpec, dtype_name, load_policy, resolve_dtype
from stages.objective.loss import LossOutput, LossSettings, dpo_loss
from stages.settings import yamlconfig as config
from stages.settings.commands import TrainConfig
from stages.stage2 import checkpoint
from stages.stage2.metrics import Accumulator, MetricsWriter, read_metrics, readable
from stages.stage2.prepare import Item, Prepared, prepare
from stages.stage2.resume import check_resumable, resume_or_start
from stages.stage2.trackers import check_installed, parse_report_to
from stages.stage2.trainutil import (
    SCHEDULERS,
    batches_for_epoch,
    build_optimizer,
    build_scheduler,
    check_optimizer,
    seed_everything,
)

DRIFT_WARN = 0.05  # mean |policy - ref| per token above this at step 0 means rewards will not start at 0


def run(cfg: TrainConfig, prepared: Prepared | None = None) -> dict:
    """Train one policy; returns the summary. A sweep passes `prepared` so the data and cache are read once."""
    check(cfg)
    env = init_distributed()
    out = Path(cfg.output)
    if (out / "summary.json").is_file() and cfg.resume:
        say(env, f"{out}: already finished (summary.json exists); nothing to do")
        return checkpoint_summary(out)
    with guarded_output(out / ".lock", out, "--output", env), StopSignal() as stop:
        if env.is_main:
            fsio.remove_stale_temporaries(out)  # what a killed run left: checkpoint/summary/metrics temporaries
        return train_run(cfg, prepared, env, out, stop)


def train_run(cfg: TrainConfig, prepared: Prepared | None, env: DistEnv, out: Path, stop: StopSignal) -> dict:
    """The run itself, holding the output folder's lock."""
    check_resumable(cfg, out)  # before any model loads
    prep = prepared or prepare(cfg)
    for note in prep.notes:
        say(env, note)
    seed_everything(cfg.seed)
    total_steps, steps_per_epoch = plan_steps(cfg, len(prep.train), env)
    spec = policy_spec(cfg, prep.cache_meta, env)
    memory = PhaseMemory(env)  # peaks per phase, every rank: "load" (load + shard), then "train"
    model = load_policy(spec, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
                        env.device, cfg.gradient_checkpointing, env=env, replicas=cfg.replicas)  # sharded load
    memory.end("load")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    start_step, prior_seconds, window = resume_or_start(cfg, out, model, optimizer, scheduler, env)
    if env.is_main:
        config.save(cfg, out / "config.yaml")
    writer = MetricsWriter(out / "metrics.jsonl", env, parse_report_to(cfg.report_to, cfg.tensorboard),
                           config=config.to_dict(cfg))
    if start_step == 0 and spec.adapter is not None:  # from an adapter: its dropout would perturb step 1
        drift_check(model, prep, cfg, env, writer)
    started = time.perf_counter()
    clock = lambda: prior_seconds + time.perf_counter() - started  # noqa: E731  (wall time across resumes)
    train_loop(model, optimizer, scheduler, prep, cfg, env, writer, start_step, total_steps, steps_per_epoch, clock,
               window, stop, drift_from_step_one=start_step == 0 and spec.adapter is None)
    logged = any("eval/loss" in r and r["step"] == total_steps for r in read_metrics(out / "metrics.jsonl"))
    final = evaluate(model, prep.eval, prep.tokenizer.pad_token_id, cfg, env) if prep.eval and not logged else {}
    if final:
        writer.write({"step": total_steps, **final})
        say(env, "final eval: " + readable({"step": total_steps, **final}))
    checkpoint.save(out, total_steps, model, optimizer, scheduler, env, {"seconds": clock()}, cfg.save_total_limit)
    checkpoint.save_adapter(model, out / "adapter", env)
    memory.end("train")
    summary = write_summary(out, cfg, total_steps, clock(), env, memory.report())
    writer.close()
    return summary


def check(cfg: TrainConfig) -> None:
    LossSettings.of(cfg).check()  # loss names, β, ε, f-divergence, WPO, LD: before any data or model is read
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise UserError("set --max-steps N or --epochs E (> 0)")
    if cfg.batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise UserError("--batch-size and --gradient-accumulation-steps must be >= 1")
    check_installed(parse_report_to(cfg.report_to, cfg.tensorboard))  # a missing tracker package: before any model
    check_numbers(cfg)


# (field, lowest allowed, inclusive?) for every number a run would otherwise accept and then fail on, much later
_RANGES = (("lora_r", 1, True), ("lora_alpha", 0, False), ("lora_dropout", 0, True), ("learning_rate", 0, False),
           ("warmup_ratio", 0, True), ("weight_decay", 0, True), ("eval_batch_size", 1, True),
           ("max_grad_norm", 0, True), ("logging_steps", 1, True), ("eval_steps", 0, True), ("save_steps", 0, True),
           ("save_total_limit", 0, True), ("max_length", 1, True), ("max_prompt_length", 1, True),
           ("chunk_size", 1, True), ("replicas", 1, True))


def check_numbers(cfg) -> None:
    """Ranges, choices and cross-field rules, before anything is read, written or loaded."""
    for name, low, inclusive in _RANGES:
        value = getattr(cfg, name, None)
        if value is not None and not (value >= low if inclusive else value > low):
            raise UserError(f"--{name.replace('_', '-')} {value}: must be {'>=' if inclusive else '>'} {low}")
    if cfg.lora_dropout >= 1 or cfg.warmup_ratio > 1:
        raise UserError("--lora-dropout must be below 1 and --warmup-ratio at most 1")
    if cfg.max_length is not None and cfg.max_prompt_length is not None and cfg.max_prompt_length > cfg.max_length:
        raise UserError(f"--max-prompt-length {cfg.max_prompt_length} cannot exceed --max-length {cfg.max_length}")
    for name, value, allowed in (("lr-scheduler", cfg.lr_scheduler, SCHEDULERS),
                                 ("dtype", cfg.dtype, (None, "auto", "fp32", "bf16", "fp16"))):
        if value not in allowed:
            raise UserError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    check_optimizer(cfg.optimizer, launched_world_size())  # torchrun's WORLD_SIZE: FSDP2 takes torch AdamW only


def policy_spec(cfg: TrainConfig, meta: dict, env: DistEnv) -> ModelSpec:
    """The policy's base loaded as the cache's reference was (quantization, dtype, SFT adapter) unless a flag says
    otherwise: then the policy at step 0 is not the reference and rewards do not start at 0 (said in one line)."""
    cached = {"load_in_4bit": meta["quantization"] != "none", "dtype": meta["dtype"],
              "adapter": (meta.get("adapter") or {}).get("path")}
    given = {"load_in_4bit": cfg.load_in_4bit, "dtype": cfg.dtype, "adapter": cfg.adapter}
    spec = {k: cached[k] if v is None else v for k, v in given.items()}
    now = {**spec, "dtype": dtype_name(resolve_dtype(spec["dtype"], env.device)),
           "adapter": str(Path(spec["adapter"]).resolve()) if spec["adapter"] else None}
    contrary = [k for k in given if given[k] is not None and now[k] != cached[k]]
    say(env, f"model: {'NF4' if now['load_in_4bit'] else now['dtype']} base, adapter {spec['adapter'] or 'none'} "
             f"({'as the cache' if not contrary else 'cache differs in ' + ', '.join(contrary)})")
    if contrary:
        say(env, f"note: --{contrary[0].replace('_', '-')} {given[contrary[0]]} differs from the cache's reference "
                 f"({cached[contrary[0]]}): the policy starts away from it and rewards will not start at 0")
    return ModelSpec(cfg.model, spec["dtype"], spec["load_in_4bit"], spec["adapter"], cfg.trust_remote_code)


def plan_steps(cfg: TrainConfig, n_train: int, env: DistEnv) -> tuple[int, int]:
    """Optimizer steps: each takes batch_size x accumulation x world_size examples."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * env.world_size
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{n_train} training examples are fewer than one optimizer step needs ({per_step} = "
                        "batch size x accumulation x processes); lower --batch-size")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return total, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class PolicyPass:
    """What one policy forward gives the metrics: losses [B], the policy's log-probs (LD-DPO sums in chosen/rejected
    with --ld-alpha), the loss head's output and the cached reference values [B] (float64, CPU)."""

    losses: torch.Tensor
    logps: LogpOutput
    loss: LossOutput
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def policy_forward(model, items: list[Item], pad_id: int, cfg: TrainConfig) -> PolicyPass:
    """One forward (chosen + rejected) -> per-example DPO losses against the cached reference.
    With --ld-alpha the loss, rewards, logps/* and drift use the LD-DPO sums on both sides (as TRL logs them);
    the sft terms use the plain sums. With --use-weighting the head also returns the WPO sums."""
    lp = pair_logps(model, [i.enc for i in items], pad_id, cfg.chunk_size, share=cfg.share_prompt,
                    ld_alpha=cfg.ld_alpha, wpo=cfg.use_weighting)
    plain_chosen = lp.chosen_logps
    if cfg.ld_alpha is not None:
        lp = dataclasses.replace(lp, chosen_logps=lp.chosen_ld_logps, rejected_logps=lp.rejected_ld_logps)
    ref_c = torch.tensor([i.ref_chosen for i in items], dtype=torch.float64)  # on the host: the metrics read them
    ref_r = torch.tensor([i.ref_rejected for i in items], dtype=torch.float64)
    device = lp.chosen_logps.device
    out = dpo_loss(lp.chosen_logps, lp.rejected_logps, ref_c.to(device), ref_r.to(device),
                   **LossSettings.of(cfg).loss_kwargs(),
                   chosen_tokens=lp.chosen_tokens, rejected_tokens=lp.rejected_tokens, chosen_sft_logps=plain_chosen,
                   chosen_wpo_logps=lp.chosen_wpo_logps, rejected_wpo_logps=lp.rejected_wpo_logps)
    return PolicyPass(out.losses, lp, out, ref_c, ref_r)


def drift_check(model, prep: Prepared, cfg, env, writer) -> None:
    """An extra no-grad eval-mode pass on the first batch, only when the policy starts from a trained adapter (its
    LoRA dropout would add noise to the first step's own forward); a fresh LoRA reads the drift from step 1."""
    items = batches_for_epoch(prep.train, cfg.batch_size, cfg.seed, 0)[env.rank]
    model.eval()
    with torch.no_grad():
        result = policy_forward(model, items, prep.tokenizer.pad_token_id, cfg)
    acc = Accumulator()
    acc.add(result)
    report_drift(acc, env, writer)
    model.train()


def report_drift(acc: Accumulator, env, writer) -> None:
    """Step 0: before any update the policy should equal the reference. acc holds forwards made before the first
    optimizer step (step 1's own, or drift_check's); logs mean |policy - reference| of summed log-probs."""
    m = acc.reduce(env)
    counts = all_reduce_sum(torch.tensor([acc.chosen_tokens + acc.rejected_tokens, 2 * acc.examples],
                                         dtype=torch.float64), env)
    per_token = m["ref_drift"] / max(float(counts[0] / counts[1]), 1.0)
    writer.write({"step": 0, "ref_drift": m["ref_drift"], "ref_drift_per_token": per_token})
    say(env, f"step 0: ref_drift {m['ref_drift']:.4g} (mean |policy - reference| of summed log-probs, "
             f"{per_token:.3g} per token)")
    if per_token > DRIFT_WARN:
        say(env, f"WARNING: the policy differs from the cached reference before training (ref_drift {per_token:.3g} "
                 "per token). Rewards will not start at 0. Was the cache made with another base, quantization "
                 "or adapter? For NF4 training, cache with `dpo precompute-ref --load-in-4bit`.")


def train_loop(model, optimizer, scheduler, prep, cfg, env, writer, start_step, total_steps, steps_per_epoch, clock,
               window: dict, stop: StopSignal, drift_from_step_one: bool):
    pad_id, accum, world = prep.tokenizer.pad_token_id, cfg.gradient_accumulation_steps, env.world_size
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(env, total=total_steps, unit="step", desc="train")
    progress.bar.update(start_step)
    model.train()
    # the logging window (sums since the last record) continues across a resume
    acc, window_tokens = Accumulator.from_state(window.get("acc")), window.get("tokens", 0)
    window_start = time.perf_counter() - window.get("elapsed", 0.0)
    order_epoch, batches = None, []  # the batch order is built once per epoch (after a resume: the epoch resumed)
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, batches = epoch, batches_for_epoch(prep.train, cfg.batch_size, cfg.seed, epoch)
        first = Accumulator() if step == 0 and drift_from_step_one else None  # step 1's forwards = the reference
        for micro in range(accum):
            items = batches[(in_epoch * accum + micro) * world + env.rank]
            result = policy_forward(model, items, pad_id, cfg)
            (result.losses.mean() / accum).backward()
            for a in (acc, first) if first is not None else (acc,):
                a.add(result)
            window_tokens += sum(i.enc.length * 2 for i in items)
        if first is not None:
            report_drift(first, env, writer)
        grad_norm = clip(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "epoch": round(done / steps_per_epoch, 4), **acc.reduce(env),
                      "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_second": window_tokens * world / max(elapsed, 1e-9)}
            writer.write(record)
            progress.update(cfg.logging_steps if done % cfg.logging_steps == 0 else done % cfg.logging_steps,
                            tokens=window_tokens * world, loss=f"{record['loss']:.4f}",
                            acc=f"{record['rewards/accuracies']:.2f}")
            say(env, readable(record))
            acc, window_tokens, window_start = Accumulator(), 0, time.perf_counter()
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done < total_steps and prep.eval:
            record = {"step": done, **evaluate(model, prep.eval, pad_id, cfg, env)}
            writer.write(record)
            say(env, "eval: " + readable(record))
        stopping = done < total_steps and stop.requested(env)  # SIGTERM/SIGINT: save this step, then stop
        if (cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps) or stopping:
            window = {"acc": acc.state(), "tokens": window_tokens, "elapsed": time.perf_counter() - window_start}
            saved = checkpoint.save(Path(cfg.output), done, model, optimizer, scheduler, env, {"seconds": clock()},
                                    cfg.save_total_limit, rank_state={"window": window})
        if stopping:
            progress.close()
            raise Interrupted(f"at step {done} of {total_steps}: checkpoint in {saved}; {rerun_hint()} to continue",
                              stop.signum)
    progress.close()


def clip(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def evaluate(model, items: list[Item], pad_id: int, cfg, env) -> dict:
    """The whole eval set, split across ranks; every rank runs the same number of forwards."""
    batches = [items[i:i + cfg.eval_batch_size] for i in range(0, len(items), cfg.eval_batch_size)]
    steps = math.ceil(len(batches) / env.world_size)
    acc = Accumulator()
    model.eval()
    with torch.no_grad():
        for k in range(steps):
            index = k * env.world_size + env.rank
            batch = batches[index] if index < len(batches) else batches[0]
            result = policy_forward(model, batch, pad_id, cfg)
            if index < len(batches):
                acc.add(result)
    model.train()
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
        "beta": cfg.beta, "loss_type": cfg.loss, "final_train": train[-1] if train else None,
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


def checkpoint_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())
