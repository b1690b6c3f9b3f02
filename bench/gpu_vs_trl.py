"""Ours against TRL 1.16's DPOTrainer on the same GPU, model, rows and dtype (issue 20, item 8; gpu_bench.sh runs it).

  stage one: `dpo precompute-ref` (stages.stage1.precompute.run) against DPOTrainer(precompute_ref_log_probs=True) on
             the same rows: scoring wall seconds (CUDA synchronised), tokens/s, MFU (2·N per forwarded token), and the
             largest |difference| of the per-example log-probs (bf16 on a GPU: small, not 0);
  stage two: optimizer steps of `dpo train` (stages.stage2.train.run, reference from our stage-one cache) against TRL's
             trainer.train with its own precomputed reference: same LoRA (r16, alpha 32, all-linear, dropout 0),
             AdamW, batch, max_length, no gradient checkpointing. The train set is ONE batch, so every step sees the
             same pairs on both sides; median step wall seconds after the first, tokens/s, MFU (6·N per token).
Tokens are the ones each side forwards (padding not counted): ours runs each prompt once per pair (prompt
sharing), TRL twice, so "pair tokens/s" (2·prompt + chosen + rejected per pair: the same work on both sides) is the
speed comparison and MFU is each side's use of the GPU. N = non-embedding parameters (bench/gpu_mfu.py).

The rows are synthetic text (random words with HH-like lengths, none cut by --max-length): nothing to download, and
the tiny tokenizer gpu_bench.sh saves into the random model's folder encodes them. Reuses bench/vs_trl.py's runners
(vs_trl.SIDE switched to bf16 on the GPU). Writes --output/gpu_vs_trl.json.

  python3 bench/gpu_vs_trl.py --model /tmp/rand3b --output bench/out/gpu_bench/vs_trl     # ~2 min on one H200
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import gpu_mfu  # noqa: E402
import vs_trl as V  # noqa: E402

WORDS = ("the a of to and in is it that for on with as was he she they we you this be at by not are from or have "
         "an but what all were when there can said which do their if will each about how up out them then many "
         "some so these would other into has more her two like him see time could no make than first been its who "
         "now people my made over did down only way find use may water long little very after words called just "
         "where most know get through back much go good new write our me man too any day same right look think "
         "also around another came come work three word must because does part even place well such here take why "
         "help put different away again off went old number great tell men say small every found still between "
         "name should home big give air line set own under read last never us left end along while might next "
         "sound below saw something thought both few those always show large often together asked house world").split()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder with a tokenizer (gpu_bench.sh builds one)")
    p.add_argument("--output", required=True, help="folder for the caches, runs and gpu_vs_trl.json")
    p.add_argument("--rows", type=int, default=256, help="stage-one rows")
    p.add_argument("--batch", type=int, default=8, help="stage two: pairs per step (the whole train set)")
    p.add_argument("--steps", type=int, default=5, help="stage two: optimizer steps per side (the first untimed)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--budget", type=int, default=32768, help="our --max-tokens-per-batch")
    p.add_argument("--trl-batch-size", type=int, default=16, help="TRL's precompute_ref_batch_size")
    return p.parse_args()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Text rows of random words: prompt ~65 words, chosen ~27, rejected ~33 (lognormal, capped)."""
    rng = random.Random(seed)

    def text(mu: float, cap: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(3, min(cap, int(rng.lognormvariate(mu, 0.5))))))

    return [{"prompt": f"\n\nHuman: {text(4.2, 150)}\n\nAssistant:", "chosen": " " + text(3.3, 60),
             "rejected": " " + text(3.5, 60)} for _ in range(n)]


def token_counts(model: Path, examples, max_length: int) -> dict:
    from stages.data.encode import TokenizeSettings, encode_examples
    from stages.model.models import load_tokenizer

    encoded, skipped = encode_examples(load_tokenizer(str(model)), examples, TokenizeSettings(max_length, max_length))
    prompts = sum(len(e.prompt_ids) for e in encoded)
    replies = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
    return {"rows": len(encoded), "skipped": skipped, "shared": prompts + replies, "pair": 2 * prompts + replies}


