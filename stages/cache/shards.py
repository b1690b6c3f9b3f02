"""Stage one as N independent shard jobs, and `dpo cache merge` of their caches into one.

Split rule (deterministic, independent of file and row order): every encoded example costs its shared-row tokens
(prompt + chosen + rejected; a prompt with many replies: its whole row, and all its replies stay in one shard);
examples are taken by cost descending, ties by content id (prompt id), and each goes to the
shard with the fewest tokens so far (ties: lowest index). Each id lands in exactly one shard; the greedy
"largest first" rule leaves the shards within one longest example of each other, i.e. within a few percent as
soon as a shard holds a few hundred examples.

A shard job is an ordinary `dpo precompute-ref` run (torchrun + FSDP2, resumable, locked) over its slice, writing
`<out stem>.shard-<I>-of-<N><suffix>`. Its metadata records `shard` = {index, num_shards, examples, tokens,
ids_digest (its slice), all_ids_digest, all_examples}; its manifest additionally holds {index, num_shards} so a
parts folder of one shard is never resumed as another. The merge checks everything a single job would have
guaranteed and writes one cache whose manifest equals the single job's.
"""

from __future__ import annotations

import heapq
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.base.errors import UserError
from stages.cache import refcache
from stages.data.encode import Encoded
from stages.data.replyset import EncodedSet
from stages.data.rows import ids_digest

INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")  # Slurm job array, Kubernetes Indexed Job


def example_tokens(e: Encoded | EncodedSet) -> int:
    """What a shard pays for an example: its [prompt|chosen|rejected] row (the default shared layout), or a
    prompt's [prompt | reply_1 | ... | reply_K] row."""
    if isinstance(e, EncodedSet):
        return e.length
    return len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)


def _key(e: Encoded | EncodedSet) -> str:
    return e.prompt_id if isinstance(e, EncodedSet) else e.example_id


def assign_shards(encoded: list, num_shards: int) -> list[list]:
    """Longest-first greedy split by tokens; see the module docstring. Returns one list per shard, each in
    the order the examples were given (so the stage's own batching is unchanged)."""
    order = sorted(encoded, key=lambda e: (-example_tokens(e), _key(e)))
    heap = [(0, i) for i in range(num_shards)]  # (tokens so far, shard index)
    owner: dict[str, int] = {}
    for e in order:
        tokens, i = heapq.heappop(heap)
        owner[_key(e)] = i
        heapq.heappush(heap, (tokens + example_tokens(e), i))
    shards: list[list] = [[] for _ in range(num_shards)]
    for e in encoded:
        shards[owner[_key(e)]].append(e)
    return shards


def resolve_index(value: str | int, num_shards: int, environ=os.environ) -> int:
    """--shard-index: a number, or `auto` = the scheduler's array index (Slurm: SLURM_ARRAY_TASK_ID minus
    SLURM_ARRAY_TASK_MIN; Kubernetes Indexed Job: JOB_COMPLETION_INDEX)."""
    text = str(value).strip()
    source = "--shard-index"
    if text == "auto":
        var = next((v for v in INDEX_VARIABLES if environ.get(v, "").strip()), None)
        if var is None:
            raise UserError("--shard-index auto: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set; "
                            "run inside a Slurm job array / Kubernetes Indexed Job, or pass the index")
        text, source = environ[var].strip(), var
        if var == "SLURM_ARRAY_TASK_ID":
            count = environ.get("SLURM_ARRAY_TASK_COUNT", "").strip()
            if count.isdigit() and int(count) != num_shards:
                raise UserError(f"SLURM_ARRAY_TASK_COUNT={count} but --num-shards {num_shards}; submit the array "
                                f"with --array=0-{num_shards - 1}")
            minimum = environ.get("SLURM_ARRAY_TASK_MIN", "0").strip() or "0"
            if text.isdigit() and minimum.isdigit():
                text = str(int(text) - int(minimum))
    if not text.lstrip("-").isdigit():
        raise UserError(f"{source}: {value!r} is not a shard index; give a number 0..{num_shards - 1} or auto")
    index = int(text)
    if not 0 <= index < num_shards:
        raise UserError(f"{source} gives shard index {index}, outside 0..{num_shards - 1} (--num-shards {num_shards})")
    return index


def shard_path(out: Path, index: int, num_shards: int) -> Path:
    """cache/ref.parquet -> cache/ref.shard-2-of-4.parquet"""
    return out.with_name(f"{out.stem}.shard-{index}-of-{num_shards}{out.suffix}")


