"""`dpo plan` against a measurement at Qwen2.5-72B's exact widths (issue 13, deliverable 5).

A random-init model built from configs/models/qwen2.5-72b-width-2layers/config.json (hidden 8192, intermediate
29568, 64 heads / 8 KV heads x 128, vocab 152064, untied head) with --layers decoder layers, saved in bf16 as
safetensors (no download; the tokenizer is SmolLM2's: its ids are < 49152 < 152064). Then, on CPU:

  stage one  `dpo precompute-ref --dtype bf16` under torchrun (--nproc processes; FSDP2 over gloo when 2+);
  stage two  `dpo train --load-in-4bit --dtype bf16 --lora-r 16` (gradient checkpointing, the default) under
             torchrun (--nproc, default 1), batch 1 per rank, --steps optimizer steps.

Each rank wraps the stage's `shard_model` to note, right after sharding: the bytes of the tensors it holds (its
parameter shards + buffers + NF4 absmax: weights as a GPU would hold them, whether a CPU run paged them in or
not) and its RSS; VmHWM is reset there. The rank's measured total = weights held + (peak RSS after sharding -
RSS after sharding): what `dpo plan --cpu` predicts (no CUDA overhead; the process's Python/torch runtime,
reported apart, is not in either). The plan gets the same layer count, --nproc "GPUs", the measured batch's tokens
(--seq-len = pair tokens / 2; --max-tokens-per-batch = stage one's largest padded batch).

  nice -n 5 env MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 .venv/bin/python bench/bench_72b.py

Since issue 20 the stages shard inside models.load_model (sharded loading), so the probe around the stages'
shard_model no longer sees it: per-rank peaks are measured by bench/bench_load.py; this script still builds the
model (--worker build) and rewrites its old section with --report-only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIG = C.REPO / "configs" / "models" / "qwen2.5-72b-width-2layers" / "config.json"
FULL = C.REPO / "configs" / "models" / "qwen2.5-72b-instruct"
GIB = 2**30
STAGES = {"stage1": "stage 1 bf16", "stage2": "stage 2 QLoRA"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rows", type=int, default=4, help="HH rows (the longest after truncation)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--budget", type=int, default=1024, help="stage one --max-tokens-per-batch")
    p.add_argument("--steps", type=int, default=2, help="stage two optimizer steps")
    p.add_argument("--stages", default="stage1,stage2")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (torchrun); 2 needs ~2 x 11 GiB at these widths (the FSDP root unit alone, "
                        "embeddings + head in bf16, is 4.6 GiB gathered per rank)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's results.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--args", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ================================================================================================ workers
def build(model_dir: Path, layers: int) -> None:
    """Random init in bf16 from the shipped config; weights + SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    raw.update(num_hidden_layers=layers, max_window_layers=layers)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(C.SMOLLM2 / name, model_dir / name)
    print(f"built {sum(p.numel() for p in model.parameters()):,} parameters in {model_dir}", flush=True)


def held_bytes(model) -> int:
    """Bytes of the tensors this rank holds: local parameter shards, buffers, NF4 quantisation state."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
        qs = getattr(p, "quant_state", None) or getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def page_in(model) -> None:
    """Touch every 4 KiB page of every local tensor (weights loaded by mmap are otherwise resident only where a
    forward has read them: the untouched embedding rows would never count)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.numel():
                t.detach().reshape(-1)[::1024].float().sum()


def stage_worker(stage: str, args: dict) -> None:
    """One rank of `dpo precompute-ref` / `dpo train` with the memory probe around shard_model."""
    import stages.stage1.precompute as P
    import stages.stage2.train as T
    from stages.settings.yamlconfig import build as build_cfg

    rec = {"rank": int(os.environ.get("RANK", "0")), "runtime_rss_gib": C.mem_status().get("rss")}  # torch imported
    mod, cls = (P, P.PrecomputeConfig) if stage == "stage1" else (T, T.TrainConfig)
    if not hasattr(mod, "shard_model"):
        sys.exit("the stages shard inside models.load_model now: measure with bench/bench_load.py")
    original = mod.shard_model

    def probe(model, env, **kw):
        out = original(model, env, **kw)
        gc.collect()
        page_in(model)  # mapped safetensors pages resident: the weights are held as a GPU holds them
        rec["weights_held_gib"] = held_bytes(model) / GIB
        rec["after_shard"] = C.mem_status()
        C.reset_peak()
        return out

    mod.shard_model = probe
    t0 = time.perf_counter()
    mod.run(build_cfg(cls, None, args))
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss_after_shard_gib"] = C.hwm_gib()
    rec["process_peak_rss_gib"] = C.peak_rss_gib()
    rec["transient_gib"] = rec["peak_rss_after_shard_gib"] - rec["after_shard"]["rss"]
    rec["measured_total_gib"] = rec["weights_held_gib"] + rec["transient_gib"]
    C.emit(rec)


