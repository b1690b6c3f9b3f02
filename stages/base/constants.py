"""Constants several parts share, declared once here: torch-free, importing nothing, so the settings, the data and
the math layers can all read them without importing one another."""

from __future__ import annotations

import os

# LM-head positions per chunk when --chunk-size is unset, per device (CHUNK_HELP says why; chunk_size_for applies it)
CHUNK_BY_DEVICE = {"cpu": 256, "cuda": 2048}
CHUNK_HELP = ("Positions per LM-head chunk (bounds the head's memory; no effect on the cache's fingerprint). Default "
              "per device: 256 on CPU ([256, vocab] fp32 logits: 150 MiB at vocab 152k); 2048 on CUDA (1.2 GB of fp32 "
              "logits at 152k, a backward peak near 12 bytes x chunk x vocab = 3.7 GB, small next to a 24-80 GB GPU, "
              "and 8x fewer head kernels).")
DEFAULT_SPLIT = "train"  # split of a saved DatasetDict or a Hub dataset when the source names none


def chunk_size_for(chunk_size: int | None, device_type: str) -> int:
    """--chunk-size when given, else the default of the device the LM head runs on (CHUNK_BY_DEVICE; CPU's for
    any other device type)."""
    return chunk_size if chunk_size is not None else CHUNK_BY_DEVICE.get(device_type, CHUNK_BY_DEVICE["cpu"])


def launched_world_size() -> int:
    """Processes torchrun started (its WORLD_SIZE; 1 without a launcher): readable before any process group, so
    settings that depend on it are checked before anything is read."""
    return int(os.environ.get("WORLD_SIZE", "1"))
