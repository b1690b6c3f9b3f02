"""The report of bench/bench_load.py (section `load-sharded` of bench/RESULTS.md): a table per rank and the
issue's two targets, with `dpo plan --cpu` recomputed as it is now (so --report-only re-plans saved results)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_load import (  # noqa: E402
    GIB,
    PHASES,
    SECTION,
    STAGE_KEYS,
    STAGE_NAMES,
    models,
    phase_peaks,
    plan_cmd,
    plan_gib,
    unit_sizes,
)


def run_rows(key: str, stage: str, n: int, run: dict, plan: dict) -> list[list]:
    name = [key, STAGE_NAMES[stage], n]
    if run.get("status") != "ok":
        reason = " ".join(str(run.get("reason", "")).split())[-300:]
        return [name + ["-", f"{run.get('status')}: {reason} (estimate {run.get('estimate_gib')} GiB)"] + ["-"] * 11]
    rows = []
    for r in run["ranks"]:
        p = phase_peaks(r, stage)
        model_peak = p["peak"] - p["baseline"]
        tool = (run.get("tool_memory") or {}).get(PHASES[stage][2], {}).get("per_rank_gb", [])
        rows.append(name + [r["rank"], C.fmt(p["baseline"]), C.fmt(p["load"] - p["baseline"]),
                     C.fmt(p[PHASES[stage][2]] - p["baseline"]), C.fmt(p["peak"]), C.fmt(p["sampled"]),
                     C.fmt(model_peak), f"{C.fmt(plan['load'])} / {C.fmt(plan['run'])}",
                     C.fmt(run["plan_at_run"]["total"]), C.fmt(plan["total"]),
                     f"{100 * (model_peak / plan['total'] - 1):+.0f}%",
                     C.fmt(tool[r["rank"]]) if r["rank"] < len(tool) else "-", f"{r['seconds']:.0f}"])
    return rows


def targets(results: dict, plans: dict) -> list[str]:
    """The issue's two targets, per model and stage: within 15 % of the plan; at N = 2 every rank below N = 1."""
    out = []
    for key in results["shapes"]:
        for stage in STAGE_KEYS:
            runs = {n: results["runs"].get(f"{key}/{stage}/{n}", {}) for n in (1, 2, 4)}
            ok = {n: r for n, r in runs.items() if r.get("status") == "ok"}
            off = [(n, r["rank"], phase_peaks(r, stage)) for n, run in ok.items() for r in run["ranks"]]
            ratios = [(p["peak"] - p["baseline"]) / plans[key][n][stage]["total"] - 1 for n, _, p in off]
            within = sum(abs(x) <= 0.15 for x in ratios)
            line = (f"{key}, {STAGE_NAMES[stage]}: peak - baseline within 15 % of the plan in {within} of "
                    f"{len(ratios)} ranks (range {min(ratios, default=0) * 100:+.0f}% to "
                    f"{max(ratios, default=0) * 100:+.0f}%)")
            if 1 in ok and 2 in ok:
                one = phase_peaks(ok[1]["ranks"][0], stage)["peak"]
                two = [phase_peaks(r, stage)["peak"] for r in ok[2]["ranks"]]
                line += (f"; N = 2 peaks {', '.join(C.fmt(x) for x in two)} vs N = 1 {C.fmt(one)} GiB: "
                         f"{'met' if max(two) < one else 'MISSED'}")
            skipped = [f"N = {n} {r.get('status')}" for n, r in runs.items() if r and r.get("status") != "ok"]
            out.append(line + (f" ({'; '.join(skipped)})" if skipped else ""))
    return out


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def root_check(results: dict) -> list[str]:
    """Stage one at N > 1: the measured score-phase peak next to shard + FSDP root unit (embeddings, head) gathered
    once / twice + one gathered layer (bf16 counts from the checkpoint's header)."""
    out = []
    for key in results["shapes"]:
        root, layers, _ = unit_sizes(models()[key]["dir"])
        for n in (2, 4):
            run = results["runs"].get(f"{key}/stage1/{n}", {})
            if run.get("status") != "ok":
                continue
            measured = max(phase_peaks(r, "stage1")["score"] - phase_peaks(r, "stage1")["baseline"]
                           for r in run["ranks"])
            once = ((root + sum(layers)) / n + root + max(layers)) / GIB
            out.append(f"{key}, stage one, N = {n}: score peak - baseline {measured:.2f} GiB (max over ranks); "
                       f"shard + root unit gathered once + one layer = {once:.2f}, with the root a second time "
                       f"{once + root / GIB:.2f} (root {root / GIB:.2f} GiB, layer {max(layers) / GIB:.2f} GiB)")
    return out


