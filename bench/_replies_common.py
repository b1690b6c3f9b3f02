"""bench/bench_replies.py's shared part: its settings, its log line, and the data (HH prompts with four sampled,
scored replies; the same pairs expanded into pair rows). See bench_replies.py's docstring."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import HH_PATH, REPO  # noqa: E402

OUT = C.OUT / "replies"
RAW = C.OUT / "replies.json"
BEGIN, END = "<!-- replies start -->", "<!-- replies end -->"
K, SEEDS = 4, (0, 1, 2, 3)
SAMPLING = {"top_p": 0.9, "temperature": 1.0, "max_new_tokens": 48, "max_prompt_tokens": 128}
MAXLEN, BUDGET, TRL_BS = 1024, 1024, 1  # nothing is cut; each side's fastest CPU batch setting (bench/vs_trl scan)
LORA = dict(r=16, alpha=32)



def log(msg: str) -> None:
    print(f"[replies {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ================================================================================================ data
def score(text: str, k: int) -> float:
    return len(set(text.lower().split())) - k / 4


def cut_reply(text: str) -> str:
    return text.split("\n\nHuman:")[0].rstrip()


def candidate_prompts(tok) -> list[str]:
    from stages.data.rows import load_examples

    examples, _ = load_examples([HH_PATH])
    seen, out = set(), []
    for e in examples:
        if e.prompt not in seen and len(tok(e.prompt, add_special_tokens=False)["input_ids"]) \
                <= SAMPLING["max_prompt_tokens"]:
            seen.add(e.prompt)
            out.append(e.prompt)
    random.Random(0).shuffle(out)
    return out


def generate(model, tok, prompts: list[str], seed: int) -> list[str]:
    """One batched sample per prompt under torch seed `seed` (left padding), cut at EOS / "\\n\\nHuman:"."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_p=SAMPLING["top_p"], temperature=SAMPLING["temperature"],
                             top_k=0, max_new_tokens=SAMPLING["max_new_tokens"], pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return [cut_reply(tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)) for row in out]


def make_sets(n: int, model_dir: Path) -> tuple[Path, Path, dict]:
    """The reply-set file (generic shape) and its expanded pair rows; sampled once, then read from bench/out."""
    from stages.model.models import load_tokenizer

    sets_path, pairs_path, meta_path = OUT / f"sets-n{n}.jsonl", OUT / f"pairs-n{n}.jsonl", OUT / f"sets-n{n}.json"
    settings = {"n": n, "seeds": list(SEEDS), **SAMPLING, "model": model_dir.name}
    if meta_path.is_file() and sets_path.is_file() and json.loads(meta_path.read_text())["settings"] == settings:
        meta = json.loads(meta_path.read_text())
        log(f"data: reusing {rel(sets_path)} (sampled {meta['date']}; delete it to sample again)")
        return sets_path, pairs_path, {**meta, "reused": True}
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pool, rows, passed, t0 = candidate_prompts(tok), [], 0, time.perf_counter()
    while len(rows) < n:
        chunk, pool = pool[:n - len(rows) + 4], pool[n - len(rows) + 4:]
        replies = list(zip(*[generate(model, tok, chunk, s) for s in SEEDS]))
        for prompt, rs in zip(chunk, replies):
            if len(rows) < n and all(rs) and len(set(rs)) == K:
                rows.append({"prompt": prompt, "completions": list(rs), "scores": [score(r, k) for k, r in
                                                                                 enumerate(rs)]})
            elif len(rows) < n:
                passed += 1
    meta = {"settings": settings, "passed_over": passed, "sampling_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(sets_path, rows)
    write_jsonl(pairs_path, expanded(rows))
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"data: sampled {n} prompts x {K} replies in {meta['sampling_s']:.0f}s ({passed} passed over)")
    return sets_path, pairs_path, {**meta, "reused": False}


def expanded(sets: list[dict]) -> list[dict]:
    """Every pair of the `all` rule as a pair row (better reply chosen), set order then (i < j) order."""
    out = []
    for s in sets:
        r, sc = s["completions"], s["scores"]
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                c, w = (i, j) if sc[i] > sc[j] else (j, i)
                out.append({"prompt": s["prompt"], "chosen": r[c], "rejected": r[w]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


