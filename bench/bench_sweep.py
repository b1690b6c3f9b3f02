"""Issue 5: wall time of a 3-β sweep over ONE cache vs three separate precompute-ref + train pipelines.

Both sides run the real CLI in subprocesses (process start, model loads and all), on the SmolLM2-135M 2-layer
slice and a subset of the HH-RLHF rows, same settings; the separate side recomputes the reference per β, as a
tool without a shared cache must.

    .venv/bin/python bench/bench_sweep.py            # 48 train + 16 eval rows, 3 betas x 6 steps
    .venv/bin/python bench/bench_sweep.py --quick    # 16 + 8 rows, 3 steps
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"
BETAS = ("0.05", "0.1", "0.5")


def dpo(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "sweep"))
    args = ap.parse_args()
    n_train, n_eval, steps = (16, 8, 3) if args.quick else (48, 16, 6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from stages.model.smollm import ensure_smollm2

    model = str(ensure_smollm2(REPO / "cache" / "models", n_layers=2))
    rows = [json.loads(line) for _, line in zip(range(n_train + n_eval), gzip.open(HH, "rt"))]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    common = ["--model", model, "--max-length", "256", "--max-prompt-length", "128"]
    train = [*common, "--data", str(out / "train.jsonl"), "--eval-data", str(out / "eval.jsonl"), "--no-load-in-4bit",
             "--max-steps", str(steps), "--batch-size", "4", "--eval-steps", "0", "--no-gradient-checkpointing",
             "--no-resume"]
    pre = ["precompute-ref", *common, "--data", str(out / "train.jsonl"), "--data", str(out / "eval.jsonl"),
           "--overwrite"]

    shared = dpo(*pre, "--out", str(out / "ref.parquet"))
    shared += dpo("sweep", *train, "--ref-cache", str(out / "ref.parquet"), "--output", str(out / "sweep"),
                  *[x for b in BETAS for x in ("--beta", b)])
    separate = 0.0
    for b in BETAS:
        cache = str(out / f"ref-{b}.parquet")
        separate += dpo(*pre, "--out", cache)
        separate += dpo("train", *train, "--ref-cache", cache, "--beta", b, "--output", str(out / f"train-{b}"))
    cmd = f"python bench/bench_sweep.py{' --quick' if args.quick else ''}"
    table = (f"| 3-β sweep, one cache | 3 x (precompute-ref + train) | ratio |\n|---|---|---|\n"
             f"| {shared:.1f} s | {separate:.1f} s | {shared / separate:.2f} |\n")
    print(table)
    print(json.dumps({"shared_s": shared, "separate_s": separate, "rows": [n_train, n_eval], "steps": steps,
                      "command": cmd}))


if __name__ == "__main__":
    main()
