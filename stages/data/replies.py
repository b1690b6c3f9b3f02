"""Rows with several scored replies per prompt -> ``ReplySet``s, and ``load_data``: what every command reads.

Accepted row shapes (each a JSON object; other keys are ignored; names mappable with ``ReplyFields``):

1. generic: ``prompt`` (a string or messages), ``completions`` (each reply a string or a list of assistant messages)
   and either ``scores`` (numbers, higher is better) or ``ranks`` (a permutation of 1..K, 1 = best; rank r is
   score -r);
2. UltraFeedback (openbmb/UltraFeedback): ``instruction`` and ``completions`` objects holding ``response`` and
   ``overall_score`` (or, with ``--rank-by``, another key or an annotation aspect whose "Rating" is the score; a
   rating "N/A" drops that reply). The row is a conversation: one user message, one assistant message per reply;
3. Nectar (berkeley-nest/Nectar): ``prompt`` text and ``answers`` objects holding ``answer`` and ``rank`` (1 = best).

A row is a conversation when its prompt or any reply is a message list, or it is UltraFeedback-shaped; otherwise it
is plain text, and replies that all start with the prompt have it removed. Within a row, empty replies and repeats
of an earlier reply are dropped and counted; a row left with fewer than 2 distinct replies, or with only tied
scores, is skipped and counted (an error with ``strict``), and a row repeating an earlier one is skipped as a
duplicate. Structural problems raise ``UserError`` with one line naming file, row and field.

``data_shape`` tells the two kinds of data apart by their first row: pair rows (prompt/chosen/rejected) keep the
path of ``rows.load_examples`` unchanged; a run must not mix the shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from stages.base.constants import DEFAULT_SPLIT
from stages.base.errors import UserError
from stages.data.pairs import PairReport, PairRule, set_pairs
from stages.data.replyset import MAX_REPLIES, ReplySet, reply_id
from stages.data.rows import (
    DEFAULT_PROMPT_FIELD,
    DUPLICATE,
    Example,
    FieldMap,
    LoadReport,
    _example_from_row,
    _is_blank,
    _messages,
    _type_name,
    _Where,
    content_id,
    load_examples,
)
from stages.data.sources import check_paths, read_rows

# Skip reasons (keys of LoadReport.skipped), besides rows.DUPLICATE.
FEWER = "fewer than 2 distinct replies"
TIED = "only tied replies"

UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")  # annotations[aspect]["Rating"]
NOT_RATED = "N/A"  # UltraFeedback's rating for "not rated": the reply is dropped
TEXT_KEYS = ("response", "answer")  # where reply objects hold their text (UltraFeedback, Nectar)
RANK_KEY = "rank"  # a reply-object key holding ranks (1 = best), not scores
_SKIP_FIX = "or run without --strict to skip it"


@dataclass(frozen=True)
class ReplyFields:
    """Where a reply row keeps its parts. ``rank_by``: for replies given as objects, the key holding each one's
    score, or an UltraFeedback annotation aspect (its "Rating"); None picks "overall_score" when the objects have
    it (UltraFeedback), else "rank" (Nectar: 1 = best)."""

    prompt: str = DEFAULT_PROMPT_FIELD  # with this default, a row without it may give "instruction" (UltraFeedback)
    replies: str | None = None          # None: "completions", or "answers" when only that is there (Nectar)
    scores: str = "scores"
    ranks: str = "ranks"                # 1 = best; rank r becomes score -r
    rank_by: str | None = None


@dataclass
class Loaded:
    """What every command gets from its data. Pair rows: ``sets`` and ``pairs`` are None and ``examples`` are
    rows.load_examples' result; reply rows: ``examples`` are the pairs derived from ``sets`` (set order, then pair
    order) and ``pairs[i]`` are set i's (chosen, rejected) reply indices under the rule."""

    examples: list[Example]
    sets: list[ReplySet] | None
    pairs: list[list[tuple[int, int]]] | None
    report: LoadReport
    pair_report: PairReport | None

    def lines(self) -> list[str]:
        """What a command prints about its data."""
        pairs = [] if self.pair_report is None else [f"pairs: {self.pair_report.summary()}"]
        return [f"data: {self.report.summary()}", *pairs]