def report(results: dict) -> str:
    plans, rows, cmds = {}, [], []
    for key, shape in results["shapes"].items():
        model_dir = models()[key]["dir"]
        plans[key] = {n: plan_gib(model_dir, n, shape) for n in (1, 2, 4)}
        st = shape["settings"]
        cmds.append(f"- {key} = {models()[key]['name']}: dpo args `--max-length {st['max_length']} "
                    f"--max-prompt-length {st['max_prompt_length']}`, stage one `--max-tokens-per-batch "
                    f"{st['budget']}`, stage two `--max-steps {st['steps']}`; {shape['rows']} rows (the longest "
                    f"after truncation), longest pair {shape['pair_tokens']} tokens as one shared row, stage one "
                    f"{shape['batches']} batch(es), largest {shape['padded']} padded tokens; plan: "
                    f"`{plan_cmd(model_dir, 1, shape)}` with --gpus N")
        for n in (1, 2, 4):
            for stage in STAGE_KEYS:
                run = results["runs"].get(f"{key}/{stage}/{n}")
                if run:
                    rows += run_rows(key, stage, n, run, plans[key][n][stage])
    head = ["model", "stage", "N", "rank", "baseline", "load peak", "run peak", "process peak RSS", "sampled max",
            "peak - baseline", "plan load / run", "plan at run", "plan now", "vs plan now", "run's own", "s"]
    return "\n".join([
        f"## Sharded loading: per-rank peak RSS vs `dpo plan --cpu` (issue 20; section `{SECTION}`)", "",
        *[f"- {models()[k]['name']}, measured by:\n" + "\n".join("  " + x for x in v.strip().splitlines())
          for k, v in results["provenance"].items()],
        "- this table: `.venv/bin/python bench/bench_load.py --report-only` (re-reads "
        f"cache/bench-load/*/results.json; the plan columns recomputed with `dpo plan` as it is then); "
        f"box memory {mem_total_gib():.1f} GiB, shared",
        "- each run: `MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 OMP_NUM_THREADS=1 python -m "
        "torch.distributed.run --nproc-per-node N bench/bench_load.py --worker DIR -- <dpo args>`, dpo args: "
        "`precompute-ref --dtype bf16 --overwrite` and `train --load-in-4bit --dtype bf16 --lora-r 16 --batch-size 1` "
        "(gradient checkpointing on), with the lengths below; gloo, one torch thread per rank; every rank's "
        "os.preadv loops until its buffer is full (see the notes)",
        *cmds,
        "- GiB per rank. baseline = RSS at the start of loading (Python, torch, transformers, PEFT, bitsandbytes "
        "imported, gloo, tokenized rows: the plan counts none of it); load / run peak = the phase's VmHWM - "
        "baseline; process peak RSS = the max VmHWM over "
        "the phases and at exit (raw, runtime included); sampled max = VmRSS sampled every 20 ms (cross-check); "
        "vs plan = (peak - baseline) / plan total - 1; run's own = the run's summary/cache `memory` for its "
        "score/train phase (stages/model/memory.py)", "",
        C.table(head, rows), "",
        "Targets (issue 20: each measured peak within 15 % of the plan; at N = 2 each rank below N = 1):", "",
        *[f"- {x}" for x in targets(results, plans)], "",
        "The FSDP root unit at N > 1 (FSDP2 copies the all-gather output into the unsharded parameters while both "
        "exist, so a gathered unit costs twice its size for a moment):", "",
        *[f"- {x}" for x in root_check(results)], "", NOTES])