def stage_one(a, model: Path, out: Path, path: Path, rows: list[dict]) -> dict:
    ours = V.ours_precompute(model, path, out / "ours.parquet", a.max_length, a.budget)
    trl = V.trl_precompute(model, rows, out / "trl-precompute", a.max_length, a.trl_batch_size)
    return {"ours_s": ours["score_wall"], "trl_s": trl["score_wall"], "ours_total_s": ours["wall"],
            "trl_total_s": trl["wall"], "diff": V.diff_stats(ours["values"], trl["values"])}


def stage_two(a, model: Path, out: Path, rows: list[dict]) -> dict:
    from stages.stage2 import train as T

    path = V.write_jsonl(out / "batch.jsonl", rows)
    cfg = T.TrainConfig.flat(model=str(model), data=(str(path),), ref_cache=str(out / "ours.parquet"),
                             output=str(out / "ours-train"), beta=0.1,
                             **V.train_settings(a.max_length, a.batch, a.steps))
    shutil.rmtree(cfg.run.output, ignore_errors=True)
    with V.optimizer_stamps() as stamps:
        T.run(cfg)
    trl = V.trl_train(model, rows, 0.1, True, a.trl_batch_size, out / "trl-train", a.batch, a.steps, a.max_length)
    ours_steps, trl_steps = V.intervals(stamps[0]), trl["steps"]
    return {"ours_steps": ours_steps, "trl_steps": trl_steps,
            "ours_s": C.median(ours_steps[1:] or ours_steps), "trl_s": C.median(trl_steps[1:] or trl_steps)}


def report(res: dict, n: int) -> list[str]:
    t1, t2, s1, s2 = res["tokens_stage_one"], res["tokens_stage_two"], res["stage_one"], res["stage_two"]
    lines = [f"side by side with TRL 1.16 on {res['device']} ({res['dtype']}), N = {n / 1e6:,.1f}M non-embedding"]
    for stage, tok, r, training in (("stage one", t1, s1, False), ("stage two step", t2, s2, True)):
        for side, forwarded in (("ours", tok["shared"]), ("TRL", tok["pair"])):
            sec = r["ours_s" if side == "ours" else "trl_s"]
            lines.append(f"  {stage:15s} {side:4s}: {sec:8.3f} s, {tok['pair'] / sec:10,.0f} pair tokens/s, "
                         f"{forwarded / sec:10,.0f} forwarded tokens/s, MFU "
                         f"{100 * gpu_mfu.mfu(forwarded / sec, n, training):5.1f}%")
        lines.append(f"  {stage:15s} TRL time / ours: {r['trl_s'] / r['ours_s']:.2f}x")
    d = s1["diff"]
    lines.append(f"  stage one values: {d['n']} rows on both sides, max |ours - TRL| {d['max']:.3e} nats "
                 f"(mean {d['mean']:.3e}, max relative {d['max_rel']:.2e})")
    return lines


def main() -> None:
    a = parse()
    import torch

    from stages.data.rows import load_examples

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        V.SIDE.update(dtype="bf16", use_cpu=False)
    # vs_trl's runners reset these profiles; here they stay unpatched (a per-chunk CUDA sync would slow our side)
    V.PROFILE.update({k: V.Accum(None) for k in ("ours_head", "trl_head", "trl_head_bwd")})
    model, out = Path(a.model), Path(a.output)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = V.write_jsonl(out / "rows.jsonl", synthetic_rows(a.rows))
    examples, _ = load_examples([path])
    rows = V.explicit_rows(examples)  # with our example ids, so the two sides' values can be matched
    n = gpu_mfu.non_embedding_params(model)
    res = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": V.SIDE["dtype"],
           "tokens_stage_one": token_counts(model, examples, a.max_length),
           "tokens_stage_two": token_counts(model, examples[:a.batch], a.max_length), "args": vars(a)}
    V.log(f"stage one: {res['tokens_stage_one']}")
    res["stage_one"] = stage_one(a, model, out, path, rows)
    V.log("stage two")
    res["stage_two"] = stage_two(a, model, out, rows[:a.batch])
    (out / "gpu_vs_trl.json").write_text(json.dumps(res, indent=1))
    print("\n".join(report(res, n)), flush=True)


if __name__ == "__main__":
    main()
