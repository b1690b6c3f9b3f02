"""`dpo cache info`: a short summary by default, the whole metadata behind --json. Caches written here directly (the
rows and metadata stage one writes), so no model runs."""

import json

from click.testing import CliRunner

from stages.cache import refcache
from stages.cli import main

ROWS = [{"example_id": f"e{i}", "ref_chosen_logps": -10.0 - i, "ref_rejected_logps": -20.0 - i,
         "chosen_tokens": 5 + i, "rejected_tokens": 6, "prompt_tokens": 7} for i in range(4)]


def meta(**extra) -> dict:
    tok = {"max_length": 64, "max_prompt_length": 32, "truncation": "rule"}
    return {"format_version": refcache.FORMAT_VERSION, "tool_version": "0.1.0", "created": "2025-01-02T03:04:05Z",
            "manifest": {"store_token_logps": False, "ids_digest": "abc"}, "tokenization": tok,
            "model": {"path": "/models/ref", "config_hash": "h"}, "adapter": {"path": "/adapters/sft", "hash": "a"},
            "dtype": "bf16", "quantization": "nf4", "world_size": 2,
            "data": {"files": {"a.jsonl": 6}, "rows_read": 6, "rows_kept": 5, "skipped": {"empty completion": 1},
                     "too_long": 1, "examples": 4, "ids_digest": "abc"}, **extra}


def write(tmp_path, m: dict):
    out = tmp_path / "ref.parquet"
    refcache.write_atomic(refcache.rows_to_table(ROWS, False), out, m)
    return str(out)


def info(*args):
    res = CliRunner().invoke(main, ["cache", "info", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_summary_names_what_made_the_cache(tmp_path):
    cut = {"prompts_cut": 3, "replies_cut": 1, "max_prompt_tokens_cut": 12, "max_reply_tokens_cut": 40, "skipped": 0}
    out = info(write(tmp_path, meta(truncation=cut)))
    for line in ("  rows: 4", "  data: 6 rows read from 1 file(s), 5 kept, 1 skipped (empty completion: 1), "
                 "1 too long", "  model: /models/ref (dtype bf16, quantization nf4)", "  adapter: /adapters/sft",
                 "  lengths: max_length 64, max_prompt_length 32",
                 "  truncation: 3 prompts cut (at most 12 tokens), 1 replies cut (at most 40 tokens), 0 skipped",
                 "  shards: one job", "  created: 2025-01-02T03:04:05Z by dpo-stages 0.1.0, 2 process(es)",
                 "  ref_chosen_logps: mean -11.5000  min -13.0000  max -10.0000",
                 "  chosen_tokens: mean 6.5  total 26"):
        assert line in out.splitlines(), (line, out)
    assert "ids_digest" not in out and len(out.splitlines()) < 20      # short: the metadata dump is behind --json


def test_truncation_not_recorded_and_shards(tmp_path):
    shard = {"index": 1, "num_shards": 3, "examples": 4, "all_examples": 12}
    out = info(write(tmp_path, meta(adapter=None, shard=shard)))
    assert "  truncation: not recorded" in out and "  adapter: none" in out
    assert "  shards: shard 1 of 3: 4 of 12 examples" in out


def test_json_holds_the_whole_metadata(tmp_path):
    m = meta(merged_from={"num_shards": 2, "shards": [{"examples": 2}, {"examples": 2}]})
    path = write(tmp_path, m)
    assert "  shards: merged from 2 shards (examples per shard: 2, 2)" in info(path)
    full = json.loads(info(path, "--json"))
    assert full["metadata"] == m and full["rows"] == 4 and full["path"] == path
    assert full["stats"]["ref_rejected_logps"] == {"mean": -21.5, "min": -23.0, "max": -20.0}
    assert full["stats"]["prompt_tokens"] == {"mean": 7.0, "total": 28}
