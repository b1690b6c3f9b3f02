"""Tokenize and cut a ReplySet by exactly encode.py's rules, the prompt once for all its replies.

For every pair (c, r) derived from a set, ``encode.encode_example`` on that pair's Example gives the prompt ids of
the encoded set and its replies c and r: the prompt is tokenized and cut as the pair's prompt is (a text prompt
keeps its end; a conversation keeps its system message and drops its oldest turns, the replies then re-split
against the cut rendering), and every reply keeps its start within max_length - len(prompt). A set that cannot fit
is skipped and counted, as a pair row is (an error with ``strict``); ``TruncationReport`` counts a set as one row
with K replies.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.base.errors import UserError
from stages.data.encode import (
    TokenizeSettings,
    TruncationReport,
    _bos,
    _chat_completion,
    _chat_ids,
    _ids,
    _skip,
    _with_eos,
    cut_chat_prompt,
)
from stages.data.replyset import EncodedSet, ReplySet


def tokenize_set(tokenizer, s: ReplySet) -> tuple[list[int], list[list[int]]]:
    """Untruncated (prompt, replies) ids, as encode.tokenize_example gives them for each pair."""
    if s.is_chat:
        if tokenizer.chat_template is None:
            raise UserError(
                f"{s.source}: row {s.row}: conversational data needs a tokenizer with a chat template; "
                "use an instruct model's tokenizer or convert the rows to prompt/chosen/rejected text"
            )
        prompt = _chat_ids(tokenizer, s.prompt, generation_prompt=True)
        return prompt, [_chat_completion(tokenizer, prompt, s, reply) for reply in s.replies]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; set one in tokenizer_config.json")
    return _bos(tokenizer) + _ids(tokenizer, s.prompt), [_with_eos(_ids(tokenizer, r), eos) for r in s.replies]


def encode_set(tokenizer, s: ReplySet, settings: TokenizeSettings, report: TruncationReport,
               strict: bool = False) -> EncodedSet | None:
    """One set tokenized and cut (module docstring), counted in `report`; None when it cannot fit (an error when
    `strict`)."""
    prompt, replies = tokenize_set(tokenizer, s)
    report.rows += 1
    full_prompt, limit = len(prompt), settings.max_prompt_length
    if limit is not None and full_prompt > limit:
        if not s.is_chat:
            prompt = prompt[-limit:] if limit > 0 else []
        else:
            cut = cut_chat_prompt(tokenizer, s, limit)
            if cut is None:
                report.skipped += 1
                _skip(s, strict, f"no room for the last user turn within --max-prompt-length {limit}",
                      "raise it or shorten the system message")
                return None
            if cut.messages != list(s.prompt):  # other turns: split the replies off that rendering
                replies = [_chat_completion(tokenizer, cut.rendered, s, r, cut.messages) for r in s.replies]
            prompt = cut.ids
    room = None if settings.max_length is None else settings.max_length - len(prompt)
    kept = replies if room is None else [r[:room] for r in replies]
    if (room is not None and room < 1) or not all(kept):  # as encode.truncate: no room, or a reply with no ids
        report.skipped += 1
        _skip(s, strict, f"the prompt ({len(prompt)} tokens) leaves no room for a reply within --max-length "
              f"{settings.max_length}", "raise --max-length or lower --max-prompt-length")
        return None
    report.add(full_prompt - len(prompt), tuple(len(full) - len(k) for full, k in zip(replies, kept)))
    return EncodedSet(s.prompt_id, s.reply_ids, tuple(prompt), tuple(tuple(k) for k in kept), s.scores)


def encode_sets(tokenizer, sets: Sequence[ReplySet], settings: TokenizeSettings,
                strict: bool = False) -> tuple[list[EncodedSet], TruncationReport]:
    """Encode every set; returns (encoded, what was cut and skipped). `strict`: a skip is a one-line error."""
    report = TruncationReport()
    encoded = [encode_set(tokenizer, s, settings, report, strict) for s in sets]
    return [e for e in encoded if e is not None], report
