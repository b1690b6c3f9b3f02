"""Stage two's input: rows read, tokenized exactly as the cache says, and joined with it by example id.

Everything here runs BEFORE any model is loaded, so a cache that does not match fails in seconds. A sweep
prepares once and trains many times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from stages.base.errors import UserError
from stages.cache import refcache
from stages.cache.fingerprint import folder_fingerprint
from stages.cache.refcache import token_count_problems
from stages.data.encode import Encoded, TokenizeSettings, encode_with_report, tokenizer_fingerprint
from stages.data.rows import load_examples
from stages.model.models import check_model_dir, dtype_name, load_tokenizer, resolve_dtype
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
    reference_differs: tuple[str, ...] = ()  # what of the policy is not the cache's reference (--allow-reference-...)


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
    read (a sweep reads it once). A policy that would not start as the cache's reference (other weights, adapter,
    NF4 or dtype: reference_differences) is refused here, before any model loads, unless --allow-reference-mismatch."""
    check_model_dir(model.model)
    df, meta = loaded if loaded is not None else refcache.read_cache(cache.ref_cache)
    if ld_alpha is not None:
        _ld_values(df.head(0), cache.ref_cache, ld_alpha)  # no per-token values: one line now, not after tokenizing
    tokenizer = load_tokenizer(model.model, model.trust_remote_code)
    settings = lengths.tokenize(meta)  # unset lengths: the cache's
    fingerprint = tokenizer_fingerprint(tokenizer, settings)
    if refcache.tokenization_problems(meta, fingerprint, cache.allow_cache_mismatch):
        raise UserError(tokenization_error(cache, meta, fingerprint))
    notes, differs = [], reference_differences(model, meta)
    if differs and not cache.allow_reference_mismatch:
        raise UserError(f"{cache.ref_cache}: {'; '.join(differs.values())}; pass --allow-reference-mismatch if "
                        "meant, else rerun `dpo precompute-ref` for this policy")
    if differs:
        notes.append(f"note: {'; '.join(differs.values())}: allowed by --allow-reference-mismatch; the policy starts "
                     "away from the reference and rewards will not start at 0")
    sets = []
    for what, paths in (("train", data.data), ("eval", data.eval_data)):
        if not paths:
            sets.append([])
            continue
        examples, report = load_examples(paths, data.fields(), data.strict, split=data.data_split)
        encoded, cuts = encode_with_report(tokenizer, examples, settings, data.strict)
        notes.append(f"{what} data: {report.summary()}" + (f"; tokenize: {cuts.summary()}" if cuts.anything else ""))
        sets.append(_join(encoded, df, cache.ref_cache, what, ld_alpha))
    if not sets[0]:
        raise UserError(f"{', '.join(data.data)}: no training examples left after validation and truncation")
    return Prepared(sets[0], sets[1], tokenizer, settings, meta, notes, tuple(differs))


def tokenization_error(cache: CacheInput, meta: dict, fingerprint: dict) -> str:
    """The one line for a cache tokenized otherwise; --allow-cache-mismatch is offered only when all that differs is
    a hash it waives (refcache.FINGERPRINT_KEYS), never for lengths or the truncation rules."""
    fixed = refcache.tokenization_problems(meta, fingerprint, True)  # what the waiver leaves
    problem = (fixed or refcache.tokenization_problems(meta, fingerprint, False))[0]
    if not fixed:
        fix = "rerun precompute-ref with this model (a hash only: --allow-cache-mismatch)"
    elif any(p.startswith(("max_length:", "max_prompt_length:")) for p in fixed):
        fix = "rerun precompute-ref with these lengths, or drop --max-length/--max-prompt-length to use the cache's"
    else:
        fix = "rerun precompute-ref with this model and lengths"
    return f"{cache.ref_cache}: other tokenization ({problem}); {fix}"


def reference_differences(model: ModelSettings, meta: dict) -> dict[str, str]:
    """What would make the policy at step 0 other than the cache's reference, by setting (weights, adapter,
    load_in_4bit, dtype) -> a phrase naming the flag. Weights and adapter compare content fingerprints made as the
    cache made them (the same files reached by another path are the same); unset --load-in-4bit/--dtype/--adapter
    take the cache's values (train.policy_spec), so only explicit ones can differ. Reads no model."""
    out, cached_adapter = {}, meta.get("adapter") or {}
    full = bool((meta["model"].get("weights") or {}).get("full_hash"))
    if folder_fingerprint(model.model, full)["hash"] != meta["manifest"]["model"]:
        out["weights"] = f"--model {model.model} has other weights than the cache's ({meta['model']['path']})"
    adapter = model.adapter or cached_adapter.get("path")
    if adapter is not None:
        whose = "--adapter" if model.adapter else "the cache's adapter"
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{whose} {adapter}: no adapter_config.json there; pass --adapter with a PEFT adapter "
                            "folder")
        hashed = folder_fingerprint(adapter, bool(cached_adapter.get("full_hash")))["hash"]
        if hashed != meta["manifest"].get("adapter"):
            out["adapter"] = (f"--adapter {adapter} differs from the cache's reference "
                              f"({cached_adapter.get('path') or 'no adapter'})" if model.adapter else
                              f"the cache's adapter {adapter} has changed since the cache was made")
    cached_4bit = meta["quantization"] != "none"
    if model.load_in_4bit is not None and model.load_in_4bit != cached_4bit:
        out["load_in_4bit"] = f"--load-in-4bit {model.load_in_4bit} differs from the cache's reference ({cached_4bit})"
    if model.dtype is not None:  # on the device init_distributed picks
        now = dtype_name(resolve_dtype(model.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
        if now != meta["dtype"]:
            given = model.dtype + (f" ({now} here)" if model.dtype == "auto" else "")
            out["dtype"] = f"--dtype {given} differs from the cache's reference ({meta['dtype']})"
    return out