def take_shard(units, cfg, meta: dict, out: Path):
    """Stage one's one call: with --num-shards N > 1, keep only shard I's examples (prompts, with all their replies)
    of `units` (stages/stage1/units.py), record the shard in `meta` (and its manifest) and return the shard's units
    and own output file. N == 1 changes nothing."""
    if cfg.num_shards == 1:  # the settings checked --num-shards and --shard-index (Scoring.check)
        return units, out
    index = resolve_index(cfg.shard_index, cfg.num_shards)
    mine = type(units)(assign_shards(units.items, cfg.num_shards)[index])
    if not mine.items:
        raise UserError(f"shard {index} of {cfg.num_shards} has no examples ({len(units.items)} in all); "
                        f"use a smaller --num-shards")
    meta["manifest"]["shard"] = {"index": index, "num_shards": cfg.num_shards}
    meta["shard"] = {"index": index, "num_shards": cfg.num_shards, "examples": len(mine.keys()),
                     "tokens": sum(example_tokens(e) for e in mine.items), "ids_digest": ids_digest(mine.keys()),
                     "all_examples": len(units.keys()), "all_ids_digest": meta["manifest"]["ids_digest"]}
    return mine, shard_path(out, index, cfg.num_shards)


# --------------------------------------------------------------------------------------------------- merge
def _shard_metas(paths: list[str]) -> list[dict]:
    metas = [refcache.read_meta(p) for p in paths]
    for p, m in zip(paths, metas):
        if "shard" not in m:
            raise UserError(f"{p}: not a shard cache (made without --num-shards); merge takes the shard files only")
    n = metas[0]["shard"]["num_shards"]
    for p, m in zip(paths, metas):
        if m["shard"]["num_shards"] != n:
            raise UserError(f"{p}: shard of {m['shard']['num_shards']}, but {Path(paths[0]).name} is a shard of "
                            f"{n}; merge the shards of one --num-shards run")
    base = _unsharded(metas[0]["manifest"])
    for p, m in zip(paths[1:], metas[1:]):
        diff = refcache._differences(base, _unsharded(m["manifest"]))
        if diff:
            raise UserError(f"{p}: other settings than {Path(paths[0]).name} ({'; '.join(diff)[:80]}); "
                            f"rerun it with the same settings")
    seen: dict[int, str] = {}
    for p, m in zip(paths, metas):
        i = m["shard"]["index"]
        if i in seen:
            raise UserError(f"shard {i} of {n} given twice ({Path(seen[i]).name}, {p}); pass each shard file once")
        seen[i] = p
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise UserError(f"shard {missing[0]} of {n} is missing ({len(missing)} missing in all); run it "
                        f"(--shard-index {missing[0]}) and pass its file too")
    return metas


def _unsharded(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "shard"}


def _read_checked(path: str, meta: dict) -> pa.Table:
    table = pq.read_table(path).replace_schema_metadata(None)
    ids = table.column(refcache.key_column(refcache.layout_of(meta))).to_pylist()
    if ids_digest(ids) != meta["shard"]["ids_digest"] or len(ids) != len(set(ids)):
        raise UserError(f"{path}: its rows are not the slice its metadata records (edited or truncated); "
                        f"rerun that shard with --overwrite")
    return table


def merge_shards(paths: list[str], out: str | Path) -> dict:
    """Check the shards (one run's settings, every index once, no id twice, union = all ids) and write one
    cache, sorted by id, atomically. Returns the merged metadata."""
    if not paths:
        raise UserError("dpo cache merge: give the shard files (e.g. cache/ref.shard-*-of-4.parquet)")
    metas = _shard_metas(list(paths))
    tables = [_read_checked(p, m) for p, m in zip(paths, metas)]
    owner: dict[str, str] = {}
    key = refcache.key_column(refcache.layout_of(metas[0]))
    for p, t in zip(paths, tables):
        for i in t.column(key).to_pylist():
            if i in owner:
                raise UserError(f"example {i} is in both {Path(owner[i]).name} and {Path(p).name}; shards must "
                                f"not overlap - rerun them with one data set and settings")
            owner[i] = p
    all_digest = metas[0]["manifest"]["ids_digest"]
    if ids_digest(owner) != all_digest:
        raise UserError(f"the {len(paths)} shards hold {len(owner)} examples, not the "
                        f"{metas[0]['shard']['all_examples']} of the data (ids digest differs); rerun the shards from "
                        "the same data")
    merged = pa.concat_tables(tables).sort_by(key)
    meta = merged_metadata(paths, metas)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    refcache.write_atomic(merged, out, meta)
    return meta


def merged_metadata(paths: list[str], metas: list[dict]) -> dict:
    """Shard 0's metadata with the shard taken out (so the manifest equals a single job's) and `merged_from`."""
    by_index = sorted(zip(paths, metas), key=lambda pm: pm[1]["shard"]["index"])
    meta = {k: v for k, v in by_index[0][1].items() if k not in ("shard", "elapsed_seconds", "world_size")}
    meta["manifest"] = _unsharded(meta["manifest"])
    meta["merged_from"] = {
        "num_shards": len(metas),
        "shards": [{"file": Path(p).name, "index": m["shard"]["index"], "examples": m["shard"]["examples"],
                    "tokens": m["shard"]["tokens"], "ids_digest": m["shard"]["ids_digest"],
                    "world_size": m.get("world_size"), "elapsed_seconds": m.get("elapsed_seconds"),
                    "created": m.get("created")} for p, m in by_index],
    }
    return meta