NOTES = """What the numbers show (written by hand from the runs above, 2026-12-04):

- **Since these notes (same runs, re-planned)**: the plan columns now count both terms found below: the loading
  slice as the loader reads it (one slice in the checkpoint dtype, + one converted copy only if that is not bf16;
  no fp32 copy) and, at N > 1, FSDP2's all-gather copy-out (one more copy of the largest gathered unit, here the
  root); the "Plan vs measured" paragraph describes the plan before that change. SmolLM2 at N = 1 stays under
  the plan (-28 %, -19 %): its tied embedding is read first, before the other shards' pages are touched, so on
  CPU its slice (an fp32 checkpoint: 4 + 2 bytes) never adds to the whole weights as the plan counts it.

- **Each rank loads only its shard (deliverable 1)**: the load phase scales as 1/N: quarter model 2.56, 1.28,
  0.64 GiB at N = 1, 2, 4 (stage two 2.02, 1.03, 0.53); SmolLM2 0.25, 0.12, 0.06. At N = 1 it peaks at the
  weights + ONE bf16 slice of the largest tensor, no second copy of the model: 72B widths, bf16:
  10.23 GiB = 7.91 (weights) + 2.32 (the 152064 x 8192 embedding, read whole); the quarter model 2.56 = 1.98 +
  0.58. Stage one's scoring then holds 7.96 GiB: the weights + 0.05 of activations (the plan's run term: 7.96).
  Stage two (NF4) at 72B widths: 7.93 GiB = the bf16 root unit 4.64 + the NF4 layers 0.92 + the 2.32 GiB slice;
  training then 6.09 (plan run term 6.17).
- **Loading bug found (stages/loading.read_flat, not changed here)**: it reads a slice with ONE os.preadv and takes
  a short read for a cut file, but Linux returns at most 0x7ffff000 bytes per call, so any slice > 2 GiB fails:
  `dpo precompute-ref` on the 72B-width model at N = 1 stopped with "model.safetensors: ends inside a tensor (read
  2147479552 of 2491416576 bytes); the file is cut short". The wrapper here makes os.preadv loop until the buffer
  is full (same buffer: no effect on memory); read_flat should loop itself.
- **Plan vs measured**: the plan's loading term counts the largest slice in bf16 plus an fp32 copy (3 x 2.32 GiB
  at 72B widths); the loader makes no fp32 copy of it, so the totals at N = 1 are 31-37 % under the plan (10.23
  vs 14.87 GiB in stage one, 7.93 vs 12.56 in stage two) while the run terms are within 2 %.
  At N > 1 the plan is UNDER the measurement (quarter model, stage one, N = 2: +47 %): FSDP2 gathers a unit
  into a buffer and then copies it into the unsharded parameters while both exist, so the root unit (embeddings
  + untied head, never resharded in stage one) costs twice its size at its first gather, and the plan counts it
  once (see the root lines above: measured = shard + root twice + one layer). At SmolLM2 size every term is
  0.1-0.3 GiB above a 0.5 GiB runtime; 15 % of the plan is 0.02-0.05 GiB, the size of the root (0.05 GiB) and
  of gloo's and autograd's buffers, so its misses there are small in GiB.
- **N = 2 below N = 1**: met where the decoder layers dominate (SmolLM2 stage one), missed where the root unit
  does: the quarter model (root 59 % of the weights, as at 72B widths with 2 layers) peaks at 3.52 GiB per rank
  at N = 2 against 2.56 at N = 1 in stage one (3.11 vs 2.02 in stage two), and SmolLM2's NF4 stage two (bf16
  tied embedding 0.05 GiB vs 0.05 GiB of NF4 layers) at 0.28 vs 0.24.
- **The 2-process runs at 72B widths still do not fit this 24 GiB box**, now for the root unit, not for loading:
  per rank 3.96 GiB of shards + 2 x 4.64 GiB (root, twice at its gather) + 1.64 (a layer) + ~1 = ~16 GiB, 32 GiB
  for two ranks in stage one (28 GiB for stage two); the runs were skipped with that estimate, and the quarter
  model, measured at N = 2, shows the same mechanism at a size that fits. At 80 layers on 8 GPUs the root is a
  small share of the model, but its first gather still needs 2 x 4.64 = 9.3 GiB per GPU for a moment, while
  the plan's all-gathered term (7.9 GiB) counts the root once plus two layers. A remedy for the lead: give the
  embeddings and the LM head FSDP units of their own (each gathered only while used, the embedding resharded
  after the forward), so no rank ever gathers 2 x 4.64 GiB at once.
"""
