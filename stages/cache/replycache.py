"""The reply-level cache: what stage one writes for data with several replies per prompt (stages/data/replyset.py).

One Parquet file, one row per (prompt, reply), keyed by the reply id:
  reply_id, prompt_id (str), ref_logps (float64 sum over the reply's tokens), reply_tokens, prompt_tokens (int32),
  and optionally ref_token_logps (list<float32>).
Metadata as for pair caches (refcache.py), with "layout": "replies" in it and in its manifest. Pairs are not
stored: each command derives them from its data and the rule (--pairs), then reads each pair's two replies here,
so one cache serves every pair rule and a new reply for an old prompt costs that reply only. Pair caches (no
"layout" key) are unchanged.
"""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa

from stages.base.errors import UserError

LAYOUT = "replies"
KEY = "reply_id"
SCHEMA = pa.schema([
    ("reply_id", pa.string()),
    ("prompt_id", pa.string()),
    ("ref_logps", pa.float64()),
    ("reply_tokens", pa.int32()),
    ("prompt_tokens", pa.int32()),
])
TOKEN_FIELDS = [("ref_token_logps", pa.list_(pa.float32()))]
_POLARS_TYPES = {"reply_id": pl.String, "prompt_id": pl.String, "ref_logps": pl.Float64, "reply_tokens": pl.Int32,
                 "prompt_tokens": pl.Int32}


def schema(store_token_logps: bool) -> pa.Schema:
    return pa.schema(list(SCHEMA) + [pa.field(n, t) for n, t in TOKEN_FIELDS]) if store_token_logps else SCHEMA


def check_rows(rows: list[dict]) -> None:
    """Refuses non-finite values, naming the reply."""
    for r in rows:
        if not math.isfinite(r["ref_logps"]):
            raise UserError(f"reply {r['reply_id']}: ref_logps is {r['ref_logps']} (non-finite); the reference model "
                            "overflowed - use --dtype fp32 or bf16 instead of fp16, or check the model weights")


def table_problem(df: pl.DataFrame, store_token_logps: bool) -> str | None:
    """The first way df differs from what stage one writes for reply sets."""
    for name, dtype in _POLARS_TYPES.items():
        if name not in df.columns:
            return f"column {name!r} is missing"
        if df.schema[name] != dtype:
            return f"column {name!r} has type {df.schema[name]}, expected {dtype}"
    ids = df["reply_id"]
    if ids.null_count():
        return "a reply_id is empty"
    if ids.is_duplicated().any():
        return f"reply {ids.filter(ids.is_duplicated())[0]} appears twice"
    bad = df.filter(~pl.col("ref_logps").is_finite() | pl.col("ref_logps").is_null())
    if bad.height:
        return f"reply {bad['reply_id'][0]}: ref_logps is {bad['ref_logps'][0]} (non-finite)"
    for col, least in (("reply_tokens", 1), ("prompt_tokens", 0)):
        bad = df.filter((pl.col(col) < least) | pl.col(col).is_null())
        if bad.height:
            return f"reply {bad['reply_id'][0]}: {col} is {bad[col][0]}"
    if store_token_logps and "ref_token_logps" not in df.columns:
        return "per-token columns are missing although the metadata says they were stored"
    return None


def lookup(df: pl.DataFrame, sets, what: str, path: str) -> dict[str, tuple]:
    """reply id -> (ref_logps, reply_tokens, prompt_tokens[, per-token values]) for every reply of the encoded
    `sets` (stages.data.replyset.EncodedSet); one UserError when a reply is missing or tokenizes to other lengths."""
    want = {k: (len(s.prompt_ids), len(r)) for s in sets for k, r in zip(s.reply_ids, s.replies)}
    cols = ["reply_id", "ref_logps", "reply_tokens", "prompt_tokens"]
    cols += ["ref_token_logps"] if "ref_token_logps" in df.columns else []
    have = df.filter(pl.col("reply_id").is_in(list(want))).select(cols)
    found = {row[0]: row[1:] for row in have.iter_rows()}
    missing = [k for k in want if k not in found]
    if missing:
        raise UserError(f"{path}: {what} data: {len(missing)} of {len(want)} replies are not in the cache (e.g. "
                        f"{missing[0]}); rerun `dpo precompute-ref` over these files")
    for k, (p, n) in want.items():
        if (found[k][2], found[k][1]) != (p, n):
            raise UserError(f"{path}: {what} data: reply {k} tokenizes to prompt/reply {p}/{n} tokens now, "
                            f"{found[k][2]}/{found[k][1]} cached; rerun `dpo precompute-ref` with these settings")
    return found


