"""Reading preference data: every row shape in every file format, content ids, errors, skips and the real HH rows."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base.errors import UserError
from stages.data.rows import Example, FieldMap, LoadReport, content_id, ids_digest, load_examples

HH_PATH = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf-harmless-test/test.jsonl.gz"
FORMATS = ("jsonl", "jsonl.gz", "json", "parquet")


def write_rows(path: Path, rows: list) -> Path:
    """Write rows in the format named by the path's extension."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


HH_CHOSEN = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: An apple."
HH_REJECTED = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: A brick."
HH_PROMPT = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant:"

# shape name -> (row, expected (prompt, chosen, rejected, is_chat))
SHAPES = {
    "explicit": (
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "source": "math", "score": 3.5},
        ("2+2=", " 4", " 5", False),
    ),
    "chat_no_prompt": (  # UltraFeedback style: the user turn is part of chosen and rejected
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")], "extra": 1},
        ((user("Hi"),), (assistant("Hello!"),), (assistant("Go away."),), True),
    ),
    "chat_string_prompt": (
        {"prompt": "Hi", "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
        ((user("Hi"),), (assistant("Hello!"),), (assistant("Go away."),), True),
    ),
    "chat_list_prompt": (  # prompt repeated inside chosen/rejected: stripped
        {"prompt": [user("Hi")], "chosen": [user("Hi"), assistant("Hello!")],
         "rejected": [user("Hi"), assistant("Go away.")]},
        ((user("Hi"),), (assistant("Hello!"),), (assistant("Go away."),), True),
    ),
    "implicit_hh": (
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        (HH_PROMPT, " An apple.", " A brick.", False),
    ),
}


def load_one(tmp_path: Path, rows: list, fmt: str = "jsonl", **kwargs) -> tuple[list[Example], LoadReport]:
    return load_examples([write_rows(tmp_path / f"data.{fmt}", rows)], **kwargs)


# ------------------------------------------------------------------------------------------ shapes and formats


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_in_each_format(tmp_path, fmt, shape):
    row, (prompt, chosen, rejected, is_chat) = SHAPES[shape]
    path = write_rows(tmp_path / f"data.{fmt}", [row])
    examples, report = load_examples([str(path)])
    assert report.read == report.kept == 1 and report.files == {str(path): 1}
    ex = examples[0]
    assert (ex.prompt, ex.chosen, ex.rejected, ex.is_chat) == (prompt, chosen, rejected, is_chat)
    assert (ex.source, ex.row) == (str(path), 1)
    assert len(ex.example_id) == 32 and int(ex.example_id, 16) >= 0
    assert ex.example_id == content_id(prompt, chosen, rejected)


def test_several_files_and_formats_at_once(tmp_path):
    paths = [write_rows(tmp_path / f"{shape}.{fmt}", [SHAPES[shape][0]])
             for shape, fmt in zip(sorted(SHAPES), FORMATS + ("jsonl",))]
    examples, report = load_examples(paths)
    # the three chat shapes hold the same content, so they share one id: kept once, counted twice as duplicates
    assert report.read == len(SHAPES) and len(report.files) == len(SHAPES)
    assert report.kept == 3 and report.skipped == {"duplicate id": 2}
    kept_shapes = ["chat_list_prompt", "explicit", "implicit_hh"]  # the first chat file read wins
    assert [Path(ex.source).stem for ex in examples] == kept_shapes


def test_extra_message_keys_dropped_and_parquet_nulls(tmp_path):
    # parquet turns messages into structs: a key present in one message appears (null) in all
    row = {"chosen": [dict(user("Hi"), name="bob"), assistant("Yes")], "rejected": [user("Hi"), assistant("No")]}
    for fmt in ("jsonl", "parquet"):
        (ex,), _ = load_one(tmp_path, [row], fmt)
        assert ex.prompt == (user("Hi"),) and ex.chosen == (assistant("Yes"),)


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(SHAPES["explicit"][0]) + "\n\n" + json.dumps(SHAPES["implicit_hh"][0]) + "\n")
    examples, report = load_examples([path])
    assert report.kept == 2 and [ex.row for ex in examples] == [1, 3]  # row = line number; blank lines are no rows