# ----------------------------------------------------------------------------------------------- public functions


def is_reply_row(row: object, fields: ReplyFields = ReplyFields()) -> bool:
    """A row (object) with a list of replies (null counts as absent: parquet fills missing values with null)."""
    return isinstance(row, dict) and row.get(_replies_name(row, fields)) is not None


def data_shape(paths: Sequence[str | Path], fields: ReplyFields = ReplyFields(), split: str = DEFAULT_SPLIT) -> str:
    """"replies" when the first row of the first source is a reply row, else "pairs" (reads that one row only)."""
    with closing(read_rows(check_paths(paths, split)[0])) as rows:
        first = next(rows, None)
    return "replies" if first is not None and is_reply_row(first[1], fields) else "pairs"


def load_reply_sets(paths: Sequence[str | Path], fields: ReplyFields = ReplyFields(), strict: bool = False,
                    split: str = DEFAULT_SPLIT) -> tuple[list[ReplySet], LoadReport, int]:
    """Every reply row of every source, in order: (sets, the counts for every row, duplicate replies dropped)."""
    sets, report, drops = _load_sets(paths, fields, strict, split)
    return sets, report, drops["duplicate"]


def load_data(paths: Sequence[str | Path], fields: FieldMap = FieldMap(), reply_fields: ReplyFields = ReplyFields(),
              rule: PairRule = PairRule(), strict: bool = False, split: str = DEFAULT_SPLIT) -> Loaded:
    """Pair data: rows.load_examples exactly (sets None). Reply data: the sets and the pairs `rule` derives from
    them; a set with no pair is dropped and counted (an error with `strict`), as is a pair an earlier set gave."""
    if data_shape(paths, reply_fields, split) == "pairs":
        examples, report = _load_pairs(paths, fields, reply_fields, strict, split)
        return Loaded(examples, None, None, report, None)
    sets, report, drops = _load_sets(paths, reply_fields, strict, split)
    pair_report = PairReport(rule=rule, duplicate_replies=drops["duplicate"], empty_replies=drops["empty"],
                             unrated_replies=drops["unrated"])
    kept, pairs, examples, seen = [], [], [], set()
    for s in sets:
        found, tied, below = set_pairs(s.scores, rule)
        pair_report.tied_skipped += tied
        pair_report.below_gap_skipped += below
        if not found and strict:
            raise _Where(s.source, s.row).error(
                None, f"no pair under {rule.describe()} ({tied} tied, {below} below the gap)",
                f"lower --min-score-gap or drop the row ({_SKIP_FIX})")
        mine = []
        for c, r in found:
            eid = content_id(s.prompt, s.replies[c], s.replies[r])
            if eid in seen:  # the same pair from an earlier set (same prompt in two rows): keep the first
                pair_report.duplicate_pairs += 1
                continue
            seen.add(eid)
            mine.append((c, r))
            examples.append(Example(eid, s.prompt, s.replies[c], s.replies[r], s.is_chat, s.source, s.row))
        if not mine:
            pair_report.no_pair_sets += 1
            continue
        kept.append(s)
        pairs.append(mine)
    pair_report.prompts, pair_report.pairs = len(kept), len(examples)
    pair_report.replies = sum(len(s.replies) for s in kept)
    return Loaded(examples, kept, pairs, report, pair_report)


# ----------------------------------------------------------------------------------------------- loading


def _mixed(where: _Where, first: str, this: str) -> UserError:
    return where.error(None, f"{this}, but the first row is {first}: the data mixes the two shapes",
                       "use one shape per run (a pair is a reply row of 2)")


_PAIR_ROW, _REPLY_ROW = "a pair row (chosen/rejected)", "a reply row (a list of replies)"


def _load_pairs(paths, fields: FieldMap, reply_fields: ReplyFields, strict: bool, split: str):
    """rows.load_examples; when it fails at or after a reply row, that row is named as mixing the shapes."""
    try:
        return load_examples(paths, fields, strict, split)
    except UserError as err:
        where = _reply_row_before_failure(paths, fields, reply_fields, strict, split)
        if where is not None:
            raise _mixed(where, _PAIR_ROW, _REPLY_ROW) from err
        raise


