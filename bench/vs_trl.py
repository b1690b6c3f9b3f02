"""Side by side with TRL 1.16's DPOTrainer on SmolLM2-135M-Instruct and HH-RLHF rows: same numbers, and time.

  (i)   equality: per-example reference log-probs of `dpo precompute-ref` (fp32) against TRL's precomputed
        ref_chosen_logps / ref_rejected_logps on the same rows, plain text and conversational (HH transcripts split
        into user/assistant messages); token ids of both tokenizations compared on every HH row;
  (ii)  stage one: our precompute-ref against TRL's precompute (DPOTrainer(precompute_ref_log_probs=True)), each at
        its fastest batch setting (TRL's batch size picked by a scan in the default mode), same rows;
  (iii) sweep: four β runs of N steps from ONE cache (`precompute-ref` + `dpo sweep`) against four TRL runs that
        each precompute, same LoRA, rows, batch size, steps, optimizer;
  (iv)  stage two: step time of our runs against TRL with precompute_ref_log_probs and with the reference computed
        online (adapter disabled, TRL's default for PEFT).
Everything runs in ONE process with one torch thread, variants interleaved; medians of repeats; ratios, not absolute
times, are the result (the 2 cores are shared). Writes the `vs_trl` section of bench/RESULTS.md.

  .venv/bin/python bench/vs_trl.py --quick     # < 3 min: smoke test, tiny workloads (not written to RESULTS.md)
  .venv/bin/python bench/vs_trl.py             # < 20 min: the recorded numbers
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


# ================================================================================================ rows
def read_hh_raw(path: Path = HH_PATH, limit: int | None = None) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def hh_messages(transcript: str) -> list[dict] | None:
    """"\\n\\nHuman: a\\n\\nAssistant: b..." -> [{user: a}, {assistant: b}, ...]; None unless the turns strictly
    alternate user/assistant starting with the user (the few odd transcripts are left out, and counted)."""
    parts = HH_TURN.split(transcript)  # ["", "Human", " a", "Assistant", " b", ...]
    if parts[0].strip() or len(parts) < 5:
        return None
    msgs = [{"role": ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(msgs)):
        return None
    return msgs if msgs[-1]["role"] == "assistant" else None


def chat_source_rows(raw: list[dict]) -> tuple[list[dict], int]:
    """HH rows as conversations without a prompt column (our loader splits the shared leading turns off);
    returns (rows, rows left out because a transcript does not alternate cleanly)."""
    out, dropped = [], 0
    for r in raw:
        c, j = hh_messages(r["chosen"]), hh_messages(r["rejected"])
        if c is None or j is None:
            dropped += 1
            continue
        out.append({"chosen": c, "rejected": j})
    return out, dropped


def explicit_rows(examples) -> list[dict]:
    """Validated Examples as TRL's explicit format: strings for text rows, message lists for chat rows."""
    def fmt(v):
        return v if isinstance(v, str) else [dict(m) for m in v]
    return [{"prompt": fmt(e.prompt), "chosen": fmt(e.chosen), "rejected": fmt(e.rejected), "example_id": e.example_id}
            for e in examples]


def write_jsonl(path: Path, rows: list[dict], keys=("prompt", "chosen", "rejected")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def trl_tokenize(tokenizer, rows: list[dict], max_length: int | None, output_dir: str) -> list[dict]:
    """TRL 1.16's own dataset preparation (EOS added to text completions, tokenization, prompt/completion split,
    drop of rows whose prompt fills max_length) without building a model: `DPOTrainer._prepare_dataset` only reads
    `self._tokenizer`. Returns rows with prompt_ids / chosen_ids / rejected_ids (and the input columns)."""
    import types

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=output_dir, report_to="none", use_cpu=True, max_length=max_length)
    fake_self = types.SimpleNamespace(_tokenizer=tokenizer)
    return list(DPOTrainer._prepare_dataset(fake_self, Dataset.from_list(rows), tokenizer, args, "train"))


# ================================================================================================ measuring
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as _dt  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's and datasets' bars (ours print their own summary lines)
OUT = REPO / "bench" / "out" / "vs_trl"
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- vs_trl start -->", "<!-- vs_trl end -->"
BETAS = (0.01, 0.05, 0.1, 0.5)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Workload sizes: --quick is a smoke test, the default is what RESULTS.md records."""
    tok_rows: int | None      # rows for the token-id comparison (None: all)
    eq_rows: int              # plain rows for (i)/(ii)
    repeats: int              # interleaved repeats of (ii)
    chat_rows: int            # conversational rows for (i)
    scan_rows: int            # rows for the batch-setting scans (0: no scan)
    trl_batch_sizes: tuple    # TRL precompute batch sizes scanned
    our_budgets: tuple        # our --max-tokens-per-batch scanned
    max_length: int           # stage one: --max-length = --max-prompt-length = TRL max_length
    sweep_steps: int          # N
    sweep_batch: int          # pairs per step (both)
    sweep_max_length: int
    sweep_repeats: int


QUICK = Plan(tok_rows=200, eq_rows=4, repeats=1, chat_rows=2, scan_rows=0, trl_batch_sizes=(2,), our_budgets=(2048,),
             max_length=512, sweep_steps=2, sweep_batch=1, sweep_max_length=192, sweep_repeats=1)
FULL = Plan(tok_rows=None, eq_rows=24, repeats=3, chat_rows=8, scan_rows=8, trl_batch_sizes=(1, 2, 4, 8),
            our_budgets=(1024, 2048, 4096, 8192), max_length=1024, sweep_steps=4, sweep_batch=2,
            sweep_max_length=384, sweep_repeats=1)


class Clock:
    """Wall and process-CPU seconds (one torch thread: CPU seconds are the work done, barely moved by other jobs)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0
        return False


