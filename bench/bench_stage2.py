"""Stage two (`dpo train --ref-cache`) against the two usual ways of getting the reference, same model/data/batch:

  (a) cache     - stage two as implemented: `stages.stage2.forward.policy_forward` with the reference as constants;
  (b) online    - same code, reference log-probs recomputed at every step by the policy with adapters disabled
                  (`with model.disable_adapter(), torch.no_grad(): sequence_logps(...)`);
  (c) two-model - a separate frozen reference copy (`load_model` a second time) run at every step.

Each variant runs in its OWN fresh process (so peak RSS is its own): load the policy with `load_policy` (LoRA
r16/alpha32 on all linear layers, gradient checkpointing on - the `dpo train` defaults), then steps of
forward + backward + clip + AdamW on one fixed batch; the first step is a warm-up and is not timed. Times are
process CPU seconds with one torch thread (robust to the other jobs on this box) and wall seconds; memory is process
peak RSS (ru_maxrss, includes loading) and the peak during the steps (VmHWM reset after loading); on GPU
`torch.cuda.max_memory_allocated`.

  .venv/bin/python bench/bench_stage2.py --quick          # < 2 min
  .venv/bin/python bench/bench_stage2.py                  # < 8 min, writes bench/RESULTS.md
  .venv/bin/python bench/bench_stage2.py --4bit           # NF4 base as in the QLoRA default (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {"cache": "(a) cache", "online": "(b) online reference", "two-model": "(c) two-model"}


# ================================================================================================ parent side
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small run (< 2 min) to check the script")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--synthetic", action="store_true",
                   help="random token rows with HH-like lengths instead of HH-RLHF (GPU runs: no data, no tokenizer)")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | auto (fp32 on CPU, bf16 on GPU)")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="NF4 base (QLoRA default; slow on CPU)")
    p.add_argument("--no-gradient-checkpointing", dest="grad_ckpt", action="store_false")
    p.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant after the warm-up")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 1; quick 0)")
    p.add_argument("--rounds", type=int, default=1, help="run the set of variant processes this many times")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None, help="log-prob head chunk (default: stages' default)")
    p.add_argument("--glibc-default", action="store_true",
                   help="run workers with glibc's default malloc settings (RSS then keeps freed memory)")
    p.add_argument("--tag", default="", help="suffix for this run's RESULTS.md section (keeps other runs' sections)")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--variants", default="cache,online,two-model",
                   help="comma-separated; options after ':' joined by '+', e.g. cache:chunk=128+share=0")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--target-length", type=int, default=None,
                   help="pick the pairs whose longer sequence is closest to this (default 200; quick 96)")
    p.add_argument("--json", default=None, help="also write step seconds and tokens per step here (gpu_mfu.py)")
    a = p.parse_args()
    a.steps = a.steps or (1 if a.quick else 3)
    a.warmup = (0 if a.quick else 1) if a.warmup is None else a.warmup
    a.target_length = a.target_length or (96 if a.quick else 200)
    return a


def model_dir(a) -> Path:
    return Path(a.model) if a.model else C.ensure_model()


def synthetic_rows(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> list:
    """HH-like shapes (prompt ~125, chosen ~41, rejected ~51 tokens on average) of random token ids."""
    from stages.data.encode import Encoded

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, c, r = (max(4, int(rng.lognormvariate(mu, 0.6) * scale)) for mu in (4.6, 3.5, 3.7))
        ids = lambda k: tuple(rng.randrange(3, vocab) for _ in range(k))  # noqa: E731
        rows.append(Encoded(f"synthetic-{i:06d}", ids(p), ids(c), ids(r)))
    return rows


def write_rows(rows: list, name: str) -> Path:
    C.OUT.mkdir(parents=True, exist_ok=True)
    path = C.OUT / f"{name}.rows.json"
    path.write_text(json.dumps([[e.example_id, e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in rows]))
    return path


def read_rows(path: str) -> list:
    from stages.data.encode import Encoded

    return [Encoded(i, tuple(p), tuple(c), tuple(r)) for i, p, c, r in json.loads(Path(path).read_text())]


def pad_id_of(mdir: Path) -> int:
    cfg = json.loads((mdir / "config.json").read_text())
    pad = cfg.get("pad_token_id")
    eos = cfg.get("eos_token_id")
    return pad if isinstance(pad, int) else (eos[0] if isinstance(eos, list) else eos or 0)


def worker_args(a, variant: str, rows_file: Path, extra_keys=()) -> list[str]:
    args = ["--worker", variant, "--rows-file", str(rows_file), "--steps", str(a.steps), "--threads", str(a.threads),
            "--warmup", str(a.warmup),
            "--dtype", a.dtype, "--pairs", str(a.pairs)]
    if a.model:
        args += ["--model", a.model]
    if a.four_bit:
        args.append("--4bit")
    if not a.grad_ckpt:
        args.append("--no-gradient-checkpointing")
    if a.chunk_size:
        args += ["--chunk-size", str(a.chunk_size)]
    return args


def run_variants(script: Path, a, variants: list[str], rows_file: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(a.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            log = C.OUT / f"{script.stem}-{v.replace(':', '_').replace('=', '').replace(',', '_')}.log"
            r = C.run_worker(script, worker_args(a, v, rows_file), env=None if a.glibc_default else C.MALLOC_ENV,
                             log=log)
            if "error" in r:
                print(f"  {v}: FAILED {r['error']}", flush=True)
            else:
                print(f"  round {rnd + 1} {v:12s} step cpu {C.fmt(C.median(r['step_cpu']), 1)}s wall "
                      f"{C.fmt(C.median(r['step_wall']), 1)}s peak {C.fmt(r['peak_gib'])} GiB "
                      f"(steps {C.fmt(r['peak_steps_gib'])} GiB)", flush=True)
            results[v].append(r)
    return results


def step_times(r: dict) -> list[float]:
    """The step times compared: user-CPU seconds on CPU (one thread, robust to the box's other jobs), wall seconds
    on a GPU (the Timer synchronises CUDA; the CPU only queues kernels there)."""
    return r["step_cpu"] if r["device"] == "cpu" else r["step_wall"]


def merged(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    out = dict(ok[0])
    for key in ("step_cpu", "step_sys", "step_wall"):
        out[key] = [x for r in ok for x in r[key]]
    for key in ok[0]["phases"]:
        out["phases"][key] = C.median([C.median(r["phases"][key]) for r in ok])
    for key in ("peak_gib", "peak_steps_gib", "loaded_gib", "runtime_gib"):
        out[key] = max(r[key] for r in ok)
    out["peak_anon"] = max(r.get("steps_status_peak", {}).get("anon", float("nan")) for r in ok)
    out["loaded_file"] = max(r.get("loaded_status", {}).get("file", float("nan")) for r in ok)
    return out


def results_table(results: dict[str, list[dict]], labels: dict[str, str], base: str) -> tuple[str, dict]:
    m = {v: merged(rs) for v, rs in results.items()}
    b = m[base]
    tag = labels[base].split()[0]
    head = ["variant", "step s (CPU: user, GPU: wall)", "sys s", "wall s", "ref fwd", "policy fwd", "backward",
            "optimizer", "peak RSS GiB", "after load GiB", "of which mapped files GiB", "step working set GiB",
            "peak anon GiB", f"time {tag}/this", f"peak RSS {tag}/this", f"working set {tag}/this"]
    rows = []
    for v, r in m.items():
        if r is None:
            rows.append([labels.get(v, v), "failed"] + [""] * (len(head) - 2))
            continue
        ph = r["phases"]
        t = C.median(step_times(r))
        work = r["peak_steps_gib"] - r["loaded_gib"]
        b_work = (b["peak_steps_gib"] - b["loaded_gib"]) if b else float("nan")
        rows.append([labels.get(v, v), C.fmt(t, 1), C.fmt(C.median(r["step_sys"]), 1),
                     C.fmt(C.median(r["step_wall"]), 1),
                     C.fmt(ph.get("ref", 0.0), 1), C.fmt(ph["forward"], 1), C.fmt(ph["backward"], 1),
                     C.fmt(ph["optimizer"], 2), C.fmt(r["peak_gib"]), C.fmt(r["loaded_gib"]),
                     C.fmt(r["loaded_file"]), C.fmt(work), C.fmt(r["peak_anon"]),
                     C.fmt(C.median(step_times(b)) / t) if b else "-",
                     C.fmt(b["peak_gib"] / r["peak_gib"]) if b else "-",
                     C.fmt(b_work / work) if b else "-"])
    return C.table(head, rows), m


TABLE_NOTES = (
    "Columns: step times are medians over the timed steps, in user-CPU seconds of the worker (one torch thread; "
    "robust to the other jobs on the box), with system seconds (page faults) and wall seconds beside; phase columns "
    "are user-CPU seconds (`backward` includes the gradient-checkpointing recompute). `peak RSS` is the worker's "
    "ru_maxrss over its whole life (loading included); `after load` is the RSS once the weights are resident; "
    "`step working set` = peak RSS during the steps minus `after load`: the memory the step itself needs "
    "(activations, log-prob head, gradients, optimizer state). `of which mapped files` = RssFile after loading: "
    "safetensors are memory-mapped, so an fp32 model loaded as fp32 keeps its weights as file pages (page cache), "
    "and a second fp32 copy of the same file (the two-model reference) maps the SAME physical pages: RSS counts "
    "them twice, physical memory holds them once. `peak anon` = largest anonymous RSS (heap: activations, "
    "gradients, converted weights) sampled every 20 ms during the steps. On GPU the memory columns are "
    "torch.cuda.max_memory_allocated / memory_allocated.")


def labels_for(variants: list[str], names: dict[str, str]) -> dict[str, str]:
    out = {}
    for v in variants:
        name, _, opts = v.partition(":")
        out[v] = names.get(name, name) + (f" [{opts}]" if opts else "")
    return out


def describe_batch(rows: list) -> str:
    plain = [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in rows]
    real = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in rows)
    return (f"{len(rows)} pairs, padded width {max(plain)}, {real} real tokens in the [2B, T] batch "
            f"(prompt lengths {[len(e.prompt_ids) for e in rows]})")


def device_desc(r: dict, a) -> str:
    malloc = ("glibc malloc defaults" if a.glibc_default else
              "workers run with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072 so RSS follows live tensors")
    return (f"{r['device']}, {r['dtype']}, {'NF4 base' if r['four_bit'] else 'no 4-bit'}, LoRA r16 all-linear "
            f"({r['trainable'] / 1e6:.1f}M trainable), gradient checkpointing {'on' if r['grad_ckpt'] else 'off'}, "
            f"prompt sharing {'on' if r.get('share_prompt') else 'off'} (stage two's default is on), "
            f"log-prob chunk {r['chunk_size']}, "
            f"{malloc if r['device'] == 'cpu' else 'torch.cuda.max_memory_allocated'}")


def section_key(prefix: str, a) -> str:
    return prefix + "".join(s for s, on in (("-quick", a.quick), ("-4bit", a.four_bit), ("-nockpt", not a.grad_ckpt),
                                            ("-glibc", a.glibc_default), ("-gpu", a.synthetic)) if on) + (
        f"-{a.tag}" if a.tag else "")


def main() -> None:
    a = parse()
    if a.worker:
        return worker(a)
    mdir = model_dir(a)
    if a.synthetic:
        vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
        pool = synthetic_rows(400, vocab)
    else:
        _, pool = C.load_encoded(mdir, a.max_length, a.max_prompt_length)
    rows = sorted(pool, key=lambda e: (abs(e.length - a.target_length), e.example_id))[:a.pairs]
    rows_file = write_rows(rows, "stage2")
    variants = a.variants.split(",")
    print(f"batch: {describe_batch(rows)}; variants {variants}", flush=True)
    results = run_variants(Path(__file__).resolve(), a, variants, rows_file)
    text, m = results_table(results, labels_for(variants, VARIANTS), variants[0])
    a_, b_, c_ = m.get("cache"), m.get("online"), m.get("two-model")
    lines = []
    if a_ and b_:
        r = C.median(step_times(a_)) / C.median(step_times(b_))
        lines.append(f"time (a)/(b) = {r:.2f} (target <= 0.72: {'met' if r <= 0.72 else 'MISSED'})")
    if a_ and c_:
        r = a_["peak_gib"] / c_["peak_gib"]
        rn = (a_["peak_gib"] - a_["runtime_gib"]) / (c_["peak_gib"] - c_["runtime_gib"])
        lines.append(f"memory (a)/(c) = {r:.2f} by process peak RSS (target <= 0.55: "
                     f"{'met' if r <= 0.55 else 'MISSED'}); {rn:.2f} without the Python/torch runtime")
    first = a_ or b_ or c_
    body = (f"## Stage two: cache vs online reference vs two models (section `{section_key('stage2', a)}`)\n\n"
            f"{C.provenance(a.threads)}"
            f"- workload: {'synthetic rows' if a.synthetic else 'HH-RLHF harmless-test rows'} closest to "
            f"{a.target_length} tokens (max_length {a.max_length}, max_prompt_length {a.max_prompt_length}): "
            f"{describe_batch(rows)}; {device_desc(first, a) if first else ''}; model {mdir.name}; "
            f"{a.steps} timed step(s) per process after {a.warmup} warm-up, {a.rounds} round(s)\n\n{text}\n\n"
            + "".join(f"- {x}\n" for x in lines) + f"\n{TABLE_NOTES}\n")
    print("\n" + body)
    if a.json:  # step seconds (wall on GPU) and tokens per step: bench/gpu_mfu.py turns them into tokens/s and MFU
        replies = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in rows)
        prompts = sum(len(e.prompt_ids) for e in rows)  # forwarded once per pair with prompt sharing, else twice
        per_variant = {v: {"step_s": C.median(step_times(r)), "timing": "user-cpu" if r["device"] == "cpu" else "wall",
                           "share_prompt": r["share_prompt"], "peak_gib": r["peak_gib"], "loaded_gib": r["loaded_gib"]}
                       for v, r in m.items() if r}
        Path(a.json).write_text(json.dumps({"pair_tokens": 2 * prompts + replies, "shared_tokens": prompts + replies,
                                            "variants": per_variant}, indent=1))
    if not a.no_write:
        C.update_results(section_key("stage2", a), body)


# ================================================================================================ worker side
def split_variant(variant: str) -> tuple[str, dict]:
    """'cache:chunk=256+share=0' -> ('cache', {'chunk_size': 256, 'share_prompt': False})."""
    name, _, opts = variant.partition(":")
    keys = {"chunk": ("chunk_size", int), "share": ("share_prompt", lambda v: v not in ("0", "false", "off"))}
    out = {}
    for kv in filter(None, opts.split("+")):
        k, _, v = kv.partition("=")
        field, conv = keys[k]
        out[field] = conv(v)
    return name, out


def load_common(a):
    """Everything a worker needs before its variant-specific part: rows, config, the policy."""
    import torch

    from stages.model.models import ModelSpec, load_policy
    from stages.settings.options import replace
    from stages.stage2.train import TrainConfig

    mdir = model_dir(a)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = read_rows(a.rows_file)
    extra = {"chunk_size": a.chunk_size} if a.chunk_size else {}
    # data / ref_cache / output are never read here (the rows come from --rows-file)
    cfg = TrainConfig.flat(model=str(mdir), data=("unused",), ref_cache="", output="", load_in_4bit=a.four_bit,
                           dtype=a.dtype, gradient_checkpointing=a.grad_ckpt, batch_size=a.pairs, **extra)
    cfg = replace(cfg, **split_variant(a.worker)[1])
    spec = ModelSpec(str(mdir), cfg.model.dtype, cfg.model.load_in_4bit)
    policy = load_policy(spec, cfg.lora.lora(), device, cfg.lora.gradient_checkpointing)
    policy.train()
    return mdir, device, rows, cfg, spec, policy


def dpo_step_factory(variant: str, policy, rows, cfg, spec, device, pad_id: int):
    """Returns ref_fn(): (ref_c, ref_r) lists, and loss_fn(refs) -> scalar loss, for variants (a)-(c)."""
    import torch

    from stages.model.logprobs import pair_logps
    from stages.model.models import load_model
    from stages.objective.loss import build_loss
    from stages.stage2.forward import policy_forward
    from stages.stage2.prepare import Item

    reference = None
    if variant == "two-model":
        reference = load_model(spec, device)  # the naive setup: a second, frozen copy in memory
        reference.eval()

    def logps(model):  # the reference pass takes the same path as stage one / the policy forward
        return pair_logps(model, rows, pad_id, cfg.compute.chunk_size, share=cfg.compute.share_prompt)

    def ref_fn():
        if variant == "cache":
            return [-1.5 * len(e.chosen_ids) for e in rows], [-1.5 * len(e.rejected_ids) for e in rows]
        with torch.no_grad():
            if variant == "online":
                with policy.disable_adapter():
                    lp = logps(policy)
            else:
                lp = logps(reference)
        return lp.chosen_logps.tolist(), lp.rejected_logps.tolist()

    ref_fn.models = [reference] if reference is not None else []
    loss = build_loss(cfg.loss)  # once, as train.run builds it

    def loss_fn(refs):
        items = [Item(e, c, r) for e, c, r in zip(rows, *refs)]
        losses = policy_forward(policy, items, pad_id, cfg, loss).losses
        return losses.mean()

    return ref_fn, loss_fn


def run_steps(a, policy, ref_fn, loss_fn) -> dict:
    import torch

    from stages.stage2.train import clip

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    phases = {"ref": [], "forward": [], "backward": [], "optimizer": []}
    step_cpu, step_sys, step_wall, losses = [], [], [], []
    for step in range(a.warmup + a.steps):
        with C.Timer() as total:
            with C.Timer() as t_ref:
                refs = ref_fn()
            with C.Timer() as t_fwd:
                loss = loss_fn(refs)
            with C.Timer() as t_bwd:
                loss.backward()
            with C.Timer() as t_opt:
                clip(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        print(f"    step {step}: user {total.user:.1f}s sys {total.sys:.1f}s wall {total.wall:.1f}s "
              f"loss {losses[-1]:.4f}", flush=True)
        if step < a.warmup:
            continue  # warm-up
        step_cpu.append(total.user)  # user CPU seconds: the compute (see _common.Timer)
        step_sys.append(total.sys)
        step_wall.append(total.wall)
        for k, t in (("ref", t_ref), ("forward", t_fwd), ("backward", t_bwd), ("optimizer", t_opt)):
            phases[k].append(t.wall if torch.cuda.is_available() else t.user)  # GPU: wall (CUDA synchronised)
    return {"step_cpu": step_cpu, "step_sys": step_sys, "step_wall": step_wall, "phases": phases, "losses": losses}


def page_in(models) -> None:
    import torch

    with torch.no_grad():
        for m in models:
            for t in list(m.parameters()) + list(m.buffers()):
                t.detach().reshape(-1)[::1024].sum() if t.numel() else None  # touch every 4 KiB page


def memory_record(device, runtime: float, loaded: float, load_peak: float | None) -> dict:
    """CPU: process peak RSS (whole life, and since the reset after loading). GPU: torch allocator peaks."""
    import torch

    if device.type == "cuda":
        steps = torch.cuda.max_memory_allocated() / 2**30
        return {"runtime_gib": 0.0, "loaded_gib": loaded, "peak_gib": max(steps, load_peak or 0.0),
                "peak_steps_gib": steps}
    return {"runtime_gib": runtime, "loaded_gib": loaded, "peak_gib": C.peak_rss_gib(), "peak_steps_gib": C.hwm_gib()}


def worker(a, factory=None) -> None:
    """One variant in this fresh process; prints one tagged JSON line."""
    C.set_threads(a.threads)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from stages.base.constants import chunk_size_for
    from stages.model.models import resolve_dtype

    if a.worker.startswith("trl"):
        import trl  # noqa: F401 - counted in the runtime baseline of TRL workers

    runtime = C.current_rss_gib()
    mdir, device, rows, cfg, spec, policy = load_common(a)
    pad_id = pad_id_of(mdir)
    name = split_variant(a.worker)[0]
    ref_fn, loss_fn = (factory or dpo_step_factory)(name, policy, rows, cfg, spec, device, pad_id)
    models = [policy] + ([m for m in getattr(ref_fn, "models", [])])
    if device.type == "cpu":
        page_in(models)  # weights are mmapped from safetensors: make them resident so "after load" counts them
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    loaded = C.current_rss_gib() if device.type != "cuda" else torch.cuda.memory_allocated() / 2**30
    loaded_status = C.mem_status()
    C.reset_peak()
    with C.PeakSampler() as sampler:
        rec = run_steps(a, policy, ref_fn, loss_fn)
    rec["loaded_status"], rec["steps_status_peak"] = loaded_status, sampler.peak
    rec.update(memory_record(device, runtime, loaded, load_peak))
    rec.update({"variant": a.worker, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", ""),
                "four_bit": a.four_bit, "grad_ckpt": a.grad_ckpt,
                "chunk_size": chunk_size_for(cfg.compute.chunk_size, device.type),
                "share_prompt": cfg.compute.share_prompt,
                "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad)})
    C.emit(rec)


if __name__ == "__main__":
    main()