def _reply_row_before_failure(paths, fields: FieldMap, reply_fields: ReplyFields, strict: bool, split: str):
    """The error path only: read again up to the first row load_examples cannot take; where the first reply row
    is when it comes no later than that row, else None."""
    try:
        for src in check_paths(paths, split):
            with closing(read_rows(src)) as rows:
                where = None
                for row_no, row in rows:
                    where = _Where(src.source, row_no)
                    if is_reply_row(row, reply_fields):
                        return where
                    _example_from_row(row, fields, where, strict)
                if where is None:  # a source without rows: that was the error
                    return None
    except UserError:
        return None
    return None


def _load_sets(paths, fields: ReplyFields, strict: bool, split: str) -> tuple[list[ReplySet], LoadReport, Counter]:
    """(sets, counts for every row, replies dropped within the sets kept: "duplicate", "empty", "unrated")."""
    sources = check_paths(paths, split)  # fail on a missing file before spending time reading the others
    report, sets, seen, drops = LoadReport(), [], set(), Counter()
    for src in sources:
        read_before = report.read
        for row_no, row in read_rows(src):
            report.read += 1
            result = _set_from_row(row, fields, _Where(src.source, row_no), strict)
            if isinstance(result, str):  # a skip reason
                report.skip(result)
                continue
            s, row_drops = result
            key = (s.prompt_id, s.reply_ids, s.scores)
            if key in seen:  # the same row again (e.g. the file given twice): keep the first
                report.skip(DUPLICATE)
                continue
            seen.add(key)
            sets.append(s)
            drops.update(row_drops)
        n_rows = report.read - read_before
        if n_rows == 0:
            what = "file" if src.kind == "file" else "dataset split"
            raise UserError(f"{src.source}: the {what} has no rows; check that it is the right {what} and not empty")
        report.files[src.source] = report.files.get(src.source, 0) + n_rows
    report.kept = len(sets)
    return sets, report, drops


# ----------------------------------------------------------------------------------------------- rows


def _replies_name(row: dict, fields: ReplyFields) -> str:
    if fields.replies is not None:
        return fields.replies
    return "answers" if row.get("completions") is None and row.get("answers") is not None else "completions"


def _row_names(row: dict) -> str:
    return ", ".join(map(repr, list(row)[:8])) + (", ..." if len(row) > 8 else "")  # keep the line short


def _set_from_row(row: object, fields: ReplyFields, where: _Where, strict: bool) -> tuple[ReplySet, Counter] | str:
    """A ReplySet and what was dropped from the row, or the reason to skip the row (raised instead when strict)."""
    name = _replies_name(row, fields) if isinstance(row, dict) else fields.replies or "completions"
    if not isinstance(row, dict):
        raise where.error(None, f"expected an object with '{name}', got {_type_name(row)}",
                          "each row must be a JSON object")
    raw = row.get(name)
    if raw is None:
        if "chosen" in row and "rejected" in row:
            raise _mixed(where, _REPLY_ROW, _PAIR_ROW)
        raise where.error(name, f"missing (the row has {_row_names(row)})",
                          "add it, or map another column to it with --replies-field")
    if not isinstance(raw, (list, tuple)):
        raise where.error(name, f"expected a list of replies, got {_type_name(raw)}", "give the replies as a list")
    if len(raw) > MAX_REPLIES:
        raise where.error(name, f"{len(raw)} replies, more than {MAX_REPLIES}",
                          f"keep at most {MAX_REPLIES} replies per prompt (e.g. the best and the worst)")
    texts, scores, score_field, uf = _replies_and_scores(row, list(raw), name, fields, where)
    prompt, replies, is_chat = _normalise(row, texts, uf, name, fields, where)
    kept_replies, kept_scores, drops, seen = [], [], Counter(), set()
    for reply, score in zip(replies, scores):
        key = reply_id(prompt, reply)
        if score is None:
            drops["unrated"] += 1
        elif _is_blank(reply):
            drops["empty"] += 1
        elif key in seen:  # the same reply again: the first one counts
            drops["duplicate"] += 1
        else:
            seen.add(key)
            kept_replies.append(reply)
            kept_scores.append(float(score))
    if len(kept_replies) < 2:
        if strict:
            n = len(kept_replies)
            raise where.error(name, f"{n} distinct non-empty {'reply' if n == 1 else 'replies'}, so no pair",
                              f"give at least 2 different replies or drop the row ({_SKIP_FIX})")
        return FEWER
    if len(set(kept_scores)) == 1:
        if strict:
            raise where.error(score_field, "every reply has the same score, so the row gives no pair",
                              f"fix the scores or drop the row ({_SKIP_FIX})")
        return TIED
    s = ReplySet(prompt, tuple(kept_replies), tuple(kept_scores), is_chat, where.source, where.row)
    return s, drops


