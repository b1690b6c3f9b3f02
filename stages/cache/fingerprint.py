"""Fingerprints of model and adapter folders: what a cache records so that a changed model is noticed, cheaply.

Read by precompute-ref (the cache's manifest), prepare (train against a cache), verify and export-trl.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLE = 1 << 20  # bytes of tensor data hashed at each end of every weight file


def _safetensors_header(path: Path) -> bytes:
    """The JSON header (names, dtypes, shapes, offsets) plus the first and last MiB of tensor data, so two
    checkpoints of the same shape (a base and its fine-tune) still differ."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        head = f.read(SAMPLE)
        f.seek(max(8 + n, path.stat().st_size - SAMPLE))
        return header + head + f.read(SAMPLE)


def folder_fingerprint(path: str | None, full_hash: bool = False) -> dict | None:
    """Cheap and content-based: config/adapter json, and per weight file its name, size and safetensors header
    (names, dtypes, shapes, offsets). `full_hash` adds a SHA-256 of every byte (slow for 140 GB)."""
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        if (p / name).is_file():
            h.update(name.encode() + (p / name).read_bytes())
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        h.update(f.name.encode() + str(f.stat().st_size).encode() + _safetensors_header(f))
        if full_hash:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return {
        "path": str(p.resolve()), "hash": h.hexdigest()[:32], "full_hash": full_hash,
        "files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
    }


def config_hash(path: str) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:32]
