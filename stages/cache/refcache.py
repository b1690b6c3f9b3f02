"""The cache format: the only contract between stage one (writes) and stage two (reads).

One Parquet file, one row per example, keyed by the content id:
  example_id (str), ref_chosen_logps, ref_rejected_logps (float64 sums over completion tokens, TRL's names),
  chosen_tokens, rejected_tokens, prompt_tokens (int32), and optionally per-token lists
  ref_chosen_token_logps, ref_rejected_token_logps (list<float32>).
Metadata is JSON under the schema key `dpo_stages`. While stage one runs, each rank writes parts into
`<out>.parts/` with a manifest of the settings; rank 0 merges them by example id and renames into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from stages.base import fsio
from stages.base.errors import UserError
from stages.cache import replycache

FORMAT_VERSION = 1
META_KEY = b"dpo_stages"
# Settings that decide token ids: a mismatch means the cached numbers are for other sequences.
TOKENIZATION_KEYS = ("max_length", "max_prompt_length", "truncation", "plain_text_convention")
FINGERPRINT_KEYS = ("tokenizer_hash", "chat_template_hash")  # --allow-cache-mismatch waives only these

SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("ref_chosen_logps", pa.float64()),
    ("ref_rejected_logps", pa.float64()),
    ("chosen_tokens", pa.int32()),
    ("rejected_tokens", pa.int32()),
    ("prompt_tokens", pa.int32()),
])
TOKEN_FIELDS = [("ref_chosen_token_logps", pa.list_(pa.float32())),
                ("ref_rejected_token_logps", pa.list_(pa.float32()))]


PAIRS = "pairs"  # the layout of pair caches (no "layout" key); replycache.LAYOUT: one row per reply


def layout_of(meta_or_manifest: dict) -> str:
    """"pairs" or "replies" (replycache.py), from a cache's metadata or manifest."""
    return meta_or_manifest.get("layout") or (meta_or_manifest.get("manifest") or {}).get("layout") or PAIRS


def key_column(layout: str) -> str:
    return replycache.KEY if layout == replycache.LAYOUT else "example_id"


def schema(store_token_logps: bool, layout: str = PAIRS) -> pa.Schema:
    if layout == replycache.LAYOUT:
        return replycache.schema(store_token_logps)
    return pa.schema(list(SCHEMA) + [pa.field(n, t) for n, t in TOKEN_FIELDS]) if store_token_logps else SCHEMA


def rows_to_table(rows: list[dict], store_token_logps: bool, layout: str = PAIRS) -> pa.Table:
    """rows: dicts with the schema's columns; refuses non-finite values, naming the example (or reply)."""
    if layout == replycache.LAYOUT:
        replycache.check_rows(rows)
    for r in rows if layout == PAIRS else ():
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if not math.isfinite(r[key]):
                raise UserError(
                    f"example {r['example_id']}: {key} is {r[key]} (non-finite); the reference model overflowed - "
                    "use --dtype fp32 or bf16 instead of fp16, or check the model weights"
                )
    sch = schema(store_token_logps, layout)
    return pa.Table.from_pylist([{k: r[k] for k in sch.names} for r in rows], schema=sch)


def write_atomic(table: pa.Table, path: Path, meta: dict | None = None) -> None:
    """Temporary name in the same folder, fsync, rename: never a half-written file that looks complete."""
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    fsio.write_atomic(path, lambda tmp: pq.write_table(table, tmp))


REQUIRED_META = ("manifest", "tokenization", "model")


