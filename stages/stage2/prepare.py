"""Stage two's input: rows read, tokenized exactly as the cache says, and joined with it by example id.

Everything here runs BEFORE any model is loaded, so a cache that does not match fails in seconds. A sweep
prepares once and trains many times. Pair rows join a pair cache by example id (`Item`); reply sets (several replies
per prompt) join a reply cache by reply id, and carry the pairs their rule derived (`SetItem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from stages.base.errors import UserError
from stages.cache import refcache, replycache
from stages.cache.fingerprint import folder_fingerprint
from stages.cache.refcache import token_count_problems
from stages.data.encode import Encoded, TokenizeSettings, TruncationReport, encode_with_report, tokenizer_fingerprint
from stages.data.encodeset import encode_set
from stages.data.replyset import EncodedSet
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

    @property
    def tokens(self) -> int:  # what its forward costs: two padded rows (the metrics' tokens/s)
        return 2 * self.enc.length

    def packed_tokens(self, share: bool) -> int:
        """Its real tokens in a packed sequence: [prompt | chosen | rejected], or two rows with the prompt twice."""
        e = self.enc
        return (1 if share else 2) * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)


@dataclass(frozen=True)
class SetItem:
    """One prompt with several replies: token ids, each reply's cached reference sum, and the pairs (reply indices)
    the rule derived, with each pair's reference values (the LD-DPO sums with --ld-alpha)."""

    enc: EncodedSet
    ref: tuple[float, ...]
    pairs: tuple[tuple[int, int], ...]
    pair_ref: tuple[tuple[float, float], ...]

    @property
    def length(self) -> int:
        return self.enc.length

    @property
    def tokens(self) -> int:  # one [prompt | replies] row
        return self.enc.length

    def packed_tokens(self, share: bool) -> int:
        """Its real tokens in a packed sequence: one [prompt | replies] row, or one row per reply with the prompt."""
        e = self.enc
        return self.tokens if share else len(e.replies) * len(e.prompt_ids) + sum(len(r) for r in e.replies)


@dataclass
class Prepared:
    train: list  # Item (pair rows) or SetItem (reply sets)
    eval: list
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


def _need_token_values(df: pl.DataFrame, cache_path: str) -> None:
    """One line when the cache (pairs or replies) has no per-token values."""
    if not all(name in df.columns for name, _ in refcache.TOKEN_FIELDS) and "ref_token_logps" not in df.columns:
        raise UserError(f"{cache_path}: --ld-alpha needs per-token reference log-probs, which this cache lacks; "
                        "rerun `dpo precompute-ref --store-token-logps`")


def _ld_values(df: pl.DataFrame, cache_path: str, alpha: float) -> dict[str, tuple[float, float]]:
    """example id -> LD-DPO reference sums; one line when the cache has no per-token values."""
    _need_token_values(df, cache_path)
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
        _need_token_values(df, cache.ref_cache)  # no per-token values: one line now, not after tokenizing
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
        loaded = data.load(paths)
        _same_layout(loaded, meta, cache.ref_cache, what)
        if loaded.sets is None:
            encoded, cuts = encode_with_report(tokenizer, loaded.examples, settings, data.strict)
            items = _join(encoded, df, cache.ref_cache, what, ld_alpha)
        else:
            items, cuts = _join_sets(tokenizer, loaded, settings, data.strict, df, cache.ref_cache, what, ld_alpha)
        notes.append(f"{what} data: {loaded.report.summary()}" + (f"; tokenize: {cuts.summary()}" if cuts.anything
                                                                  else ""))
        if loaded.pair_report is not None:
            notes.append(f"{what} pairs: {loaded.pair_report.summary()}")
        sets.append(items)
    if not sets[0]:
        raise UserError(f"{', '.join(data.data)}: no training examples left after validation and truncation")
    return Prepared(sets[0], sets[1], tokenizer, settings, meta, notes, tuple(differs))


def _same_layout(loaded, meta: dict, path: str, what: str) -> None:
    """Pair rows need a pair cache, reply sets a reply cache (one line otherwise)."""
    problem = replycache.layout_problem(refcache.layout_of(meta), loaded.sets is not None)
    if problem:
        raise UserError(f"{path}: {what} data: {problem}")


def _join_sets(tokenizer, loaded, settings: TokenizeSettings, strict: bool, df: pl.DataFrame, path: str, what: str,
               ld_alpha: float | None) -> tuple[list[SetItem], TruncationReport]:
    """Reply sets tokenized as the cache's were and joined with it by reply id; each keeps its rule's pairs."""
    report, encoded = TruncationReport(), []
    for s, pairs in zip(loaded.sets, loaded.pairs):
        e = encode_set(tokenizer, s, settings, report, strict)
        if e is not None:
            encoded.append((e, tuple(pairs)))
    found = replycache.lookup(df, [e for e, _ in encoded], what, path)
    items = []
    for e, pairs in encoded:
        ref = tuple(found[k][0] for k in e.reply_ids)
        if ld_alpha is None:
            pair_ref = tuple((ref[c], ref[r]) for c, r in pairs)
        else:  # LD-DPO: the pair's shared length decides the weights, so each pair has its own reference sums
            tokens = [found[k][3] for k in e.reply_ids]
            pair_ref = tuple(ld_reference(tokens[c], tokens[r], ld_alpha) for c, r in pairs)
        items.append(SetItem(e, ref, pairs, pair_ref))
    return items, report


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
