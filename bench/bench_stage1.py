"""Stage one (`dpo precompute-ref`) throughput and padding waste on HH-RLHF rows with SmolLM2-135M (fp32, CPU).

Four variants at the same token budget: {length-sorted, data order} x {prompt shared, plain}. Batches come from
`stages.stage1.precompute.plan_batches` and are scored by `stages.stage1.precompute.score_batches` (the code the command
runs, parts written to a scratch folder), one model in one process, variants interleaved and rotated each repeat.

  padding waste = 1 - real tokens / forwarded tokens (as the command's summary reports it), computed on the timed
  sample AND on all 2,308 rows (planning only, no model);
  pair tokens / s = the same work for every variant (pair tokens = 2*prompt + chosen + rejected, what a plain
  forward needs without padding), so their ratio is the speed-up; forwarded tokens / s = raw model throughput;
  real tokens / s = what the command's summary reports (prompt counted once when shared);
  TFLOP/s = 2 x parameters x real tokens / s (matrix work of the weights only; attention and pads not counted).

A second table repeats shared vs plain (both sorted) on multi-turn rows with long prompts, where sharing the
prompt saves the most. Values of every variant are checked against the sorted plain one (max abs difference).

On CPU, times are user-CPU seconds with one torch thread (the box's cores are shared); on GPU, wall seconds with
CUDA synchronisation. `--fsdp1` wraps the model with FSDP2 `fully_shard` per decoder layer on a one-process group
(what `torchrun --nproc-per-node 1` would give), to show the sharding overhead at world size 1.

  .venv/bin/python bench/bench_stage1.py --quick      # < 2 min
  .venv/bin/python bench/bench_stage1.py              # < 8 min, writes bench/RESULTS.md
  python3 bench/bench_stage1.py --model /tmp/rand3b --synthetic --rows 512 --budget 32768   # GPU (gpu_bench.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ALL = {"sorted-shared": ("sorted", True, True), "sorted-plain": ("sorted", True, False),
       "unsorted-shared": ("unsorted", False, True), "unsorted-plain": ("unsorted", False, False)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (< 2 min) to check the script")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--synthetic", action="store_true", help="random-token rows with HH-like lengths (GPU runs)")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | auto (fp32 on CPU, bf16 on GPU)")
    p.add_argument("--variants", default=",".join(ALL), help=f"subset of {','.join(ALL)}")
    p.add_argument("--fsdp1", action="store_true", help="FSDP2 fully_shard on a one-process group")
    p.add_argument("--rows", type=int, default=None, help="timed sample of HH rows (default 24; quick 6)")
    p.add_argument("--long-rows", type=int, default=None,
                   help="multi-turn long-prompt rows (default 8; quick 3; 0 skips that table)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 2; quick 1)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=384)
    p.add_argument("--budget", type=int, default=4096, help="--max-tokens-per-batch (padded tokens per forward)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU seconds then measure work, robust to other jobs on the cores)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    a = p.parse_args()
    a.rows = a.rows or (6 if a.quick else 24)
    a.long_rows = (3 if a.quick else 8) if a.long_rows is None else a.long_rows
    a.repeats = a.repeats or (1 if a.quick else 2)
    if a.synthetic:
        a.long_rows = 0
    return a


# ------------------------------------------------------------------------------------------------ measuring
def waste(batches, shared: bool) -> tuple[float, int, int]:
    from stages.stage1.precompute import batch_tokens

    real = padded = 0
    for b in batches:
        r, p = batch_tokens(b, shared)
        real, padded = real + r, padded + p
    return 1 - real / padded, real, padded


def pair_tokens(rows) -> int:
    return sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in rows)


def score(model, pad_id, batches, shared: bool):
    """Time `score_batches` over `batches`; return (Timer, {example_id: (chosen, rejected)})."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq
    import torch

    from stages.model.distributed import DistEnv
    from stages.model.runguard import StopSignal
    from stages.settings.commands import Scoring
    from stages.settings.groups import Compute
    from stages.stage1.precompute import score_batches
    from stages.stage1.units import PairUnits

    parts = C.OUT / "stage1-parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    # the two groups score_batches reads, at the command's defaults (the default chunk size)
    cfg = SimpleNamespace(scoring=Scoring(batches_per_part=8), compute=Compute())
    device = next(model.parameters()).device
    env = DistEnv(0, 1, 0, device if device.type == "cuda" else torch.device("cpu"))
    with C.Timer() as timer, StopSignal() as stop:
        score_batches(model, pad_id, PairUnits([]), batches, parts, shared, cfg, env, stop)
    values = {}
    for f in sorted(parts.glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        values.update(zip(t["example_id"], zip(t["ref_chosen_logps"], t["ref_rejected_logps"])))
    return timer, values


def long_multiturn(encoded, tok, n: int):
    """A random sample of the rows with >= 2 human turns and a prompt of >= 200 tokens."""
    human = tok.encode("\n\nHuman:", add_special_tokens=False)

    def turns(e):
        ids, k = e.prompt_ids, len(human)
        return sum(1 for i in range(len(ids) - k + 1) if tuple(ids[i:i + k]) == tuple(human))

    multi = [e for e in encoded if turns(e) >= 2 and len(e.prompt_ids) >= 200]
    return C.sample_rows(multi, n, seed=1), len(multi)


def timed_variants(model, pad_id, rows, variants, a, on_gpu: bool) -> dict:
    from stages.stage1.precompute import plan_batches

    plans = {v: plan_batches(rows, a.budget, ALL[v][2], ALL[v][1]) for v in variants}
    times = {v: [] for v in variants}
    walls = {v: [] for v in variants}
    values = {}
    score(model, pad_id, plan_batches(rows[:2], a.budget, True, True), True)  # warm-up (allocator, kernels)
    for rep in range(a.repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate: no variant always first
        for v in order:
            timer, vals = score(model, pad_id, plans[v], ALL[v][2])
            times[v].append(timer.wall if on_gpu else timer.user)
            walls[v].append(timer.wall)
            values[v] = vals
            print(f"  repeat {rep + 1}: {name(v):28s} user-cpu {timer.user:7.1f}s wall {timer.wall:7.1f}s", flush=True)
    return {"plans": plans, "times": times, "walls": walls, "values": values}


def name(v: str) -> str:
    s, _, shared = ALL[v]
    return f"{s}, prompt {'shared' if shared else 'plain'}"


def pair_gap(encoded) -> float:
    """Padding the plain layout cannot avoid: |chosen - rejected| per pair over its padded cost."""
    gap = sum(abs(len(e.chosen_ids) - len(e.rejected_ids)) for e in encoded)
    return gap / sum(2 * e.length for e in encoded)


def max_diff(values, ref) -> float:
    return max(max(abs(a - b) for a, b in zip(values[k], ref[k])) for k in ref)


# ------------------------------------------------------------------------------------------------ setup
def fsdp_world_size_one(model, device) -> None:
    """What `shard_model` does under torchrun, on a one-process group (shard_model itself skips world size 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from stages.model.distributed import decoder_layers

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # At world size 1 a first forward under inference_mode (as score_batches runs it) makes FSDP2's unsharded
    # parameters inference tensors and every later forward fails ("Inference tensors do not track version
    # counter"); one forward under no_grad first avoids it. World size 2 does not need this (checked on CPU).
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]], device=device), use_cache=False)


def load(a):
    import torch

    from stages.model.logprobs import supports_prompt_sharing
    from stages.model.models import ModelSpec, load_model

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    mdir = Path(a.model) if a.model else C.ensure_model()
    tok = None
    if a.synthetic:
        import bench_stage2 as S

        vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
        encoded = S.synthetic_rows(max(a.rows, 2000), vocab)
        pad = S.pad_id_of(mdir)
    else:
        tok, encoded = C.load_encoded(mdir, a.max_length, a.max_prompt_length)
        pad = tok.pad_token_id
    model = load_model(ModelSpec(str(mdir), a.dtype), device)
    model.eval()
    if not supports_prompt_sharing(model):
        sys.exit("the model's attention implementation does not support prompt sharing")
    n_params = sum(p.numel() for p in model.parameters())
    if a.fsdp1:
        fsdp_world_size_one(model, device)
    return device, mdir, tok, encoded, pad, model, n_params


# ------------------------------------------------------------------------------------------------ report
def main_table(run, rows, encoded, variants, a, n_params):
    from stages.stage1.precompute import plan_batches

    base = "unsorted-plain" if "unsorted-plain" in variants else variants[-1]
    ref_key = "sorted-plain" if "sorted-plain" in variants else variants[0]
    ref_vals = run["values"][ref_key]
    t_base, w_base = C.median(run["times"][base]), C.median(run["walls"][base])
    work = pair_tokens(rows)
    head = ["variant", "batches", "padding waste (sample)", "padding waste (all rows)", "forwarded tokens",
            "time s", "wall s", "pair tokens/s", "forwarded tokens/s", "real tokens/s", "TFLOP/s",
            f"speed-up vs {name(base)}", "wall speed-up", f"max abs diff vs {name(ref_key)}"]
    body, numbers = [], {}
    for v in variants:
        plan = run["plans"][v]
        w, real, padded = waste(plan, ALL[v][2])
        w_all, _, _ = waste(plan_batches(encoded, a.budget, ALL[v][2], ALL[v][1]), ALL[v][2])
        t, wall = C.median(run["times"][v]), C.median(run["walls"][v])
        tflops = 2 * n_params * real / t / 1e12
        numbers[v] = {"seconds": t, "wall": wall, "real_tokens_per_s": real / t, "pair_tokens_per_s": work / t,
                      "forwarded_tokens_per_s": padded / t, "tflops": tflops, "waste_sample": w, "waste_all": w_all}
        body.append([name(v), len(plan), f"{100 * w:.1f}%", f"{100 * w_all:.1f}%", padded, C.fmt(t, 2),
                     C.fmt(wall, 1), C.fmt(work / t, 0), C.fmt(padded / t, 0), C.fmt(real / t, 0),
                     C.fmt(tflops, 4 if tflops < 1 else 1), C.fmt(t_base / t) + "x", C.fmt(w_base / wall) + "x",
                     f"{max_diff(run['values'][v], ref_vals):.1e}"])
    return C.table(head, body), numbers


def long_table(run, long_rows):
    keys = ["sorted-shared", "sorted-plain"]
    work = pair_tokens(long_rows)
    t_plain, w_plain = C.median(run["times"]["sorted-plain"]), C.median(run["walls"]["sorted-plain"])
    body = []
    for v in keys:
        w, _, padded = waste(run["plans"][v], ALL[v][2])
        t, wall = C.median(run["times"][v]), C.median(run["walls"][v])
        body.append([name(v), len(run["plans"][v]), f"{100 * w:.1f}%", padded, C.fmt(t, 1), C.fmt(wall, 1),
                     C.fmt(work / t, 0), C.fmt(t_plain / t) + "x", C.fmt(w_plain / wall) + "x"])
    table = C.table(["variant", "batches", "padding waste", "forwarded tokens", "time s", "wall s", "pair tokens/s",
                     "speed-up", "wall speed-up"], body)
    return table, max_diff(run["values"]["sorted-shared"], run["values"]["sorted-plain"]), C.median(
        [t_plain / C.median(run["times"]["sorted-shared"])])


def main() -> None:
    a = parse()
    C.set_threads(a.threads)
    import torch

    from stages.base.constants import chunk_size_for
    from stages.settings.groups import Compute

    variants = a.variants.split(",")
    device, mdir, tok, encoded, pad, model, n_params = load(a)
    on_gpu = device.type == "cuda"
    rows = C.sample_rows(encoded, a.rows)
    long_rows, n_multi = long_multiturn(encoded, tok, a.long_rows) if a.long_rows else ([], 0)
    print(f"{len(encoded)} rows; sample {len(rows)} rows, {len(long_rows)} multi-turn long-prompt rows "
          f"(of {n_multi}); budget {a.budget}; {n_params / 1e9:.3f}B parameters on {device}", flush=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    run = timed_variants(model, pad, rows, variants, a, on_gpu)
    t1, numbers = main_table(run, rows, encoded, variants, a, n_params)
    gpu_mem = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    what = "synthetic random-token rows with HH-like lengths" if a.synthetic else \
        f"{len(rows)} HH-RLHF harmless-test rows (fixed random sample, seed 0)"
    timing = "wall seconds (CUDA synchronised)" if on_gpu else "user-CPU seconds with one torch thread"
    desc = (f"{what}, {mdir.name} ({n_params / 1e9:.3f}B parameters) {dtype} on "
            f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}{', FSDP2 world size 1' if a.fsdp1 else ''}, "
            f"max_length {a.max_length}, max_prompt_length {a.max_prompt_length}, --max-tokens-per-batch {a.budget}, "
            f"log-prob chunk {chunk_size_for(Compute().chunk_size, device.type)} (the default), "
            f"{a.repeats} repeat(s) per variant, interleaved; times are {timing}"
            + (f"; peak GPU memory {gpu_mem:.1f} GiB" if gpu_mem is not None else ""))
    key = "stage1" + ("-quick" if a.quick else "") + ("-gpu" if on_gpu else "") + ("-fsdp1" if a.fsdp1 else "")
    text = (f"## Stage one: tokens/s and padding waste (section `{key}`)\n\n"
            f"{C.provenance(a.threads)}- workload: {desc}\n\n{t1}\n")
    if long_rows:
        long_run = timed_variants(model, pad, long_rows, ["sorted-shared", "sorted-plain"], a, on_gpu)
        t2, diff_long, _ = long_table(long_run, long_rows)
        p_share = 2 * sum(len(e.prompt_ids) for e in long_rows) / pair_tokens(long_rows)
        text += (f"\nMulti-turn rows with long prompts ({len(long_rows)} rows sampled from the {n_multi} rows with "
                 f">= 2 human turns and >= 200 prompt tokens; the two prompt copies are {100 * p_share:.0f}% of the "
                 f"pair tokens), both length-sorted; max abs diff shared vs plain {diff_long:.1e}:\n\n{t2}\n")
    text += (f"\nNotes: times are medians; speed-ups are against the table's baseline row and use the `time s` column "
             f"({timing}; wall seconds on this shared CPU box swing by 2x from one minute to the next). \"pair "
             f"tokens\" = 2 x prompt + chosen + rejected, the same work for every variant. \"max abs diff\" = largest "
             f"difference of a summed log-prob between two layouts. Padding waste of the plain layout has a floor "
             f"even with perfect sorting: chosen and rejected of one pair are padded to the longer of the two, which "
             f"over all rows alone wastes {100 * pair_gap(encoded):.1f}%; the shared layout [prompt | chosen | "
             f"rejected] has no such floor.\n")
    print("\n" + text)
    if a.json:
        Path(a.json).write_text(json.dumps({"params": n_params, "variants": numbers, "gpu_mem_gib": gpu_mem}, indent=1))
    if not a.no_write:
        C.update_results(key, text)


if __name__ == "__main__":
    main()