def _replies_and_scores(row: dict, raw: list, name: str, fields: ReplyFields, where: _Where):
    """(reply values, a score per reply (None: not rated), the field scores came from, UltraFeedback-shaped)."""
    objects = [i for i, r in enumerate(raw, start=1) if isinstance(r, dict)]
    if not objects:
        if fields.rank_by is not None:
            raise where.error(name, "--rank-by needs replies given as objects, but these are not",
                              f"unset --rank-by and give '{fields.scores}' or '{fields.ranks}'")
        scores, score_field = _scores_from_fields(row, len(raw), name, fields, where)
        return raw, scores, score_field, False
    texts = []
    for i, obj in enumerate(raw, start=1):
        if not isinstance(obj, dict):
            raise where.error(name, f"reply {i} is {_type_name(obj)} but reply {objects[0]} is an object",
                              "give every reply the same way: all objects, or all strings / message lists")
        key = next((k for k in TEXT_KEYS if obj.get(k) is not None), None)
        if key is None:
            raise where.error(name, f"reply {i} is an object without {' or '.join(map(repr, TEXT_KEYS))}",
                              "give replies as strings, message lists, or UltraFeedback / Nectar objects")
        texts.append(obj[key])
    key = fields.rank_by or _auto_key(raw, name, where)
    values = [_object_score(obj, key, i, name, where) for i, obj in enumerate(raw, start=1)]
    if key == RANK_KEY:  # never "N/A": ranks must be numbers
        _check_ranks(values, f"'{key}' values", name, where)
        values = [-v for v in values]
    uf = any(obj.get("response") is not None for obj in raw)
    return texts, values, name, uf


def _auto_key(objs: list[dict], name: str, where: _Where) -> str:
    for key in ("overall_score", RANK_KEY):
        if any(key in obj for obj in objs):
            return key
    raise where.error(name, "the reply objects have no 'overall_score' or 'rank'",
                      "name the key holding each reply's score with --rank-by")


def _object_score(obj: dict, key: str, i: int, name: str, where: _Where) -> float | None:
    """Reply object i's score under `key`: a key of the object, or an UltraFeedback aspect's "Rating"."""
    fix = f"check --rank-by (a key of the reply objects, or one of {', '.join(UF_ASPECTS)})"
    if key in UF_ASPECTS and key not in obj:
        note = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
        rating = note.get(key)
        if isinstance(rating, (list, tuple)) and len(rating) == 1:  # some exports keep each aspect in a list of one
            rating = rating[0]
        if not isinstance(rating, dict) or rating.get("Rating") is None:
            raise where.error(name, f"reply {i} has no annotations['{key}']['Rating']", fix)
        value, label = rating["Rating"], f"reply {i} '{key}' rating"
    elif obj.get(key) is None:
        raise where.error(name, f"reply {i} has no '{key}'", fix)
    else:
        value, label = obj[key], f"reply {i} '{key}'"
    if isinstance(value, str) and key != RANK_KEY:
        if value.strip() == NOT_RATED:
            return None
        try:
            value = float(value)
        except ValueError:
            raise where.error(name, f"{label} is {value[:20]!r}, not a number", "give numbers (or 'N/A')") from None
    return _number(value, label, name, where)


