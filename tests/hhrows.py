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