def read_meta(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such cache file; make it first with `dpo precompute-ref --output {path}`")
    try:
        raw = pq.read_schema(p).metadata or {}
        meta = json.loads(raw[META_KEY]) if META_KEY in raw else None
    except (pa.ArrowException, OSError, ValueError) as e:  # truncated, not Parquet, damaged footer or metadata
        raise UserError(f"{path}: damaged or not a cache ({_first_line(e)}); rerun `dpo precompute-ref`") from None
    if meta is None:
        raise UserError(f"{path}: a Parquet file without dpo_stages metadata; it was not written by "
                        "`dpo precompute-ref`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: cache format {meta.get('format_version')}, this tool reads {FORMAT_VERSION}; "
                        "rerun precompute-ref")
    missing = [k for k in REQUIRED_META if not isinstance(meta.get(k), dict)]
    if missing:
        raise UserError(f"{path}: cache metadata lacks {missing[0]!r}; not written by this tool - rerun precompute-ref")
    return meta


def read_cache(path: str | Path) -> tuple[pl.DataFrame, dict]:
    """Rows and metadata, checked: anything stage one would never write (damaged pages, wrong columns, duplicate
    ids, non-finite values, impossible counts) is one UserError naming the file."""
    meta = read_meta(path)
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - polars raises ComputeError/OSError/... for damaged data pages
        raise UserError(f"{path}: damaged cache data ({_first_line(e)}); rerun `dpo precompute-ref`") from None
    store = bool(meta["manifest"].get("store_token_logps"))
    check = replycache.table_problem if layout_of(meta) == replycache.LAYOUT else table_problem
    problem = check(df, store)
    if problem:
        raise UserError(f"{path}: {problem}; this file was not written by `dpo precompute-ref` - rerun it")
    return df, meta


_POLARS_TYPES = {"example_id": (pl.String,), "ref_chosen_logps": (pl.Float64,), "ref_rejected_logps": (pl.Float64,),
                 "chosen_tokens": (pl.Int32,), "rejected_tokens": (pl.Int32,), "prompt_tokens": (pl.Int32,)}


def table_problem(df: pl.DataFrame, store_token_logps: bool) -> str | None:
    """The first way df differs from what stage one writes: columns and types, unique ids, finite values, counts."""
    for name, types in _POLARS_TYPES.items():
        if name not in df.columns:
            return f"column {name!r} is missing"
        if df.schema[name] not in types:
            return f"column {name!r} has type {df.schema[name]}, expected {types[0]}"
    ids = df["example_id"]
    if ids.null_count() or ids.is_duplicated().any():
        if ids.null_count():
            return "an example_id is empty"
        return f"example {ids.filter(ids.is_duplicated())[0]} appears twice"
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        bad = df.filter(~pl.col(col).is_finite() | pl.col(col).is_null())
        if bad.height:
            return f"example {bad['example_id'][0]}: {col} is {bad[col][0]} (non-finite)"
    for col, least in (("chosen_tokens", 1), ("rejected_tokens", 1), ("prompt_tokens", 0)):
        bad = df.filter((pl.col(col) < least) | pl.col(col).is_null())
        if bad.height:
            return f"example {bad['example_id'][0]}: {col} is {bad[col][0]}"
    if store_token_logps and not all(n in df.columns for n, _ in TOKEN_FIELDS):
        return "per-token columns are missing although the metadata says they were stored"
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:60]


# -------------------------------------------------------------------------------------------------- parts
def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def config_path(out: Path) -> Path:
    """The resolved settings of the run that wrote `out`, saved next to it."""
    return out.with_name(out.name + ".config.yaml")


VALUE_FREE = ("ids_digest",)  # manifest keys that do not change any cached value (which rows, not how scored)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every differing leaf, nested keys joined with dots."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b and k not in VALUE_FREE:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _leaf(difference: str) -> str:
    """'tokenization.max_length: 256 -> 200' -> 'max_length: 256 -> 200' (keeps one-line errors short)."""
    key, rest = difference.split(": ", 1)
    return f"{key.split('.')[-1]}: {rest}"


def clean_leftovers(out: Path) -> None:
    """Under the output's lock: what a killed run left — temporaries next to the cache and in its parts folder, and
    the renamed parts folder of a finished merge whose delete was cut short."""
    shutil.rmtree(out.with_name(out.name + ".parts.done"), ignore_errors=True)
    fsio.remove_stale_temporaries(out.parent, (out.name, config_path(out).name, "manifest.json"))
    fsio.remove_stale_temporaries(parts_dir(out))


