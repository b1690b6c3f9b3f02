"""Many replies per prompt (issue 23, item 5): K = 4 reply rows against the same pairs expanded into pair rows, through
this tool and through TRL 1.16, side by side in one process (one torch thread, variants interleaved, medians).

Data: HH-RLHF harmless-test prompts (the shared text up to the last "\\n\\nAssistant:", as rows.load_examples splits
it; distinct prompts of <= 128 tokens, shuffled with seed 0), each with 4 replies sampled by SmolLM2-135M-Instruct
(plain text, top-p 0.9, temperature 1, no top-k, <= 48 new tokens, cut at EOS or "\\n\\nHuman:"), reply k under
torch seed k (k = 0..3; one batched generate per seed). Score of reply k = its number of distinct lower-cased
whitespace-separated words - k/4 (four distinct scores: a tie goes to the lower seed), so `--pairs all` gives all 6
pairs per prompt. A prompt whose four replies are not four distinct non-empty texts is passed over (counted). The
generated file is cached under bench/out/replies/ (reruns skip sampling); the expanded pair rows next to it.

  stage one: (a) ours on the reply rows (`dpo precompute-ref` over the reply-set file: one [prompt | 4 replies] row
  per prompt), (b) ours on the expanded pair rows (shared-prompt [prompt|chosen|rejected] rows, the default),
  (c) TRL 1.16's precompute on the expanded pairs (bench/vs_trl.trl_precompute). Tokens forwarded (real, padded),
  scoring CPU / wall seconds, peak RSS (VmHWM, glibc trimming as bench/_common.MALLOC_ENV), values compared.
  stage two: one training step (forward + backward, LoRA r16 on all linear layers, fp32 full model) on the same
  6M pairs of M prompts: (a) stages.stage2.forward.policy_forward on M SetItems, (b) the same on 6M Items, (c) TRL
  1.16's DPOTrainer.training_step with its precomputed reference. CPU seconds per pair, ratios, peak RSS.

  .venv/bin/python bench/bench_replies.py --quick    # < 2 min smoke run on the 2-layer slice (not recorded)
  .venv/bin/python bench/bench_replies.py            # ~10 min (+2 min the first time: sampling), writes RESULTS.md
  .venv/bin/python bench/bench_replies.py --render bench/out/replies.json   # rewrite the section from saved numbers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import REPO  # noqa: E402
from _replies_common import (  # noqa: E402
    BUDGET,
    LORA,
    MAXLEN,
    OUT,
    RAW,
    TRL_BS,
    log,
    make_sets,
    read_jsonl,
    rel,
    write_jsonl,
)
from _replies_report import model_shape, publish  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    prompts: int       # N prompts (6N pairs)
    repeats: int       # stage one: timed repeats of ours (a) and (b)
    trl_repeats: int   # stage one: timed repeats of TRL (c)
    micro: int         # stage two: M prompts per micro-batch (6M pairs)
    steps: int         # stage two: timed steps per variant (after one untimed warm-up step)
    layers: int | None  # None: the full model; n: its n-layer slice (--quick)


FULL = Plan(prompts=16, repeats=2, trl_repeats=1, micro=2, steps=2, layers=None)
QUICK = Plan(prompts=3, repeats=1, trl_repeats=1, micro=1, steps=1, layers=2)


class Peaks:
    """VmHWM windows: `cut()` closes one (its peak joins `whole`) and opens the next."""

    def __init__(self):
        self.whole = 0.0
        C.reset_peak()

    def cut(self) -> float:
        peak = C.hwm_gib()
        self.whole = max(self.whole, peak)
        C.reset_peak()
        return peak


# ================================================================================================ stage one
def qk(widths_by_batch: list[tuple[int, int]]) -> int:
    """Attention query-key elements per layer and head: rows x width^2 per forward (sdpa computes every one)."""
    return sum(rows * width * width for rows, width in widths_by_batch)


def ours_stage_one(model_dir: Path, data: Path, out: Path, peaks: Peaks) -> dict:
    """`dpo precompute-ref` over `data` in this process; scoring timed and its batches counted."""
    import polars as pl

    import stages.stage1.precompute as pc
    import vs_trl as V

    seen, original = {}, pc.score_batches

    def scoring(model, pad_id, units, batches, parts, share, *a, **k):
        seen["load_peak"], seen["base"] = peaks.cut(), C.current_rss_gib()
        with C.Timer() as t:
            stats = original(model, pad_id, units, batches, parts, share, *a, **k)
        widths = [(len(b), units.cost(b, share) // len(b)) for b in batches]
        seen.update(cpu=t.cpu, user=t.user, wall=t.wall, peak=peaks.cut(), units=int(stats[0]),
                    real=int(stats[1]), padded=int(stats[2]), batches=len(batches), qk=qk(widths),
                    rows=sum(len(b) for b in batches), lengths=[units.cost([u], share) for b in batches for u in b])
        return stats

    pc.score_batches = scoring
    V.PROFILE["ours_head"].reset()
    try:
        with C.Timer() as total:
            pc.run(pc.PrecomputeConfig.flat(model=str(model_dir), data=(str(data),), output=str(out),
                                            max_length=MAXLEN, max_prompt_length=MAXLEN,
                                            max_tokens_per_batch=BUDGET, overwrite=True))
    finally:
        pc.score_batches = original
    df = pl.read_parquet(out)
    if "reply_id" in df.columns:
        values = dict(zip(df["reply_id"].to_list(), df["ref_logps"].to_list()))
        seen["tokens"] = {"prompt": df.unique("prompt_id")["prompt_tokens"].to_list(),
                          "reply": df["reply_tokens"].to_list()}
    else:
        values = {i: (c, r) for i, c, r in zip(df["example_id"], df["ref_chosen_logps"], df["ref_rejected_logps"])}
    return {**seen, "total_cpu": total.cpu, "total_wall": total.wall, "head_cpu": V.PROFILE["ours_head"].cpu,
            "values": values}


def trl_stage_one(model_dir: Path, rows: list[dict], peaks: Peaks) -> dict:
    """bench/vs_trl.trl_precompute (load, DPOTrainer(precompute_ref_log_probs=True)) with its batches counted."""
    from trl import DPOTrainer

    import vs_trl as V

    seen = {"real": 0, "padded": 0, "widths": [], "batches": 0}
    fwd, pre = DPOTrainer.compute_ref_log_probs, DPOTrainer._precompute_ref_logps

    def counting(self, model, inputs):
        ids = inputs["input_ids"]
        seen["padded"] += ids.numel()
        seen["real"] += int(inputs["attention_mask"].sum())
        seen["widths"].append((ids.shape[0], ids.shape[1]))
        seen["batches"] += 1
        return fwd(self, model, inputs)

    def scoring(self, *a, **k):
        seen["load_peak"], seen["base"] = peaks.cut(), C.current_rss_gib()
        out = pre(self, *a, **k)
        seen["peak"] = peaks.cut()
        return out

    DPOTrainer.compute_ref_log_probs, DPOTrainer._precompute_ref_logps = counting, scoring
    try:
        r = V.trl_precompute(model_dir, rows, OUT / "trl-stage1", MAXLEN, TRL_BS)
    finally:
        DPOTrainer.compute_ref_log_probs, DPOTrainer._precompute_ref_logps = fwd, pre
    widths = seen.pop("widths")
    return {**seen, "qk": qk(widths), "rows": sum(b for b, _ in widths), "cpu": r["score_cpu"],
            "wall": r["score_wall"], "total_cpu": r["cpu"], "total_wall": r["wall"], "head_cpu": r["head_cpu"],
            "values": r["values"]}


def phase_stage_one(model_dir: Path, files: dict, plan: Plan) -> dict:
    """(a) replies, (b) pairs, (c) TRL, interleaved (the order rotates each repeat) after an untimed warm-up of ours on
    two prompts; values from the first runs."""
    from stages.data.replyset import reply_id
    from stages.data.rows import content_id

    pair_rows = read_jsonl(files["pairs"])
    trl_rows = [{**r, "example_id": content_id(r["prompt"], r["chosen"], r["rejected"])} for r in pair_rows]
    warm = {v: write_jsonl(OUT / f"warm-{v}.jsonl", read_jsonl(files[v])[:n]) for v, n in (("sets", 2), ("pairs", 2))}
    for v in warm:  # untimed: first-call costs (allocator, kernels, imports) stay out of the timed runs
        ours_stage_one(model_dir, warm[v], OUT / f"warm-{v}.parquet", Peaks())
    order, runs = ["replies", "pairs", "trl"], {"replies": [], "pairs": [], "trl": []}
    values = {}
    for rep in range(max(plan.repeats, plan.trl_repeats)):
        for v in order[rep % 3:] + order[:rep % 3]:
            if len(runs[v]) >= (plan.trl_repeats if v == "trl" else plan.repeats):
                continue
            peaks = Peaks()
            if v == "trl":
                r = trl_stage_one(model_dir, trl_rows, peaks)
            else:
                r = ours_stage_one(model_dir, files["sets" if v == "replies" else "pairs"], OUT / f"{v}.parquet",
                                   peaks)
            r["whole_peak"] = max(peaks.whole, peaks.cut())
            values.setdefault(v, r.pop("values"))
            runs[v].append(r)
            log(f"stage one rep {rep + 1} {v}: forwarded {r['padded']} tokens (real {r['real']}), scoring CPU "
                f"{r['cpu']:.1f}s wall {r['wall']:.1f}s, peak RSS {r['peak']:.2f} GiB (start {r['base']:.2f})")
    by_reply = values["replies"]
    from_replies = {content_id(r["prompt"], r["chosen"], r["rejected"]):
                    (by_reply[reply_id(r["prompt"], r["chosen"])], by_reply[reply_id(r["prompt"], r["rejected"])])
                    for r in pair_rows}
    import vs_trl as V

    eq = {"replies_vs_pairs": V.diff_stats(from_replies, values["pairs"]),
          "replies_vs_trl": V.diff_stats(from_replies, values["trl"]),
          "pairs_vs_trl": V.diff_stats(values["pairs"], values["trl"]), "replies": len(by_reply),
          "pairs": len(pair_rows)}
    log(f"values: {eq}")
    return {"runs": runs, "eq": eq}


# ================================================================================================ stage two
def stage_two_inputs(model_dir: Path, files: dict, plan: Plan, train_out: Path):
    """The M reply sets whose rows are nearest the median row length, their 6M pairs as Items, and the same pairs
    as TRL text rows."""
    from stages.data.encode import Encoded
    from stages.data.replyset import prompt_id
    from stages.data.rows import content_id
    from stages.stage2.prepare import Item, prepare
    from stages.stage2.train import TrainConfig

    cfg = TrainConfig.flat(model=str(model_dir), data=(str(files["sets"]),), ref_cache=str(OUT / "replies.parquet"),
                           output=str(train_out), load_in_4bit=False, dtype="fp32", lora_r=LORA["r"],
                           lora_alpha=LORA["alpha"], lora_dropout=0.0, gradient_checkpointing=False,
                           batch_size=plan.micro, max_steps=1, max_length=MAXLEN, max_prompt_length=MAXLEN)
    prepared = prepare(cfg.data, cfg.model, cfg.cache, cfg.lengths)
    ranked = sorted(prepared.train, key=lambda s: s.length)
    mid = len(ranked) // 2
    sets = ranked[max(0, mid - plan.micro // 2):][:plan.micro]
    items = [Item(Encoded(f"{s.enc.prompt_id}-{c}-{r}", s.enc.prompt_ids, s.enc.replies[c], s.enc.replies[r]),
                  *s.pair_ref[k]) for s in sets for k, (c, r) in enumerate(s.pairs)]
    chosen = {s.enc.prompt_id for s in sets}
    trl_rows = [{**r, "example_id": content_id(r["prompt"], r["chosen"], r["rejected"])}
                for r in read_jsonl(files["pairs"]) if prompt_id(r["prompt"]) in chosen]
    assert len(items) == len(trl_rows) == 6 * len(sets), (len(items), len(trl_rows))
    return cfg, prepared.tokenizer.pad_token_id, sets, items, trl_rows


def trl_step_setup(model_dir: Path, rows: list[dict]):
    """DPOTrainer with LoRA (same settings) and precompute_ref_log_probs (done at init, untimed); its one batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    import vs_trl as V

    model, tok = V.load_hf(model_dir)
    args = V.trl_config(OUT / "trl-stage2", beta=0.1, precompute_ref_log_probs=True,
                        precompute_ref_batch_size=TRL_BS, per_device_train_batch_size=len(rows), max_length=MAXLEN)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    if getattr(trainer, "current_gradient_accumulation_steps", None) is None:
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    return trainer, batch


