"""Stage one: `dpo precompute-ref`. Run the frozen reference ONCE over every example and write a cache.

  read + validate rows -> tokenize -> open (or resume) the parts folder -> length-sorted token-budget batches,
  split across ranks -> load the reference, shard it with FSDP2 -> score each batch (prompt shared by its
  replies) -> write a part every few batches -> rank 0 merges parts by example id (reply id) -> summary.
Pair rows are scored one [prompt|chosen|rejected] row per example; data with several replies per prompt one
[prompt | reply_1 | ... | reply_k] row per prompt, each (prompt, reply) once (stages/stage1/units.py).
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
from stages.data.encode import encode_with_report, tokenizer_fingerprint
from stages.data.encodeset import encode_sets
from stages.data.rows import ids_digest
from stages.model.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed
from stages.model.logprobs import supports_prompt_sharing
from stages.model.memory import PhaseMemory, memory_line
from stages.model.models import (
    check_model_dir,
    dtype_name,
    load_model,
    load_tokenizer,
    quantization_name,
    resolve_dtype,
)
from stages.model.rowlayout import attention_of, prepare_model
from stages.model.runguard import StopSignal, guarded_output, rerun_hint
from stages.settings import yamlconfig as config
from stages.settings.commands import PrecomputeConfig
from stages.stage1.units import PairUnits, ReplyUnits


def run(cfg: PrecomputeConfig) -> Path:
    """Stage one for settings the groups have checked (stages/settings: before anything is read)."""
    env = init_distributed()
    for note in cfg.notes:  # defaults derived from what the user gave
        say(env, f"note: {note}")
    out = Path(cfg.scoring.output)
    check_model_dir(cfg.model.model)
    loaded = cfg.data.load()  # pair rows, or reply sets and the pairs the rule derives from them
    for line in loaded.lines():
        say(env, line)
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    settings = cfg.lengths.tokenize()
    if loaded.sets is None:
        encoded, cuts = encode_with_report(tokenizer, loaded.examples, settings, cfg.data.strict)
        units = PairUnits(encoded)
    else:  # every reply of every set is scored, whatever the pair rule: one cache serves every --pairs
        encoded, cuts = encode_sets(tokenizer, loaded.sets, settings, cfg.data.strict)
        units = ReplyUnits(encoded)
    say(env, f"tokenize (--max-prompt-length {settings.max_prompt_length}, --max-length {settings.max_length}): "
             f"{cuts.summary()}")
    if not encoded:
        raise UserError(f"{', '.join(cfg.data.data)}: no usable rows after validation and truncation")
    meta = cache_metadata(cfg, tokenizer, settings, loaded, units, len(encoded), env.world_size, env.device)
    meta["truncation"] = cuts.as_meta()  # what tokenization cut and skipped (`dpo cache info` shows it)
    units, out = shards.take_shard(units, cfg.scoring, meta, out)  # --num-shards: this shard's examples, own file
    with guarded_output(out.with_name(f".{out.name}.lock"), out, "--output", env):
        base, have = open_cache_everywhere(out, meta["manifest"], cfg.scoring.overwrite, env)
        todo = units.todo(have, row_budget(cfg))
        keys = units.keys()
        left = len(set(keys) - have)
        say(env, f"cache: {len(keys) - left} of {len(keys)} {units.noun} already in {out}; {left} to go")
        stats, seconds = reference_pass(cfg, out, units, todo, tokenizer.pad_token_id, meta, env) if todo else \
            (None, 0.0)
        if env.is_main:
            finish(cfg, out, units, meta, base, stats, seconds, env)
        barrier(env)
    return out


def row_budget(cfg: PrecomputeConfig) -> int:
    """Most tokens of one [prompt | replies] row: --max-row-tokens, never above the batch budget."""
    return min(cfg.compute.max_row_tokens or cfg.scoring.max_tokens_per_batch, cfg.scoring.max_tokens_per_batch)


def open_cache_everywhere(out: Path, manifest: dict, overwrite: bool, env) -> tuple:
    """Rank 0, holding the lock: clear what a killed run left, read the finished cache (same settings: reused;
    other settings: refused), check the parts folder. Returns (finished rows on rank 0 or None, ids already
    computed) on every rank; every rank raises the same error if something is wrong. Only the ids (or the error)
    are broadcast: the finished table stays on rank 0, the one rank that merges."""
    result, base = None, None
    if env.is_main:
        try:
            refcache.clean_leftovers(out)
            layout = refcache.layout_of(manifest)
            base = refcache.finished_rows(out, manifest, overwrite)
            have = set(base.column(refcache.key_column(layout)).to_pylist()) if base is not None else set()
            if refcache.parts_dir(out).exists() or overwrite:
                have |= refcache.done_ids(refcache.open_parts(out, manifest, overwrite), layout)
            result = have
        except (UserError, OSError) as e:
            result = e
    result = broadcast_object(result if env.is_main else None, env)
    if isinstance(result, BaseException):
        raise result
    return base, result


def reference_pass(cfg, out: Path, units, todo: list, pad_id: int, meta: dict, env) -> tuple[torch.Tensor, float]:
    """Load the reference, score `todo` (units' forward units) into parts (every rank its batches). A signal stops
    after the current batch with the parts saved: Interrupted says how many examples (replies) are safe."""
    parts = refcache.parts_dir(out)
    if env.is_main:
        refcache.open_parts(out, meta["manifest"], False)
    barrier(env)
    # --pack: a batch is one sequence of its units back to back (its real tokens are its cost: no padding)
    batches = plan_batches(todo, cfg.scoring.max_tokens_per_batch, cfg.compute.share_prompt,
                           cfg.scoring.sort_by_length, units.real if cfg.compute.pack else units.cost)
    spec = cfg.model.spec()
    memory = PhaseMemory(env)  # peaks per phase, every rank: "load" (load + shard), then "score"
    model = load_model(spec, env.device, env=env, replicas=cfg.compute.replicas)  # each rank reads only its shard
    model.eval()
    attention, line = prepare_model(model, cfg.compute.attention)  # segments: the model's attention switched
    say(env, line)
    share = cfg.compute.share_prompt and (attention == "segments" or supports_prompt_sharing(model))
    meta["share_prompt"] = share  # what was used, not only asked for
    memory.end("load")
    start = time.perf_counter()
    with StopSignal() as stop:
        stats = score_batches(model, pad_id, units, batches, parts, share, cfg, env, stop)
    stats = all_reduce_sum(stats, env)
    memory.end("score")
    meta["memory"] = memory.report()  # recorded in the cache's metadata, printed at the end
    barrier(env)
    if stop.signum is not None:
        raise Interrupted(f"{len(refcache.done_ids(parts, units.layout))} {units.noun} are safe in {parts} "
                          f"({int(stats[0])} computed now, "
                          f"{sum(map(units.count, batches)) - int(stats[0])} left); {rerun_hint()} to continue",
                          stop.signum)
    return stats, time.perf_counter() - start


def finish(cfg, out: Path, units, meta: dict, base, stats, seconds: float, env) -> None:
    """Rank 0: finished rows + parts -> the cache, its settings file next to it. Safe to kill anywhere: a rerun
    ends the job without recomputing."""
    parts = refcache.parts_dir(out)
    keys = set(units.keys())
    if base is not None and not parts.exists():
        if not refcache.config_path(out).is_file():  # a kill between the cache and its settings file (old order)
            config.save(cfg, refcache.config_path(out))
        say(env, f"done: {out} already holds all {len(keys)} {units.noun}; nothing to compute")
        return
    meta["elapsed_seconds"] = round(seconds, 3)
    refcache.merge_parts(parts, out, keys, meta, cfg.scoring.store_token_logps, base,
                         write_config=lambda: config.save(cfg, refcache.config_path(out)))
    say(env, summary_line(out, len(keys), stats if stats is not None else torch.zeros(3), seconds, units.noun))
    if "memory" in meta:  # absent when nothing was left to compute (no model loaded)
        say(env, memory_line(meta["memory"]))


def cache_metadata(cfg, tokenizer, settings, loaded, units, n_encoded: int, world_size, device) -> dict:
    """What produced the numbers. `manifest` holds what must match to resume or to trust the cache; a reply
    cache's manifest (and metadata) also hold "layout": "replies"; pair caches' stay as they were."""
    tokenization = tokenizer_fingerprint(tokenizer, settings)
    dtype = dtype_name(resolve_dtype(cfg.model.dtype, device))
    manifest = {
        "model": folder_fingerprint(cfg.model.model, cfg.scoring.full_hash)["hash"],
        "adapter": (folder_fingerprint(cfg.model.adapter, cfg.scoring.full_hash) or {}).get("hash"),
        "dtype": dtype, "quantization": quantization_name(cfg.model.spec()),
        "tokenization": tokenization, "ids_digest": ids_digest(units.keys()),
        "store_token_logps": cfg.scoring.store_token_logps,
    }
    report, rows = loaded.report, loaded.sets if loaded.sets is not None else loaded.examples
    data = {"files": report.files, "rows_read": report.read, "rows_kept": report.kept, "skipped": report.skipped,
            "too_long": len(rows) - n_encoded, "examples": len(units.keys()), "ids_digest": manifest["ids_digest"]}
    layout = {}
    if units.layout != refcache.PAIRS:
        manifest["layout"] = layout["layout"] = units.layout
        data |= {"prompts": len(units.items), "replies": len(units.keys()), "pairs": loaded.pair_report.summary()}
    return {
        "format_version": refcache.FORMAT_VERSION, "tool_version": __version__, "manifest": manifest, **layout,
        "model": {"path": cfg.model.model, "config_hash": config_hash(cfg.model.model),
                  "weights": folder_fingerprint(cfg.model.model, cfg.scoring.full_hash)},
        "adapter": folder_fingerprint(cfg.model.adapter, cfg.scoring.full_hash),
        "dtype": dtype, "quantization": manifest["quantization"], "tokenization": tokenization, "data": data,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def plan_batches(todo: list, budget: int, shared: bool, sort: bool, cost=PairUnits.cost) -> list[list]:
    """Greedy token-budget batches, longest first (an out-of-memory shows at once); a lone unit always fits.
    `cost(batch, shared)`: the padded tokens of a batch (units.py)."""
    order = sorted(todo, key=lambda e: cost([e], shared), reverse=True) if sort else list(todo)
    batches: list[list] = []
    for e in order:
        if batches and cost(batches[-1] + [e], shared) <= budget:
            batches[-1].append(e)
        else:
            batches.append([e])
    return batches


def score_batches(model, pad_id, units, batches, parts, share, cfg, env, stop) -> torch.Tensor:
    """Forward this rank's batches (batches[rank::world]) under no_grad; a part file every
    `batches_per_part` batches or `part_seconds`, whichever comes first, and at a stop signal.
    Returns [examples (replies), real tokens, padded tokens] of this rank."""
    mine, world = batches[env.rank::env.world_size], env.world_size
    steps = math.ceil(len(batches) / world)  # every rank runs this many forwards (dummies pad)
    stats = torch.zeros(3, dtype=torch.float64)
    rows: list[dict] = []
    part_index, last_part = refcache.next_part_index(parts, env.rank), time.monotonic()
    store, layout = cfg.scoring.store_token_logps, units.layout
    budget = cfg.scoring.max_tokens_per_batch if cfg.compute.pack else None
    progress = Progress(env, total=sum(map(units.count, batches)), unit="ex" if layout == refcache.PAIRS else "reply",
                        desc="reference")
    dummy = mine[-1][:1] if mine else [units.dummy(pad_id)]  # the shortest unit: the cheapest forward
    # no_grad, not inference_mode: where FSDP2 shards over one process (HSDP with one GPU per replica group) its
    # unsharded parameters would become inference tensors and the second forward fails
    with torch.no_grad():
        for step in range(steps):
            batch = mine[step] if step < len(mine) else dummy  # a rank with nothing left still joins the collectives
            out = units.forward(model, batch, pad_id, cfg.compute.chunk_size, share, store, budget,
                                attention_of(model))
            done_now = batches[step * world:(step + 1) * world]  # what all ranks finished in this step
            progress.update(sum(map(units.count, done_now)), tokens=sum(units.real(b, share) for b in done_now))
            if step >= len(mine):  # dummy forward: keeps ranks in step, result discarded
                if stop.requested(env):
                    break
                continue
            rows += units.rows(batch, out, store)
            padded = units.real(batch, share) if budget else units.cost(batch, share)  # packed: no padding
            stats += torch.tensor([units.count(batch), units.real(batch, share), padded], dtype=torch.float64)
            part_due = time.monotonic() - last_part >= cfg.scoring.part_seconds
            if (step + 1) % cfg.scoring.batches_per_part == 0 or part_due:
                refcache.write_part(parts, env.rank, part_index, rows, store, layout)
                part_index, rows, last_part = part_index + 1, [], time.monotonic()
            if stop.requested(env):  # every rank sees it at the same step: the forwards stay in lockstep
                break
    refcache.write_part(parts, env.rank, part_index, rows, store, layout)
    progress.close()
    return stats


# pair rows' cost, real tokens and cache rows under their older names (benches and tests read them)
batch_cost, result_rows = PairUnits.cost, PairUnits.rows


def batch_tokens(batch, shared: bool) -> tuple[int, int]:
    """(real tokens, padded tokens) of one forward of pair rows."""
    return PairUnits.real(batch, shared), PairUnits.cost(batch, shared)


def summary_line(out: Path, n: int, stats: torch.Tensor, seconds: float, noun: str = "examples") -> str:
    examples, real, padded = stats.tolist()
    waste = 1 - real / padded if padded else 0.0
    return (f"done: {out} - {n} {noun} ({int(examples)} computed now), {int(real)} tokens in {seconds:.1f}s, "
            f"{real / max(seconds, 1e-9):.0f} tokens/s, padding waste {100 * waste:.1f}%")