# ================================================================================================ parent
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(stage: str, args: dict, log: Path, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker", stage,
           "--args", json.dumps(args)]
    env = {**os.environ, **C.MALLOC_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=3000)
    log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    recs = [json.loads(x[len(C.RESULT_TAG):]) for x in proc.stdout.splitlines() if x.startswith(C.RESULT_TAG)]
    if proc.returncode != 0 or len(recs) != nproc:
        sys.exit(f"{stage} failed (rc {proc.returncode}); see {log}:\n{proc.stderr[-3000:]}")
    return sorted(recs, key=lambda r: r["rank"])


def pick_rows(a, model_dir: Path, dest: Path):
    """The longest HH rows after truncation (similar lengths: little padding); written as prompt/chosen/rejected."""
    from stages.stage1.precompute import plan_batches

    tok, encoded = C.load_encoded(model_dir, a.max_length, a.max_prompt_length)
    from stages.data.rows import load_examples

    by_id = {e.example_id: e for e in load_examples([C.HH_PATH])[0]}
    chosen = C.longest_rows(encoded, a.rows)
    with open(dest, "w", encoding="utf-8") as f:
        for e in chosen:
            x = by_id[e.example_id]
            f.write(json.dumps({"prompt": x.prompt, "chosen": x.chosen, "rejected": x.rejected}) + "\n")
    pair_tokens = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in chosen)
    batches = plan_batches(chosen, a.budget, True, True)
    padded = max(len(b) * max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in b) for b in batches)
    return pair_tokens, padded, len(batches)


def plan_for(model_dir: Path, gpus: int, seq_len: int, t1: int, cpu: bool, layers=None, gpu_memory="80GB"):
    from stages.settings.commands import PlanConfig
    from stages.tools.plan import plan_memory

    return plan_memory(PlanConfig(str(model_dir), gpus=gpus, gpu_memory=gpu_memory, max_length=seq_len, batch_size=1,
                                  lora_r=16, max_tokens_per_batch=t1, layers=layers, cpu=cpu))