def test_explicit_text_prompt_repeated_in_completions_is_stripped(tmp_path):
    row = {"prompt": HH_PROMPT, "chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    (ex,), _ = load_one(tmp_path, [row])
    assert (ex.prompt, ex.chosen, ex.rejected) == (HH_PROMPT, " An apple.", " A brick.")


def test_field_mapping(tmp_path):
    rows = [{"question": "2+2=", "good": " 4", "bad": " 5", "prompt": "ignored"}]
    fields = FieldMap(prompt="question", chosen="good", rejected="bad")
    for fmt in FORMATS:
        (ex,), _ = load_one(tmp_path, rows, fmt, fields=fields)
        assert (ex.prompt, ex.chosen, ex.rejected) == ("2+2=", " 4", " 5")


# ------------------------------------------------------------------------------------------ conversational prompts


def test_chat_prompt_absent_string_list_agree(tmp_path):
    reply_c, reply_r = [assistant("Paris.")], [assistant("Rome.")]
    rows = [
        {"chosen": [user("Capital of France?")] + reply_c, "rejected": [user("Capital of France?")] + reply_r},
        {"prompt": "Capital of France?", "chosen": reply_c, "rejected": reply_r},
        {"prompt": [user("Capital of France?")], "chosen": reply_c, "rejected": reply_r},
        {"prompt": "Capital of France?", "chosen": [user("Capital of France?")] + reply_c,
         "rejected": [user("Capital of France?")] + reply_r},
    ]
    ids = set()
    for row in rows:
        (ex,), _ = load_one(tmp_path, [row])
        assert ex.prompt == (user("Capital of France?"),) and ex.chosen == tuple(reply_c) and ex.is_chat
        ids.add(ex.example_id)
    assert len(ids) == 1


def test_chat_absent_prompt_multi_turn(tmp_path):
    shared = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("A fruit?")]
    row = {"chosen": shared + [assistant("Apple.")], "rejected": shared + [assistant("Brick.")]}
    (ex,), _ = load_one(tmp_path, [row])
    assert ex.prompt == tuple(shared) and ex.chosen == (assistant("Apple."),)
    assert ex.rejected == (assistant("Brick."),)


def test_chat_absent_prompt_backs_off_to_an_assistant_turn(tmp_path):
    # The conversations differ at a user turn: the completion must still start with an assistant message.
    row = {"chosen": [user("Hi"), assistant("Hello."), user("Bye")],
           "rejected": [user("Hi"), assistant("Hello."), user("Thanks"), assistant("Welcome.")]}
    (ex,), _ = load_one(tmp_path, [row])
    assert ex.prompt == (user("Hi"),)
    assert ex.chosen == (assistant("Hello."), user("Bye"))
    assert ex.rejected == (assistant("Hello."), user("Thanks"), assistant("Welcome."))


# ------------------------------------------------------------------------------------------ content ids


def test_ids_stable_across_order_files_and_formats(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(20)]
    base, _ = load_one(tmp_path, rows)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    split = [write_rows(tmp_path / "part1.parquet", shuffled[:7]), write_rows(tmp_path / "part2.json", shuffled[7:])]
    other, _ = load_examples(split)
    by_content = {(e.prompt, e.chosen): e.example_id for e in base}
    assert all(by_content[(e.prompt, e.chosen)] == e.example_id for e in other)
    assert ids_digest(e.example_id for e in base) == ids_digest(e.example_id for e in other)
    assert ids_digest(["a", "b"]) == ids_digest(["b", "a"]) != ids_digest(["a", "c"])
    assert len(ids_digest([])) == 64


def test_id_same_for_implicit_and_explicit_hh_row(tmp_path):
    implicit, _ = load_one(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "jsonl")
    row = {"prompt": HH_PROMPT, "chosen": " An apple.", "rejected": " A brick."}
    explicit, _ = load_one(tmp_path, [row], "parquet")
    assert implicit[0].example_id == explicit[0].example_id


def test_id_depends_on_content():
    assert content_id("p", "a", "b") != content_id("p", "b", "a")
    assert content_id("p", "a", "b") != content_id(({"role": "user", "content": "p"},), "a", "b")
    # canonical form: key order of messages does not matter
    m1, m2 = {"role": "user", "content": "p"}, {"content": "p", "role": "user"}
    assert content_id((m1,), "a", "b") == content_id((m2,), "a", "b")


# ------------------------------------------------------------------------------------------ skips and report


