"""Stage one as shard jobs (`--num-shards N --shard-index I|auto`) and `dpo cache merge`.

Pinned: the split (every id in exactly one shard, independent of row order, shard tokens within one longest
example of each other - the greedy bound - and within a few percent on the real HH file); the scheduler index
(`auto`); a 3-shard run merged equals the single job (same ids, same manifest, values within fp32 rounding of a
different batch composition); `dpo train` takes the merged file; `dpo cache info` says it came from 3 shards;
the merge refuses, with one line, every inconsistent set of shards.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UserError
from stages.cache import refcache, shards
from stages.data.encode import Encoded, TokenizeSettings, encode_examples
from stages.data.rows import ids_digest, load_examples
from stages.model.models import load_tokenizer
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from tests.test_precompute import (  # noqa: F401
    CHAT_ROWS,
    MAXLEN,
    MAXPROMPT,
    hh_rows,
    invoke,
    max_abs_diff,
    run_inproc,
    write_jsonl,
)

N = 3


def fake(i: int, p: int, c: int, r: int) -> Encoded:
    return Encoded(f"{i:032x}", (1,) * p, (2,) * c, (3,) * r)


# ------------------------------------------------------------------------------------------------ the split
def test_every_id_in_exactly_one_shard_whatever_the_order():
    rng = random.Random(0)
    items = [fake(i, rng.randint(1, 300), rng.randint(1, 200), rng.randint(1, 200)) for i in range(500)]
    split = shards.assign_shards(items, 4)
    ids = [e.example_id for s in split for e in s]
    assert sorted(ids) == sorted(e.example_id for e in items)
    shuffled = items[:]
    rng.shuffle(shuffled)
    again = shards.assign_shards(shuffled, 4)
    assert [{e.example_id for e in s} for s in again] == [{e.example_id for e in s} for s in split]
    for s in split:  # each shard keeps the given order (the stage sorts its own batches)
        positions = [items.index(e) for e in s]
        assert positions == sorted(positions)


def test_shards_within_one_longest_example_of_each_other():
    rng = random.Random(1)
    items = [fake(i, rng.randint(1, 900), rng.randint(1, 400), rng.randint(1, 400)) for i in range(97)]
    for n in (2, 3, 5, 8):
        loads = [sum(shards.example_tokens(e) for e in s) for s in shards.assign_shards(items, n)]
        # greedy largest-first onto the lightest shard: max - min never exceeds the largest single example
        assert max(loads) - min(loads) <= max(shards.example_tokens(e) for e in items), (n, loads)
        assert sum(loads) == sum(shards.example_tokens(e) for e in items)


def test_balanced_within_a_few_percent_on_the_hh_file(hh_path, tiny_llama):
    examples, _ = load_examples([hh_path])
    encoded, _ = encode_examples(load_tokenizer(str(tiny_llama)), examples, TokenizeSettings(1024, 512))
    for n in (4, 8, 32):
        loads = [sum(shards.example_tokens(e) for e in s) for s in shards.assign_shards(encoded, n)]
        spread = (max(loads) - min(loads)) / (sum(loads) / n)
        print(f"{len(encoded)} HH examples in {n} shards: token spread {100 * spread:.3f}%")
        assert spread < 0.03, loads


def test_shard_index_from_the_scheduler():
    assert shards.resolve_index("2", 4, {}) == 2
    assert shards.resolve_index(3, 4, {}) == 3
    assert shards.resolve_index("auto", 4, {"SLURM_ARRAY_TASK_ID": "1"}) == 1
    # --array=1-4: ids start at SLURM_ARRAY_TASK_MIN
    assert shards.resolve_index("auto", 4, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                                            "SLURM_ARRAY_TASK_COUNT": "4"}) == 3
    assert shards.resolve_index("auto", 4, {"JOB_COMPLETION_INDEX": "0"}) == 0
    cases = [("auto", {}, "neither SLURM_ARRAY_TASK_ID"), ("auto", {"JOB_COMPLETION_INDEX": "4"}, "outside 0..3"),
             ("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, "--array=0-3"),
             ("7", {}, "outside 0..3"), ("x", {}, "not a shard index")]
    for value, env, needle in cases:
        with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("-", r"\-")):
            shards.resolve_index(value, 4, env)


def test_shard_file_name():
    assert shards.shard_path(Path("cache/ref.parquet"), 2, 4) == Path("cache/ref.shard-2-of-4.parquet")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sharded(tiny_llama, hh_path, tmp_path_factory):
    """30 examples (25 HH + 5 chat rows): one single job and three shard jobs of the same data."""
    d = tmp_path_factory.mktemp("shards")
    data = [write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, 25)), write_jsonl(d / "chat.jsonl", CHAT_ROWS)]
    single = run_inproc(tiny_llama, data, d / "single" / "ref.parquet", max_tokens_per_batch=2048)
    files = [precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=tuple(map(str, data)),
                                                  output=str(d / "sh" / "ref.parquet"), max_length=MAXLEN,
                                                  max_prompt_length=MAXPROMPT, max_tokens_per_batch=2048, num_shards=N,
                                                  shard_index=str(i)))
             for i in range(N)]
    assert files == [d / "sh" / f"ref.shard-{i}-of-{N}.parquet" for i in range(N)]
    return {"dir": d, "data": data, "single": single, "single_path": d / "single" / "ref.parquet", "files": files}


def test_shard_caches_record_their_slice(sharded):
    metas = [refcache.read_meta(f) for f in sharded["files"]]
    single_meta = refcache.read_meta(sharded["single_path"])
    all_ids = sharded["single"]["example_id"].to_list()
    seen = []
    for i, (f, m) in enumerate(zip(sharded["files"], metas)):
        ids = pl.read_parquet(f)["example_id"].to_list()
        seen += ids
        assert m["shard"]["index"] == i and m["shard"]["num_shards"] == N
        assert m["shard"]["examples"] == len(ids) > 0
        assert m["shard"]["ids_digest"] == ids_digest(ids)
        assert m["shard"]["all_ids_digest"] == ids_digest(all_ids) == single_meta["manifest"]["ids_digest"]
        assert m["shard"]["all_examples"] == len(all_ids) == 30
    assert sorted(seen) == sorted(all_ids)


def test_merge_equals_the_single_job(sharded, tmp_path):
    out = tmp_path / "merged.parquet"
    res = invoke("cache", "merge", *map(str, sharded["files"]), "--out", str(out))
    assert res.exit_code == 0, res.output
    merged = pl.read_parquet(out)
    single = sharded["single"]
    assert merged["example_id"].to_list() == single["example_id"].to_list()  # same ids, sorted
    assert merged.select("chosen_tokens", "rejected_tokens", "prompt_tokens").equals(
        single.select("chosen_tokens", "rejected_tokens", "prompt_tokens"))
    diff = max_abs_diff(merged, single)
    scale = float(single["ref_chosen_logps"].abs().max())
    print(f"merged vs single job: max |diff| {diff:.3e} on sums up to {scale:.1f} nats")
    # fp32 sums of a few hundred terms in another batch composition (other padding, other matmul blocking):
    # rounding of order 1e-7 relative per term, i.e. well under 1e-5 absolute for sums of this size
    assert diff <= 1e-5 + 1e-7 * scale
    meta, single_meta = refcache.read_meta(out), refcache.read_meta(sharded["single_path"])
    assert meta["manifest"] == single_meta["manifest"]  # what train and resume check: identical
    assert meta["tokenization"] == single_meta["tokenization"]
    assert meta["merged_from"]["num_shards"] == N and "shard" not in meta
    assert [s["index"] for s in meta["merged_from"]["shards"]] == list(range(N))
    info = invoke("cache", "info", str(out))
    assert info.exit_code == 0 and "merged from 3 shards" in info.output, info.output
    shard_info = invoke("cache", "info", str(sharded["files"][1]))
    assert "shard 1 of 3" in shard_info.output


def test_train_takes_the_merged_cache(sharded, tiny_llama, tmp_path):
    from stages.stage2 import train
    from stages.stage2.train import TrainConfig

    out = tmp_path / "merged.parquet"
    shards.merge_shards(list(map(str, sharded["files"])), out)
    train.run(TrainConfig.flat(model=str(tiny_llama), data=tuple(map(str, sharded["data"])), ref_cache=str(out),
                                    output=str(tmp_path / "run"), load_in_4bit=False, max_steps=1, batch_size=2,
                                    lora_r=4))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(UserError, match="not in the cache"):  # one shard alone does not cover the data
        train.run(TrainConfig.flat(model=str(tiny_llama), data=tuple(map(str, sharded["data"])),
                                   ref_cache=str(sharded["files"][0]), output=str(tmp_path / "run1"), max_steps=1))


def test_auto_index_from_the_environment(sharded, tiny_llama, tmp_path):
    out = tmp_path / "ref.parquet"
    args = ["precompute-ref", "--model", str(tiny_llama), "--out", str(out), "--num-shards", str(N),
            "--shard-index", "auto", "--max-length", str(MAXLEN), "--max-prompt-length", str(MAXPROMPT),
            "--max-tokens-per-batch", "2048"] + [a for p in sharded["data"] for a in ("--data", str(p))]
    from click.testing import CliRunner

    from stages.cli import main

    res = CliRunner().invoke(main, args, env={"JOB_COMPLETION_INDEX": "2"}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    made = pl.read_parquet(tmp_path / f"ref.shard-2-of-{N}.parquet")["example_id"].to_list()
    assert made == pl.read_parquet(sharded["files"][2])["example_id"].to_list()
    bad = CliRunner().invoke(main, args[:-2] + ["--shard-index", "5"] + args[-2:], env={})
    assert bad.exit_code == 2 and "outside 0..2" in bad.output


# ------------------------------------------------------------------------------------------- refusals
def rewrite(src: Path, dst: Path, edit_meta=None, edit_table=None) -> Path:
    """A copy of a shard cache with its metadata and/or rows changed (keeping the slice digest consistent)."""
    table = pq.read_table(src)
    meta = refcache.read_meta(src)
    if edit_table:
        table = edit_table(table)
        meta["shard"]["ids_digest"] = ids_digest(table.column("example_id").to_pylist())
        meta["shard"]["examples"] = table.num_rows
    if edit_meta:
        edit_meta(meta)
    refcache.write_atomic(table.replace_schema_metadata(None), dst, meta)
    return dst


def merge_error(tmp_path, *files) -> str:
    res = invoke("cache", "merge", *map(str, files), "--out", str(tmp_path / "out.parquet"))
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert len(lines[0]) <= 220
    assert not (tmp_path / "out.parquet").exists()
    return lines[0]


def test_merge_refuses_inconsistent_shards(sharded, tmp_path):
    f0, f1, f2 = sharded["files"]
    assert "shard 2 of 3 is missing" in merge_error(tmp_path, f0, f1)
    assert "given twice" in merge_error(tmp_path, f0, f1, f1, f2)
    dtype = rewrite(f1, tmp_path / "dtype.parquet", lambda m: m["manifest"].update(dtype="bf16"))
    assert "dtype" in merge_error(tmp_path, f0, dtype, f2)
    tok = rewrite(f1, tmp_path / "tok.parquet", lambda m: m["manifest"]["tokenization"].update(max_length=512))
    assert "tokenization.max_length" in merge_error(tmp_path, f0, tok, f2)
    model = rewrite(f1, tmp_path / "model.parquet", lambda m: m["manifest"].update(model="other"))
    assert "model" in merge_error(tmp_path, f0, model, f2)
    four = rewrite(f1, tmp_path / "four.parquet", lambda m: m["shard"].update(num_shards=4))
    assert "shard of 4" in merge_error(tmp_path, f0, four, f2)
    t0 = pq.read_table(f0)
    overlap = rewrite(f1, tmp_path / "overlap.parquet",
                      edit_table=lambda t: __import__("pyarrow").concat_tables(
                          [t.replace_schema_metadata(None), t0.slice(0, 1).replace_schema_metadata(None)]))
    assert "is in both" in merge_error(tmp_path, f0, overlap, f2)
    short = rewrite(f2, tmp_path / "short.parquet", edit_table=lambda t: t.slice(1))
    assert "not the 30 of the data" in merge_error(tmp_path, f0, f1, short)
    edited = tmp_path / "edited.parquet"
    refcache.write_atomic(pq.read_table(f2).slice(1).replace_schema_metadata(None), edited, refcache.read_meta(f2))
    assert "not the slice its metadata records" in merge_error(tmp_path, f0, f1, edited)
    assert "not a shard cache" in merge_error(tmp_path, f0, f1, sharded["single_path"])
    assert "no such cache file" in merge_error(tmp_path, f0, f1, tmp_path / "nope.parquet")


def test_merge_output_is_atomic(sharded, tmp_path, monkeypatch):
    """A failure while writing leaves no file at --out (written to a temporary name, then renamed)."""
    out = tmp_path / "merged.parquet"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        shards.merge_shards(list(map(str, sharded["files"])), out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_one_shard_settings_are_checked(sharded, tiny_llama, tmp_path):
    with pytest.raises(UserError, match="needs --num-shards"):
        run_inproc(tiny_llama, sharded["data"], tmp_path / "x.parquet", shard_index="2")
    with pytest.raises(UserError, match="no examples"):
        precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(sharded["data"][1]),),
                                             output=str(tmp_path / "y.parquet"), num_shards=6, shard_index="5"))
