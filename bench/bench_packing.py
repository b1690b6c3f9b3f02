"""Packed rows and segment attention (issue 24, items 3 and 5): today's layout (one padded row per prompt, a dense
[B, 1, W, W] mask) against `--pack` (several prompts in one sequence up to the token budget) with the dense
block-diagonal mask and with `--attention segments` (stages/model/segattn.py: per segment, no [T, T] tensor), side
by side in one process (one torch thread, variants interleaved, the order rotating, medians).

  (a) padding waste, planning only (no model): HH-RLHF harmless-test pair rows (all of them) and many-replies rows
      (bench/out/replies/sets-n16.jsonl, the sampled reply sets of bench_replies.py, else built from HH rows as
      tests/test_many_replies.reply_sets does; and every HH row pair as one 4-reply set) at budgets 512 and 2048:
      stage one's batches (`precompute.plan_batches`, cost `units.cost`, or `units.real` with --pack) and stage
      two's micro-batches (`trainutil.batches_for_epoch` / `token_batches`, then `packing.pack` with --pack).
  (b) stage one (`precompute.score_batches`, the command's loop) and stage two (`stage2.forward.policy_forward` +
      backward, LoRA r16 on all linear layers, a TrainConfig from `TrainConfig.flat`; typical micro-batches of
      --batch-size 8 / 4 without and with --max-tokens-per-batch 512 / 2048) on SmolLM2-135M-Instruct's 2-layer
      slice, fp32: CPU / wall seconds, peak RSS over each run, values against today's.
  (c) item 3: one attention layer (SmolLM2's 9 heads x 64, 3 KV heads; forward + backward) at 2k and 8k tokens per
      row, the dense mask (built as packing.py builds it, then transformers' sdpa) against segattn: time, peak RSS.
Peak RSS is VmHWM per run (reset through /proc/self/clear_refs), with glibc trimming (bench/_common.MALLOC_ENV; the
script re-executes itself with it).

  .venv/bin/python bench/bench_packing.py --quick     # < 2 min smoke run (not recorded)
  .venv/bin/python bench/bench_packing.py             # < 10 min, writes the packing section of bench/RESULTS.md
  .venv/bin/python bench/bench_packing.py --render bench/out/packing.json   # rewrite the section from saved numbers
  python3 bench/bench_packing.py --gpu --model /tmp/rand3b --4bit   # CUDA attention paths (bench/gpu_bench.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _packing_report as R  # noqa: E402
from _packing_report import BUDGETS, VARIANTS, Peaks, log, set_attention  # noqa: E402

RAW = C.OUT / "packing.json"
LORA = dict(r=16, alpha=32)


@dataclasses.dataclass(frozen=True)
class Plan:
    hh_rows: int        # stage one: HH pair rows scored (a fixed random sample)
    sets: int           # stage one: reply sets scored (the first n of the sets file)
    repeats: int        # stage one: timed runs per variant and budget
    s2_pairs: int       # stage two: HH pairs in the micro-batch
    s2_sets: int        # stage two: reply sets in the micro-batch
    steps: int          # stage two: timed steps per variant (after one untimed warm-up)
    attn_tokens: tuple  # (c): tokens per row
    attn_repeats: int   # (c): timed runs per path and layout (after one untimed warm-up at the smallest size)


FULL = Plan(hh_rows=32, sets=16, repeats=2, s2_pairs=8, s2_sets=4, steps=2, attn_tokens=(2048, 8192), attn_repeats=2)
QUICK = Plan(hh_rows=6, sets=3, repeats=1, s2_pairs=2, s2_sets=1, steps=1, attn_tokens=(512, 1024), attn_repeats=1)


# ================================================================================================ (b) stage one
def score(model, units, batches, budget: int, pack: bool) -> tuple[dict, dict]:
    """`precompute.score_batches` over `batches` (parts to a scratch folder): timing, tokens, values by key."""
    import shutil

    import pyarrow.parquet as pq
    import torch

    from stages.model.distributed import DistEnv
    from stages.model.runguard import StopSignal
    from stages.settings.commands import Scoring
    from stages.settings.groups import Compute
    from stages.stage1.precompute import score_batches

    parts = C.OUT / "packing" / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    cfg = SimpleNamespace(scoring=Scoring(batches_per_part=1 << 20, max_tokens_per_batch=budget),
                          compute=Compute(pack=pack))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with Peaks() as mem, C.Timer() as t, StopSignal() as stop:
        stats = score_batches(model, 2, units, batches, parts, True, cfg, env, stop)
    values = {}
    for f in sorted(parts.glob("*.parquet")):
        d = pq.read_table(f).to_pydict()
        if "reply_id" in d:
            values.update(zip(d["reply_id"], d["ref_logps"]))
        else:
            values.update(zip(d["example_id"], zip(d["ref_chosen_logps"], d["ref_rejected_logps"])))
    return {"cpu": t.cpu, "user": t.user, "wall": t.wall, "peak": mem.peak, "added": mem.added,
            "real": int(stats[1]), "positions": int(stats[2]), "forwards": len(batches)}, values


def phase_stage_one(model, dense_impl: str, data: dict, plan: Plan) -> dict:
    """Per data set and budget: today, --pack dense, --pack segments; the order rotating each repeat."""
    from stages.stage1.precompute import plan_batches
    from stages.stage1.units import PairUnits, ReplyUnits

    picked = list({i.enc: 0 for k, p in data["picks"].items() if k.startswith("hh") for i in p[0]})  # stage two's
    hh = picked + [e for e in C.sample_rows(data["hh"], plan.hh_rows) if e not in picked][:plan.hh_rows - len(picked)]
    inputs = {"hh": PairUnits(hh), "sets": ReplyUnits(data["sets"][:plan.sets])}
    warm = PairUnits(inputs["hh"].items[:2])
    for v, (pack, attention) in VARIANTS.items():  # untimed: first-call costs stay out of the timed runs
        set_attention(model, attention, dense_impl)
        score(model, warm, plan_batches(warm.items, 512, True, True, warm.real if pack else warm.cost), 512, pack)
    out, refs = {}, {}
    for name, units in inputs.items():
        for budget in BUDGETS:
            todo = units.todo(set(), budget)
            plans = {v: plan_batches(todo, budget, True, True, units.real if p else units.cost)
                     for v, (p, _) in VARIANTS.items()}
            runs, values = {v: [] for v in VARIANTS}, {}
            for rep in range(plan.repeats):
                for v in list(VARIANTS)[rep % 3:] + list(VARIANTS)[:rep % 3]:
                    pack, attention = VARIANTS[v]
                    set_attention(model, attention, dense_impl)
                    r, values[v] = score(model, units, plans[v], budget, pack)
                    r["qk"] = R.qk_elements(plans[v], budget if pack else None, attention)
                    runs[v].append(r)
                    log(f"stage one {name} {budget} {v}: CPU {r['cpu']:.1f}s wall {r['wall']:.1f}s, {r['forwards']} "
                        f"forwards, {r['positions']} positions ({r['real']} real), peak +{r['added']:.2f} GiB")
            diffs = {v: R.max_diff(values["today"], values[v]) for v in VARIANTS}
            out[f"{name}-{budget}"] = {"runs": runs, "diff": diffs}
            refs[name] = values["today"]
    set_attention(model, "dense", dense_impl)
    return {"results": out, "refs": refs, "tokens": {n: sum(units.real([u], True) for u in units.todo(set(), 1 << 40))
                                                     for n, units in inputs.items()}}


# ================================================================================================ (b) stage two
def phase_stage_two(model_dir: Path, data: dict, refs: dict, plan: Plan) -> dict:
    """Per micro-batch (without, and with each token budget): one warm-up step per variant, then `steps` timed
    rounds, the order rotating: today, --pack dense, --pack segments (only the layout changes)."""
    import torch

    from stages.model.models import LoraSettings, ModelSpec, load_policy
    from stages.objective.loss import build_loss
    from stages.settings.commands import TrainConfig
    from stages.stage2.forward import policy_forward

    policy = load_policy(ModelSpec(str(model_dir), "fp32", False, None, False),
                         LoraSettings(LORA["r"], LORA["alpha"], 0.0, ("all-linear",)), torch.device("cpu"), False)
    policy.train()
    dense_impl = policy.config._attn_implementation
    cfgs = {(v, b): TrainConfig.flat(model=str(model_dir), data=("unused",), ref_cache="", output="", lora_r=LORA["r"],
                                     lora_alpha=LORA["alpha"], lora_dropout=0.0, load_in_4bit=False, dtype="fp32",
                                     gradient_checkpointing=False, max_tokens_per_batch=b, pack=p, attention=a)
            for b in (None, *BUDGETS) for v, (p, a) in VARIANTS.items()}
    loss, out = build_loss(cfgs["today", None].loss), {}
    for name, (items, budget, size) in R.stage_two_items(data, refs).items():
        runs = {v: [] for v in VARIANTS}
        for rep in range(plan.steps + 1):
            for v in list(VARIANTS)[rep % 3:] + list(VARIANTS)[:rep % 3]:
                set_attention(policy, VARIANTS[v][1], dense_impl)
                with Peaks() as mem, C.Timer() as t:
                    res = policy_forward(policy, items, 2, cfgs[v, budget], loss)
                    res.objective.backward()
                    policy.zero_grad(set_to_none=True)
                r = {"cpu": t.cpu, "user": t.user, "wall": t.wall, "peak": mem.peak, "added": mem.added,
                     "loss": float(res.objective.detach())}
                if rep:  # round 0 is the warm-up
                    runs[v].append(r)
                log(f"stage two {name} {'warm-up' if not rep else f'rep {rep}'} {v}: CPU {t.cpu:.1f}s wall "
                    f"{t.wall:.1f}s, peak +{mem.added:.2f} GiB, loss {r['loss']:.6f}")
        out[name] = {"runs": runs, "shapes": R.stage_two_shapes(items, budget), "n": len(items), "budget": budget,
                     "size": size, "pairs": sum(len(getattr(i, "pairs", ((0, 1),))) for i in items)}
    return out


# ================================================================================================ (c) one layer
def attention_layer(model, plan: Plan, rows: list) -> dict:
    """Forward + backward of one attention layer's attention (model layer 0's module and shapes), dense mask vs
    segments, at each size: a row [prompt | chosen | rejected] (T/2, T/4, T/4) and a row packed with HH rows."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from stages.model import segattn
    from stages.model.packing import _block_mask, _layout

    module, cfg = model.model.layers[0].self_attn, model.config
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    segattn.register()

    def one(t: int, layout_rows: list, path: str) -> dict:
        _, _, blk, seg, *_, lengths = _layout([layout_rows], 0, True)
        blk, seg = (torch.nn.functional.pad(x, (0, t - x.shape[1]), value=-1) for x in (blk, seg))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, t, d, generator=g, requires_grad=True) for n in (h, hkv, hkv))
        with Peaks() as mem, C.Timer() as tm:
            if path == "dense":
                mask = _block_mask(blk, seg, "sdpa", torch.float32)
                out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=d ** -0.5)
            else:
                out, _ = segattn.segment_attention(module, q, k, v, None, scaling=d ** -0.5,
                                                   segment_layout=segattn.Layout.of_lengths(lengths))
            out.square().sum().backward()
        return {"cpu": tm.cpu, "wall": tm.wall, "added": mem.added, "peak": mem.peak}

    from stages.data.replyset import Row

    shapes = {}
    for t in plan.attn_tokens:
        shapes[f"pair-{t}"] = [Row(tuple(range(t // 2)), (tuple(range(t // 4)), tuple(range(t - t // 2 - t // 4))),
                                   ("c", "r"))]
        shapes[f"packed-{t}"] = R.fill(rows, t)
    one(plan.attn_tokens[0], shapes[f"pair-{plan.attn_tokens[0]}"], "dense")  # warm-up
    one(plan.attn_tokens[0], shapes[f"pair-{plan.attn_tokens[0]}"], "segments")
    runs = {k: {"dense": [], "segments": []} for k in shapes}
    for rep in range(plan.attn_repeats):
        for key, layout_rows in shapes.items():
            t = int(key.split("-")[1])
            for path in (("dense", "segments") if rep % 2 == 0 else ("segments", "dense")):
                r = one(t, layout_rows, path)
                runs[key][path].append(r)
                log(f"attention {key} {path}: CPU {r['cpu']:.2f}s, peak +{r['added']:.3f} GiB")
    meta = {k: {"blocks": len(v), "real": sum(r.length for r in v),
                "qk_dense": int(k.split("-")[1]) ** 2, "qk_segments": R.qk_elements([v], 1, "segments")}
            for k, v in shapes.items()}
    return {"runs": runs, "meta": meta, "heads": [h, hkv, d]}


# ================================================================================================ GPU
def gpu_parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_packing.py --gpu", description="the attention paths on CUDA")
    p.add_argument("--model", required=True, help="model folder (gpu_bench.sh: the random-init ~3.2B model)")
    p.add_argument("--tokens", default="2048,8192", help="tokens per forward (comma-separated)")
    p.add_argument("--dtype", default="bf16", help="stage one's dtype and stage two's compute dtype")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="stage two on an NF4 base (QLoRA)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up)")
    p.add_argument("--json", default=None, help="write the numbers here (and a markdown table next to it)")
    return p.parse_args(argv)


def gpu_workloads(vocab: int, tokens: int) -> dict:
    """Per size: HH-like random rows filling one forward of `tokens` real tokens, and one [prompt | chosen |
    rejected] row of `tokens` tokens (T/2, T/4, T/4)."""
    from bench_stage2 import synthetic_rows
    from stages.data.encode import Encoded
    from stages.stage1.precompute import plan_batches
    from stages.stage1.units import PairUnits

    hh = plan_batches(synthetic_rows(4 * tokens // 100 + 8, vocab), tokens, True, False, PairUnits.real)[0]
    ids = lambda n, k: tuple(3 + (i * 7919 + k) % (vocab - 3) for i in range(n))  # noqa: E731
    long = Encoded("long", ids(tokens // 2, 0), ids(tokens // 4, 1), ids(tokens - tokens // 2 - tokens // 4, 2))
    return {"hh": hh, "long": [long]}


def gpu_run(a, device, model, stage: str, mdir: str) -> list[dict]:
    """Every size x workload x variant of one stage: median wall s, real tokens/s, peak allocated (GiB)."""
    import torch

    from stages.objective.loss import build_loss
    from stages.settings.commands import TrainConfig
    from stages.stage1.units import PairUnits
    from stages.stage2.forward import policy_forward
    from stages.stage2.prepare import Item

    dense_impl, out = model.config._attn_implementation, []
    variants = {"today": (False, "dense"), "segments": (False, "segments"), **VARIANTS}
    for t in (int(x) for x in a.tokens.split(",")):
        for name, batch in gpu_workloads(model.config.vocab_size, t).items():
            for v, (pack, attention) in variants.items():
                if name == "long" and pack:
                    continue  # one row: nothing to pack
                set_attention(model, attention, dense_impl)
                cfg = TrainConfig.flat(model=mdir, data=("unused",), ref_cache="", output="", lora_dropout=0.0,
                                       max_tokens_per_batch=t, pack=pack, attention=attention)
                loss, items = build_loss(cfg.loss), [Item(e, 0.0, 0.0) for e in batch]

                def call():
                    if stage == "stage1":
                        with torch.no_grad():
                            PairUnits.forward(model, batch, 2, None, True, False, t if pack else None, attention)
                    else:
                        policy_forward(model, items, 2, cfg, loss).objective.backward()
                        model.zero_grad(set_to_none=True)

                call()  # warm-up
                walls = []
                C.reset_peak()
                for _ in range(a.repeats):
                    with C.Timer() as tm:
                        call()
                    walls.append(tm.wall)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else C.hwm_gib()
                real = PairUnits.real(batch, True)
                out.append({"stage": stage, "tokens": t, "workload": name, "variant": v, "real": real,
                            "positions": real if pack else PairUnits.cost(batch, True), "rows": len(batch),
                            "s": C.median(walls), "tokens_per_s": real / C.median(walls), "peak_gib": peak})
                log(f"GPU {stage} {t} {name} {v}: {out[-1]['s']:.3f}s, {out[-1]['tokens_per_s']:,.0f} tokens/s, "
                    f"peak {peak:.2f} GiB")
    set_attention(model, "dense", dense_impl)
    return out


def gpu_main(argv: list[str]) -> None:
    """Stage one (load_model, no grad) then stage two (load_policy, LoRA r16, gradient checkpointing, NF4 with
    --4bit); MFU as bench/gpu_mfu.py counts it; a markdown table printed and written next to --json."""
    import torch

    from gpu_mfu import mfu, non_embedding_params
    from stages.model.models import LoraSettings, ModelSpec, load_model, load_policy

    a = gpu_parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ModelSpec(a.model, a.dtype, False), device)
    model.eval()
    recs = gpu_run(a, device, model, "stage1", a.model)
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    policy = load_policy(ModelSpec(a.model, a.dtype, a.four_bit), LoraSettings(16, 32, 0.0, ("all-linear",)), device,
                         True)
    policy.train()
    recs += gpu_run(a, device, policy, "stage2", a.model)
    n = non_embedding_params(a.model)
    for r in recs:
        r["mfu"] = mfu(r["tokens_per_s"], n, r["stage"] == "stage2")
    what = {"stage1": f"stage one {a.dtype}", "stage2": f"stage two {'NF4' if a.four_bit else a.dtype} LoRA"}
    body = C.table(["stage", "budget", "rows", "real / positions", "variant", "s / call", "real tokens/s", "MFU",
                    "peak GiB"], [[what[r["stage"]], r["tokens"], f"{r['workload']} ({r['rows']})",
                                   f"{r['real']} / {r['positions']}", r["variant"], f"{r['s']:.4f}",
                                   f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_gib']:.2f}"]
                                  for r in recs])
    head = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (dry run)'}, `{C.command_line()}`, "
            f"N = {n / 1e6:,.1f}M non-embedding; MFU = (2 or 6)·N·tokens/s / 989 TFLOP/s (attention not counted)")
    print(f"\n{head}\n\n{body}\n", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"records": recs, "n": n, "command": C.command_line()}, indent=1))
        Path(a.json).with_suffix(".md").write_text(f"{head}\n\n{body}\n")


# ================================================================================================ main
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min; RESULTS.md untouched)")
    p.add_argument("--render", default=None, help="only rewrite the section from a saved results JSON")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    p.add_argument("--gpu", action="store_true", help="the CUDA comparison (gpu_bench.sh); --gpu --help: its options")
    a, rest = p.parse_known_args()
    a.rest = rest
    return a


def main() -> None:
    a = parse()
    if a.gpu:
        gpu_main(a.rest)
        return
    if a.render:
        R.publish(json.loads(Path(a.render).read_text()), not a.no_write)
        return
    if any(os.environ.get(k) != v for k, v in C.MALLOC_ENV.items()):  # glibc reads them at start: run again
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **C.MALLOC_ENV})
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from stages.model.models import ModelSpec, load_model
    from stages.model.rowlayout import pair_rows
    from stages.model.smollm import ensure_smollm2

    plan = QUICK if a.quick else FULL
    C.set_threads(1)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    machine = C.machine_line(1)
    C.ensure_model()
    model_dir = ensure_smollm2(C.REPO / "cache" / "models", n_layers=2)
    data = R.load_data(model_dir)
    waste = R.waste_table(data)
    data["picks"] = R.pick_batches(data, plan.s2_pairs, plan.s2_sets, plan.sets)
    log("padding waste planned")
    model = load_model(ModelSpec(str(model_dir), "fp32", False), torch.device("cpu"))
    model.eval()
    dense_impl = model.config._attn_implementation
    stage_one = phase_stage_one(model, dense_impl, data, plan)
    attention = attention_layer(model, plan, pair_rows(data["hh"]))
    del model
    stage_two = phase_stage_two(model_dir, data, stage_one.pop("refs"), plan)
    res = {"waste": waste, "stage_one": stage_one, "stage_two": stage_two, "attention": attention,
           "data": {"hh": len(data["hh"]), "sets": len(data["sets"]), "hh_sets": len(data["hh_sets"]),
                    "sets_file": data["sets_file"], "replies": sum(len(s.replies) for s in data["sets"])},
           "meta": {"quick": a.quick, "plan": dataclasses.asdict(plan), "command": C.command_line(),
                    "started": started, "machine": machine, "versions": C.versions(),
                    "model": os.path.relpath(model_dir, C.REPO), "wall_total": time.perf_counter() - t0}}
    saved = RAW.with_name("packing-quick.json") if a.quick else RAW
    saved.write_text(json.dumps(res, default=list))
    log(f"raw numbers in {os.path.relpath(saved, C.REPO)} (re-render with --render)")
    R.publish(res, not (a.quick or a.no_write))
    log(f"done in {res['meta']['wall_total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
