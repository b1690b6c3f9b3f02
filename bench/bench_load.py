"""Per-rank peak RSS of both stages at N = 1, 2, 4 processes, next to `dpo plan --cpu` (issue 20, deliverable 2).

Models: (a) SmolLM2-135M-Instruct; (b) a random-init model at Qwen2.5-72B's exact widths with 2 decoder layers
(configs/models/qwen2.5-72b-width-2layers, bf16 safetensors built by bench_72b.py's builder under cache/). Both
stages run as a user runs them (`dpo precompute-ref --dtype bf16`, then `dpo train --load-in-4bit --dtype bf16
--lora-r 16 --batch-size 1`, gradient checkpointing) under `torchrun --nproc-per-node N` (gloo), every process
with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072 (glibc hands freed blocks back, so RSS follows the live
tensors) and one torch thread.

Each rank runs the CLI inside a wrapper (this file, --worker) that writes a per-rank JSON file at exit. Peak RSS:
stages/model/memory.py resets VmHWM at each phase start (it writes 5 to /proc/self/clear_refs, which resets ru_maxrss
too), so the wrapper wraps that reset and reads VmRSS and VmHWM just before each one: the phase peaks are exact,
the process peak is their max with the VmHWM at exit; a 20 ms VmRSS sampler runs beside as a cross-check.
`baseline` = RSS at the start of loading (Python, torch, the process group, the tokenized data): the plan counts
no runtime, so the plan is compared with peak - baseline; the raw peaks are in the table too.

Memory safety (a 24 GiB box shared with other jobs): before each run the estimate N x (plan + 1 GiB) must fit in
--cap-gib and in MemAvailable - 2 GiB (it waits up to --wait-s for memory, else the run is skipped and recorded
with its estimate); a watchdog kills the run's own process group if MemAvailable falls under 1 GiB.

  nice -n 5 .venv/bin/python bench/bench_load.py                      # all runs, then bench/RESULTS.md
  .venv/bin/python bench/bench_load.py --report-only                  # re-plan and rewrite from saved results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GIB = 2**30
WORK = C.REPO / "cache" / "bench-load"  # git-ignored: rows, caches, runs, the 72B-width model (8.5 GB)
SECTION = "load-sharded"
STAGE_KEYS = {"stage1": "stage1_bf16", "stage2": "stage2"}
STAGE_NAMES = {"stage1": "stage 1 bf16", "stage2": "stage 2 NF4 + LoRA"}
PHASES = {"stage1": ("pre", "load", "score"), "stage2": ("pre", "load", "train")}


def models() -> dict:
    return {"smollm2": {"dir": C.SMOLLM2, "name": "SmolLM2-135M-Instruct", "layers": None},
            "q72w": {"dir": WORK / "q72w-2l" / "model", "name": "Qwen2.5-72B widths, 2 layers (random)",
                     "layers": 2},
            "q72w-quarter": {"dir": WORK / "q72w-quarter" / "model", "layers": 8,
                             "name": "Qwen2.5-72B's vocabulary, a quarter of its other widths, 8 layers (random)"}}


QUARTER = {"hidden_size": 2048, "intermediate_size": 7392, "num_attention_heads": 16, "num_key_value_heads": 2,
           "num_hidden_layers": 8, "max_window_layers": 8}  # head dim 128 and vocabulary 152064 kept


def build_quarter(model_dir: Path) -> None:
    """The 72B-width config with QUARTER's widths: an FSDP root unit (embeddings + untied head, 1.16 GiB in bf16)
    as big a share of the model as at 72B widths with 2 layers, small enough for N = 2 and 4 on this box."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads((C.REPO / "configs" / "models" / "qwen2.5-72b-width-2layers" /
                                        "config.json").read_text()).items() if not k.startswith("_")}
    raw.update(QUARTER)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw), dtype=torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(C.SMOLLM2 / name, model_dir / name)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,q72w")
    p.add_argument("--nprocs", default="1,2,4")
    p.add_argument("--stages", default="stage1,stage2")
    p.add_argument("--rows", type=int, default=8, help="the longest HH rows after truncation")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=64)
    p.add_argument("--budget", type=int, default=512, help="stage one --max-tokens-per-batch")
    p.add_argument("--steps", type=int, default=2, help="stage two optimizer steps (batch 1 per rank)")
    p.add_argument("--cap-gib", type=float, default=20.0, help="skip runs whose estimated total RSS exceeds this")
    p.add_argument("--wait-s", type=float, default=900.0, help="wait this long for memory before skipping")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--report-only", action="store_true", help="re-plan and rewrite the report from results.json")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("dpo_args", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args()


