"""`dpo cache info / verify / export-trl` and `dpo sample` on data with several replies per prompt (issue 23), on the
tiny random model: a reply cache is described, checked and exported as TRL pairs whose values are the same as the
expanded pair rows' (the same pairs written as prompt/chosen/rejected rows, cached as a pair cache)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from stages.cli import main as cli_main
from stages.data.replyset import reply_id
from tests.hhrows import expanded_pairs

LENGTHS = ("--max-length", "64", "--max-prompt-length", "32")
SETS = [  # generic shape; set 3 has a tie (never a pair)
    {"prompt": "What is two plus two?", "completions": ["Four.", "Five.", "It is four."], "scores": [3, 1, 2]},
    {"prompt": "Name a colour.", "completions": ["Blue.", "Dog.", "Red is one.", "I cannot."], "scores": [4, 1, 3, 2]},
    {"prompt": "Say hello.", "completions": ["Hello!", "Goodbye.", "Hi there."], "scores": [2, 0, 2]},
    {"prompt": "Is the sky blue?", "completions": ["Yes, usually.", "No.", "Green."], "scores": [5, 2, 1]},
    {"prompt": "Count to three.", "completions": ["One, two, three.", "Three.", "1 2 3", "Four."],
     "ranks": [1, 3, 2, 4]},
]
CHAT_SETS = [  # replies as assistant message lists
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "completions": ["Paris.", "Rome.", "It is Paris, of course."], "scores": [3, 1, 2]},
    {"prompt": [{"role": "user", "content": "Thanks, that was helpful!"}],
     "completions": ["You are welcome.", "No.", "Anything else?"], "scores": [3, 1, 2]},
]
for _s in CHAT_SETS:
    _s["completions"] = [[{"role": "assistant", "content": c}] for c in _s["completions"]]


def invoke(*args: str):
    """`dpo ARGS` in this process."""
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


expanded = expanded_pairs  # tests/hhrows.py


def precompute(model: Path, data: Path, out: Path) -> Path:
    res = invoke("precompute-ref", "--model", str(model), "--data", str(data), "--output", str(out), *LENGTHS)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tmp_path_factory) -> dict:
    """Reply sets and their expanded pair rows (text and conversational), each precomputed as its own cache."""
    root = tmp_path_factory.mktemp("reply_tools")
    files = {"sets": write_jsonl(root / "sets.jsonl", SETS), "pairs": write_jsonl(root / "pairs.jsonl", expanded(SETS)),
             "chat_sets": write_jsonl(root / "chat_sets.jsonl", CHAT_SETS),
             "chat_pairs": write_jsonl(root / "chat_pairs.jsonl", expanded(CHAT_SETS))}
    caches = {f"{k}_cache": precompute(tiny_llama, p, root / f"{k}.parquet") for k, p in files.items()}
    more = [dict(SETS[1], completions=SETS[1]["completions"] + ["Purple."], scores=[4, 1, 3, 2, 0])]  # a new reply
    return {"model": tiny_llama, "root": root, **files, **caches,
            "more": write_jsonl(root / "more.jsonl", SETS[:1] + more + SETS[2:])}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------------ info
def test_info_names_replies_prompts_and_pairs(made):
    res = invoke("cache", "info", str(made["sets_cache"]))
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(made["sets_cache"])
    n_pairs = len(expanded(SETS))
    lines = res.output.splitlines()
    assert f"  rows: {df.height} replies of 5 prompts" in lines and df.height == 17
    assert "  layout: replies (one row per prompt and reply; every --pairs rule reads them)" in lines
    assert f"  pairs: 5 prompts, 17 replies -> {n_pairs} pairs (--pairs all); 1 tied pair skipped (at precompute)" \
        in lines, res.output
    assert f"  ref_logps: mean {df['ref_logps'].mean():.4f}  min {df['ref_logps'].min():.4f}  " \
           f"max {df['ref_logps'].max():.4f}" in lines
    assert f"  reply_tokens: mean {df['reply_tokens'].mean():.1f}  total {df['reply_tokens'].sum()}" in lines
    assert "  data: 5 rows read from 1 file(s), 5 kept, 0 skipped, 0 too long" in lines
    assert "ref_chosen_logps" not in res.output and lines[-1] == "  full metadata: add --json"
    full = json.loads(invoke("cache", "info", str(made["sets_cache"]), "--json").output)
    assert full["rows"] == 17 and full["stats"]["prompts"] == {"total": 5}
    assert full["stats"]["prompt_tokens"]["total"] == df["prompt_tokens"].sum()
    assert full["metadata"]["layout"] == "replies" and full["metadata"]["data"]["replies"] == 17
    pair = invoke("cache", "info", str(made["pairs_cache"])).output  # a pair cache: no reply lines
    assert f"  rows: {n_pairs}" in pair.splitlines() and "layout" not in pair and "ref_chosen_logps: mean" in pair


# ------------------------------------------------------------------------------------------------------ verify
def test_verify_reply_data(made):
    for extra in ((), ("--model", str(made["model"]))):
        res = invoke("cache", "verify", str(made["sets_cache"]), "--data", str(made["sets"]), *extra)
        assert res.exit_code == 0 and res.stdout.startswith("ok: "), res.output
        assert "pairs: 5 prompts" in res.stderr, res.stderr  # what the rule derived, beside the verdict
    res = invoke("cache", "verify", str(made["sets_cache"]), "--data", str(made["more"]))  # one reply not cached
    assert res.exit_code == 1, res.output
    key = reply_id("Name a colour.", "Purple.")
    assert res.stdout.splitlines() == [f"MISMATCH 1 of 18 replies are not in the cache (e.g. {made['more']} row 2, "
                                       f"reply 5, id {key})"]
    res = invoke("cache", "verify", str(made["sets_cache"]), "--data", str(made["sets"]), "--model",
                 str(made["model"]), "--max-prompt-length", "4")  # other lengths: named, with the token counts
    assert res.exit_code == 1 and "MISMATCH max_prompt_length: cache 32, now 4" in res.output, res.output
    assert "replies tokenize to other lengths than cached" in res.output and "prompt/reply 4/" in res.output


def test_verify_a_cache_of_the_other_layout(made):
    for data, cache, shape in (("pairs", "sets_cache", "pair rows"), ("sets", "pairs_cache", "several replies")):
        res = invoke("cache", "verify", str(made[cache]), "--data", str(made[data]))
        assert res.exit_code == 1, res.output
        (line,) = res.stdout.splitlines()
        assert line.startswith("MISMATCH a cache of ") and shape in line, line
        assert line.endswith("rerun `dpo precompute-ref` over this data"), line


# ------------------------------------------------------------------------------------------------------ export
def export(made, data: str, cache: str, out: Path, *extra: str) -> tuple[list[dict], str]:
    res = invoke("cache", "export-trl", str(made[cache]), "--data", str(made[data]), "--output", str(out), *extra)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in out.read_text().splitlines()], res.output


def test_export_derived_pairs_equal_the_pair_export(made, tmp_path):
    rows, output = export(made, "sets", "sets_cache", tmp_path / "sets.jsonl")
    oracle, pair_output = export(made, "pairs", "pairs_cache", tmp_path / "pairs.jsonl")
    assert len(rows) == len(expanded(SETS)) == len(oracle)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["example_id"]) for r in rows] == \
        [(r["prompt"], r["chosen"], r["rejected"], r["example_id"]) for r in oracle]  # same pairs, ids, order
    replies = dict(pl.read_parquet(made["sets_cache"]).select("reply_id", "ref_logps").iter_rows())
    for r, o in zip(rows, oracle):
        assert r["ref_chosen_logps"] == replies[reply_id(r["prompt"], r["chosen"])]
        assert r["ref_rejected_logps"] == replies[reply_id(r["prompt"], r["rejected"])]
        assert abs(r["ref_chosen_logps"] - o["ref_chosen_logps"]) < 1e-3
        assert abs(r["ref_rejected_logps"] - o["ref_rejected_logps"]) < 1e-3
    assert output.splitlines()[1].startswith("pairs: 5 prompts, 17 replies -> ") and "pairs:" not in pair_output
    rows, output = export(made, "sets", "sets_cache", tmp_path / "bw.jsonl", "--pairs", "best-worst")
    assert len(rows) == 5 and "cached replies are in no exported pair" in output.splitlines()[-1]


def test_export_chat_convention_on_reply_data(made, tmp_path):
    """--trl-chat-convention adds each pair's tails on derived pairs as on the same pairs as pair rows."""
    rows, output = export(made, "chat_sets", "chat_sets_cache", tmp_path / "c.jsonl", "--trl-chat-convention")
    oracle, _ = export(made, "chat_pairs", "chat_pairs_cache", tmp_path / "p.jsonl", "--trl-chat-convention")
    assert "--trl-chat-convention: added" in output and len(rows) == len(oracle) == 6
    replies = dict(pl.read_parquet(made["chat_sets_cache"]).select("reply_id", "ref_logps").iter_rows())
    for r, o in zip(rows, oracle):
        assert r["prompt"] == o["prompt"] and r["chosen"] == o["chosen"]
        assert abs(r["ref_chosen_logps"] - o["ref_chosen_logps"]) < 1e-3
        assert abs(r["ref_rejected_logps"] - o["ref_rejected_logps"]) < 1e-3
        assert r["ref_chosen_logps"] < replies[reply_id(r["prompt"], r["chosen"])]  # a tail token was added


def test_export_errors_on_reply_data(made, tmp_path):
    res = invoke("cache", "export-trl", str(made["sets_cache"]), "--data", str(made["more"]), "--output",
                 str(tmp_path / "x.jsonl"))
    (line,) = error_lines(res.output)
    assert res.exit_code == 2 and "1 of 18 replies are not in the cache" in line and "row 2" in line, res.output
    assert reply_id("Name a colour.", "Purple.")[:12] in line and not (tmp_path / "x.jsonl").exists()
    for data, cache in (("pairs", "sets_cache"), ("sets", "pairs_cache")):
        res = invoke("cache", "export-trl", str(made[cache]), "--data", str(made[data]), "--output",
                     str(tmp_path / "y.jsonl"))
        (line,) = error_lines(res.output)
        assert res.exit_code == 2 and "rerun `dpo precompute-ref` over this data" in line, res.output


# ------------------------------------------------------------------------------------------------------ sample
def test_sample_takes_each_prompt_once(made, tmp_path):
    res = invoke("sample", "--model", str(made["model"]), "--data", str(made["sets"]), "-n", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output
    samples = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [SETS[0]["prompt"], SETS[1]["prompt"]]  # set 1 has 3 pairs
