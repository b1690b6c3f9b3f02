"""Validate preference rows (prompt / chosen / rejected) into ``Example``s, each with a stable content id.

``load_examples`` composes the two halves of reading data: ``sources.py`` yields every source's rows as plain dicts
(files, save_to_disk folders, Hub ids), and this module checks and normalises each row, accounting for every one.
Accepted row shapes (field names mappable with ``FieldMap``; other columns are ignored):

1. explicit text: ``prompt``, ``chosen``, ``rejected`` strings;
2. conversational: ``chosen``/``rejected`` lists of ``{"role", "content"}`` messages; ``prompt`` a string (one user
   message), a message list, or absent (then the prompt is the messages both conversations share, as in
   UltraFeedback or orpo-dpo-mix-40k, whose chosen/rejected repeat the user turn). When chosen/rejected are whole
   conversations that contain the given prompt as one of their shared turns (orpo-dpo-mix: ``prompt`` is the first
   user turn, after an optional system message; other sets: the last user turn), the prompt is again the whole
   shared message prefix and the replies are what follows it, so no turn is fed twice;
3. implicit-prompt transcripts (HH-RLHF): ``chosen``/``rejected`` strings and no prompt; the prompt is their shared
   text up to and including the last ``"\\n\\nAssistant:"``.

Structural problems (unreadable file, bad JSON, missing field, wrong type, ...) raise ``UserError`` with one line naming
file, row and field. Content problems (a pair whose completions are equal or empty) are skipped and counted, or raise
with ``strict=True``; rows with an id already seen are kept once and counted. ``LoadReport`` accounts for every row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stages.base.constants import DEFAULT_SPLIT  # declared once, there
from stages.base.errors import UserError
from stages.data.sources import check_paths, read_rows

Message = dict  # {"role": str, "content": str}
Text = str | tuple  # a string (text rows) or a tuple of messages (chat rows)

ASSISTANT_MARK = "\n\nAssistant:"  # HH-RLHF turn marker; implicit prompts end with the last shared one
DEFAULT_PROMPT_FIELD = "prompt"

# Skip reasons (keys of LoadReport.skipped).
EQUAL = "chosen equals rejected"
EMPTY = "empty completion"
DUPLICATE = "duplicate id"


@dataclass(frozen=True)
class Example:
    """One validated preference pair; completions exclude the prompt.

    ``row`` is 1-based within ``source``; for JSON lines files it is the line number, so an editor can jump to it.
    """

    example_id: str  # 32 hex chars: sha256 of the canonical content, see content_id()
    prompt: Text
    chosen: Text
    rejected: Text
    is_chat: bool
    source: str  # file path as given
    row: int


@dataclass(frozen=True)
class FieldMap:
    """Column names of prompt / chosen / rejected in the input rows.

    With the default prompt name a row may lack the prompt (shapes 2 and 3). A renamed prompt field
    (``--prompt-field question``) must be present, so a typo is reported instead of silently changing the shape.
    """

    prompt: str = DEFAULT_PROMPT_FIELD
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass
class LoadReport:
    """Counts for every row read: read == kept + sum(skipped.values())."""

    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    files: dict[str, int] = field(default_factory=dict)  # path as given -> rows read

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """E.g. "read 2312 rows from 1 file, kept 2308, skipped 4 (empty completion: 4)"."""
        nfiles = len(self.files)
        line = (
            f"read {self.read} {'row' if self.read == 1 else 'rows'} from {nfiles} {'file' if nfiles == 1 else 'files'}"
            f", kept {self.kept}, skipped {self.skipped_total}"
        )
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()) if n)
        return f"{line} ({reasons})" if reasons else line


@dataclass(frozen=True)
class _Where:
    """Location of a row, to build one-line errors: "<file>: row <n>, field '<f>': <problem>; <fix>"."""

    source: str
    row: int

    def error(self, field_name: str | None, problem: str, fix: str) -> UserError:
        place = f"{self.source}: row {self.row}" + (f", field '{field_name}'" if field_name else "")
        return UserError(f"{place}: {problem}; {fix}")


# ----------------------------------------------------------------------------------------------- public functions


def load_examples(
    paths: Sequence[str | Path], fields: FieldMap = FieldMap(), strict: bool = False, split: str = DEFAULT_SPLIT
) -> tuple[list[Example], LoadReport]:
    """Read every row of every source (file, saved dataset folder, Hub id), in order; returns the kept examples
    and the counts. ``split`` is used by dataset sources that name no ``:split`` of their own.

    Raises UserError on the first structural problem (and, with ``strict``, on equal or empty completions).
    """
    sources = check_paths(paths, split)  # fail on a missing file before spending time reading the others
    report, examples, seen = LoadReport(), [], set()
    for src in sources:
        source = src.source
        read_before = report.read
        for row_no, row in read_rows(src):
            report.read += 1
            result = _example_from_row(row, fields, _Where(source, row_no), strict)
            if isinstance(result, str):  # a skip reason
                report.skip(result)
            elif result.example_id in seen:  # same content again (e.g. the file given twice): keep the first
                report.skip(DUPLICATE)
            else:
                seen.add(result.example_id)
                examples.append(result)
        n_rows = report.read - read_before
        if n_rows == 0:
            what = "file" if src.kind == "file" else "dataset split"
            raise UserError(f"{source}: the {what} has no rows; check that it is the right {what} and not empty")
        report.files[source] = report.files.get(source, 0) + n_rows
    report.kept = len(examples)
    return examples, report


def content_id(prompt: Text, chosen: Text, rejected: Text) -> str:
    """sha256[:32] of canonical JSON of the normalised pair; independent of file, row order and row shape.

    Messages must already be {"role", "content"} only (tuples serialise as JSON lists).
    """
    canonical = json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); hash them rather than crash
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def ids_digest(example_ids: Iterable[str]) -> str:
    """sha256 over the sorted ids: one fingerprint of a data set's content, whatever its order."""
    return hashlib.sha256("\n".join(sorted(example_ids)).encode("ascii")).hexdigest()


