"""Stage one: `dpo precompute-ref`. Run the frozen reference ONCE over every example and write a cache.

  read + validate rows -> tokenize -> open (or resume) the parts folder -> length-sorted token-budget batches,
  split across ranks -> load the reference, shard it with FSDP2 -> score each batch (prompt shared by both
  replies) -> write a part every few batches -> rank 0 merges parts by example id -> summary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from stages import __version__
from stages.base.errors import Interrupted, UserError
from stages.base.progress import Progress, say
from stages.cache import refcache, shards
from stages.cache.fingerprint import config_hash, folder_fingerprint
from stages.data.encode import Encoded, encode_with_report, tokenizer_fingerprint
from stages.data.rows import ids_digest, load_examples
from stages.model.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed
from stages.model.logprobs import pair_logps, supports_prompt_sharing
from stages.model.memory import PhaseMemory, memory_line
from stages.model.models import (
    check_model_dir,
    dtype_name,
    load_model,
    load_tokenizer,
    quantization_name,
    resolve_dtype,
)
from stages.model.runguard import StopSignal, guarded_output, rerun_hint
from stages.settings import yamlconfig as config
from stages.settings.commands import PrecomputeConfig


def run(cfg: PrecomputeConfig) -> Path:
    """Stage one for settings the groups have checked (stages/settings: before anything is read)."""
    env = init_distributed()
    for note in cfg.notes:  # defaults derived from what the user gave
        say(env, f"note: {note}")
    out = Path(cfg.scoring.output)
    check_model_dir(cfg.model.model)
    examples, report = load_examples(cfg.data.data, cfg.data.fields(), cfg.data.strict, split=cfg.data.data_split)
    say(env, f"data: {report.summary()}")
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    settings = cfg.lengths.tokenize()
    encoded, cuts = encode_with_report(tokenizer, examples, settings, cfg.data.strict)
    say(env, f"tokenize (--max-prompt-length {settings.max_prompt_length}, --max-length {settings.max_length}): "
             f"{cuts.summary()}")
    if not encoded:
        raise UserError(f"{', '.join(cfg.data.data)}: no usable rows after validation and truncation")
    meta = cache_metadata(cfg, tokenizer, settings, examples, encoded, report, env.world_size, env.device)
    meta["truncation"] = cuts.as_meta()  # what tokenization cut and skipped (`dpo cache info` shows it)
    encoded, out = shards.take_shard(encoded, cfg.scoring, meta, out)  # --num-shards: this shard's examples, own file
    with guarded_output(out.with_name(f".{out.name}.lock"), out, "--output", env):
        base, have = open_cache_everywhere(out, meta["manifest"], cfg.scoring.overwrite, env)
        todo = [e for e in encoded if e.example_id not in have]
        say(env, f"cache: {len(encoded) - len(todo)} of {len(encoded)} examples already in {out}; {len(todo)} to go")
        stats, seconds = reference_pass(cfg, out, todo, tokenizer.pad_token_id, meta, env) if todo else (None, 0.0)
        if env.is_main:
            finish(cfg, out, encoded, meta, base, stats, seconds, env)
        barrier(env)
    return out


def open_cache_everywhere(out: Path, manifest: dict, overwrite: bool, env) -> tuple:
    """Rank 0, holding the lock: clear what a killed run left, read the finished cache (same settings: reused;
    other settings: refused), check the parts folder. Returns (finished rows on rank 0 or None, ids already
    computed) on every rank; every rank raises the same error if something is wrong. Only the ids (or the error)
    are broadcast: the finished table stays on rank 0, the one rank that merges."""
    result, base = None, None
    if env.is_main:
        try:
            refcache.clean_leftovers(out)
            base = refcache.finished_rows(out, manifest, overwrite)
            have = set(base.column("example_id").to_pylist()) if base is not None else set()
            if refcache.parts_dir(out).exists() or overwrite:
                have |= refcache.done_ids(refcache.open_parts(out, manifest, overwrite))
            result = have
        except (UserError, OSError) as e:
            result = e
    result = broadcast_object(result if env.is_main else None, env)
    if isinstance(result, BaseException):
        raise result
    return base, result


def reference_pass(cfg, out: Path, todo: list[Encoded], pad_id: int, meta: dict, env) -> tuple[torch.Tensor, float]:
    """Load the reference, score `todo` into parts (every rank its batches). A signal stops after the current
    batch with the parts saved: Interrupted says how many examples are safe."""
    parts = refcache.parts_dir(out)
    if env.is_main:
        refcache.open_parts(out, meta["manifest"], False)
    barrier(env)
    batches = plan_batches(todo, cfg.scoring.max_tokens_per_batch, cfg.compute.share_prompt,
                           cfg.scoring.sort_by_length)
    spec = cfg.model.spec()
    memory = PhaseMemory(env)  # peaks per phase, every rank: "load" (load + shard), then "score"
    model = load_model(spec, env.device, env=env, replicas=cfg.compute.replicas)  # each rank reads only its shard
    model.eval()
    share = cfg.compute.share_prompt and supports_prompt_sharing(model)
    meta["share_prompt"] = share  # what was used, not only asked for
    memory.end("load")
    start = time.perf_counter()
    with StopSignal() as stop:
        stats = score_batches(model, pad_id, batches, parts, share, cfg, env, stop)
    stats = all_reduce_sum(stats, env)
    memory.end("score")
    meta["memory"] = memory.report()  # recorded in the cache's metadata, printed at the end
    barrier(env)
    if stop.signum is not None:
        raise Interrupted(f"{len(refcache.done_ids(parts))} examples are safe in {parts} "
                          f"({int(stats[0])} computed now, "
                          f"{len(todo) - int(stats[0])} left); {rerun_hint()} to continue", stop.signum)
    return stats, time.perf_counter() - start


def finish(cfg, out: Path, encoded: list[Encoded], meta: dict, base, stats, seconds: float, env) -> None:
    """Rank 0: finished rows + parts -> the cache, its settings file next to it. Safe to kill anywhere: a rerun
    ends the job without recomputing."""
    parts = refcache.parts_dir(out)
    if base is not None and not parts.exists():
        if not refcache.config_path(out).is_file():  # a kill between the cache and its settings file (old order)
            config.save(cfg, refcache.config_path(out))
        say(env, f"done: {out} already holds all {len(encoded)} examples; nothing to compute")
        return
    meta["elapsed_seconds"] = round(seconds, 3)
    refcache.merge_parts(parts, out, {e.example_id for e in encoded}, meta, cfg.scoring.store_token_logps, base,
                         write_config=lambda: config.save(cfg, refcache.config_path(out)))
    say(env, summary_line(out, len(encoded), stats if stats is not None else torch.zeros(3), seconds))
    if "memory" in meta:  # absent when nothing was left to compute (no model loaded)
        say(env, memory_line(meta["memory"]))


def cache_metadata(cfg, tokenizer, settings, examples, encoded, report, world_size, device) -> dict:
    """What produced the numbers. `manifest` holds what must match to resume or to trust the cache."""
    tokenization = tokenizer_fingerprint(tokenizer, settings)
    dtype = dtype_name(resolve_dtype(cfg.model.dtype, device))
    manifest = {
        "model": folder_fingerprint(cfg.model.model, cfg.scoring.full_hash)["hash"],
        "adapter": (folder_fingerprint(cfg.model.adapter, cfg.scoring.full_hash) or {}).get("hash"),
        "dtype": dtype, "quantization": quantization_name(cfg.model.spec()),
        "tokenization": tokenization, "ids_digest": ids_digest(e.example_id for e in encoded),
        "store_token_logps": cfg.scoring.store_token_logps,
    }
    return {
        "format_version": refcache.FORMAT_VERSION, "tool_version": __version__, "manifest": manifest,
        "model": {"path": cfg.model.model, "config_hash": config_hash(cfg.model.model),
                  "weights": folder_fingerprint(cfg.model.model, cfg.scoring.full_hash)},
        "adapter": folder_fingerprint(cfg.model.adapter, cfg.scoring.full_hash),
        "dtype": dtype, "quantization": manifest["quantization"], "tokenization": tokenization,
        "data": {"files": report.files, "rows_read": report.read, "rows_kept": report.kept,
                 "skipped": report.skipped, "too_long": len(examples) - len(encoded),
                 "examples": len(encoded), "ids_digest": manifest["ids_digest"]},
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def batch_cost(batch: list[Encoded], shared: bool) -> int:
    """Padded tokens a forward pays: [prompt|chosen|rejected] rows when shared, else 2B rows of prompt+reply."""
    if shared:
        return len(batch) * max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in batch)
    return 2 * len(batch) * max(e.length for e in batch)


def plan_batches(todo: list[Encoded], budget: int, shared: bool, sort: bool) -> list[list[Encoded]]:
    """Greedy token-budget batches, longest first (an out-of-memory shows at once); a lone example always fits."""
    order = sorted(todo, key=lambda e: batch_cost([e], shared), reverse=True) if sort else list(todo)
    batches: list[list[Encoded]] = []
    for e in order:
        if batches and batch_cost(batches[-1] + [e], shared) <= budget:
            batches[-1].append(e)
        else:
            batches.append([e])
    return batches


def score_batches(model, pad_id, batches, parts, share, cfg, env, stop) -> torch.Tensor:
    """Forward this rank's batches (batches[rank::world]) under no_grad; a part file every
    `batches_per_part` batches or `part_seconds`, whichever comes first, and at a stop signal.
    Returns [examples, real tokens, padded tokens] of this rank."""
    mine, world = batches[env.rank::env.world_size], env.world_size
    steps = math.ceil(len(batches) / world)  # every rank runs this many forwards (dummies pad)
    stats = torch.zeros(3, dtype=torch.float64)
    rows: list[dict] = []
    part_index, last_part = refcache.next_part_index(parts, env.rank), time.monotonic()
    progress = Progress(env, total=sum(map(len, batches)), unit="ex", desc="reference")
    dummy = mine[-1][:1] if mine else None  # the shortest example: the cheapest forward
    # no_grad, not inference_mode: where FSDP2 shards over one process (HSDP with one GPU per replica group) its
    # unsharded parameters would become inference tensors and the second forward fails
    with torch.no_grad():
        for step in range(steps):
            batch = mine[step] if step < len(mine) else (dummy or [])
            if not batch:  # a rank with no examples at all still has to join the collectives
                batch = [Encoded("dummy", (pad_id,), (pad_id,), (pad_id,))]
            out = pair_logps(model, batch, pad_id, cfg.compute.chunk_size, share=share,
                             token_logps=cfg.scoring.store_token_logps)
            done_now = batches[step * world:(step + 1) * world]  # what all ranks finished in this step
            progress.update(sum(map(len, done_now)), tokens=sum(batch_tokens(b, share)[0] for b in done_now))
            if step >= len(mine):  # dummy forward: keeps ranks in step, result discarded
                if stop.requested(env):
                    break
                continue
            rows += result_rows(batch, out, cfg.scoring.store_token_logps)
            real, padded = batch_tokens(batch, share)
            stats += torch.tensor([len(batch), real, padded], dtype=torch.float64)
            part_due = time.monotonic() - last_part >= cfg.scoring.part_seconds
            if (step + 1) % cfg.scoring.batches_per_part == 0 or part_due:
                refcache.write_part(parts, env.rank, part_index, rows, cfg.scoring.store_token_logps)
                part_index, rows, last_part = part_index + 1, [], time.monotonic()
            if stop.requested(env):  # every rank sees it at the same step: the forwards stay in lockstep
                break
    refcache.write_part(parts, env.rank, part_index, rows, cfg.scoring.store_token_logps)
    progress.close()
    return stats


def batch_tokens(batch: list[Encoded], shared: bool) -> tuple[int, int]:
    """(real tokens, padded tokens) of one forward."""
    if shared:
        real = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in batch)
    else:
        real = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in batch)
    return real, batch_cost(batch, shared)


def result_rows(batch: list[Encoded], out, store_token_logps: bool) -> list[dict]:
    """The batch's cache rows from ONE device->host copy: sums, token counts (and the per-token log-probs) are
    concatenated on the device as float64 (exact for fp32 values and integer counts), copied once, then split."""
    n = len(batch)
    tokens = list(out.token_logps) if store_token_logps else []  # 2B [tokens] vectors: chosen, then rejected
    columns = [out.chosen_logps, out.rejected_logps, out.chosen_tokens, out.rejected_tokens, *tokens]
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in columns]).cpu().tolist()
    chosen, rejected, chosen_tokens, rejected_tokens = (flat[k * n:(k + 1) * n] for k in range(4))
    per_token, at = [], 4 * n
    for t in tokens:
        per_token.append(flat[at:at + t.shape[0]])
        at += t.shape[0]
    rows = []
    for i, e in enumerate(batch):
        row = {
            "example_id": e.example_id, "ref_chosen_logps": chosen[i], "ref_rejected_logps": rejected[i],
            "chosen_tokens": int(chosen_tokens[i]), "rejected_tokens": int(rejected_tokens[i]),
            "prompt_tokens": len(e.prompt_ids),
        }
        if store_token_logps:
            row["ref_chosen_token_logps"] = per_token[i]
            row["ref_rejected_token_logps"] = per_token[n + i]
        rows.append(row)
    return rows


def summary_line(out: Path, n: int, stats: torch.Tensor, seconds: float) -> str:
    examples, real, padded = stats.tolist()
    waste = 1 - real / padded if padded else 0.0
    return (f"done: {out} - {n} examples ({int(examples)} computed now), {int(real)} tokens in {seconds:.1f}s, "
            f"{real / max(seconds, 1e-9):.0f} tokens/s, padding waste {100 * waste:.1f}%")
