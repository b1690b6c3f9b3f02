"""`dpo cache verify`: does a cache cover these data, made with this tokenizer and these weights?

Pair rows need a pair cache holding every example; data with several replies per prompt a reply cache holding every
reply of every set (stages/cache/replycache.py). A cache of the other layout is one problem line."""

from __future__ import annotations

import sys

from stages.cache import refcache, replycache
from stages.cache.fingerprint import folder_fingerprint
from stages.data.encode import encode_with_report, tokenizer_fingerprint
from stages.data.encodeset import encode_sets
from stages.model.models import check_model_dir, load_tokenizer
from stages.settings.groups import DataSpec, Lengths


def verify_cache(path: str, data: DataSpec, model: str | None, lengths: Lengths) -> list[str]:
    """What is wrong with the cache at `path` for `data` (and `model`, tokenized with `lengths`: unset ones are
    the cache's); empty when it covers them."""
    df, meta = refcache.read_cache(path)
    loaded = data.load()  # pair rows, or reply sets (and the pairs their rule derives)
    if loaded.sets is not None:  # what the rule derived: said on stderr, the verdict is stdout's
        print("\n".join(loaded.lines()), file=sys.stderr)
    wrong = replycache.layout_problem(refcache.layout_of(meta), loaded.sets is not None)
    if wrong:
        return [wrong]
    if loaded.sets is None:
        problems = refcache.coverage_problems(df, [e.example_id for e in loaded.examples])
    else:
        problems = replycache.coverage_problems(df, loaded.sets)
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
    if loaded.sets is None:
        encoded, cuts = encode_with_report(tokenizer, loaded.examples, settings)
        counts = refcache.token_count_problems(df, encoded)
    else:
        encoded_sets, cuts = encode_sets(tokenizer, loaded.sets, settings)
        counts = replycache.token_count_problems(df, encoded_sets)
    if cuts.anything:  # not a problem (the cache cut them the same way): said on stderr, the verdict is stdout's
        print(f"tokenize: {cuts.summary()}", file=sys.stderr)
    return problems + counts