def shape(units, batch: list, completion: int) -> dict:
    """Positions of one shared-prompt forward over `batch` (one padded batch, as stage two runs it)."""
    padded = units.cost(batch, True)
    return {"rows": len(batch), "padded": padded, "real": units.real(batch, True),
            "qk": qk([(len(batch), padded // len(batch))]), "completion": completion}


def phase_stage_two(model_dir: Path, files: dict, plan: Plan) -> dict:
    """One warm-up step per variant, then `steps` timed rounds, the order rotating."""
    import torch

    from stages.data.replyset import split_rows
    from stages.model.models import LoraSettings, ModelSpec, load_policy
    from stages.stage1.units import PairUnits, ReplyUnits
    from stages.stage2.forward import NO_ROW_LIMIT, policy_forward
    from stages.stage2.train import Trainer

    cfg, pad, sets, items, trl_rows = stage_two_inputs(model_dir, files, plan, OUT / "stage2-unused")
    policy = load_policy(ModelSpec(str(model_dir), "fp32", False, None, False),
                         LoraSettings(LORA["r"], LORA["alpha"], 0.0, ("all-linear",)), torch.device("cpu"), False)
    policy.train()
    loss = Trainer.build(policy, cfg, 1).loss
    trainer, batch = trl_step_setup(model_dir, trl_rows)

    def ours(inputs):
        out = policy_forward(policy, inputs, pad, cfg, loss)
        out.objective.backward()
        policy.zero_grad(set_to_none=True)
        return float(out.objective.detach())

    def trl():
        value = trainer.training_step(trainer.model, batch)
        trainer.model.zero_grad(set_to_none=True)
        return float(value)

    steps = {"replies": lambda: ours(sets), "pairs": lambda: ours(items), "trl": trl}
    runs = {v: [] for v in steps}
    for rep in range(plan.steps + 1):
        for v in list(steps)[rep % 3:] + list(steps)[:rep % 3]:
            peaks = Peaks()
            base = C.current_rss_gib()
            with C.Timer() as t:
                value = steps[v]()
            record = {"cpu": t.cpu, "user": t.user, "wall": t.wall, "peak": peaks.cut(), "base": base, "loss": value}
            if rep:  # step 0 is the warm-up
                runs[v].append(record)
            log(f"stage two {'warm-up' if not rep else f'rep {rep}'} {v}: CPU {t.cpu:.1f}s wall {t.wall:.1f}s, peak "
                f"{record['peak']:.2f} GiB (start {base:.2f}), loss {value:.6f}")
    ids = batch["input_ids"]
    reply_rows = [r for s in sets for r in split_rows(s.enc, NO_ROW_LIMIT)]
    encs = [i.enc for i in items]
    shapes = {"replies": shape(ReplyUnits, reply_rows, sum(len(x) for r in reply_rows for x in r.replies)),
              "pairs": shape(PairUnits, encs, sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encs)),
              "trl": {"rows": ids.shape[0], "padded": ids.numel(), "real": int(batch["attention_mask"].sum()),
                      "qk": qk([(ids.shape[0], ids.shape[1])]), "completion": int(batch["completion_mask"].sum())}}
    return {"runs": runs, "shapes": shapes, "pairs": len(items), "prompts": len(sets),
            "row_lengths": [s.length for s in sets]}


# ================================================================================================ main
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min, 2-layer slice; RESULTS.md untouched)")
    p.add_argument("--render", default=None, help="only rewrite the section from a saved results JSON")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.render:
        publish(json.loads(Path(a.render).read_text()), not a.no_write)
        return
    if any(os.environ.get(k) != v for k, v in C.MALLOC_ENV.items()):  # glibc reads them at start: run again
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **C.MALLOC_ENV})
    os.environ.setdefault("TQDM_DISABLE", "1")
    import vs_trl as V
    from stages.model.smollm import ensure_smollm2

    plan = QUICK if a.quick else FULL
    C.set_threads(1)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    full = C.ensure_model()
    model_dir = full if plan.layers is None else ensure_smollm2(REPO / "cache" / "models", n_layers=plan.layers)
    OUT.mkdir(parents=True, exist_ok=True)
    sets, pairs, data_meta = make_sets(plan.prompts, full)
    V.install_profiles()
    files = {"sets": sets, "pairs": pairs}
    stage_one = phase_stage_one(model_dir, files, plan)
    stage_two = phase_stage_two(model_dir, files, plan)
    shape_ = model_shape(model_dir)
    cmds = [f"dpo precompute-ref --model {rel(model_dir)} --data {rel(p)} --output {rel(OUT / f'{v}.parquet')} "
            f"--dtype fp32 --max-length {MAXLEN} --max-prompt-length {MAXLEN} --max-tokens-per-batch {BUDGET}"
            for v, p in (("replies", sets), ("pairs", pairs))]
    res = {"stage_one": stage_one, "stage_two": stage_two, "model_shape": shape_, "cmds": cmds,
           "model_desc": "SmolLM2-135M-Instruct fp32, " + (f"full model ({shape_['layers']} layers)"
                                                            if plan.layers is None else
                                                            f"its {shape_['layers']}-layer slice"),
           "data": {"prompts": plan.prompts, "passed_over": data_meta["passed_over"], "sets": rel(sets),
                    "reused": data_meta["reused"],
                    "pairs": rel(pairs), "date": data_meta["date"], "sampling_s": data_meta["sampling_s"]},
           "meta": {"quick": a.quick, "plan": dataclasses.asdict(plan), "command": C.command_line(),
                    "started": started, "machine": C.machine_line(1), "versions": C.versions(V.VERSIONS),
                    "model": rel(model_dir), "wall_total": time.perf_counter() - t0}}
    saved = RAW.with_name("replies-quick.json") if a.quick else RAW
    saved.write_text(json.dumps(res, default=list))
    log(f"raw numbers in {rel(saved)} (re-render with --render {rel(saved)})")
    publish(res, not (a.quick or a.no_write))
    log(f"done in {res['meta']['wall_total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
