"""Many replies per prompt: the types every layer shares (data, cache, stage one, stage two), and their ids.

A ``ReplySet`` is one prompt with K >= 2 distinct replies and a score per reply (higher is better; ranks arrive as
scores -rank). Pairs are derived from it by a rule (stages/data/pairs.py); a derived pair is an ordinary
``rows.Example`` whose ``example_id`` is ``rows.content_id(prompt, chosen, rejected)``: the SAME id the pair would
have as a pair row, so a pair row file and the reply sets it came from name their pairs alike.

Ids (sha256[:32] of canonical JSON, like rows.content_id):
    prompt_id = sha(prompt)                 one per prompt, whatever its replies
    reply_id  = sha(prompt, reply)          one per (prompt, reply): stage one's cache key for reply sets
Pair rows (K = 2, prompt/chosen/rejected columns) keep today's path, ids and cache; only data with several replies
per prompt uses these types.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from stages.data.rows import Text

MAX_REPLIES = 32  # replies per prompt: pairs grow as K^2 and the row [prompt | reply_1 .. reply_K] as K


def _sha(obj: object) -> str:
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def prompt_id(prompt: Text) -> str:
    """sha256[:32] of the canonical prompt (messages as {"role", "content"} only)."""
    return _sha({"prompt": prompt})


def reply_id(prompt: Text, reply: Text) -> str:
    """sha256[:32] of the canonical (prompt, reply): a reply scored once, whatever pairs it is in."""
    return _sha({"prompt": prompt, "reply": reply})


@dataclass(frozen=True)
class ReplySet:
    """One prompt with its distinct replies (order as given) and their scores (higher is better)."""

    prompt: Text
    replies: tuple[Text, ...]
    scores: tuple[float, ...]
    is_chat: bool
    source: str  # file path as given
    row: int     # 1-based row within source

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.prompt)

    @property
    def reply_ids(self) -> tuple[str, ...]:
        return tuple(reply_id(self.prompt, r) for r in self.replies)


@dataclass(frozen=True)
class EncodedSet:
    """A ReplySet tokenized and cut as pairs are (encode.py's rule): one prompt, each reply within max_length."""

    prompt_id: str
    reply_ids: tuple[str, ...]
    prompt_ids: tuple[int, ...]
    replies: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]

    @property
    def length(self) -> int:
        """Tokens of the whole row [prompt | reply_1 | ... | reply_K]."""
        return len(self.prompt_ids) + sum(len(r) for r in self.replies)


@dataclass(frozen=True)
class Row:
    """One forward row: a prompt and some of its replies, [prompt | reply_a | reply_b | ...]; `keys` names each
    reply (its reply_id) so results can be joined back. A prompt whose replies exceed the row budget gets several
    rows, each with its own copy of the prompt."""

    prompt_ids: tuple[int, ...]
    replies: tuple[tuple[int, ...], ...]
    keys: tuple[str, ...]
    prompt_id: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.replies)


def split_rows(s: EncodedSet, budget: int, keep: set[str] | None = None) -> list[Row]:
    """The rows of one encoded set under `budget` tokens each (greedy, replies in order; a reply that does not fit
    with the prompt alone still gets a row of its own). `keep`: only these reply ids (stage one's todo)."""
    rows: list[Row] = []
    cur: list[tuple[tuple[int, ...], str]] = []
    used = len(s.prompt_ids)
    for ids, key in zip(s.replies, s.reply_ids):
        if keep is not None and key not in keep:
            continue
        if cur and used + len(ids) > budget:
            rows.append(Row(s.prompt_ids, tuple(r for r, _ in cur), tuple(k for _, k in cur), s.prompt_id))
            cur, used = [], len(s.prompt_ids)
        cur.append((ids, key))
        used += len(ids)
    if cur:
        rows.append(Row(s.prompt_ids, tuple(r for r, _ in cur), tuple(k for _, k in cur), s.prompt_id))
    return rows
