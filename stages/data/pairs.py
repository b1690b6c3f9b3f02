"""Which pairs a prompt with several scored replies gives: the rule (``--pairs``, ``--min-score-gap``) and its report.

Replies are taken in the order the row gives them; a higher score is better (ranks arrive as scores -rank).

- ``all``: every two replies i < j whose scores differ; the higher-scored one is chosen. K replies give at most
  K(K-1)/2 pairs.
- ``best-worst``: one pair, the first reply with the top score against the first reply with the lowest score.
- ``best-rest``: the first reply with the top score against every other reply with a lower score, in order (at most
  K-1 pairs).

Two replies with the same score never pair (a tie teaches nothing; such candidates are counted as tied). A candidate
pair is kept only when score(chosen) - score(rejected) >= ``--min-score-gap`` (default 0: any difference will do; a
difference equal to the gap up to float rounding counts as equal); candidates below it are counted and skipped. A
prompt for which the rule gives no pair is dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PAIR_RULES = ("all", "best-worst", "best-rest")


@dataclass(frozen=True)
class PairRule:
    """``pairs``: one of PAIR_RULES; ``min_score_gap``: the least score(chosen) - score(rejected) a pair needs (>= 0).
    The settings (stages/settings/groups.DataSpec) check both before anything is read."""

    pairs: str = "all"
    min_score_gap: float = 0.0

    def describe(self) -> str:
        """How reports name the rule: "--pairs all" (and the gap when there is one)."""
        return f"--pairs {self.pairs}" + (f", --min-score-gap {self.min_score_gap:g}" if self.min_score_gap else "")


def set_pairs(scores: Sequence[float], rule: PairRule) -> tuple[list[tuple[int, int]], int, int]:
    """(chosen index, rejected index) pairs under `rule` (module docstring), the number of tied candidate pairs
    skipped, and the number of candidates skipped for a score difference below ``rule.min_score_gap``."""
    n = len(scores)
    if n < 2:
        return [], 0, 0
    if rule.pairs == "all":
        candidates = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        top = max(range(n), key=lambda i: (scores[i], -i))  # the first reply with the top score
        if rule.pairs == "best-worst":
            candidates = [(top, min(range(n), key=lambda i: (scores[i], i)))]  # the first with the lowest score
        else:
            candidates = [(top, j) for j in range(n) if j != top]
    pairs, tied, below = [], 0, 0
    for i, j in candidates:
        if scores[i] == scores[j]:
            tied += 1
            continue
        chosen, rejected = (i, j) if scores[i] > scores[j] else (j, i)
        if _below(scores[chosen] - scores[rejected], rule.min_score_gap):
            below += 1
            continue
        pairs.append((chosen, rejected))
    return pairs, tied, below


def _below(diff: float, gap: float) -> bool:
    """diff < gap, but not by rounding alone (8.3 - 8.1 is 0.2 for a --min-score-gap of 0.2)."""
    return diff < gap and not math.isclose(diff, gap, rel_tol=1e-9, abs_tol=1e-12)


def _count(n: int, one: str, many: str | None = None) -> str:
    """"1 prompt", "1,648 replies": thousands separators, singular for one."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


@dataclass
class PairReport:
    """What the rule made of the reply sets. ``prompts`` and ``replies`` count the sets kept (those with a pair);
    the skip counts are over every set the rule saw."""

    prompts: int = 0
    replies: int = 0
    pairs: int = 0
    tied_skipped: int = 0           # candidate pairs of two equal scores
    below_gap_skipped: int = 0      # candidate pairs closer than --min-score-gap
    no_pair_sets: int = 0           # sets dropped because the rule gave them no pair
    duplicate_replies: int = 0      # a reply repeated within its row: the first is kept (dropped at load)
    empty_replies: int = 0          # empty replies (dropped at load)
    unrated_replies: int = 0        # replies whose rating is "N/A" (UltraFeedback; dropped at load)
    duplicate_pairs: int = 0        # pairs an earlier set already gave (same prompt, chosen and rejected)
    rule: PairRule = field(default_factory=PairRule)

    def summary(self) -> str:
        """E.g. "412 prompts, 1,648 replies -> 2,310 pairs (--pairs all); 162 tied pairs skipped"."""
        line = (f"{_count(self.prompts, 'prompt')}, {_count(self.replies, 'reply', 'replies')} -> "
                f"{_count(self.pairs, 'pair')} ({self.rule.describe()})")
        extra = [
            (self.tied_skipped, _count(self.tied_skipped, "tied pair") + " skipped"),
            (self.below_gap_skipped, _count(self.below_gap_skipped, "pair") + " below the score gap skipped"),
            (self.duplicate_pairs, _count(self.duplicate_pairs, "repeated pair") + " skipped"),
            (self.no_pair_sets, _count(self.no_pair_sets, "prompt") + " without a pair skipped"),
            (self.duplicate_replies, _count(self.duplicate_replies, "duplicate reply", "duplicate replies")
             + " dropped"),
            (self.empty_replies, _count(self.empty_replies, "empty reply", "empty replies") + " dropped"),
            (self.unrated_replies, _count(self.unrated_replies, "unrated reply", "unrated replies")
             + " (N/A) dropped"),
        ]
        notes = [text for n, text in extra if n]
        return line + ("; " + ", ".join(notes) if notes else "")