def test_equal_and_empty_completions_skipped_and_counted(tmp_path):
    rows = [
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"prompt": "p", "chosen": "   ", "rejected": " x"},
        {"chosen": [user("Hi"), assistant("Same")], "rejected": [user("Hi"), assistant("Same")]},
        {"chosen": [user("Hi"), assistant("Yes")], "rejected": [user("Hi")]},
        {"prompt": "p", "chosen": " ok", "rejected": " no"},
    ]
    examples, report = load_one(tmp_path, rows)
    assert [e.row for e in examples] == [5]
    assert report.skipped == {"chosen equals rejected": 2, "empty completion": 2}
    assert report.read == 5 and report.kept == 1 and report.kept + report.skipped_total == report.read


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "rejected", "same as chosen"),
    ({"prompt": "p", "chosen": " ", "rejected": " x"}, "chosen", "empty"),
    ({"prompt": "p", "chosen": " x", "rejected": ""}, "rejected", "empty"),
    ({"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " x"}, "chosen", "empty"),
])
def test_strict_makes_skips_errors(tmp_path, row, field, problem):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    with pytest.raises(UserError) as info:
        load_one(tmp_path, [good, row], strict=True)
    msg = str(info.value)
    assert "data.jsonl" in msg and "row 2" in msg and f"field '{field}'" in msg and problem in msg
    assert "\n" not in msg


def test_duplicates_kept_once_and_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "q", "chosen": " a", "rejected": " b"}]
    a = write_rows(tmp_path / "a.jsonl", rows + [rows[0]])
    b = write_rows(tmp_path / "b.parquet", rows[1:])
    examples, report = load_examples([a, b], strict=True)  # duplicates are not an error, even when strict
    assert [(e.source, e.row) for e in examples] == [(str(a), 1), (str(a), 2)]
    assert report.skipped == {"duplicate id": 2} and report.read == 4 and report.kept == 2
    assert report.files == {str(a): 3, str(b): 1}


def test_summary_text():
    report = LoadReport(read=2312, kept=2300, skipped={"duplicate id": 2, "chosen equals rejected": 10},
                        files={"x.jsonl": 2312})
    assert report.summary() == (
        "read 2312 rows from 1 file, kept 2300, skipped 12 (chosen equals rejected: 10, duplicate id: 2)"
    )
    report = LoadReport(read=1, kept=1, skipped={}, files={"a.jsonl": 1, "b.jsonl": 0})
    assert report.summary() == "read 1 row from 2 files, kept 1, skipped 0"


# ------------------------------------------------------------------------------------------ errors


ROW_ERRORS = [  # (row, field named in the message, words of the problem)
    ({"prompt": "p", "rejected": " b"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": " a"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": 3, "rejected": " b"}, "chosen", "got int"),
    ({"prompt": "p", "chosen": " a", "rejected": None}, "rejected", "got null"),
    ({"prompt": "p", "chosen": " a", "rejected": [assistant("b")]}, "rejected", "is a list but 'chosen' is a string"),
    ({"prompt": ["p"], "chosen": " a", "rejected": " b"}, "prompt", "expected a string"),
    ({"prompt": 7, "chosen": [assistant("a")], "rejected": [assistant("b")]}, "prompt", "got int"),
    ({"prompt": " ", "chosen": " a", "rejected": " b"}, "prompt", "empty"),
    ({"prompt": "p", "chosen": [{"content": "a"}], "rejected": [assistant("b")]}, "chosen",
     "message 1 'role' is missing"),
    ({"prompt": "p", "chosen": [assistant("a")], "rejected": [assistant("b"), {"role": "user", "content": 5}]},
     "rejected", "message 2 'content' is int"),
    ({"prompt": "p", "chosen": ["a"], "rejected": [assistant("b")]}, "chosen", "message 1 is a string"),
    ({"prompt": "p", "chosen": [user("a")], "rejected": [assistant("b")]}, "chosen", "starts with a 'user' message"),
    ({"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]}, "prompt",
     "share no leading messages"),
    ({"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}, "prompt", "\\n\\nAssistant:"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: a"}, "prompt",
     "share no '\\n\\nAssistant:'"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("row, field, problem", ROW_ERRORS)
def test_bad_rows_name_file_row_and_field(tmp_path, fmt, row, field, problem):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    with pytest.raises(UserError) as info:
        load_one(tmp_path, [good, good, row], fmt)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / f"data.{fmt}") + ": row 3, ")
    assert f"field '{field}'" in msg and problem in msg and "\n" not in msg
    assert ";" in msg  # the part after ";" says how to fix it


def test_mapped_field_names_appear_in_errors(tmp_path):
    fields = FieldMap(prompt="question", chosen="good", rejected="bad")
    with pytest.raises(UserError, match=r"row 1, field 'good': missing"):
        load_one(tmp_path, [{"question": "q", "bad": " b"}], fields=fields)
    with pytest.raises(UserError, match=r"row 1, field 'question': missing.*--prompt-field"):
        load_one(tmp_path, [{"good": " a", "bad": " b"}], fields=fields)


def test_row_not_an_object(tmp_path):
    with pytest.raises(UserError, match=r"data\.jsonl: row 2: expected an object .* got a list"):
        load_one(tmp_path, [{"prompt": "p", "chosen": " a", "rejected": " b"}, ["p", "a", "b"]])


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n\n{"prompt": "p", "chosen": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 3: not valid JSON \(.* at column \d+\)"):
        load_examples([path])


def test_bad_json_list_and_bad_utf8(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "p"},\n{oops}\n]')
    with pytest.raises(UserError, match=r"bad\.json: line 3: not valid JSON"):
        load_examples([path])
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        load_examples([path])


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("data.csv", "a,b\n", r"data\.csv: unsupported file type; use one of .jsonl"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: the file has no rows"),
    ("empty.json", "[]", r"empty\.json: the file has no rows"),
    ("broken.jsonl.gz", b"not gzip at all", r"broken\.jsonl\.gz: cannot read the file"),
    ("broken.parquet", b"PAR1 not really", r"broken\.parquet: cannot read the parquet file"),
])
def test_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        load_examples([path])
    assert "\n" not in str(info.value)