def finished_rows(out: Path, manifest: dict, overwrite: bool) -> pa.Table | None:
    """The rows of a finished cache at `out` made with the same settings (which rows aside): stage one computes only
    what is not in it and writes the union. Other settings refuse (or --overwrite: recompute, replace at the end)."""
    if overwrite or not out.exists():
        return None
    if not out.is_file():
        raise UserError(f"--output {out}: a folder, not a cache file; give a file name such as {out}/ref.parquet")
    diff = _differences(read_meta(out)["manifest"], manifest)
    if diff:
        raise UserError(f"--output {out}: a cache made with other settings ({_leaf(diff[0])}); the same settings reuse "
                        "it, --overwrite recomputes")
    df, _ = read_cache(out)
    return df.to_arrow().cast(schema(bool(manifest.get("store_token_logps")), layout_of(manifest)))


def open_parts(out: Path, manifest: dict, overwrite: bool) -> Path:
    """Parts folder for this run. An existing one is resumed only if it was made with the same settings."""
    d = parts_dir(out)
    mf = d / "manifest.json"
    if d.exists() and overwrite:
        shutil.rmtree(d)
    if mf.is_file():
        old = json.loads(mf.read_text())
        diff = _differences(old, manifest)
        if diff:
            raise UserError(f"{d}: parts made with other settings ({_leaf(diff[0])}); the same settings "
                            "resume, --overwrite restarts")
        return d
    d.mkdir(parents=True, exist_ok=True)
    fsio.write_text_atomic(mf, json.dumps(manifest, sort_keys=True, indent=1))
    return d


def done_ids(d: Path, layout: str = PAIRS) -> set[str]:
    """Ids (example ids, or reply ids) already written by any rank (parts are renamed into place, so a listed part
    is whole)."""
    ids: set[str] = set()
    for part in sorted(d.glob("part-*.parquet")):
        ids.update(pq.read_table(part, columns=[key_column(layout)]).column(0).to_pylist())
    return ids


def write_part(d: Path, rank: int, index: int, rows: list[dict], store_token_logps: bool, layout: str = PAIRS) -> None:
    if rows:
        write_atomic(rows_to_table(rows, store_token_logps, layout), d / f"part-r{rank:04d}-{index:06d}.parquet")


def next_part_index(d: Path, rank: int) -> int:
    return len(list(d.glob(f"part-r{rank:04d}-*.parquet")))


def merge_parts(d: Path, out: Path, expected_ids: set[str], meta: dict, store_token_logps: bool,
                base: pa.Table | None = None, write_config=None) -> pa.Table:
    """Rank 0: the finished rows (`base`) plus every part, joined by example id, into one file. Each id once, every
    expected id present. Order of the end game, each step safe to kill and rerun: settings file, cache (renamed
    into place), parts folder renamed away, then deleted (a rerun deletes a leftover `.parts.done`)."""
    layout = layout_of(meta)
    key = key_column(layout)  # example_id, or reply_id
    parts = [pq.read_table(p) for p in sorted(d.glob("part-*.parquet"))] if d.is_dir() else []
    table = pa.concat_tables(parts) if parts else schema(store_token_logps, layout).empty_table()
    ids = table.column(key).to_pylist()
    if len(ids) != len(set(ids)):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{d}: {key[:-3]} {twice} was written twice; delete the folder (or --overwrite) and rerun")
    table = table.filter(pa.array([i in expected_ids for i in ids], type=pa.bool_()))
    if base is not None:  # finished rows not recomputed since (all of them, unless a kill came after the write)
        fresh = set(ids)
        old = base.filter(pa.array([i not in fresh for i in base.column(key).to_pylist()], type=pa.bool_()))
        table = pa.concat_tables([old, table])
    missing = expected_ids - set(table.column(key).to_pylist())
    if missing:
        what = "replies" if layout == replycache.LAYOUT else "examples"
        raise UserError(f"{d}: {len(missing)} {what} have no entry (e.g. {sorted(missing)[0]}); rerun the same "
                        "command to finish")
    table = table.sort_by(key)
    if write_config is not None:
        write_config()
    write_atomic(table, out, meta)
    if d.is_dir():
        trash = d.with_name(d.name + ".done")  # rename first: a kill mid-delete never leaves parts without manifest
        os.replace(d, trash)
        shutil.rmtree(trash)
    return table


