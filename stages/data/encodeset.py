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

from stages.data.encode import TokenizeSettings, TruncationReport, _skip, fit_prompt, tokenize_replies
from stages.data.replyset import EncodedSet, ReplySet


def tokenize_set(tokenizer, s: ReplySet) -> tuple[list[int], list[list[int]]]:
    """Untruncated (prompt, replies) ids, as encode.tokenize_example gives them for each pair."""
    return tokenize_replies(tokenizer, s, s.replies)


def encode_set(tokenizer, s: ReplySet, settings: TokenizeSettings, report: TruncationReport,
               strict: bool = False) -> EncodedSet | None:
    """One set tokenized and cut (module docstring), counted in `report`; None when it cannot fit (an error when
    `strict`)."""
    full, replies = tokenize_replies(tokenizer, s, s.replies)
    report.rows += 1
    fitted = fit_prompt(tokenizer, s, full, s.replies, settings, report, strict)
    if fitted is None:
        return None
    prompt, resplit = fitted
    replies = replies if resplit is None else resplit
    room = None if settings.max_length is None else settings.max_length - len(prompt)
    kept = replies if room is None else [r[:room] for r in replies]
    if (room is not None and room < 1) or not all(kept):  # as encode.truncate: no room, or a reply with no ids
        report.skipped += 1
        _skip(s, strict, f"the prompt ({len(prompt)} tokens) leaves no room for a reply within --max-length "
              f"{settings.max_length}", "raise --max-length or lower --max-prompt-length")
        return None
    report.add(len(full) - len(prompt), tuple(len(r) - len(k) for r, k in zip(replies, kept)))
    return EncodedSet(s.prompt_id, s.reply_ids, tuple(prompt), tuple(tuple(k) for k in kept), s.scores)


def encode_sets(tokenizer, sets: Sequence[ReplySet], settings: TokenizeSettings,
                strict: bool = False) -> tuple[list[EncodedSet], TruncationReport]:
    """Encode every set; returns (encoded, what was cut and skipped). `strict`: a skip is a one-line error."""
    report = TruncationReport()
    encoded = [encode_set(tokenizer, s, settings, report, strict) for s in sets]
    return [e for e in encoded if e is not None], report