def main() -> None:
    a = parse()
    if a.worker == "build":
        return build(Path(a.args), a.layers)
    if a.worker:
        return stage_worker(a.worker, json.loads(a.args))
    out = C.OUT / f"q72w-{a.layers}l"
    model_dir, data, cache = out / "model", out / "rows.jsonl", out / "ref.parquet"
    out.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "model.safetensors.index.json").is_file() and not (model_dir / "model.safetensors").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", "build", "--layers", str(a.layers), "--args",
                        str(model_dir)], check=True, env={**os.environ, **C.MALLOC_ENV})
        print(f"model built in {time.perf_counter() - t:.0f}s", flush=True)
    pair_tokens, padded, n_batches = pick_rows(a, model_dir, data)
    seq_len = -(-pair_tokens // 2)  # plan's T = 2 * seq_len per pair ~ the shared [prompt|chosen|rejected] row
    saved = out / f"results-{a.nproc}proc.json"
    if a.report_only:
        return finish(a, model_dir, json.loads(saved.read_text()), pair_tokens, padded, n_batches, seq_len)
    common = {"model": str(model_dir), "data": [str(data)], "dtype": "bf16", "max_length": a.max_length,
              "max_prompt_length": a.max_prompt_length}
    results = {}
    if "stage1" in a.stages:
        shutil.rmtree(cache.with_name(cache.name + ".parts"), ignore_errors=True)
        cache.unlink(missing_ok=True)
        results["stage1"] = torchrun("stage1", {**common, "out": str(cache), "max_tokens_per_batch": a.budget,
                                                "overwrite": True}, out / "stage1.log", a.nproc)
        print("stage1", json.dumps(results["stage1"]), flush=True)
    if "stage2" in a.stages:
        run_dir = out / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        results["stage2"] = torchrun("stage2", {**common, "ref_cache": str(cache), "output": str(run_dir),
                                                "load_in_4bit": True, "lora_r": 16, "batch_size": 1,
                                                "max_steps": a.steps, "gradient_checkpointing": True,
                                                "logging_steps": 1}, out / "stage2.log", a.nproc)
        print("stage2", json.dumps(results["stage2"]), flush=True)
    saved.write_text(json.dumps(results, indent=1))
    finish(a, model_dir, results, pair_tokens, padded, n_batches, seq_len)


def finish(a, model_dir, results, pair_tokens, padded, n_batches, seq_len) -> None:
    body = report(a, model_dir, results, pair_tokens, padded, n_batches, seq_len)
    print(body)
    if not a.no_write:
        C.update_results(f"72b-width-{a.layers}l", body)


WEIGHT_LIKE = ("weights", "AdamW", "all-gathered", "overhead")  # exact byte counts: not scaled


def split(sc) -> tuple[float, float]:
    """(weights-like GiB, the rest: activations, head, dequantised linear) of a plan scenario."""
    w = sum(v for k, v in sc.breakdown.items() if any(x in k for x in WEIGHT_LIKE)) / GIB
    return w, sc.total / GIB - w


def report(a, model_dir, results, pair_tokens, padded, n_batches, seq_len) -> str:
    plan = plan_for(model_dir, a.nproc, seq_len, padded, cpu=True)
    keys = {"stage1": "stage1_bf16", "stage2": "stage2"}
    rows, ratios = [], {}
    for stage, recs in results.items():
        sc = plan.scenario(keys[stage])
        plan_w, plan_rest = split(sc)
        for r in recs:
            total_ratio = r["measured_total_gib"] / (sc.total / GIB)
            ratios.setdefault(stage, []).append(r["transient_gib"] / plan_rest)
            rows.append([STAGES[stage], r["rank"], C.fmt(r["runtime_rss_gib"]), C.fmt(r["weights_held_gib"]),
                         C.fmt(plan_w), C.fmt(r["after_shard"]["rss"]), C.fmt(r["peak_rss_after_shard_gib"]),
                         C.fmt(r["transient_gib"]), C.fmt(plan_rest), C.fmt(r["measured_total_gib"]),
                         C.fmt(sc.total / GIB), f"{100 * (total_ratio - 1):+.1f}%", f"{r['seconds']:.0f}"])
    lines = [f"## `dpo plan` vs a measurement at Qwen2.5-72B widths, {a.layers} layer(s) "
             f"(section `72b-width-{a.layers}l`)",
             "", C.provenance(1).rstrip(),
             f"- model: random init from `configs/models/qwen2.5-72b-width-2layers/config.json` with {a.layers} "
             f"decoder layer(s), bf16 safetensors; {a.rows} longest HH rows at --max-length {a.max_length} "
             f"--max-prompt-length {a.max_prompt_length} (longest pair {pair_tokens} tokens as one shared row; "
             f"stage one {n_batches} batch(es), largest {padded} padded tokens); stage two {a.steps} steps, "
             f"batch 1, NF4 + LoRA r16, gradient checkpointing, --dtype bf16",
             f"- {a.nproc} process(es) under torchrun, one torch thread each",
             f"- plan: `dpo plan --model {model_dir.relative_to(C.REPO)} --cpu --gpus {a.nproc} --seq-len {seq_len} "
             f"--batch 1 --lora-r 16 --max-tokens-per-batch {padded}`",
             "- GiB per rank. weights held = the rank's parameter shards + buffers + NF4 absmax (as a GPU holds "
             "them; every page touched after loading, so RSS holds them too); transient = peak RSS after sharding "
             "- RSS after sharding (activations, log-prob head, NF4 dequantisation, LoRA optimizer state); "
             "measured = weights held + transient, the same thing as the plan's --cpu total; runtime = RSS with "
             "torch imported, before anything loads (in neither)", "",
             C.table(["stage", "rank", "runtime", "weights held", "plan: weights", "RSS after shard",
                      "peak RSS after", "transient", "plan: the rest", "measured", "plan --cpu",
                      "measured vs plan", "s"], rows)]
    for stage in results:
        sc = plan.scenario(keys[stage])
        lines += ["", f"Plan breakdown, {STAGES[stage]} (GiB per rank): " +
                  ", ".join(f"{k} {v / GIB:.2f}" for k, v in sc.breakdown.items())]
    lines += ["", extrapolation(ratios)]
    return "\n".join(lines)


def extrapolation(ratios: dict) -> str:
    """The README's setting (80 layers, 8 GPUs, seq 2048, stage one 16384 tokens): the plan, and the plan with
    its non-weight part scaled by the measured/planned transient found here (weights are exact counts)."""
    plan = plan_for(FULL, 8, 2048, 16384, cpu=False)
    before = {"stage1": 35.0, "stage2": 24.0}  # README before issue 13 (stage one's activation model since fixed)
    keys = {"stage1": "stage1_bf16", "stage2": "stage2"}
    rows = []
    for stage, rs in ratios.items():
        sc = plan.scenario(keys[stage])
        w, rest = split(sc)
        worst = max(rs)
        rows.append([STAGES[stage], f"{before[stage]:.0f}", C.fmt(sc.total / GIB, 1), C.fmt(w, 1), C.fmt(rest, 1),
                     f"{worst:.2f}", C.fmt(w + rest * worst, 1)])
    return ("Qwen2.5-72B (80 layers) on 8 x 80 GB at the README's settings, GiB per GPU incl. the 2 GiB CUDA "
            "overhead; 'extrapolated' keeps the plan's weights (exact counts) and scales the rest by the "
            "measured/planned transient here:\n\n" +
            C.table(["stage", "README before", "plan now", "plan: weights + gathered", "plan: the rest",
                     "measured/plan (the rest)", "extrapolated"], rows))


if __name__ == "__main__":
    main()