# ----------------------------------------------------------------------------------------- checks for readers
def tokenization_problems(meta: dict, tokenization: dict, allow_fingerprint_mismatch: bool) -> list[str]:
    """Differences between the cache's tokenization and this run's; fingerprints are waivable, lengths are not."""
    cached = meta.get("tokenization", {})
    keys = TOKENIZATION_KEYS + (() if allow_fingerprint_mismatch else FINGERPRINT_KEYS)
    return [f"{k}: cache {cached.get(k)!r}, now {tokenization.get(k)!r}"
            for k in keys if cached.get(k) != tokenization.get(k)]


def coverage_problems(df: pl.DataFrame, example_ids: list[str]) -> list[str]:
    """Every example needs a finite cached entry."""
    have = df.select("example_id", "ref_chosen_logps", "ref_rejected_logps")
    want = pl.DataFrame({"example_id": example_ids})
    joined = want.join(have, on="example_id", how="left")
    problems = []
    missing = joined.filter(pl.col("ref_chosen_logps").is_null())["example_id"]
    if len(missing):
        problems.append(f"{len(missing)} of {len(example_ids)} examples are not in the cache (e.g. {missing[0]})")
    bad = joined.filter(~pl.col("ref_chosen_logps").is_finite() | ~pl.col("ref_rejected_logps").is_finite())
    if bad.height:
        problems.append(f"{bad.height} examples have non-finite cached log-probs (e.g. {bad['example_id'][0]})")
    return problems


def token_count_problems(df: pl.DataFrame, encoded) -> list[str]:
    """Per example: this run's prompt/chosen/rejected token counts (`encoded`: data.encode.Encoded items) must
    equal the cached ones."""
    mine = pl.DataFrame({
        "example_id": [e.example_id for e in encoded],
        "p": [len(e.prompt_ids) for e in encoded],
        "c": [len(e.chosen_ids) for e in encoded],
        "r": [len(e.rejected_ids) for e in encoded],
    })
    j = mine.join(df.select("example_id", "prompt_tokens", "chosen_tokens", "rejected_tokens"), on="example_id")
    bad = j.filter((pl.col("p") != pl.col("prompt_tokens")) | (pl.col("c") != pl.col("chosen_tokens"))
                   | (pl.col("r") != pl.col("rejected_tokens")))
    if not bad.height:
        return []
    row = bad.row(0, named=True)
    return [f"{bad.height} examples tokenize to other lengths than cached (e.g. {row['example_id']}: prompt/chosen/"
            f"rejected {row['p']}/{row['c']}/{row['r']} now, {row['prompt_tokens']}/{row['chosen_tokens']}/"
            f"{row['rejected_tokens']} cached)"]


# ----------------------------------------------------------------------------------------- `dpo cache info`
def origin_line(meta: dict) -> str | None:
    """One line for `dpo cache info`: where a shard or a merged cache came from (the `shard` and `merged_from`
    metadata that stages.cache.shards writes), or None for a cache of one job."""
    noun = "replies" if layout_of(meta) == replycache.LAYOUT else "examples"  # what a shard's rows are
    if "merged_from" in meta:
        shards = meta["merged_from"]["shards"]
        sizes = ", ".join(str(s["examples"]) for s in shards)
        return f"  merged from {len(shards)} shards ({noun} per shard: {sizes})"
    if "shard" in meta:
        s = meta["shard"]
        return (f"  shard {s['index']} of {s['num_shards']}: {s['examples']} of {s['all_examples']} {noun}; "
                f"merge all {s['num_shards']} with `dpo cache merge`")
    return None