class Accum:
    """Wraps a function; sums wall/CPU seconds over its calls (used for phase profiles)."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu, self.calls = fn, 0.0, 0.0, 0

    def __call__(self, *a, **k):
        with Clock() as c:
            out = self.fn(*a, **k)
        self.wall, self.cpu, self.calls = self.wall + c.wall, self.cpu + c.cpu, self.calls + 1
        return out

    def reset(self):
        self.wall = self.cpu = 0.0
        self.calls = 0


def med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def f(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def log(msg: str) -> None:
    print(f"[vs_trl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ================================================================================================ profiles
PROFILE = {}


def install_profiles() -> None:
    """Time the LM-head part of each side: our chunked head (`stages.logprobs._chunk_logps`) and TRL's fused
    chunked log-prob kernel (torch fallback on CPU), to explain where the time goes."""
    import stages.logprobs as lp
    from trl.kernels import chunked_logprob as ck

    PROFILE["ours_head"] = Accum(lp._chunk_logps)
    lp._chunk_logps = PROFILE["ours_head"]
    fwd = ck.ChunkedLogProbFunction.forward
    PROFILE["trl_head"] = Accum(fwd)
    ck.ChunkedLogProbFunction.forward = staticmethod(PROFILE["trl_head"])


# ================================================================================================ runners
def load_hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def trl_config(out: Path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no",
                logging_steps=1, seed=42, gradient_checkpointing=False)
    return DPOConfig(**{**base, **kw})


def ours_precompute(model_dir: Path, data: Path, out: Path, max_length: int, budget: int) -> dict:
    """`dpo precompute-ref` in this process; returns values by id and timings (total, scoring)."""
    import stages.precompute as pc
    from stages import refcache

    score = Accum(pc.score_batches)
    pc.score_batches, original = score, pc.score_batches
    PROFILE["ours_head"].reset()
    try:
        with Clock() as c:
            pc.run(pc.PrecomputeConfig(model=str(model_dir), data=(str(data),), out=str(out), max_length=max_length,
                                       max_prompt_length=max_length, max_tokens_per_batch=budget, overwrite=True))
    finally:
        pc.score_batches = original
    df, meta = refcache.read_cache(out)
    values = {r["example_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in df.iter_rows(named=True)}
    return {"values": values, "wall": c.wall, "cpu": c.cpu, "score_wall": score.wall, "score_cpu": score.cpu,
            "head_cpu": PROFILE["ours_head"].cpu}


def precompute_cmd(model_dir, data, out, max_length, budget) -> str:
    return (f"dpo precompute-ref --model {rel(model_dir)} --data {rel(data)} --out {rel(out)} --dtype fp32 "
            f"--max-length {max_length} --max-prompt-length {max_length} --max-tokens-per-batch {budget}")


def trl_precompute(model_dir: Path, rows: list[dict], out: Path, max_length: int, batch_size: int) -> dict:
    """TRL 1.16 as a user runs it: load the model, DPOTrainer(precompute_ref_log_probs=True) (no ref model)."""
    from datasets import Dataset
    from trl import DPOTrainer

    score = Accum(DPOTrainer._precompute_ref_logps)
    DPOTrainer._precompute_ref_logps, original = score, DPOTrainer._precompute_ref_logps
    PROFILE["trl_head"].reset()
    try:
        with Clock() as c:
            model, tok = load_hf(model_dir)
            trainer = DPOTrainer(model=model, args=trl_config(out, precompute_ref_log_probs=True, max_length=max_length,
                                                              precompute_ref_batch_size=batch_size),
                                 train_dataset=Dataset.from_list(rows), processing_class=tok)
    finally:
        DPOTrainer._precompute_ref_logps = original
    ds = trainer.train_dataset
    values = {r["example_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in ds}
    ids = {r["example_id"]: (tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in ds}
    return {"values": values, "ids": ids, "wall": c.wall, "cpu": c.cpu, "score_wall": score.wall,
            "score_cpu": score.cpu, "head_cpu": PROFILE["trl_head"].cpu}


def diff_stats(mine: dict, theirs: dict) -> dict:
    common = sorted(set(mine) & set(theirs))
    d = [abs(mine[i][k] - theirs[i][k]) for i in common for k in (0, 1)]
    rel_ = [abs(mine[i][k] - theirs[i][k]) / max(abs(theirs[i][k]), 1e-9) for i in common for k in (0, 1)]
    return {"n": len(common), "only_ours": len(set(mine) - set(theirs)), "only_trl": len(set(theirs) - set(mine)),
            "max": max(d), "mean": sum(d) / len(d), "max_rel": max(rel_)}


def rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)