# ================================================================================================ worker (a rank)
def status_gib(key: str) -> float:
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(found.group(1)) / 2**20 if found else float("nan")


class Sampler:
    """Max VmRSS sampled every 20 ms on a thread (a cross-check that no reset hides a peak)."""

    def __init__(self):
        self.max, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.max = max(self.max, status_gib("VmRSS"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.max, status_gib("VmRSS"))


def preload() -> None:
    """Import what the stages import lazily (model classes, PEFT, bitsandbytes, Arrow): runtime, in the baseline."""
    import importlib

    for name in ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2", "peft",
                 "bitsandbytes", "pyarrow.parquet", "stages.stage1.precompute", "stages.stage2.train",
                 "stages.model.loading"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def whole_preadv() -> None:
    """Linux's preadv returns at most 0x7ffff000 bytes per call; stages/loading.read_flat reads a tensor's slice
    with ONE call and takes a short read for a cut file, so a slice > 2 GiB (the 72B-width embedding whole at
    N = 1) fails. Here os.preadv loops until the buffer is full: same buffer, same memory."""
    real = os.preadv

    def preadv(fd, buffers, offset, *rest):
        if len(buffers) != 1 or rest:
            return real(fd, buffers, offset, *rest)
        view, done = memoryview(buffers[0]).cast("B"), 0
        while done < len(view):
            got = real(fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
        return done

    os.preadv = preadv


def cli_worker(outdir: Path, argv: list[str]) -> None:
    """One rank: `dpo ARGV` with every VmHWM reset wrapped; writes outdir/rank{R}.json."""
    import stages.model.memory as M
    from stages.cli import main

    preload()
    whole_preadv()
    rank, t0 = int(os.environ.get("RANK", "0")), time.perf_counter()
    rec = {"rank": rank, "import_rss": status_gib("VmRSS"), "marks": []}
    original = M.reset_rss_peak

    def reset() -> bool:  # a phase ends (or the first starts): its peak is the VmHWM now
        rec["marks"].append({"t": round(time.perf_counter() - t0, 1), "rss": status_gib("VmRSS"),
                             "hwm": status_gib("VmHWM")})
        return original()

    M.reset_rss_peak = reset
    sampler, rc = Sampler(), 0
    try:
        main(argv, prog_name="dpo")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    rec.update(rc=rc, seconds=round(time.perf_counter() - t0, 1), final_rss=status_gib("VmRSS"),
               final_hwm=status_gib("VmHWM"), sampled_max=sampler.stop())
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"rank{rank}.json").write_text(json.dumps(rec))
    sys.exit(rc)


def phase_peaks(rec: dict, stage: str) -> dict:
    """{baseline, pre, load, score|train, after, peak} in GiB from a rank's marks (3 resets: the start of load,
    the end of load, the end of the run phase)."""
    marks, names = rec["marks"], PHASES[stage]
    out = {name: float("nan") for name in names}  # a phase with no reset seen (memory.py changed): not measured
    out.update({name: m["hwm"] for name, m in zip(names, marks)})
    out["after"] = rec["final_hwm"]
    out["baseline"] = marks[0]["rss"] if marks else float("nan")
    out["peak"] = max([m["hwm"] for m in marks] + [rec["final_hwm"]])
    out["sampled"] = rec["sampled_max"]
    return out


# ================================================================================================ parent
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_available_gib() -> float:
    found = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(found.group(1)) / 2**20


def pytest_count() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum("pytest" in line for line in out.splitlines())


def wait_for_memory(need: float, cap: float, wait_s: float) -> str | None:
    """None when `need` GiB fits now (waiting up to wait_s for it), else why the run is skipped."""
    if need > cap:
        return f"estimated {need:.1f} GiB in all ranks > the {cap:.0f} GiB this box can give"
    deadline = time.monotonic() + wait_s
    while mem_available_gib() - 2.0 < need:
        if time.monotonic() > deadline:
            return (f"estimated {need:.1f} GiB; only {mem_available_gib():.1f} GiB available after waiting "
                    f"{wait_s:.0f} s ({pytest_count()} pytest processes running)")
        time.sleep(15)
    return None


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own), by process id: nothing else."""
    table = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                                                     text=True).stdout.splitlines()]
    tree, grew = {pid}, True
    while grew:
        more = {int(p) for p, pp in table if int(pp) in tree} - tree
        tree, grew = tree | more, bool(more)
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def launch(argv: list[str], n: int, outdir: Path, log: Path, timeout: float) -> tuple[int, str]:
    """torchrun N ranks of the wrapper in a session of their own; a watchdog kills that session (only it) when the
    box runs low on memory. Returns (rc, why it was killed or '')."""
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(outdir), "--", *argv]
    env = {**os.environ, **C.MALLOC_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    why, start = "", time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if mem_available_gib() < 1.0:
                why = f"killed by the watchdog: MemAvailable {mem_available_gib():.2f} GiB"
            elif time.monotonic() - start > timeout:
                why = f"killed after {timeout:.0f} s"
            if why:
                kill_tree(proc.pid)
                proc.wait()
                break
            time.sleep(0.5)
    return proc.returncode, why


def write_rows(model_dir: Path, a, dest: Path) -> dict:
    """The longest HH rows after truncation, as prompt/chosen/rejected lines; their token shape for the plan."""
    from stages.data.rows import load_examples
    from stages.stage1.precompute import batch_cost, plan_batches

    _, encoded = C.load_encoded(model_dir, a.max_length, a.max_prompt_length)
    by_id = {e.example_id: e for e in load_examples([C.HH_PATH])[0]}
    chosen = C.longest_rows(encoded, a.rows)
    dest.write_text("".join(json.dumps({"prompt": by_id[e.example_id].prompt, "chosen": by_id[e.example_id].chosen,
                                        "rejected": by_id[e.example_id].rejected}) + "\n" for e in chosen))
    pair = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in chosen)
    batches = plan_batches(chosen, a.budget, True, True)
    return {"pair_tokens": pair, "seq_len": -(-pair // 2), "padded": max(batch_cost(b, True) for b in batches),
            "batches": len(batches), "rows": len(chosen)}


def dpo_args(stage: str, model_dir: Path, work: Path, a) -> list[str]:
    common = ["--model", str(model_dir), "--data", str(work / "rows.jsonl"), "--dtype", "bf16",
              "--max-length", str(a.max_length), "--max-prompt-length", str(a.max_prompt_length)]
    if stage == "stage1":
        return ["precompute-ref", *common, "--out", str(work / "ref.parquet"), "--max-tokens-per-batch",
                str(a.budget), "--overwrite"]
    return ["train", *common, "--ref-cache", str(work / "ref.parquet"), "--output", str(work / "run"),
            "--load-in-4bit", "--lora-r", "16", "--batch-size", "1", "--max-steps", str(a.steps),
            "--logging-steps", "1", "--no-resume"]


def plan_cmd(model_dir: Path, n: int, shape: dict) -> str:
    return (f"dpo plan --model {os.path.relpath(model_dir, C.REPO)} --cpu --gpus {n} --seq-len {shape['seq_len']} "
            f"--batch 1 --lora-r 16 --max-tokens-per-batch {shape['padded']}")


def plan_gib(model_dir: Path, n: int, shape: dict) -> dict:
    """{stage: {total, load, run}} GiB per rank from `dpo plan --cpu` as it is now (same code as the CLI)."""
    from stages.settings.commands import PlanConfig
    from stages.tools.plan import plan_memory

    plan = plan_memory(PlanConfig(str(model_dir), gpus=n, max_length=shape["seq_len"], batch_size=1, lora_r=16,
                                  max_tokens_per_batch=shape["padded"], cpu=True))
    out = {}
    for stage, key in STAGE_KEYS.items():
        sc = plan.scenario(key)
        out[stage] = {"total": sc.total / GIB, "load": getattr(sc, "load", float("nan")) / GIB,
                      "run": getattr(sc, "run", sc.total) / GIB}
    return out


def unit_sizes(model_dir: Path) -> tuple[int, list[int], int]:
    """Bytes in bf16, from the checkpoint's header: (the FSDP root unit, each decoder layer, the largest tensor of
    a layer)."""
    from stages.model.loading import index_checkpoint

    sizes = {}
    for name, t in index_checkpoint(model_dir).items():
        unit = re.match(r".*\.layers\.(\d+)\.", name)
        sizes.setdefault(unit.group(1) if unit else "root", []).append(t.numel * 2)
    root = sum(sizes.pop("root"))
    return root, [sum(v) for v in sizes.values()], max(max(v) for v in sizes.values())


def rough_gib(model_dir: Path, n: int, stage: str) -> float:
    """A rank's RSS by rough arithmetic from the checkpoint's header (bf16 weights): at N = 1 the weights + the
    largest tensor read whole; at N > 1 its shard + the FSDP root unit (embeddings, head) TWICE (FSDP2 copies
    the all-gather output into the unsharded parameters while both exist) + one gathered layer. Stage two: NF4
    layers (0.28 of bf16 with absmax) and one linear dequantised. + 1 GiB (runtime, activations)."""
    root, layers, largest = unit_sizes(model_dir)
    scale = 0.28 if stage == "stage2" else 1.0
    weights, layer = root + scale * sum(layers), scale * max(layers) + (largest if stage == "stage2" else 0)
    per_rank = weights + max(largest, root / 2) if n == 1 else weights / n + 2 * root + layer
    return per_rank / GIB + 1.0


def run_one(key: str, stage: str, n: int, model_dir: Path, shape: dict, a) -> dict:
    work = WORK / key
    plan = plan_gib(model_dir, n, shape)[stage]
    need = n * rough_gib(model_dir, n, stage)
    print(f"{key} {stage} N={n}: plan {plan['total']:.2f} GiB/rank, estimate {need:.1f} GiB in all; "
          f"available {mem_available_gib():.1f} GiB, {pytest_count()} pytest processes", flush=True)
    skip = wait_for_memory(need, a.cap_gib, a.wait_s)
    res = {"estimate_gib": round(need, 2), "plan_at_run": plan}
    if skip:
        return {**res, "status": "skipped", "reason": skip}
    if stage == "stage2" and not (work / "ref.parquet").is_file():
        return {**res, "status": "skipped", "reason": "no stage-one cache"}
    outdir, log = work / f"ranks-{stage}-{n}", work / f"{stage}-{n}.log"
    rc, why = launch(dpo_args(stage, model_dir, work, a), n, outdir, log, a.timeout_s)
    ranks = sorted((json.loads(p.read_text()) for p in outdir.glob("rank*.json")), key=lambda r: r["rank"])
    res.update(status="ok" if rc == 0 and len(ranks) == n else "failed", rc=rc, reason=why, ranks=ranks,
               log=os.path.relpath(log, C.REPO), tool_memory=tool_memory(stage, work))
    if res["status"] == "failed":
        res["reason"] = why or log.read_text()[-600:]
    return res


def tool_memory(stage: str, work: Path) -> dict | None:
    """What the run itself reports (stages/model/memory.py): the cache's metadata or summary.json's "memory"."""
    try:
        if stage == "stage1":
            from stages.cache.refcache import read_meta

            return read_meta(work / "ref.parquet").get("memory")
        return json.loads((work / "run" / "summary.json").read_text()).get("memory")
    except Exception:  # noqa: BLE001 - a report of another module's output: absent is fine
        return None


def main() -> None:
    a = parse()
    if a.worker:
        return cli_worker(Path(a.worker), a.dpo_args)
    if not a.report_only:
        C.ensure_model()
        for key in a.models.split(","):
            saved = WORK / key / "results.json"  # one file per model: models may run side by side
            results = json.loads(saved.read_text()) if saved.is_file() else {"runs": {}, "shapes": {}}
            model_dir = models()[key]["dir"]
            if key == "q72w-quarter" and not (model_dir / "config.json").is_file():
                build_quarter(model_dir)
            if not (model_dir / "config.json").is_file():
                sys.exit(f"{model_dir} missing: build it with `python bench/bench_72b.py --worker build --layers 2 "
                         f"--args {model_dir}`")
            (WORK / key).mkdir(parents=True, exist_ok=True)
            shape = results["shapes"][key] = write_rows(model_dir, a, WORK / key / "rows.jsonl")
            shape["settings"] = {k: getattr(a, k) for k in ("max_length", "max_prompt_length", "budget", "steps")}
            results["provenance"] = C.provenance(1)
            for n in map(int, a.nprocs.split(",")):
                for stage in a.stages.split(","):
                    results["runs"][f"{key}/{stage}/{n}"] = run_one(key, stage, n, model_dir, shape, a)
                    saved.write_text(json.dumps(results, indent=1))
                    print(json.dumps(summarize_run(results["runs"][f"{key}/{stage}/{n}"], stage)), flush=True)
    results = {"runs": {}, "shapes": {}, "provenance": {}}
    for key in models():
        if (WORK / key / "results.json").is_file():
            part = json.loads((WORK / key / "results.json").read_text())
            results["runs"].update(part["runs"])
            results["shapes"].update(part["shapes"])
            results["provenance"][key] = part["provenance"]
    from bench_load_report import report

    body = report(results)
    print(body)
    if not a.no_write:
        C.update_results(SECTION, body)


def summarize_run(run: dict, stage: str) -> dict:
    if run.get("status") != "ok":
        return {k: run.get(k) for k in ("status", "reason", "estimate_gib")}
    return {"status": "ok", "peaks": [{k: round(v, 3) for k, v in phase_peaks(r, stage).items()}
                                      for r in run["ranks"]]}


if __name__ == "__main__":
    main()
