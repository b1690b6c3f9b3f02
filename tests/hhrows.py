"""Small HH-RLHF row files for tests: a slice of the shared test split, written as JSON lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def hh_rows(hh_path: Path, start: int, stop: int) -> list[dict]:
    rows = []
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= stop:
                break
            if i >= start:
                rows.append(json.loads(line))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def expanded_pairs(sets: list[dict]) -> list[dict]:
    """The oracle of many-replies tests: every pair of the `all` rule of generic-shape rows ({"prompt",
    "completions", "scores" or "ranks"}) as a pair row, in row then (i < j) order; ties never pair, rank r is
    score -r."""
    out = []
    for s in sets:
        r, sc = s["completions"], s.get("scores") or [-x for x in s["ranks"]]
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                if sc[i] != sc[j]:
                    c, w = (i, j) if sc[i] > sc[j] else (j, i)
                    out.append({"prompt": s["prompt"], "chosen": r[c], "rejected": r[w]})
    return out
