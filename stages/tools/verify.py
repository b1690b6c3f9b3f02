"""`dpo cache verify`: does a cache cover these data, made with this tokenizer and these weights?"""

from __future__ import annotations

import sys

from stages.cache import refcache
from stages.cache.fingerprint import folder_fingerprint
from stages.data.encode import encode_with_report, tokenizer_fingerprint
from stages.data.rows import load_examples
from stages.model.models import check_model_dir, load_tokenizer
from stages.settings.groups import DataSpec, Lengths


def verify_cache(path: str, data: DataSpec, model: str | None, lengths: Lengths) -> list[str]:
    """What is wrong with the cache at `path` for `data` (and `model`, tokenized with `lengths`: unset ones are
    the cache's); empty when it covers them."""
    df, meta = refcache.read_cache(path)
    examples, _ = load_examples(data.data, data.fields())
    problems = refcache.coverage_problems(df, [e.example_id for e in examples])
    if model is None:
        return problems
    check_model_dir(model)
    settings = lengths.tokenize(meta)
    tokenizer = load_tokenizer(model)
    problems += refcache.tokenization_problems(meta, tokenizer_fingerprint(tokenizer, settings), False)
    weights = folder_fingerprint(model, meta["model"]["weights"].get("full_hash", False))["hash"]
    if weights != meta["manifest"]["model"]:
        problems.append(f"model weights: cache made from {meta['model']['path']} ({meta['manifest']['model']}), "
                        f"{model} has fingerprint {weights}")
    encoded, cuts = encode_with_report(tokenizer, examples, settings)
    if cuts.anything:  # not a problem (the cache cut them the same way): said on stderr, the verdict is stdout's
        print(f"tokenize: {cuts.summary()}", file=sys.stderr)
    return problems + refcache.token_count_problems(df, encoded)
