"""Stage two's input: rows read, tokenized exactly as the cache says, and joined with it by example id.

Everything here runs BEFORE any model is loaded, so a cache that does not match fails in seconds. A sweep
prepares once and trains many times.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from stages.base.errors import UserError
from stages.cache import refcache
from stages.cache.fingerprint import folder_fingerprint
from stages.cache.refcache import token_count_problems
from stages.data.encode import Encoded, TokenizeSettings, encode_examples, tokenizer_fingerprint
from stages.data.rows import load_examples
from stages.model.models import check_model_dir, load_tokenizer
from stages.objective.loss import ld_token_weights
from stages.settings.groups import CacheInput, DataSpec, Lengths, ModelSettings


@dataclass(frozen=True)
class Item:
    """One training example: token ids plus its cached reference values."""

    enc: Encoded
    ref_chosen: float
    ref_rejected: float

    @property
    def length(self) -> int:
        return self.enc.length


@dataclass
class Prepared:
    train: list[Item]
    eval: list[Item]
    tokenizer: object
    settings: TokenizeSettings
    cache_meta: dict
    notes: list[str]  # what the user should read: counts, skips, warnings


def ld_reference(chosen: list[float], rejected: list[float], alpha: float) -> tuple[float, float]:
    """LD-DPO reference sums of one pair from the cache's per-token log-probs (loss.ld_token_weights), float64."""
    shared = min(len(chosen), len(rejected))
    out = []
    for tokens in (chosen, rejected):
        values = torch.tensor(tokens, dtype=torch.float64)
        out.append(float((values * ld_token_weights(torch.arange(len(tokens)), torch.tensor(shared), alpha)).sum()))
    return out[0], out[1]


def _ld_values(df: pl.DataFrame, cache_path: str, alpha: float) -> dict[str, tuple[float, float]]:
    """example id -> LD-DPO reference sums; one line when the cache has no per-token values."""
    if not all(name in df.columns for name, _ in refcache.TOKEN_FIELDS):
        raise UserError(f"{cache_path}: --ld-alpha needs per-token reference log-probs, which this cache lacks; "
                        "rerun `dpo precompute-ref --store-token-logps`")
    columns = (df["ref_chosen_token_logps"].to_list(), df["ref_rejected_token_logps"].to_list())
    return {i: ld_reference(c, r, alpha) for i, c, r in zip(df["example_id"].to_list(), *columns)}


def _join(encoded: list[Encoded], df: pl.DataFrame, cache_path: str, what: str, ld_alpha=None) -> list[Item]:
    problems = refcache.coverage_problems(df, [e.example_id for e in encoded])
    problems += token_count_problems(df, encoded)
    if problems:
        raise UserError(f"{cache_path}: {what} data: {problems[0]}; rerun `dpo precompute-ref` over these files")
    if ld_alpha is not None:  # LD-DPO: the reference side of the loss is the LD-weighted sum
        wanted = df.filter(pl.col("example_id").is_in([e.example_id for e in encoded]))
        ref = _ld_values(wanted, cache_path, ld_alpha)
    else:
        ref = dict(zip(df["example_id"].to_list(), zip(df["ref_chosen_logps"].to_list(),
                                                       df["ref_rejected_logps"].to_list())))
    return [Item(e, *ref[e.example_id]) for e in encoded]


def prepare(data: DataSpec, model: ModelSettings, cache: CacheInput, lengths: Lengths, ld_alpha: float | None = None,
            loaded: tuple[pl.DataFrame, dict] | None = None) -> Prepared:
    """Rows of `data` (and its eval data) tokenized as the cache says, joined with it. `loaded`: the cache already
    read (a sweep reads it once)."""
    check_model_dir(model.model)
    df, meta = loaded if loaded is not None else refcache.read_cache(cache.ref_cache)
    if ld_alpha is not None:
        _ld_values(df.head(0), cache.ref_cache, ld_alpha)  # no per-token values: one line now, not after tokenizing
    tokenizer = load_tokenizer(model.model, model.trust_remote_code)
    settings = lengths.tokenize(meta)  # unset lengths: the cache's
    fingerprint = tokenizer_fingerprint(tokenizer, settings)
    problems = refcache.tokenization_problems(meta, fingerprint, cache.allow_cache_mismatch)
    if problems:
        waiver = "" if cache.allow_cache_mismatch else " (a hash only: --allow-cache-mismatch)"
        raise UserError(f"{cache.ref_cache}: other tokenization ({problems[0]}); rerun precompute-ref with this model "
                        f"and lengths{waiver}")
    notes = []
    weights = folder_fingerprint(model.model)["hash"]
    if weights != meta["manifest"]["model"]:
        notes.append(f"note: the cache was made from {meta['model']['path']}, not these weights; the step-0 drift "
                     "check will show how far apart they are")
    sets = []
    for what, paths in (("train", data.data), ("eval", data.eval_data)):
        if not paths:
            sets.append([])
            continue
        examples, report = load_examples(paths, data.fields(), data.strict, split=data.data_split)
        encoded, too_long = encode_examples(tokenizer, examples, settings)
        notes.append(f"{what} data: {report.summary()}"
                     + (f"; {too_long} too long for --max-length" if too_long else ""))
        sets.append(_join(encoded, df, cache.ref_cache, what, ld_alpha))
    if not sets[0]:
        raise UserError(f"{', '.join(data.data)}: no training examples left after validation and truncation")
    return Prepared(sets[0], sets[1], tokenizer, settings, meta, notes)
