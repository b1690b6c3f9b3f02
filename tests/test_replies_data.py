"""Many replies per prompt, the data layer (issue 23): reading reply rows into ReplySets, the pair rules and their
report, tokenizing a set as its pairs are tokenized, and load_data leaving pair data exactly as it was.

Pinned here: every accepted shape (generic scores / ranks, text and chat, UltraFeedback, Nectar; JSON lines and
parquet); the rules worked by hand (ties never pair, the gap); the report's text; one line per bad input naming
file, row, field and the fix; duplicates dropped and counted; mixed shapes refused; and the key property: for
every derived pair, encode_example gives the encoded set's prompt and the two replies' ids, and the pair's id is
the one the same pair has as a pair row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from stages.base.errors import UserError
from stages.data.encode import (
    TokenizeSettings,
    TruncationReport,
    cut_chat_prompt,
    encode_example,
    encode_with_report,
)
from stages.data.encodeset import encode_set, encode_sets
from stages.data.pairs import PairReport, PairRule, set_pairs
from stages.data.replies import (
    FEWER,
    TIED,
    ReplyFields,
    data_shape,
    is_reply_row,
    load_data,
    load_reply_sets,
)
from stages.data.replyset import MAX_REPLIES
from stages.data.rows import DUPLICATE, FieldMap, content_id, load_examples
from tests.tiny import build_tokenizer


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write(name: str, rows: list) -> str:
    """Rows into `name` (relative: the tests run in tmp_path, so error lines stay short); .parquet or JSON lines."""
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), name)
    else:
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return name


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny ChatML tokenizer, loaded from a folder as a model's tokenizer is (tiny_llama's, without a model)."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def one_set(row: dict, fields: ReplyFields = ReplyFields()):
    sets, report, dups = load_reply_sets([write("one.jsonl", [row])], fields)
    assert report.kept == 1, report.summary()
    return sets[0]


def uf_completion(text: str, overall: float, helpfulness: str = "3", as_list: bool = False) -> dict:
    rating = {"Rating": helpfulness, "Rationale": "..."}
    return {"response": text, "overall_score": overall, "fine-grained_score": overall / 2, "model": "m",
            "annotations": {"helpfulness": [rating] if as_list else rating, "honesty": {"Rating": "5"}}}


# --------------------------------------------------------------------------------------------------- shapes
def test_generic_text_rows_with_scores_or_ranks():
    s = one_set({"prompt": "2+2=", "completions": [" 4", " 5", " four"], "scores": [2, 0, 1.5], "id": 7})
    assert (s.prompt, s.replies, s.scores, s.is_chat, s.source, s.row) == \
        ("2+2=", (" 4", " 5", " four"), (2.0, 0.0, 1.5), False, "one.jsonl", 1)
    s = one_set({"prompt": "2+2=", "completions": [" 4", " 5", " four"], "ranks": [1, 3, 2]})
    assert s.scores == (-1.0, -3.0, -2.0)


def test_text_replies_that_all_repeat_the_prompt_lose_it():
    s = one_set({"prompt": "Q: hi?", "completions": ["Q: hi? yes", "Q: hi? no"], "scores": [1, 0]})
    assert s.replies == (" yes", " no")
    s = one_set({"prompt": "Q: hi?", "completions": ["Q: hi? yes", "no"], "scores": [1, 0]})
    assert s.replies == ("Q: hi? yes", "no")  # not all of them: left as given


def test_chat_rows_messages_and_strings():
    s = one_set({"prompt": [{"role": "system", "content": "Be brief.", "x": 1}, user("Hi")],
                 "completions": [[assistant("Hello!")], "Go away."], "scores": [1, 0]})
    assert s.is_chat and s.prompt == ({"role": "system", "content": "Be brief."}, user("Hi"))
    assert s.replies == ((assistant("Hello!"),), (assistant("Go away."),))
    s = one_set({"prompt": "Hi", "completions": [[assistant("Hello!")], [assistant("Bye.")]], "ranks": [2, 1]})
    assert s.is_chat and s.prompt == (user("Hi"),) and s.scores == (-2.0, -1.0)


def test_ultrafeedback_rows_are_conversations_scored_by_overall_score_or_an_aspect():
    row = {"instruction": "Name a fruit.", "source": "x",
           "completions": [uf_completion("An apple.", 8.5, "5"), uf_completion("A brick.", 2.0, "1", as_list=True),
                           uf_completion("A pear.", 7.0, "N/A")]}
    s = one_set(row)
    assert s.is_chat and s.prompt == (user("Name a fruit."),)
    assert s.replies == ((assistant("An apple."),), (assistant("A brick."),), (assistant("A pear."),))
    assert s.scores == (8.5, 2.0, 7.0)
    loaded = load_data([write("uf.jsonl", [row])], reply_fields=ReplyFields(rank_by="helpfulness"))
    (s,) = loaded.sets
    assert s.scores == (5.0, 1.0) and len(s.replies) == 2  # "N/A": that reply is dropped and counted
    assert loaded.pair_report.unrated_replies == 1 and "1 unrated reply (N/A) dropped" in loaded.lines()[1]
    s = one_set(row, ReplyFields(rank_by="fine-grained_score"))  # a plain key of the objects works too
    assert s.scores == (4.25, 1.0, 3.5)


def test_nectar_rows_are_plain_text_ranked_answers():
    row = {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant: ", "turns": 1,
           "answers": [{"answer": "A brick.", "model": "a", "rank": 3.0}, {"answer": "An apple.", "model": "b",
                                                                            "rank": 1.0},
                       {"answer": "A pear.", "model": "c", "rank": 2.0}]}
    s = one_set(row)
    assert not s.is_chat and s.prompt == row["prompt"]
    assert s.replies == ("A brick.", "An apple.", "A pear.") and s.scores == (-3.0, -1.0, -2.0)


def test_parquet_gives_the_same_sets_as_json_lines():
    rows = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "answers": [{"answer": " Hello.", "model": "a", "rank": 2.0},
                                                                  {"answer": " Hi!", "model": "b", "rank": 1.0}]},
            {"prompt": "\n\nHuman: Bye\n\nAssistant:", "answers": [{"answer": " Bye.", "model": "a", "rank": 1.0},
                                                                   {"answer": " No.", "model": "b", "rank": 2.0}]}]
    from_parquet, report, _ = load_reply_sets([write("n.parquet", rows)])
    from_json, _, _ = load_reply_sets([write("n.jsonl", rows)])
    assert report.kept == 2 and [(s.prompt, s.replies, s.scores) for s in from_parquet] == \
        [(s.prompt, s.replies, s.scores) for s in from_json]
    uf = [{"instruction": "Name a fruit.", "completions": [uf_completion("An apple.", 8.0), uf_completion("No.", 1)]}]
    (s,), _, _ = load_reply_sets([write("uf.parquet", uf)])
    assert s.is_chat and s.scores == (8.0, 1.0)


def test_the_first_row_decides_the_shape(tmp_path):
    reply_row = {"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]}
    pair_row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert is_reply_row(reply_row, ReplyFields()) and not is_reply_row(pair_row, ReplyFields())
    assert is_reply_row({"answers": []}, ReplyFields()) and not is_reply_row({"completions": None}, ReplyFields())
    assert is_reply_row({"outs": ["a"]}, ReplyFields(replies="outs"))
    assert data_shape([write("r.jsonl", [reply_row, pair_row])], ReplyFields()) == "replies"
    assert data_shape([write("p.jsonl", [pair_row, reply_row]), "r.jsonl"], ReplyFields()) == "pairs"


# --------------------------------------------------------------------------------------------------- rules
SCORES = (3, 1, 3, 2, 1)


@pytest.mark.parametrize("rule, want", [
    (PairRule("all"), ([(0, 1), (0, 3), (0, 4), (2, 1), (3, 1), (2, 3), (2, 4), (3, 4)], 2, 0)),
    (PairRule("all", 2), ([(0, 1), (0, 4), (2, 1), (2, 4)], 2, 4)),
    (PairRule("best-worst"), ([(0, 1)], 0, 0)),
    (PairRule("best-worst", 2.5), ([], 0, 1)),
    (PairRule("best-rest"), ([(0, 1), (0, 3), (0, 4)], 1, 0)),
    (PairRule("best-rest", 1.5), ([(0, 1), (0, 4)], 1, 1)),
])
def test_pair_rules_worked_by_hand(rule, want):
    assert set_pairs(SCORES, rule) == want


def test_ties_never_pair_and_a_gap_equal_up_to_rounding_counts():
    assert set_pairs((1, 1), PairRule("best-worst")) == ([], 1, 0)
    assert set_pairs((1, 1, 1), PairRule("all")) == ([], 3, 0)
    assert set_pairs((0, 5), PairRule("all")) == ([(1, 0)], 0, 0)  # chosen is the higher, whatever the order
    assert set_pairs((8.1, 8.3), PairRule("all", 0.2)) == ([(1, 0)], 0, 0)
    assert set_pairs((1,), PairRule()) == ([], 0, 0)


@pytest.mark.parametrize("flags", [["--pairs", "some"], ["--min-score-gap", "-1"], ["--min-score-gap", "nan"],
                                   ["--min-score-gap", "inf"]])
def test_a_bad_rule_is_one_line(flags, tmp_path):
    """The settings check the rule (stages/settings/groups.DataSpec) before anything is read."""
    from click.testing import CliRunner

    from stages.cli import main

    res = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "c.parquet"), "--data", "x.jsonl", *flags])
    assert res.exit_code == 2 and ("--pairs" in res.output or "--min-score-gap" in res.output), res.output
    assert "Traceback" not in res.output and not (tmp_path / "c.parquet").exists()


def test_the_pair_report_reads_as_one_line():
    report = PairReport(prompts=412, replies=1648, pairs=2310, tied_skipped=162)
    assert report.summary() == "412 prompts, 1,648 replies -> 2,310 pairs (--pairs all); 162 tied pairs skipped"
    report = PairReport(prompts=1, replies=2, pairs=1, below_gap_skipped=4, no_pair_sets=5, duplicate_replies=3,
                        rule=PairRule("best-rest", 0.5))
    assert report.summary() == ("1 prompt, 2 replies -> 1 pair (--pairs best-rest, --min-score-gap 0.5); "
                                "4 pairs below the score gap skipped, 5 prompts without a pair skipped, "
                                "3 duplicate replies dropped")
    assert PairReport().summary() == "0 prompts, 0 replies -> 0 pairs (--pairs all)"
    assert report.summary().isascii()


# --------------------------------------------------------------------------------------------------- bad input
GOOD = {"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]}
BAD = [  # (row 2, field, words of the problem, words of the fix)
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "scores", "1 value for 2 replies", "one number"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, "x"]}, "scores", "score 2 is a string", "a number"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, float("nan")]}, "scores", "score 2 is nan", "finite"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, float("inf")]}, "scores", "score 2 is inf", "finite"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [True, 0]}, "scores", "score 1 is bool", "a number"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1]}, "ranks", "not a permutation of 1..2", "distinct"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 3]}, "ranks", "not a permutation", "1 = best"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "ranks": [1, 2]}, "scores", "'ranks'", "keep one"),
    ({"prompt": "p", "completions": ["a", "b"]}, "scores", "no 'scores' or 'ranks'", "--scores-field"),
    ({"prompt": "p", "completions": ["a"] * (MAX_REPLIES + 1), "scores": [0] * (MAX_REPLIES + 1)}, "completions",
     f"{MAX_REPLIES + 1} replies, more than {MAX_REPLIES}", "at most"),
    ({"prompt": "p", "completions": ["a", 3], "scores": [1, 0]}, "completions", "reply 2 is int", "text or"),
    ({"prompt": "p", "completions": ["a", [{"role": "user"}]], "scores": [1, 0]}, "completions", "'content'",
     "role"),
    ({"prompt": "p", "completions": [[user("a")], "b"], "scores": [1, 0]}, "completions", "starts with a 'user'",
     "assistant"),
    ({"prompt": " ", "completions": ["a", "b"], "scores": [1, 0]}, "prompt", "the prompt is empty", "needs a prompt"),
    ({"prompt": [], "completions": [[assistant("a")], "b"], "scores": [1, 0]}, "prompt", "empty", "needs a prompt"),
    ({"prompt": 5, "completions": ["a", "b"], "scores": [1, 0]}, "prompt", "got int", "as text"),
    ({"completions": ["a", "b"], "scores": [1, 0]}, "prompt", "missing", "--prompt-field"),
    ({"prompt": "p", "completions": "ab", "scores": [1, 0]}, "completions", "a list of replies", "as a list"),
    ({"prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}, "completions", "without 'response'", "Nectar"),
    ({"prompt": "p", "completions": [{"response": "a"}, "b"]}, "completions", "reply 2 is a string", "same way"),
    ({"prompt": "p", "completions": [{"response": "a"}, {"response": "b"}]}, "completions", "'overall_score'",
     "--rank-by"),
    ({"prompt": "p", "completions": [{"response": "a", "overall_score": "x"}, {"response": "b", "overall_score": 1}]},
     "completions", "reply 1 'overall_score' is 'x'", "numbers"),
    ({"prompt": "p", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 1}]}, "answers",
     "'rank' values are not a permutation", "distinct"),
]


@pytest.mark.parametrize("row, field, problem, fix", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_every_bad_input_is_one_line_naming_file_row_field_and_fix(row, field, problem, fix):
    path = write("bad.jsonl", [GOOD, row])
    with pytest.raises(UserError) as info:
        load_data([path])
    message = str(info.value)
    assert message.startswith(f"bad.jsonl: row 2, field '{field}': "), message
    place, _, rest = message.partition(": row 2, field ")
    assert problem in rest and "; " in rest and fix in rest.split("; ", 1)[1], message
    assert "\n" not in message and len(message) <= 200, message


def test_rank_by_names_an_aspect_or_key_the_objects_lack():
    row = {"instruction": "p", "completions": [uf_completion("a", 1), uf_completion("b", 2)]}
    path = write("uf.jsonl", [row])
    for rank_by, problem in (("truthfulness", "no annotations['truthfulness']['Rating']"), ("score", "no 'score'")):
        with pytest.raises(UserError, match=f"uf.jsonl: row 1, field 'completions': reply 1 has {problem}".replace(
                "[", r"\[").replace("]", r"\]")):
            load_data([path], reply_fields=ReplyFields(rank_by=rank_by))
    with pytest.raises(UserError, match="--rank-by needs replies given as objects"):
        load_data([write("g.jsonl", [GOOD])], reply_fields=ReplyFields(rank_by="helpfulness"))


# --------------------------------------------------------------------------------------------------- skips, duplicates
def test_duplicate_and_empty_replies_are_dropped_and_counted():
    row = {"prompt": "p", "completions": ["a", "b", "a", " ", "b"], "scores": [1, 2, 3, 4, 5]}
    loaded = load_data([write("d.jsonl", [row])])
    (s,) = loaded.sets
    assert s.replies == ("a", "b") and s.scores == (1.0, 2.0)  # the first of each is kept, with its score
    assert (loaded.pair_report.duplicate_replies, loaded.pair_report.empty_replies) == (2, 1)
    assert loaded.lines()[1].endswith("; 2 duplicate replies dropped, 1 empty reply dropped")
    assert load_reply_sets(["d.jsonl"])[2] == 2


def test_rows_without_a_pair_are_skipped_and_counted_or_with_strict_an_error():
    rows = [GOOD, {"prompt": "p", "completions": ["a", "a"], "scores": [1, 0]},
            {"prompt": "q", "completions": ["a", "b"], "scores": [1, 1]}, GOOD,
            {"prompt": "p", "completions": ["a", "b"], "scores": [2, 0]}]
    path = write("s.jsonl", rows)
    sets, report, _ = load_reply_sets([path])
    assert [s.row for s in sets] == [1, 5]
    assert (report.read, report.kept, report.skipped) == (5, 2, {FEWER: 1, TIED: 1, DUPLICATE: 1})
    assert load_data([path, path]).report.skipped[DUPLICATE] == 4  # the file twice: its 3 kept rows again
    with pytest.raises(UserError, match=r"^s.jsonl: row 2, field 'completions': 1 distinct non-empty reply"):
        load_reply_sets([path], strict=True)
    with pytest.raises(UserError, match=r"^t.jsonl: row 1, field 'scores': every reply has the same score"):
        load_reply_sets([write("t.jsonl", [rows[2]])], strict=True)


def test_a_set_the_rule_gives_no_pair_is_dropped_and_counted():
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "scores": [3, 1, 0.5]},
            {"prompt": "q", "completions": ["a", "b"], "scores": [1, 0.5]}]
    loaded = load_data([write("g.jsonl", rows)], rule=PairRule("all", 1))
    assert [s.row for s in loaded.sets] == [1] and loaded.pairs == [[(0, 1), (0, 2)]]
    assert (loaded.pair_report.no_pair_sets, loaded.pair_report.below_gap_skipped) == (1, 2)
    assert loaded.lines() == ["data: read 2 rows from 1 file, kept 2, skipped 0",
                              "pairs: 1 prompt, 3 replies -> 2 pairs (--pairs all, --min-score-gap 1); "
                              "2 pairs below the score gap skipped, 1 prompt without a pair skipped"]
    with pytest.raises(UserError, match=r"^g.jsonl: row 2: no pair under --pairs all, --min-score-gap 1 "):
        load_data(["g.jsonl"], rule=PairRule("all", 1), strict=True)


def test_a_pair_an_earlier_set_gave_is_not_derived_twice():
    rows = [{"prompt": "p", "completions": ["a", "b"], "scores": [1, 0]},
            {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 0, -1]}]
    loaded = load_data([write("g.jsonl", rows)])
    assert loaded.pairs == [[(0, 1)], [(0, 2), (1, 2)]] and loaded.pair_report.duplicate_pairs == 1
    assert len({e.example_id for e in loaded.examples}) == len(loaded.examples) == 3


# --------------------------------------------------------------------------------------------------- mixed shapes
def test_mixed_shapes_are_refused_in_one_line():
    reply_row, pair_row = GOOD, {"prompt": "p", "chosen": "a", "rejected": "b"}
    for rows, first in (([reply_row, pair_row], "a reply row (a list of replies)"),
                        ([pair_row, reply_row], "a pair row (chosen/rejected)")):
        with pytest.raises(UserError) as info:
            load_data([write("m.jsonl", rows)])
        message = str(info.value)
        assert message.startswith("m.jsonl: row 2: ") and f"the first row is {first}" in message
        assert "mixes the two shapes" in message and len(message) <= 200
    bad_pair = {"prompt": "p", "chosen": "a"}
    with pytest.raises(UserError, match="row 2, field 'rejected': missing"):  # an earlier error stays that error
        load_data([write("m.jsonl", [pair_row, bad_pair, reply_row])])
    Path("empty.jsonl").write_text("")
    with pytest.raises(UserError, match="^empty.jsonl: the file has no rows"):
        load_data([write("p.jsonl", [pair_row]), "empty.jsonl", write("r.jsonl", [reply_row])])


# --------------------------------------------------------------------------------------------------- pair data
def test_load_data_on_pair_files_is_load_examples_exactly(hh_path):
    rows = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
            {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]},
            {"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}]
    for paths in ([write("p.jsonl", rows)], [write("p.parquet", rows[:1]), "p.jsonl"], [str(hh_path)]):
        loaded = load_data(paths, FieldMap(), ReplyFields(), PairRule("best-worst"))
        examples, report = load_examples(paths)
        assert loaded.examples == examples and loaded.report == report
        assert (loaded.sets, loaded.pairs, loaded.pair_report) == (None, None, None)
        assert loaded.lines() == [f"data: {report.summary()}"]
    with pytest.raises(UserError, match="chosen equals rejected|same as chosen"):
        load_data(["p.jsonl"], strict=True)


# --------------------------------------------------------------------------------------------------- encoding
SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
LONG = " The weather today is sunny with a light breeze, and tomorrow there may be some rain."


def chat_rows() -> list[dict]:
    history = [user("How do I bake bread at home?"), assistant("You need flour, water, yeast and salt.")] * 3
    return [
        {"prompt": [SYSTEM, *history, user("And how long should it rise?")],
         "completions": [[assistant("About an hour." + LONG * 2)], "Two hours.", [assistant("I cannot help.")],
                         "It depends." + LONG],
         "scores": [4, 3, 1, 2]},
        {"prompt": "What is the capital of France?", "completions": ["Paris.", "Lyon." + LONG], "ranks": [1, 2]},
        {"instruction": "Name a fruit." + LONG,
         "completions": [uf_completion("An apple.", 8), uf_completion("A brick." + LONG, 2),
                         uf_completion("A pear.", 7)]},
    ]


def text_rows() -> list[dict]:
    return [
        {"prompt": "\n\nHuman: What is the capital of France?" + LONG * 2 + "\n\nAssistant:",
         "completions": [" Paris." + LONG, " Lyon.", " It is Paris, of course." + LONG * 3], "scores": [2, 0, 1]},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:",
         "answers": [{"answer": " Hello.", "rank": 2}, {"answer": " Hi! How can I help?" + LONG, "rank": 1},
                     {"answer": " Go away.", "rank": 3}]},
        {"prompt": "Q: what is 2+2?", "completions": ["Q: what is 2+2? 4", "Q: what is 2+2? 5"], "scores": [1, 0]},
    ]


@pytest.mark.parametrize("rows", [chat_rows(), text_rows()], ids=["chat", "text"])
@pytest.mark.parametrize("settings", [TokenizeSettings(1024, 512), TokenizeSettings(96, 64),
                                      TokenizeSettings(None, None), TokenizeSettings(70, 60)],
                         ids=["fits", "cut", "unlimited", "tight"])
def test_each_derived_pair_encodes_as_the_set_does(tok, rows, settings):
    loaded = load_data([write("sets.jsonl", rows)], rule=PairRule("all"))
    encoded, report = encode_sets(tok, loaded.sets, settings)
    assert len(encoded) == len(loaded.sets) and report.rows == len(loaded.sets) and report.skipped == 0
    assert report.replies == sum(len(s.replies) for s in loaded.sets)
    pair_report = TruncationReport()
    examples = iter(loaded.examples)
    for s, enc, pairs in zip(loaded.sets, encoded, loaded.pairs):
        assert (enc.prompt_id, enc.reply_ids, enc.scores) == (s.prompt_id, s.reply_ids, s.scores)
        for c, r in pairs:
            ex = next(examples)
            assert ex.example_id == content_id(s.prompt, s.replies[c], s.replies[r])
            e = encode_example(tok, ex, settings, pair_report)
            assert (e.prompt_ids, e.chosen_ids, e.rejected_ids) == (enc.prompt_ids, enc.replies[c], enc.replies[r])
    cut = settings.max_length is not None and settings.max_length < 100
    if cut and loaded.sets[0].is_chat:  # the long conversation drops turns: its replies are re-split
        assert cut_chat_prompt(tok, loaded.sets[0], settings.max_prompt_length).messages != list(loaded.sets[0].prompt)
    assert bool(report.prompts_cut and report.replies_cut) == cut  # the cut settings do cut prompts and replies
    assert report.summary().endswith(f"of {report.replies} replies (by at most {report.max_reply_tokens_cut} "
                                     "tokens)") if cut else report.summary().startswith("nothing cut")
    # the same pairs written as pair rows are read with the same ids
    pair_rows = [{"prompt": list(e.prompt) if e.is_chat else e.prompt,
                  "chosen": list(e.chosen) if e.is_chat else e.chosen,
                  "rejected": list(e.rejected) if e.is_chat else e.rejected} for e in loaded.examples]
    as_rows, _ = load_examples([write("pairs.jsonl", pair_rows)])
    assert [e.example_id for e in as_rows] == [e.example_id for e in loaded.examples]


def test_a_set_that_cannot_fit_is_skipped_and_counted_or_with_strict_an_error(tok):
    (s,) = load_data([write("t.jsonl", text_rows()[:1])]).sets
    settings = TokenizeSettings(max_length=8, max_prompt_length=8)
    report = TruncationReport()
    assert encode_set(tok, s, settings, report) is None and (report.rows, report.skipped, report.replies) == (1, 1, 0)
    with pytest.raises(UserError, match=r"^t.jsonl: row 1: the prompt \(8 tokens\) leaves no room"):
        encode_set(tok, s, settings, TruncationReport(), strict=True)
    (c,) = load_data([write("c.jsonl", chat_rows()[:1])]).sets
    report = TruncationReport()
    assert encode_set(tok, c, TokenizeSettings(64, 4), report) is None and report.skipped == 1
    with pytest.raises(UserError, match=r"^c.jsonl: row 1: no room for the last user turn"):
        encode_set(tok, c, TokenizeSettings(64, 4), TruncationReport(), strict=True)


def test_pair_rows_report_two_replies_a_row_as_before(tok):
    rows = [{"prompt": "2+2=", "chosen": " 4" + LONG, "rejected": " 5"}] * 1 + \
        [{"prompt": "3+3=", "chosen": " 6", "rejected": " 7"}]
    _, report = encode_with_report(tok, load_examples([write("p.jsonl", rows)])[0], TokenizeSettings(12, 6))
    assert report.replies == 4 and " of 4 replies (by at most " in report.summary()
