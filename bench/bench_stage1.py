"""Stage one (`dpo precompute-ref`) throughput and padding waste on HH-RLHF rows with SmolLM2-135M (fp32, CPU).

Four variants at the same token budget: {length-sorted, data order} x {prompt shared, plain}. Batches come from
`stages.precompute.plan_batches` and are scored by `stages.precompute.score_batches` (the code the command runs,
parts written to a scratch folder), one model in one process, variants interleaved and rotated each repeat.

  padding waste = 1 - real tokens / forwarded tokens (as the command's summary reports it), computed on the timed
  sample AND on all 2,308 rows (planning only, no model);
  examples/s and pair tokens/s = the same work for every variant (pair tokens = 2*prompt + chosen + rejected, what a
  plain forward needs without padding), so their ratio is the speed-up; forwarded tokens/s = raw model throughput.

A second table repeats shared vs plain (both sorted) on multi-turn rows with long prompts, where sharing the
prompt saves the most. Values of every variant are checked against the sorted plain one (max abs difference).

  .venv/bin/python bench/bench_stage1.py --quick      # < 2 min
  .venv/bin/python bench/bench_stage1.py              # < 8 min, writes bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = [("sorted", True, True), ("sorted", True, False), ("unsorted", False, True), ("unsorted", False, False)]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (< 2 min) to check the script")
    p.add_argument("--rows", type=int, default=None, help="timed sample of HH rows (default 24; quick 6)")
    p.add_argument("--long-rows", type=int, default=None, help="multi-turn long-prompt rows (default 8; quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 2; quick 1)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=384)
    p.add_argument("--budget", type=int, default=4096, help="--max-tokens-per-batch (padded tokens per forward)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU seconds then measure work, robust to other jobs on the cores)")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    a = p.parse_args()
    a.rows = a.rows or (6 if a.quick else 24)
    a.long_rows = a.long_rows or (3 if a.quick else 8)
    a.repeats = a.repeats or (1 if a.quick else 2)
    return a


def waste(batches, shared: bool) -> tuple[float, int, int]:
    from stages.precompute import batch_tokens

    real = padded = 0
    for b in batches:
        r, p = batch_tokens(b, shared)
        real, padded = real + r, padded + p
    return 1 - real / padded, real, padded


def pair_tokens(rows) -> int:
    return sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in rows)


def score(model, pad_id, batches, shared: bool, chunk: int):
    """Time `score_batches` over `batches`; return (Timer, {example_id: (chosen, rejected)})."""
    import pyarrow.parquet as pq
    import torch

    from stages.distributed import DistEnv
    from stages.precompute import PrecomputeConfig, score_batches

    parts = C.OUT / "stage1-parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    cfg = PrecomputeConfig(model="", data=(), chunk_size=chunk, batches_per_part=8)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    # the lead's signature gained `total` (progress bar size); pass it when present
    extra = [sum(len(b) for b in batches)] if "total" in inspect.signature(score_batches).parameters else []
    with C.Timer() as timer:
        score_batches(model, pad_id, batches, len(batches), parts, shared, cfg, env, *extra)
    values = {}
    for f in sorted(parts.glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        values.update(zip(t["example_id"], zip(t["ref_chosen_logps"], t["ref_rejected_logps"])))
    return timer, values


def long_multiturn(encoded, tok, n: int) -> list:
    """A random sample of the rows with >= 2 human turns and a prompt of >= 200 tokens."""
    human = tok.encode("\n\nHuman:", add_special_tokens=False)

    def turns(e):
        ids, k = e.prompt_ids, len(human)
        return sum(1 for i in range(len(ids) - k + 1) if tuple(ids[i:i + k]) == tuple(human))

    multi = [e for e in encoded if turns(e) >= 2 and len(e.prompt_ids) >= 200]
    return C.sample_rows(multi, n, seed=1), len(multi)


def timed_variants(model, pad_id, rows, variants, a, budget) -> dict:
    from stages.precompute import plan_batches

    plans = {v: plan_batches(rows, budget, v[2], v[1]) for v in variants}
    times = {v: [] for v in variants}
    walls = {v: [] for v in variants}
    values = {}
    score(model, pad_id, plan_batches(rows[:2], budget, True, True), True, 1024)  # warm-up (allocator, kernels)
    for rep in range(a.repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no variant always first
        for v in order:
            timer, vals = score(model, pad_id, plans[v], v[2], 1024)
            times[v].append(timer.cpu)
            walls[v].append(timer.wall)
            values[v] = vals
            print(f"  repeat {rep + 1}: {name(v):28s} cpu {timer.cpu:7.1f}s wall {timer.wall:7.1f}s", flush=True)
    return {"plans": plans, "times": times, "walls": walls, "values": values}


def name(v) -> str:
    return f"{v[0]}, prompt {'shared' if v[2] else 'plain'}"


def pair_gap(encoded) -> float:
    """Padding the plain layout cannot avoid: |chosen - rejected| per pair over its padded cost."""
    gap = sum(abs(len(e.chosen_ids) - len(e.rejected_ids)) for e in encoded)
    return gap / sum(2 * e.length for e in encoded)


def max_diff(values, ref) -> float:
    return max(max(abs(a - b) for a, b in zip(values[k], ref[k])) for k in ref)


def main() -> None:
    a = parse()
    C.set_threads(a.threads)
    import torch

    from stages.logprobs import supports_prompt_sharing
    from stages.models import ModelSpec, load_model
    from stages.precompute import plan_batches

    model_dir = C.ensure_model()
    tok, encoded = C.load_encoded(model_dir, a.max_length, a.max_prompt_length)
    rows = C.sample_rows(encoded, a.rows)
    long_rows, n_multi = long_multiturn(encoded, tok, a.long_rows)
    model = load_model(ModelSpec(str(model_dir), "fp32"), torch.device("cpu"))
    model.eval()
    assert supports_prompt_sharing(model), "the model's attention implementation does not support prompt sharing"
    pad = tok.pad_token_id
    print(f"{len(encoded)} rows encoded; sample {len(rows)} rows, {len(long_rows)} multi-turn long-prompt rows "
          f"(of {n_multi}); budget {a.budget}", flush=True)

    main_run = timed_variants(model, pad, rows, VARIANTS, a, a.budget)
    long_variants = [VARIANTS[0], VARIANTS[1]]
    long_run = timed_variants(model, pad, long_rows, long_variants, a, a.budget)

    base = VARIANTS[3]  # unsorted, plain: what a naive loop does
    ref_vals = main_run["values"][VARIANTS[1]]
    t_base, w_base = C.median(main_run["times"][base]), C.median(main_run["walls"][base])
    work = pair_tokens(rows)
    head = ["variant", "batches", "padding waste (sample)", "padding waste (all rows)", "forwarded tokens",
            "CPU s", "wall s", "pair tokens / CPU s", "forwarded tokens / CPU s", "speed-up (CPU)",
            "speed-up (wall)", "max abs diff"]
    body = []
    for v in VARIANTS:
        plan = main_run["plans"][v]
        w, _, padded = waste(plan, v[2])
        w_all, _, _ = waste(plan_batches(encoded, a.budget, v[2], v[1]), v[2])
        t, wall = C.median(main_run["times"][v]), C.median(main_run["walls"][v])
        body.append([name(v), len(plan), f"{100 * w:.1f}%", f"{100 * w_all:.1f}%", padded, C.fmt(t, 1),
                     C.fmt(wall, 1), C.fmt(work / t, 0), C.fmt(padded / t, 0), C.fmt(t_base / t) + "x",
                     C.fmt(w_base / wall) + "x", f"{max_diff(main_run['values'][v], ref_vals):.1e}"])
    t1 = C.table(head, body)

    long_work = pair_tokens(long_rows)
    p_share = sum(len(e.prompt_ids) for e in long_rows) / long_work
    body2 = []
    t_plain, w_plain = C.median(long_run["times"][VARIANTS[1]]), C.median(long_run["walls"][VARIANTS[1]])
    for v in long_variants:
        plan = long_run["plans"][v]
        w, _, padded = waste(plan, v[2])
        t, wall = C.median(long_run["times"][v]), C.median(long_run["walls"][v])
        body2.append([name(v), len(plan), f"{100 * w:.1f}%", padded, C.fmt(t, 1), C.fmt(wall, 1),
                      C.fmt(long_work / t, 0), C.fmt(t_plain / t) + "x", C.fmt(w_plain / wall) + "x"])
    t2 = C.table(["variant", "batches", "padding waste", "forwarded tokens", "CPU s", "wall s",
                  "pair tokens / CPU s", "speed-up (CPU)", "speed-up (wall)"], body2)
    diff_long = max_diff(long_run["values"][VARIANTS[0]], long_run["values"][VARIANTS[1]])
    intrinsic = pair_gap(encoded)

    sample_desc = (f"{len(rows)} HH-RLHF harmless-test rows (fixed random sample, seed 0), SmolLM2-135M-Instruct fp32, "
                   f"max_length {a.max_length}, max_prompt_length {a.max_prompt_length}, "
                   f"--max-tokens-per-batch {a.budget}, {a.repeats} repeat(s) per variant, interleaved")
    text = (f"## Stage one: tokens/s and padding waste (`bench/bench_stage1.py`{' --quick' if a.quick else ''})\n\n"
            f"{C.provenance(a.threads)}- workload: {sample_desc}\n\n{t1}\n\n"
            f"Multi-turn rows with long prompts ({len(long_rows)} rows with >= 2 human turns and >= 200 prompt "
            f"tokens, sampled from the {n_multi} such rows; prompt copies are {100 * 2 * p_share:.0f}% of the pair "
            f"tokens), both length-sorted; max abs diff shared vs plain {diff_long:.1e}:\n\n{t2}\n\n"
            f"Notes: times are medians; speed-ups are relative to each table's baseline "
            f"(unsorted plain / sorted plain) and computed from process CPU seconds with one torch thread (the work "
            f"done; wall seconds on this shared box swing by 2x from one minute to the next). \"pair tokens\" = "
            f"2 x prompt + chosen + rejected, the same work for every variant. \"max abs diff\" = largest "
            f"|log-prob sum| difference against sorted plain. Padding waste of the plain layout has a floor even "
            f"with perfect sorting: chosen and rejected of one pair are padded to the longer of the two, which over "
            f"all rows alone wastes {100 * intrinsic:.1f}%; the shared layout [prompt | chosen | rejected] has no "
            f"such floor.\n")
    print("\n" + text)
    if not a.no_write:
        C.update_results("stage1" + ("-quick" if a.quick else ""), text)


if __name__ == "__main__":
    main()