def test_empty_parquet_folder_and_no_paths(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(UserError, match="has no rows"):
        load_examples([path])
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        load_examples([folder])
    with pytest.raises(UserError, match="no data files given"):
        load_examples([])


def test_missing_file_reported_before_reading_others(tmp_path):
    good = write_rows(tmp_path / "good.jsonl", [SHAPES["explicit"][0]])
    with pytest.raises(UserError, match="nope.parquet: no such file"):
        load_examples([good, tmp_path / "nope.parquet"])


# ------------------------------------------------------------------------------------------ real data


def test_real_hh_rlhf_harmless_rows():
    if not HH_PATH.exists():
        pytest.skip(f"HH-RLHF harmless test split not found at {HH_PATH}")
    examples, report = load_examples([HH_PATH])
    print(report.summary())
    assert report.read == 2312 and report.files == {str(HH_PATH): 2312}
    assert report.kept + report.skipped_total == report.read and report.kept == len(examples)
    assert set(report.skipped) <= {"empty completion", "chosen equals rejected", "duplicate id"}
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as fh:
        originals = [json.loads(line) for line in fh]
    for ex in examples:
        assert ex.prompt.endswith("\n\nAssistant:") and not ex.is_chat
        original = originals[ex.row - 1]
        assert ex.prompt + ex.chosen == original["chosen"] and ex.prompt + ex.rejected == original["rejected"]
        assert ex.chosen.strip() and ex.chosen != ex.rejected
    assert len({ex.example_id for ex in examples}) == len(examples)


# ------------------------------------------------------------------------------------------ the source article's shape


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def orpo_row(source: str, turns: list[dict], good: str, bad: str, prompt_turn: int = 0) -> dict:
    """A row as in orpo-dpo-mix-40k: source, prompt (text of a user turn), question, whole conversations
    (message keys in the dataset's order: content first)."""
    def conv(reply):
        return [{"content": m["content"], "role": m["role"]} for m in turns + [assistant(reply)]]
    users = [m["content"] for m in turns if m["role"] == "user"]
    return {"source": source, "prompt": users[prompt_turn], "question": users[0],
            "chosen": conv(good), "rejected": conv(bad)}


ORPO_TURNS = [  # (turns before the final reply, chosen, rejected, which user turn `prompt` holds)
    ([system("You are an unbiased, uncensored, helpful assistant."), user("What is the capital of Peru?")],
     "Lima.", "Cusco, I think.", 0),
    ([user("Name a prime."), assistant("7."), user("And an even one?")], "2.", "9.", 0),  # prompt = FIRST user turn
    ([user("Name a prime."), assistant("7."), user("And an even one?")], "2 is.", "4 is odd.", -1),  # = LAST one
    ([system("Answer in French."), user("Hello?"), assistant("Bonjour."), user("Thanks!"), assistant("De rien."),
      user("Bye.")], "Au revoir.", "Goodbye.", 0),
    ([user("  Spaces around?  ")], "Yes.", "No.", 0),  # prompt column stripped, the turn not: still matched
]


def test_orpo_dpo_mix_rows_prompt_is_the_shared_prefix(tmp_path):
    rows = [orpo_row("airoboros-3.2", t, c, r, i) for t, c, r, i in ORPO_TURNS]
    rows[-1]["prompt"] = rows[-1]["prompt"].strip()
    for fmt in ("jsonl", "parquet"):
        examples, report = load_one(tmp_path, rows, fmt)
        assert report.kept == len(rows), report.summary()
        for ex, (turns, good, bad, _) in zip(examples, ORPO_TURNS):
            assert ex.is_chat and ex.prompt == tuple(turns)  # system message and earlier turns included, once
            assert ex.chosen == (assistant(good),) and ex.rejected == (assistant(bad),)
    # the same pairs without a prompt column get the same ids: the prompt column only confirms the split
    bare, _ = load_one(tmp_path, [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    assert [e.example_id for e in bare] == [e.example_id for e in examples]


def test_orpo_rows_whose_prompt_matches_no_turn_keep_the_old_rule(tmp_path):
    # a prompt column that is not one of the conversation's turns is a separate user message; the replies must
    # then start with an assistant turn, and a system message there is still reported in one line
    row = {"prompt": "Something else", "chosen": [system("S"), user("Q"), assistant("A")],
           "rejected": [system("S"), user("Q"), assistant("B")]}
    with pytest.raises(UserError, match=r"row 1, field 'chosen': the reply after the prompt starts with a 'system'"):
        load_one(tmp_path, [row])


# ------------------------------------------------------------------------------------------ Hugging Face datasets


def _rows_for_sources(kind: str = "chat") -> list[dict]:
    """Five rows of one kind (an Arrow column holds either strings or message lists, not both), all with the same
    columns (Arrow takes them from the first row; a missing prompt is null, which means absent)."""
    if kind == "text":
        rows = [SHAPES["explicit"][0], SHAPES["implicit_hh"][0], {"prompt": "1+1=", "chosen": " 2", "rejected": " 3"},
                {"chosen": HH_CHOSEN + " Red.", "rejected": HH_REJECTED},
                {"prompt": "Hi", "chosen": "!", "rejected": "?"}]
    else:
        rows = [SHAPES["chat_no_prompt"][0], {"prompt": "Hey", "chosen": [assistant("Hi!")],
                                              "rejected": [assistant("No.")]}]
        rows += [orpo_row("s", t, c, r, i) for t, c, r, i in ORPO_TURNS[:3]]
    columns = sorted({k for r in rows for k in r})
    return [{k: r.get(k) for k in columns} for r in rows]


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_save_to_disk_dataset_and_dataset_dict(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    rows = _rows_for_sources(kind)
    expected, _ = load_one(tmp_path, rows)
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(both))
    got, report = load_examples([single])
    assert [e.example_id for e in got] == [e.example_id for e in expected] and report.files == {str(single): 5}
    assert [(e.prompt, e.chosen, e.rejected) for e in got] == [(e.prompt, e.chosen, e.rejected) for e in expected]
    got, report = load_examples([str(both)])  # default split: train
    assert [e.example_id for e in got] == [e.example_id for e in expected] and report.files == {f"{both}:train": 5}
    test_split, report = load_examples([both], split="test")
    assert [e.example_id for e in test_split] == [e.example_id for e in expected[:2]]
    again, _ = load_examples([f"{both}:test"])  # FOLDER:SPLIT overrides --data-split
    assert [e.example_id for e in again] == [e.example_id for e in expected[:2]]
    with pytest.raises(UserError, match=r"dict:validation: no split 'validation' \(it has train, test\)"):
        load_examples([both], split="validation")


def _hub_repo(root: Path, rows: list[dict]) -> Path:
    """A dataset repo as on the Hub: data/<split>-00000-of-00001.parquet (load_dataset infers the splits)."""
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nlicense: mit\n---\n# test preference data\n")
    return root


def test_hub_id_from_a_dataset_repo_in_a_local_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = _rows_for_sources()
    expected, _ = load_one(tmp_path, rows)
    _hub_repo(tmp_path / "trl-lib" / "ultrafeedback_binarized", rows)
    monkeypatch.chdir(tmp_path)  # the id is the repo's path relative to here, as load_dataset resolves it
    got, report = load_examples(["trl-lib/ultrafeedback_binarized"])
    assert [e.example_id for e in got] == [e.example_id for e in expected]
    assert report.files == {"trl-lib/ultrafeedback_binarized:train": 5}
    got, report = load_examples(["trl-lib/ultrafeedback_binarized:test"])
    assert [e.example_id for e in got] == [e.example_id for e in expected[:2]]
    got, _ = load_examples(["trl-lib/ultrafeedback_binarized@default:test"])
    assert len(got) == 2
    with pytest.raises(UserError, match=r"ultrafeedback_binarized:nope: cannot load the dataset \(.*nope") as info:
        load_examples(["trl-lib/ultrafeedback_binarized:nope"])
    assert "\n" not in str(info.value)


HUB_OFFLINE_SCRIPT = """
import json, sys
from stages.data.rows import load_examples
from stages.base.errors import UserError
examples, report = load_examples([sys.argv[1]])
print(json.dumps({"ids": [e.example_id for e in examples], "files": report.files}))
try:
    load_examples(["nobody/not-cached"])
except UserError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_hub_id_offline_from_the_local_hf_cache(tmp_path):
    """A Hub id the machine loaded once (simulated: its cache entry, named as the Hub would name it) loads with
    the network off, through datasets.load_dataset's offline cache."""
    import os
    import subprocess
    import sys

    pytest.importorskip("datasets")
    rows = _rows_for_sources()
    expected, _ = load_one(tmp_path, rows)
    cache = tmp_path / "hf-cache"
    repo = _hub_repo(tmp_path / "src" / "trl-lib___ultrafeedback_binarized", rows)  # cache folder name of the id
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = f"import datasets; datasets.load_dataset({str(repo)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    for arrow in cache.rglob("trl-lib___ultrafeedback_binarized-*.arrow"):  # the Hub names files by the name only
        arrow.rename(arrow.with_name(arrow.name.replace("trl-lib___", "")))
    script = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n" + HUB_OFFLINE_SCRIPT
    out = subprocess.run([sys.executable, "-c", script, "trl-lib/ultrafeedback_binarized"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    result, error = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert result["ids"] == [e.example_id for e in expected]
    assert result["files"] == {"trl-lib/ultrafeedback_binarized:train": 5}
    assert error["error"].startswith("nobody/not-cached:train: cannot load the dataset (")
    assert "\n" not in error["error"]


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_content_ids_do_not_depend_on_how_rows_arrive(tmp_path, monkeypatch, kind):
    """The same rows from JSONL, Parquet, a saved Dataset and a Hub-style repo: the same ids in the same order."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = _rows_for_sources(kind)
    ids = {}
    for fmt in ("jsonl", "parquet"):
        ids[fmt] = [e.example_id for e in load_examples([write_rows(tmp_path / f"rows.{fmt}", rows)])[0]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ids["saved"] = [e.example_id for e in load_examples([tmp_path / "saved"])[0]]
    ids["repo"] = [e.example_id for e in load_examples([str(_hub_repo(tmp_path / "repo", rows))])[0]]
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["jsonl"]) == len(rows), ids


def test_dataset_source_errors(tmp_path):
    with pytest.raises(UserError, match=r"rows\.csv: unsupported file type"):
        load_examples(["rows.csv"])  # not a Hub id, even though it does not exist
    with pytest.raises(UserError, match=r"no such file or folder, and not a Hub dataset id"):
        load_examples([str(tmp_path / "missing" / "folder")])


def test_a_cache_made_from_jsonl_is_hit_by_the_same_rows_as_a_saved_dataset(tmp_path, tiny_llama):
    """Same cache hits whatever the source: stage one over JSONL, `dpo cache verify` over save_to_disk output
    (a DatasetDict, split chosen with FOLDER:SPLIT) finds every example."""
    from click.testing import CliRunner

    from stages.cli import main

    datasets = pytest.importorskip("datasets")
    rows = _rows_for_sources("chat")
    jsonl = write_rows(tmp_path / "rows.jsonl", rows)
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    cache = tmp_path / "ref.parquet"
    runner = CliRunner()
    res = runner.invoke(main, ["precompute-ref", "--model", str(tiny_llama), "--data", str(jsonl), "--out", str(cache),
                               "--max-length", "128", "--max-prompt-length", "64"],  # every row fits: none skipped
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["cache", "verify", str(cache), "--data", f"{tmp_path / 'saved'}:validation"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and res.output.startswith("ok: "), res.output