def info_stats(df: pl.DataFrame) -> dict:
    """`dpo cache info`'s statistics of a reply cache."""
    stats = {"ref_logps": {"mean": df["ref_logps"].mean(), "min": df["ref_logps"].min(),
                           "max": df["ref_logps"].max()}}
    stats |= {c: {"mean": df[c].mean(), "total": int(df[c].sum())} for c in ("prompt_tokens", "reply_tokens")}
    stats["prompts"] = {"total": df["prompt_id"].n_unique()}
    return stats


# ------------------------------------------------------------------------- the tools (info, verify, export-trl)
def layout_problem(layout: str, reply_data: bool) -> str | None:
    """A cache of the other layout than the data (`layout`: refcache.layout_of's), in one line; None when they
    match: pair rows need a pair cache, data with several replies per prompt a reply cache."""
    if (layout == LAYOUT) == reply_data:
        return None
    shape = "several replies per prompt" if reply_data else "pair rows"
    return f"a cache of {layout}, but the data has {shape}; rerun `dpo precompute-ref` over this data"


def info_lines(meta: dict) -> list[str]:
    """`dpo cache info`'s lines only a reply cache has: its layout and the pairs the run's rule derived."""
    data = meta.get("data") or {}
    return ["  layout: replies (one row per prompt and reply; every --pairs rule reads them)",
            f"  pairs: {data.get('pairs', '?')} (at precompute)"]


def coverage_problems(df: pl.DataFrame, sets) -> list[str]:
    """Every reply of `sets` (stages.data.replyset.ReplySet) needs a cached entry (table_problem: finite)."""
    want = [(k, s) for s in sets for k in s.reply_ids]
    have = set(df.filter(pl.col(KEY).is_in([k for k, _ in want]))[KEY].to_list())
    missing = [(k, s) for k, s in want if k not in have]
    if not missing:
        return []
    key, s = missing[0]
    return [f"{len(missing)} of {len(want)} replies are not in the cache (e.g. {s.source} row {s.row}, reply "
            f"{s.reply_ids.index(key) + 1}, id {key})"]


def token_count_problems(df: pl.DataFrame, encoded) -> list[str]:
    """Per reply: this run's prompt/reply token counts (`encoded`: replyset.EncodedSet items) must equal the cached
    ones (replies not in the cache are coverage_problems')."""
    mine = pl.DataFrame({KEY: [k for e in encoded for k in e.reply_ids],
                         "p": [len(e.prompt_ids) for e in encoded for _ in e.replies],
                         "n": [len(r) for e in encoded for r in e.replies]},
                        schema={KEY: pl.String, "p": pl.Int64, "n": pl.Int64})
    j = mine.join(df.select(KEY, "prompt_tokens", "reply_tokens"), on=KEY)
    bad = j.filter((pl.col("p") != pl.col("prompt_tokens")) | (pl.col("n") != pl.col("reply_tokens")))
    if not bad.height:
        return []
    row = bad.row(0, named=True)
    return [f"{bad.height} replies tokenize to other lengths than cached (e.g. {row[KEY]}: prompt/reply "
            f"{row['p']}/{row['n']} now, {row['prompt_tokens']}/{row['reply_tokens']} cached)"]


def pair_values(df: pl.DataFrame, examples) -> tuple[list[tuple[float, float] | None], list[str], set[str]]:
    """For each pair (rows.Example derived from a reply set): (ref log-prob of its chosen reply, of its rejected
    reply) from the cache, or None when either is missing; the missing reply ids (data order); the reply ids used."""
    from stages.data.replyset import reply_id

    keys = [(reply_id(e.prompt, e.chosen), reply_id(e.prompt, e.rejected)) for e in examples]
    wanted = list(dict.fromkeys(k for pair in keys for k in pair))
    have = df.filter(pl.col(KEY).is_in(wanted)).select(KEY, "ref_logps")
    ref = dict(zip(have[KEY].to_list(), have["ref_logps"].to_list()))
    values = [(ref[c], ref[r]) if c in ref and r in ref else None for c, r in keys]
    return values, [k for k in wanted if k not in ref], set(ref)
