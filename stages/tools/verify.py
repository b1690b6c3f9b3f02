"""`dpo cache verify`: does a cache cover these data, made with this tokenizer and these weights?"""

from __future__ import annotations

import polars as pl

from stages.cache import refcache
from stages.cache.fingerprint import folder_fingerprint
from stages.data.encode import TokenizeSettings, encode_examples, tokenizer_fingerprint
from stages.data.rows import FieldMap, load_examples
from stages.model.models import check_model_dir, load_tokenizer


def token_count_problems(df: pl.DataFrame, encoded) -> list[str]:
    """Per example: this run's prompt/chosen/rejected token counts must equal the cached ones."""
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


def verify_cache(path, data, fields, model=None, max_length=None, max_prompt_length=None) -> list[str]:
    df, meta = refcache.read_cache(path)
    examples, _ = load_examples(data, FieldMap(*fields))
    problems = refcache.coverage_problems(df, [e.example_id for e in examples])
    if model is None:
        return problems
    check_model_dir(model)
    tok_meta = meta["tokenization"]
    settings = TokenizeSettings(
        max_length if max_length is not None else tok_meta["max_length"],
        max_prompt_length if max_prompt_length is not None else tok_meta["max_prompt_length"],
    )
    tokenizer = load_tokenizer(model)
    problems += refcache.tokenization_problems(meta, tokenizer_fingerprint(tokenizer, settings), False)
    weights = folder_fingerprint(model, meta["model"]["weights"].get("full_hash", False))["hash"]
    if weights != meta["manifest"]["model"]:
        problems.append(f"model weights: cache made from {meta['model']['path']} ({meta['manifest']['model']}), "
                        f"{model} has fingerprint {weights}")
    encoded, _ = encode_examples(tokenizer, examples, settings)
    return problems + token_count_problems(df, encoded)
