"""`torchrun --nproc-per-node 2` on CPU (gloo, FSDP2) gives the same per-example values as one process.

An ODD number of one-example batches means rank 1 has one batch fewer than rank 0 and runs the dummy forward;
a single example leaves rank 1 with no batch at all. Both with and without prompt sharing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from stages.cache import refcache
from stages.data.encode import TokenizeSettings, encode_examples
from stages.data.rows import load_examples
from stages.model.models import load_tokenizer
from stages.stage1.precompute import plan_batches
from tests.bounds import logit_scale_of_files, min_token_nats, sum_tol
from tests.test_precompute import (  # noqa: F401
    MAXLEN,
    MAXPROMPT,
    SHORT,
    VALUE_COLS,
    files,
    hh_rows,
    run_inproc,
    write_jsonl,
)
from tests.tiny import VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist
BUDGET = 1  # every example is its own batch (a lone example always fits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "stages.cli", "precompute-ref", "--model", str(model),
           "--data", str(data), "--out", str(out), "--max-tokens-per-batch", str(BUDGET), "--batches-per-part", "2",
           *SHORT, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("share", [True, False], ids=["share", "no-share"])
def test_two_ranks_equal_one_process(share, tiny_llama, files, tmp_path):
    data = files["seven"]
    tok = load_tokenizer(str(tiny_llama))
    examples, _ = load_examples([data])
    encoded, _ = encode_examples(tok, examples, TokenizeSettings(MAXLEN, MAXPROMPT))
    batches = plan_batches(encoded, BUDGET, share, True)
    assert len(encoded) % 2 == 1 and len(batches) == 7  # rank 0: 4 batches, rank 1: 3 + one dummy forward

    flag = "--share-prompt" if share else "--no-share-prompt"
    proc = torchrun(tiny_llama, data, tmp_path / "dist" / "ref.parquet", flag)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    dist_df = pl.read_parquet(tmp_path / "dist" / "ref.parquet").sort("example_id")
    one = run_inproc(tiny_llama, [data], tmp_path / "one" / "ref.parquet", max_tokens_per_batch=BUDGET,
                     share_prompt=share)

    assert dist_df.height == 7 and dist_df["example_id"].n_unique() == 7
    assert dist_df["example_id"].to_list() == one["example_id"].to_list()
    assert dist_df.select(VALUE_COLS[2:]).equals(one.select(VALUE_COLS[2:]))
    diff = max(float((dist_df[c] - one[c]).abs().max()) for c in VALUE_COLS[:2])
    print(f"max |dist - single| ({'share' if share else 'no-share'}): {diff:.3e}")
    # each example is its own batch in both runs and no value crosses ranks, so this is the same fp32 forward
    # (0.0 measured); bound it anyway per example by rounding (tests/bounds.py). An off-by-one token or a mask
    # error moves a sum by >= min_token_nats (> sum_tol here: random model), so it still fails.
    z = logit_scale_of_files(tiny_llama, [data], MAXLEN, MAXPROMPT)
    assert min_token_nats(VOCAB_SIZE, z) > sum_tol(max(one["chosen_tokens"].max(), one["rejected_tokens"].max()), z)
    for side in ("chosen", "rejected"):
        diff = (dist_df[f"ref_{side}_logps"] - one[f"ref_{side}_logps"]).abs()
        assert (diff <= sum_tol(one[f"{side}_tokens"], z)).all(), side
    meta = refcache.read_meta(tmp_path / "dist" / "ref.parquet")
    assert meta["world_size"] == 2
    assert meta["share_prompt"] is share
    assert sum(line.startswith("done:") for line in proc.stdout.splitlines()) == 1  # rank 0 only
    assert "Traceback" not in proc.stderr


def test_rank_without_any_batch_still_joins(tiny_llama, files, tmp_path):
    """One example: rank 1 has nothing of its own and runs only the dummy forward."""
    one_row = write_jsonl(tmp_path / "one.jsonl", [next(iter(_rows(files["seven"])))])
    proc = torchrun(tiny_llama, one_row, tmp_path / "dist" / "ref.parquet")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    dist_df = pl.read_parquet(tmp_path / "dist" / "ref.parquet")
    single = run_inproc(tiny_llama, [one_row], tmp_path / "one" / "ref.parquet", max_tokens_per_batch=BUDGET)
    assert dist_df.height == 1
    assert dist_df.select("example_id", *VALUE_COLS[2:]).equals(single.select("example_id", *VALUE_COLS[2:]))
    z = logit_scale_of_files(tiny_llama, [one_row], MAXLEN, MAXPROMPT)  # rounding only, as above (tests/bounds.py)
    for side in ("chosen", "rejected"):
        diff = abs(dist_df[f"ref_{side}_logps"][0] - single[f"ref_{side}_logps"][0])
        assert diff <= sum_tol(single[f"{side}_tokens"][0], z), side
    assert refcache.read_meta(tmp_path / "dist" / "ref.parquet")["world_size"] == 2


def _rows(path: Path):
    import json

    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