def summary_lines(meta: dict) -> list[str]:
    """`dpo cache info`'s human lines from the metadata: model, adapter, lengths, truncation counts (stage one's
    meta["truncation"]; "not recorded" by older caches), where the rows came from (shards), when and by what."""
    data, tok, cut = meta.get("data") or {}, meta.get("tokenization") or {}, meta.get("truncation")
    skipped = data.get("skipped", "?")  # reason -> count, as LoadReport counts them
    why = ", ".join(f"{r}: {n}" for r, n in skipped.items() if n) if isinstance(skipped, dict) else ""
    count = sum(skipped.values()) if isinstance(skipped, dict) else skipped
    dropped = f"{data.get('rows_kept', '?')} kept, {count} skipped{f' ({why})' if why else ''}, " \
              f"{data.get('too_long', '?')} too long"
    files = len(data.get("files") or [])
    cuts = "not recorded" if not isinstance(cut, dict) else (
        f"{cut.get('prompts_cut', '?')} prompts cut (at most {cut.get('max_prompt_tokens_cut', '?')} tokens), "
        f"{cut.get('replies_cut', '?')} replies cut (at most {cut.get('max_reply_tokens_cut', '?')} tokens), "
        f"{cut.get('skipped', '?')} skipped")
    adapter = meta.get("adapter")
    replies = replycache.info_lines(meta) if layout_of(meta) == replycache.LAYOUT else []  # layout, pairs
    return [f"  data: {data.get('rows_read', '?')} rows read from {files} file(s), {dropped}", *replies,
            f"  model: {meta['model'].get('path', '?')} (dtype {meta.get('dtype', '?')}, quantization "
            f"{meta.get('quantization', '?')})",
            f"  adapter: {adapter.get('path', '?') if isinstance(adapter, dict) else 'none'}",
            f"  lengths: max_length {tok.get('max_length', '?')}, "
            f"max_prompt_length {tok.get('max_prompt_length', '?')}",
            f"  truncation: {cuts}",
            f"  shards: {(origin_line(meta) or '  one job').strip()}",
            f"  created: {meta.get('created', '?')} by dpo-stages {meta.get('tool_version', '?')}"
            + (f", {meta['world_size']} process(es)" if meta.get("world_size") else "")]


def info_text(path: str | Path, as_json: bool = False) -> str:
    """`dpo cache info`: a short summary (summary_lines, the log-prob and token statistics), or with `as_json` one
    JSON object {path, rows, stats, metadata} holding the whole metadata. A reply cache's rows are replies (its
    stats: replycache.info_stats, with the number of prompts)."""
    df, meta = read_cache(path)
    replies = layout_of(meta) == replycache.LAYOUT
    stats = {c: {"mean": df[c].mean(), "min": df[c].min(), "max": df[c].max()}
             for c in ("ref_chosen_logps", "ref_rejected_logps")} if not replies else replycache.info_stats(df)
    stats |= {c: {"mean": df[c].mean(), "total": int(df[c].sum())} for c in ("prompt_tokens", "chosen_tokens",
                                                                              "rejected_tokens")} if not replies else {}
    if as_json:
        return json.dumps({"path": str(path), "rows": df.height, "stats": stats, "metadata": meta}, indent=2,
                          sort_keys=True)
    rows = f"{df.height} replies of {stats['prompts']['total']} prompts" if replies else df.height
    lines = [f"cache {path}", f"  rows: {rows}"] + summary_lines(meta)
    shown = {c: v for c, v in stats.items() if v.get("mean") is not None}  # no rows: no means; prompts: a count
    lines += [f"  {c}: mean {v['mean']:.4f}  min {v['min']:.4f}  max {v['max']:.4f}" for c, v in shown.items()
              if "min" in v]
    lines += [f"  {c}: mean {v['mean']:.1f}  total {v['total']}" for c, v in shown.items() if "total" in v]
    return "\n".join(lines + ["  full metadata: add --json"])