def _number(value: object, label: str, name: str, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(name, f"{label} is {_type_name(value)}, not a number", "give a number for every reply")
    if not math.isfinite(value):
        raise where.error(name, f"{label} is {value}", "give a finite number for every reply")
    return float(value)


def _check_ranks(ranks: list[float], what: str, name: str, where: _Where) -> None:
    if sorted(ranks) != list(range(1, len(ranks) + 1)):
        raise where.error(name, f"{what} are not a permutation of 1..{len(ranks)}",
                          "give each reply a distinct rank, 1 = best (or give scores, which may tie)")


def _scores_from_fields(row: dict, n: int, name: str, fields: ReplyFields, where: _Where):
    """(a score per reply, the field they came from) from the row's scores or ranks list."""
    has_scores, has_ranks = row.get(fields.scores) is not None, row.get(fields.ranks) is not None
    if has_scores and has_ranks:
        raise where.error(fields.scores, f"given together with '{fields.ranks}'",
                          "keep one: scores (higher is better) or ranks (1 = best)")
    if not (has_scores or has_ranks):
        raise where.error(fields.scores, f"no '{fields.scores}' or '{fields.ranks}' (the row has {_row_names(row)})",
                          "add one, or map it with --scores-field / --ranks-field")
    field_name = fields.scores if has_scores else fields.ranks
    values = row[field_name]
    if not isinstance(values, (list, tuple)):
        raise where.error(field_name, f"expected a list of numbers, got {_type_name(values)}",
                          f"give one number per reply in '{name}'")
    if len(values) != n:
        raise where.error(field_name, f"{len(values)} {'value' if len(values) == 1 else 'values'} for {n} replies",
                          f"give one number per reply, in the order of '{name}'")
    what = "score" if has_scores else "rank"
    numbers = [_number(v, f"{what} {i}", field_name, where) for i, v in enumerate(values, start=1)]
    if has_ranks:
        _check_ranks(numbers, "the ranks", field_name, where)
        numbers = [-r for r in numbers]
    return numbers, field_name


def _prompt(row: dict, fields: ReplyFields, where: _Where) -> tuple[object, str]:
    """(the prompt value, its field): with the default field name, UltraFeedback's "instruction" is taken too."""
    if row.get(fields.prompt) is not None:
        return row[fields.prompt], fields.prompt
    if fields.prompt == DEFAULT_PROMPT_FIELD and row.get("instruction") is not None:
        return row["instruction"], "instruction"
    raise where.error(fields.prompt, f"missing (the row has {_row_names(row)})",
                      "add it, or map another column to it with --prompt-field")


def _normalise(row: dict, texts: list, uf: bool, name: str, fields: ReplyFields, where: _Where):
    """(prompt, replies, is_chat): chat as {role, content} messages, text with a repeated prompt removed."""
    prompt, prompt_field = _prompt(row, fields, where)
    for i, reply in enumerate(texts, start=1):
        if not isinstance(reply, (str, list, tuple)):
            raise where.error(name, f"reply {i} is {_type_name(reply)}, not a string or a list of messages",
                              "give each reply as text or as {role, content} messages")
    if not isinstance(prompt, (str, list, tuple)):
        raise where.error(prompt_field, f"expected a string or a list of messages, got {_type_name(prompt)}",
                          "give the prompt as text or as {role, content} messages")
    is_chat = uf or not isinstance(prompt, str) or any(not isinstance(r, str) for r in texts)
    if not is_chat:
        if not prompt.strip():
            raise where.error(prompt_field, "the prompt is empty", "every row needs a prompt to condition on")
        if all(r.startswith(prompt) for r in texts):  # whole transcripts: do not feed the prompt twice
            texts = [r[len(prompt):] for r in texts]
        return prompt, texts, False
    prompt_msgs = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else \
        _messages(prompt, prompt_field, where)
    if not any(m["content"].strip() for m in prompt_msgs):
        raise where.error(prompt_field, "the prompt is empty", "every row needs a prompt to condition on")
    replies = []
    for i, reply in enumerate(texts, start=1):
        msgs = ({"role": "assistant", "content": reply},) if isinstance(reply, str) else _messages(reply, name, where)
        if msgs and msgs[0]["role"] != "assistant":
            raise where.error(name, f"reply {i} starts with a '{msgs[0]['role']}' message",
                              "each reply must start with an assistant message")
        replies.append(msgs)
    return prompt_msgs, replies, True
