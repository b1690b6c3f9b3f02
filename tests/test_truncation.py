"""Truncation is counted, reported and sensible (issue 22).

Pinned here: rows that fit keep EXACTLY the ids the old keep-end rule gave (so caches of such rows are unchanged);
a conversation that is too long keeps its system message and drops its oldest whole turns, and only a last user
turn that alone does not fit is cut inside (keeping its end); a prompt that cannot keep any of it is skipped and
counted (--strict: one line naming the row); text prompts keep their end; the counts (prompts and replies cut, the
most tokens cut, rows skipped) are exact, printed, and written by stage one as meta["truncation"].
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.base.errors import UserError
from stages.data.encode import (
    TRUNCATION,
    TokenizeSettings,
    encode_with_report,
    tokenize_example,
    tokenizer_fingerprint,
    truncate,
)
from stages.data.rows import load_examples
from tests.tiny import build_tokenizer

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
LIMITS = TokenizeSettings(max_length=256, max_prompt_length=128)
P = LIMITS.max_prompt_length


def _turns(i: int, n: int) -> list[dict]:
    out = []
    for t in range(n):
        out.append({"role": "user", "content": f"Question {t} of row {i}: how do I bake bread at home?"})
        out.append({"role": "assistant", "content": "You need flour, water, yeast and salt. Knead the dough."})
    return out


def chat_row(i: int, turns: int, last: str = "", reply: str = "", system: dict | None = SYSTEM) -> dict:
    """A multi-turn conversation with a system message; `last` lengthens the last user turn, `reply` the chosen."""
    prompt = ([system] if system else []) + _turns(i, turns)
    prompt.append({"role": "user", "content": f"And how long should it rise, version {i}?{last}"})
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": f"About {i + 1} hours, then bake it.{reply}"}],
            "rejected": [{"role": "assistant", "content": "I cannot help with that request."}]}


def write(tmp_path: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def render(tok, messages, generation_prompt=True) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False))


def mixed_rows() -> list[dict]:
    """20 rows: short ones that fit, multi-turn ones whose oldest turns must go, long last turns, long replies."""
    rows = [chat_row(i, turns=i % 4, reply=" It depends on the weather." * (i % 3) * 6) for i in range(14)]
    rows += [chat_row(20 + i, turns=1, last=" The weather today is sunny." * (6 + i)) for i in range(6)]
    return rows


# --------------------------------------------------------------------------------------- rows that fit: unchanged
def test_rows_that_fit_keep_exactly_their_ids(tok, tmp_path):
    """Whatever else is cut, a row whose prompt fits gets the ids the previous rule gave (prompt untouched, replies
    keep their start): the cache values of such rows cannot change."""
    rows = mixed_rows() + [{"prompt": "Human: hi\n\nAssistant:", "chosen": " Hello there.", "rejected": " No."}]
    examples, _ = load_examples([write(tmp_path, rows[:-1]), write(tmp_path, rows[-1:], "text.jsonl")])
    encoded, report = encode_with_report(tok, examples, LIMITS)
    by_id = {e.example_id: e for e in encoded}
    fitting = 0
    for ex in examples:
        prompt, chosen, rejected = tokenize_example(tok, ex)
        if len(prompt) > LIMITS.max_prompt_length:
            continue
        fitting += 1
        old = truncate(prompt, chosen, rejected, LIMITS)  # the rule before issue 22
        e = by_id[ex.example_id]
        assert (list(e.prompt_ids), list(e.chosen_ids), list(e.rejected_ids)) == tuple(map(list, old))
        assert list(e.prompt_ids) == prompt
    assert 5 <= fitting < len(examples) and report.prompts_cut and report.replies_cut  # the test proves something


def test_rows_that_fit_do_not_depend_on_the_other_rows(tok, tmp_path):
    examples, _ = load_examples([write(tmp_path, mixed_rows())])
    together, _ = encode_with_report(tok, examples, LIMITS)
    alone = [e for ex in examples for e in encode_with_report(tok, [ex], LIMITS)[0]]
    assert together == alone


# ------------------------------------------------------------------------------------------------------ the rule
def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_system_message(tok, tmp_path):
    row = chat_row(1, turns=3)
    (ex,), _ = load_examples([write(tmp_path, [row])])
    full = render(tok, row["prompt"])
    limit = len(render(tok, [SYSTEM] + row["prompt"][3:])) + 1  # room for the system message and the newest 2 turns
    assert len(full) > limit
    (e,), report = encode_with_report(tok, [ex], TokenizeSettings(512, limit))
    kept = [SYSTEM] + row["prompt"][3:]  # whole turns dropped from the start of the history, after the system
    assert kept[1]["role"] == "user"
    assert list(e.prompt_ids) == render(tok, kept)
    whole = render(tok, kept + row["chosen"], generation_prompt=False)  # the reply follows the kept turns
    assert list(e.prompt_ids) + list(e.chosen_ids) == whole[:len(e.prompt_ids) + len(e.chosen_ids)]
    assert tok.decode(list(e.chosen_ids)).endswith("<|im_end|>")
    assert (report.prompts_cut, report.max_prompt_tokens_cut) == (1, len(full) - len(e.prompt_ids))
    assert (report.replies_cut, report.skipped) == (0, 0)


def test_a_last_user_turn_that_alone_does_not_fit_is_cut_inside_keeping_its_end(tok, tmp_path):
    row = chat_row(2, turns=2, last=" The weather today is sunny." * 12 + " THE END")
    (ex,), _ = load_examples([write(tmp_path, [row])])
    (e,), report = encode_with_report(tok, [ex], LIMITS)
    ids = list(e.prompt_ids)
    head = render(tok, [SYSTEM], generation_prompt=False)  # the system turn, uncut
    assert len(ids) == LIMITS.max_prompt_length and ids[:len(head)] == head
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n" + SYSTEM["content"] + "<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(" THE END<|im_end|>\n<|im_start|>assistant\n") and "Question" not in text
    assert report.prompts_cut == 1 and report.skipped == 0


def test_a_prompt_without_room_for_its_last_user_turn_is_skipped_or_with_strict_an_error(tok, tmp_path):
    big = {"role": "system", "content": "Please answer the question as helpfully and honestly as you can. " * 10}
    rows = [chat_row(0, turns=1), chat_row(1, turns=1, system=big), chat_row(2, turns=0)]
    path = write(tmp_path, rows)
    examples, _ = load_examples([path])
    encoded, report = encode_with_report(tok, examples, LIMITS)
    assert [e.example_id for e in encoded] == [examples[0].example_id, examples[2].example_id]
    assert report.skipped == 1 and report.rows == 3
    assert "skipped 1 rows that cannot fit" in report.summary()
    with pytest.raises(UserError) as err:
        encode_with_report(tok, examples, LIMITS, strict=True)
    line = str(err.value)
    assert "\n" not in line and f"{path}: row 2:" in line and f"--max-prompt-length {P}" in line


def test_a_conversation_without_a_system_message_drops_its_oldest_turns_too(tok, tmp_path):
    row = chat_row(3, turns=3, system=None)
    (ex,), _ = load_examples([write(tmp_path, [row])])
    (e,), _ = encode_with_report(tok, [ex], LIMITS)
    kept = next(row["prompt"][j:] for j in range(0, len(row["prompt"]), 2) if len(render(tok, row["prompt"][j:])) <= P)
    assert list(e.prompt_ids) == render(tok, kept) and kept[0]["role"] == "user"


def test_text_prompts_keep_their_end_as_before(tok, tmp_path):
    rows = [{"prompt": "The weather today is sunny. " * 30 + "Question?", "chosen": " Yes." * 200, "rejected": " No."}]
    (ex,), _ = load_examples([write(tmp_path, rows)])
    (e,), report = encode_with_report(tok, [ex], LIMITS)
    prompt, chosen, rejected = tokenize_example(tok, ex)
    assert (list(e.prompt_ids), list(e.chosen_ids), list(e.rejected_ids)) == tuple(
        map(list, truncate(prompt, chosen, rejected, LIMITS)))
    assert list(e.prompt_ids) == prompt[-P:]
    assert report.as_meta() == {"prompts_cut": 1, "replies_cut": 1, "max_prompt_tokens_cut": len(prompt) - P,
                                "max_reply_tokens_cut": len(chosen) - (LIMITS.max_length - P),
                                "skipped": 0}


# ------------------------------------------------------------------------------------------------------ counting
def test_counts_are_exact(tok, tmp_path):
    examples, _ = load_examples([write(tmp_path, mixed_rows())])
    encoded, report = encode_with_report(tok, examples, LIMITS)
    untruncated = {ex.example_id: tokenize_example(tok, ex) for ex in examples}
    prompt_cuts, reply_cuts = [], []
    for e in encoded:
        p, c, r = untruncated[e.example_id]
        if len(p) > len(e.prompt_ids):
            prompt_cuts.append(len(p) - len(e.prompt_ids))
        room = LIMITS.max_length - len(e.prompt_ids)
        reply_cuts += [len(x) - room for x in (c, r) if len(x) > room]
    assert prompt_cuts and reply_cuts
    assert report.as_meta() == {"prompts_cut": len(prompt_cuts), "replies_cut": len(reply_cuts),
                                "max_prompt_tokens_cut": max(prompt_cuts), "max_reply_tokens_cut": max(reply_cuts),
                                "skipped": len(examples) - len(encoded)}
    assert report.summary().startswith(f"cut {len(prompt_cuts)} of {len(encoded)} prompts (by at most "
                                       f"{max(prompt_cuts)} tokens) and {len(reply_cuts)} of {2 * len(encoded)} "
                                       f"replies (by at most {max(reply_cuts)} tokens)")
    fits, nothing = encode_with_report(tok, examples, TokenizeSettings(None, None))
    assert not nothing.anything and nothing.summary() == f"nothing cut: every prompt and reply of {len(fits)} rows fits"


def test_the_fingerprint_names_the_rule(tok):
    fp = tokenizer_fingerprint(tok, LIMITS)
    assert fp["truncation"] == TRUNCATION and "drop_oldest_turns" in TRUNCATION  # caches of the old rule differ


def test_stage_one_prints_and_records_the_counts(tiny_llama, tmp_path, capsys):
    from stages.cache import refcache
    from stages.stage1 import precompute
    from stages.stage1.precompute import PrecomputeConfig

    rows = mixed_rows()[:8] + mixed_rows()[14:16]
    path = write(tmp_path, rows)
    out = tmp_path / "ref.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(path),), output=str(out), max_length=256,
                                         max_prompt_length=P, dtype="fp32"))
    examples, _ = load_examples([path])
    _, want = encode_with_report(build_tokenizer(), examples, LIMITS)
    _, meta = refcache.read_cache(str(out))
    assert meta["truncation"] == want.as_meta() and want.prompts_cut and want.replies_cut
    assert f"tokenize (--max-prompt-length {P}, --max-length 256): {want.summary()}\n" in capsys.readouterr().out


def test_stage_one_strict_stops_with_one_line_naming_the_row(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from stages.cli import main

    big = {"role": "system", "content": "Please answer the question as helpfully and honestly as you can. " * 10}
    path = write(tmp_path, [chat_row(0, turns=1), chat_row(1, turns=1, system=big)])
    out = tmp_path / "ref.parquet"
    result = CliRunner().invoke(main, ["precompute-ref", "--model", str(tiny_llama), "--data", str(path), "--output",
                                       str(out), "--max-length", "256", "--max-prompt-length", str(P), "--strict"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "rows.jsonl: row 2: no room" in errors[0], result.output
    assert errors[0].endswith("shorten the system message"), errors[0]  # all of it fits the one line
    assert not out.exists()


def test_sample_cuts_prompts_as_training_does(tiny_llama, tmp_path, capsys):
    from stages.tools.sample import SampleConfig, pick_prompts

    rows = [chat_row(0, turns=3), chat_row(1, turns=0)]
    path = write(tmp_path, rows)
    cfg = SampleConfig.flat(model=str(tiny_llama), data=(str(path),), n=2, max_prompt_length=P)
    examples, _ = load_examples([path])
    want, _ = encode_with_report(build_tokenizer(), examples, LIMITS)
    assert [list(ids) for _, ids in pick_prompts(cfg, build_tokenizer())] == [list(e.prompt_ids) for e in want]
    assert f"sample: cut 1 of 2 prompts to --max-prompt-length {P}" in capsys.readouterr().out