# ----------------------------------------------------------------------------------------------- rows


def _example_from_row(row: object, fields: FieldMap, where: _Where, strict: bool) -> Example | str:
    """An Example, or the reason to skip the row (raised instead when strict)."""
    prompt, chosen, rejected, is_chat = _normalise(row, fields, where)
    for value, name in ((chosen, fields.chosen), (rejected, fields.rejected)):
        if _is_blank(value):
            if strict:
                raise where.error(name, "the completion is empty",
                                  "fill it in or drop the row (or run without --strict to skip it)")
            return EMPTY
    if chosen == rejected:
        if strict:
            raise where.error(fields.rejected, "the same as chosen, so the pair teaches nothing",
                              "fix or drop the row (or run without --strict to skip it)")
        return EQUAL
    return Example(content_id(prompt, chosen, rejected), prompt, chosen, rejected, is_chat, where.source, where.row)


def _is_blank(completion: Text) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return not any(m["content"].strip() for m in completion)  # no messages, or only empty ones


def _type_name(value: object) -> str:
    names = {str: "a string", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _normalise(row: object, fields: FieldMap, where: _Where) -> tuple[Text, Text, Text, bool]:
    """(prompt, chosen, rejected, is_chat) with the prompt removed from the completions."""
    if not isinstance(row, dict):
        expected = f"expected an object with '{fields.chosen}' and '{fields.rejected}', got {_type_name(row)}"
        raise where.error(None, expected, "each row must be a JSON object")
    chosen = _required(row, fields.chosen, where)
    rejected = _required(row, fields.rejected, where)
    prompt = _optional_prompt(row, fields, where)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _text_pair(prompt, chosen, rejected, fields, where)
    if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
        return _chat_pair(prompt, chosen, rejected, fields, where)
    bad, name = (chosen, fields.chosen) if not isinstance(chosen, (str, list, tuple)) else (rejected, fields.rejected)
    if isinstance(bad, (str, list, tuple)):  # each is fine alone, but one is text and the other a message list
        problem = f"is {_type_name(rejected)} but '{fields.chosen}' is {_type_name(chosen)}"
    else:
        problem = f"expected a string or a list of messages, got {_type_name(bad)}"
    raise where.error(name, problem, "chosen and rejected must both be strings or both be lists of {role, content}")


def _required(row: dict, name: str, where: _Where) -> object:
    if name not in row:
        names = ", ".join(map(repr, list(row)[:8])) + (", ..." if len(row) > 8 else "")  # keep the line short
        raise where.error(name, f"missing (the row has {names or 'no fields'})",
                          "add it, or map another column to it (e.g. --chosen-field / --rejected-field)")
    return row[name]


def _optional_prompt(row: dict, fields: FieldMap, where: _Where) -> object:
    """The prompt value, or None when absent (null counts as absent: parquet fills missing values with null)."""
    if fields.prompt not in row and fields.prompt != DEFAULT_PROMPT_FIELD:
        raise where.error(fields.prompt, "missing",
                          "check the --prompt-field name, or leave it unset to infer the prompt")
    return row.get(fields.prompt)


def _text_pair(prompt: object, chosen: str, rejected: str, fields: FieldMap, where: _Where):
    if prompt is None:
        return (*_split_transcripts(chosen, rejected, fields, where), False)
    if not isinstance(prompt, str):
        raise where.error(fields.prompt,
                          f"expected a string (chosen and rejected are strings), got {_type_name(prompt)}",
                          "give the prompt as text, or chosen/rejected as message lists")
    if not prompt.strip():
        raise where.error(fields.prompt, "the prompt is empty", "every pair needs a prompt to condition on")
    # Rows that repeat the prompt in both completions (whole transcripts plus a prompt column) would otherwise
    # feed the prompt twice; stripping also gives them the same id as the prompt-less form.
    if chosen.startswith(prompt) and rejected.startswith(prompt):
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    return prompt, chosen, rejected, False


def _split_transcripts(chosen: str, rejected: str, fields: FieldMap, where: _Where) -> tuple[str, str, str]:
    """HH-RLHF rows: prompt = shared text up to and including the last shared "\\n\\nAssistant:"."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARK)
    if cut < 0:
        raise where.error(
            fields.prompt,
            "absent, and chosen and rejected share no '\\n\\nAssistant:' turn to split the prompt at",
            "add a prompt column (or map one with --prompt-field), or give HH-RLHF style transcripts",
        )
    end = cut + len(ASSISTANT_MARK)
    return chosen[:end], chosen[end:], rejected[end:]


def _messages(value: Sequence, name: str, where: _Where) -> tuple[Message, ...]:
    """Validated messages keeping only role and content (extra keys would change the content id)."""
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise where.error(name, f"message {i} is {_type_name(m)}, not an object",
                              'each message must be {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"{_type_name(m[key])}, not a string"
                raise where.error(name, f"message {i} '{key}' is {got}",
                                  'each message must be {"role": str, "content": str}')
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _chat_pair(prompt: object, chosen_raw: Sequence, rejected_raw: Sequence, fields: FieldMap, where: _Where):
    chosen = _messages(chosen_raw, fields.chosen, where)
    rejected = _messages(rejected_raw, fields.rejected, where)
    if prompt is None:
        prompt_msgs, chosen, rejected = _split_shared_messages(chosen, rejected, fields, where)
    else:
        if isinstance(prompt, str):
            prompt_msgs = ({"role": "user", "content": prompt},)
        elif isinstance(prompt, (list, tuple)):
            prompt_msgs = _messages(prompt, fields.prompt, where)
        else:
            raise where.error(fields.prompt, f"expected a string or a list of messages, got {_type_name(prompt)}",
                              "give the prompt as text or as {role, content} messages")
        if _within_shared_turns(prompt_msgs, chosen, rejected):
            # whole conversations repeating the prompt (orpo-dpo-mix: `prompt` is the first user turn, maybe after
            # a system message; others: the last user turn): the prompt is everything the two share
            prompt_msgs, chosen, rejected = _split_shared_messages(chosen, rejected, fields, where)
    if not prompt_msgs or not any(m["content"].strip() for m in prompt_msgs):
        raise where.error(fields.prompt, "the prompt is empty", "every pair needs a prompt to condition on")
    for completion, name in ((chosen, fields.chosen), (rejected, fields.rejected)):
        # The chat template renders the prompt with a generation prompt, so the reply must be an assistant turn.
        if completion and completion[0]["role"] != "assistant":
            raise where.error(name, f"the reply after the prompt starts with a '{completion[0]['role']}' message",
                              "the completion must start with an assistant message; check the prompt and message order")
    return prompt_msgs, chosen, rejected, True


def _within_shared_turns(prompt: tuple, chosen: tuple, rejected: tuple) -> bool:
    """True when the prompt's messages appear, in order and contiguous, among the leading messages chosen and
    rejected share (role equal, content equal up to surrounding whitespace)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    key = lambda m: (m["role"], m["content"].strip())  # noqa: E731
    want, shared = [key(m) for m in prompt], [key(m) for m in chosen[:k]]
    return any(shared[i:i + len(want)] == want for i in range(len(shared) - len(want) + 1))


def _split_shared_messages(chosen: tuple, rejected: tuple, fields: FieldMap, where: _Where):
    """No prompt given: the prompt is the longest shared run of leading messages, backed off until both
    completions start at an assistant message (or one of them is empty, which is then skipped as empty)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1

    def starts_reply(msgs: tuple, i: int) -> bool:
        return i == len(msgs) or msgs[i]["role"] == "assistant"

    # Identical conversations (both end at k) back off to their last assistant turn, so they are reported as
    # "chosen equals rejected" rather than as empty completions.
    while k > 0 and not (starts_reply(chosen, k) and starts_reply(rejected, k)
                         and not (k == len(chosen) and k == len(rejected))):
        k -= 1
    if k == 0:
        raise where.error(
            fields.prompt,
            "absent, and chosen and rejected share no leading messages before an assistant reply",
            "add a prompt field (or map one with --prompt-field), or include the user turn in both conversations",
        )
    return chosen[:k], chosen[k:], rejected[k:]
