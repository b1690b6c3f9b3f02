"""The streamed LoRA merge of `dpo export` (issue 25, deliverables 2 and 3): peak RSS at Qwen2.5-72B widths, and
how far each export's logits lie from the trained model.

Memory. A random-init model from configs/models/qwen2.5-72b-width-2layers/config.json (bf16, 4.2 B parameters,
8.5 GB) is written tensor by tensor (never whole) in 2 GB safetensors shards, plus a random LoRA r16 / alpha 32
on all 14 linear layers (A ~ N(0, 1/in), B ~ N(0, 0.01): not a no-op), fp32 as PEFT saves it. A one-file copy
of the same base is made by the merge itself (adapter None: re-shard only). Then each variant runs
stages.model.merge.merge in a fresh process with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072 (glibc hands
freed blocks back, so RSS follows the live tensors); VmHWM is reset right before the merge and read right after.
The big files are deleted at the end (--keep keeps them).

Logits. For the tiny random Llama (tests/tiny.py) and the SmolLM2 slice (2 real layers): a short real QLoRA run
(`dpo precompute-ref --load-in-4bit` + `dpo train --load-in-4bit`, fp32 compute on CPU, see the section for steps
and rates), then its adapter exported with merge_into original and dequantized (fp32 and bf16 files), and each
export's max |logit difference| against (a) the trained model: PeftModel on the NF4 base as stage two loads it,
and (b) the same adapter on the original fp32 base, over held-out HH-RLHF rows (prompt + chosen, one forward
each).

  nice -n 5 .venv/bin/python bench/bench_export.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIG = C.REPO / "configs" / "models" / "qwen2.5-72b-width-2layers" / "config.json"
WORK = C.REPO / "cache" / "bench-export"  # git-ignored
SECTION = "export"
GB = 10**9
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size of the sharded base and of the exports")
    p.add_argument("--steps", type=int, default=20, help="QLoRA optimizer steps of the logit runs")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-logits", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the 8.5 GB models under cache/bench-export")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ================================================================================================ the 72B-width base
def write_streamed(path: Path, specs: list[tuple[str, tuple, object]], make) -> None:
    """A safetensors file whose tensors are made (make(name, shape)) and written one at a time."""
    import torch

    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype], "shape": list(shape),
                        "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape, dtype in specs:
            t = make(name, shape).to(dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            del t


def build_base(folder: Path, shard_bytes: int) -> None:
    """Random bf16 weights (std 0.02; norms 1) in shards of <= shard_bytes, one tensor in memory at a time."""
    import torch

    from stages.model.loading import meta_model

    folder.mkdir(parents=True)
    raw = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    model = meta_model(str(folder), torch.bfloat16, False)
    specs = [(n, tuple(t.shape), torch.bfloat16) for n, t in model.state_dict().items()]
    seeds = {n: i for i, (n, _, _) in enumerate(specs)}

    def make(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(seeds[name])
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)

    groups, size = [[]], 0
    for s in specs:
        n = torch.Size(s[1]).numel() * 2
        if groups[-1] and size + n > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(s)
        size += n
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_streamed(folder / name, group, make)
        weight_map.update({n: name for n, _, _ in group})
        print(f"  wrote {name}: {sum(torch.Size(s).numel() * 2 for _, s, _ in group) / GB:.2f} GB", flush=True)
    total = sum(torch.Size(s).numel() * 2 for _, s, _ in specs)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build_adapter(base: Path, folder: Path) -> None:
    """LoRA r16 / alpha 32 on the 14 linear layers, random A and non-zero B, written as PEFT writes adapters."""
    import torch
    from safetensors.torch import save_file

    from stages.model.loading import meta_model
    from stages.model.quiet import import_bitsandbytes

    import_bitsandbytes(required=False)
    from peft import LoraConfig

    LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(str(folder))
    model, g, tensors = meta_model(str(base), torch.bfloat16, False), torch.Generator().manual_seed(0), {}
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in TARGETS:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(16, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(m.out_features, 16, generator=g) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def merge_worker(args: dict) -> None:
    """One merge in this (fresh) process: VmHWM reset right before it, read right after."""
    import torch

    from stages.model.merge import MergeJob, merge

    job = MergeJob(Path(args["base"]), Path(args["adapter"]) if args["adapter"] else None,
                   getattr(torch, args["dtype"]), args["merge_into"], torch.bfloat16, args["max_shard_bytes"])
    out = Path(args["out"])
    out.mkdir(parents=True)
    import transformers  # noqa: F401  (as `dpo export` has them: imported before the baseline)

    from stages.model.quiet import import_bitsandbytes

    import_bitsandbytes()
    before = C.current_rss_gib()
    C.reset_peak()
    with C.Timer() as t:
        report = merge(job, out, say=lambda line: print(line, flush=True))
    hwm = C.hwm_gib()
    C.emit({"hwm_gib": hwm, "before_gib": before, "wall_s": t.wall, "cpu_s": t.cpu,
            "shards": len(report.shards), "merged": report.merged, "dequantized": report.dequantized,
            "largest_out_gb": max((out / f).stat().st_size for f in report.shards) / GB, "bytes": report.bytes,
            "check": spot_check(job, out) if job.adapter and job.merge_into == "original" else "-"})


def spot_check(job, out: Path) -> str:
    """Two merged tensors of the output (read back after the peak was taken) against W + 2 B @ A computed whole:
    the largest LoRA'd matrix and an attention one; the worst |difference| in units of |expected| x 2^-8."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stages.model.loading import index_checkpoint, read_flat

    lora, base, worst = load_file(str(job.adapter / "adapter_model.safetensors")), index_checkpoint(job.base), 0.0
    written = index_checkpoint(out)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        key = "base_model.model." + name.removesuffix(".weight")
        w = read_flat(base[name], 0, base[name].numel).reshape(base[name].shape).float()
        want = w.addmm_(lora[key + ".lora_B.weight"], lora[key + ".lora_A.weight"], alpha=32 / 16)
        with safe_open(str(written[name].file), framework="pt") as f:
            got = f.get_tensor(name).float()
        ulp = want.abs().clamp_min(1e-30) * 2.0**-8
        worst = max(worst, float(((got - want).abs() / ulp).max()))
    return f"<= {worst:.2f}"


def largest_file_gb(folder: Path, pattern: str = "*.safetensors") -> float:
    return max(p.stat().st_size for p in folder.glob(pattern)) / GB


def memory(a) -> list:
    shard = int(a.shard_gb * GB)
    root = WORK / "q72w"
    shutil.rmtree(root, ignore_errors=True)
    free = shutil.disk_usage(WORK.parent).free / GB
    if free < 30:
        sys.exit(f"{free:.0f} GB free under {WORK.parent}: the memory bench needs ~26 GB (two bases, one export)")
    t0 = time.perf_counter()
    build_base(root / "sharded", shard)
    build_adapter(root / "sharded", root / "adapter")
    print(f"built base + adapter in {time.perf_counter() - t0:.0f}s", flush=True)
    runs = [("re-shard only (no adapter): 2 GB shards -> 1 file", "sharded", None, 10**15, "original", "single"),
            ("original, bf16", "sharded", "adapter", shard, "original", None),
            ("original, bf16", "single", "adapter", shard, "original", None),
            ("original, bf16", "sharded", "adapter", 10**15, "original", None),
            ("dequantized (NF4 bf16 round trip), bf16", "sharded", "adapter", shard, "dequantized", None)]
    rows = []
    for label, src, adapter, max_shard, into, keep_as in runs:
        out = root / (keep_as or "out")
        args = {"base": str(root / src), "adapter": str(root / adapter) if adapter else None, "out": str(out),
                "max_shard_bytes": max_shard, "merge_into": into, "dtype": "bfloat16"}
        print(f"merge: {label}, from {src}", flush=True)
        r = C.run_worker(Path(__file__), ["--worker", json.dumps(args)], timeout=1800, env=C.MALLOC_ENV,
                         log=WORK / f"merge-{len(rows)}.log")
        if "error" in r:
            sys.exit(f"merge worker failed: {r['error']}")
        if keep_as:
            shutil.copy(root / src / "config.json", out)
        else:
            shutil.rmtree(out)
        adapter_mb = (root / "adapter" / "adapter_model.safetensors").stat().st_size / 1e6 if adapter else 0
        rows.append([label, f"{src} ({len(list((root / src).glob('*.safetensors')))} file(s))",
                     C.fmt(largest_file_gb(root / src)), "1 file" if max_shard > 10**14 else f"{max_shard / GB:g} GB",
                     f"{r['shards']}", C.fmt(r["largest_out_gb"]), C.fmt(adapter_mb, 1), r["merged"],
                     C.fmt(r["before_gib"]), C.fmt(r["hwm_gib"]), C.fmt(r["hwm_gib"] - r["before_gib"]),
                     f"{r['wall_s']:.0f}", r["check"]])
        print(f"  peak {r['hwm_gib']:.2f} GiB (before {r['before_gib']:.2f}), {r['wall_s']:.0f}s", flush=True)
    if not a.keep:
        shutil.rmtree(root)
    return rows


# ================================================================================================ logits
def qlora_adapter(model_dir: Path, work: Path, rows: Path, steps: int, lr: float) -> Path:
    """`dpo precompute-ref --load-in-4bit` + `dpo train --load-in-4bit` (fp32 compute): the run's adapter."""
    from stages.stage1 import precompute
    from stages.stage1.precompute import PrecomputeConfig
    from stages.stage2 import train
    from stages.stage2.train import TrainConfig

    cache = work / "ref.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(model_dir), data=(str(rows),), output=str(cache), load_in_4bit=True,
                                         max_length=256, max_prompt_length=128))
    train.run(TrainConfig.flat(model=str(model_dir), data=(str(rows),), ref_cache=str(cache), output=str(work / "run"),
                               load_in_4bit=True, max_steps=steps, batch_size=4, learning_rate=lr, lora_dropout=0.0,
                               seed=0))
    return work / "run" / "adapter"


def eval_ids(model_dir: Path, rows: Path) -> list[list[int]]:
    from stages.data.encode import TokenizeSettings, encode_examples
    from stages.data.rows import load_examples
    from stages.model.models import load_tokenizer

    examples, _ = load_examples([rows])
    encoded, _ = encode_examples(load_tokenizer(str(model_dir)), examples, TokenizeSettings(256, 128))
    return [list(e.prompt_ids) + list(e.chosen_ids) for e in encoded]


def all_logits(model, seqs) -> list:
    import torch

    with torch.no_grad():
        return [model.eval()(input_ids=torch.tensor([s])).logits.double() for s in seqs]


def max_diff(x: list, y: list) -> str:
    return f"{max(float((a - b).abs().max()) for a, b in zip(x, y)):.3g}"


def logit_rows(name: str, model_dir: Path, work: Path, steps: int, lr: float) -> tuple[list, int]:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.model.merge import MergeJob, merge
    from stages.model.models import ModelSpec, load_model

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hh = C.REPO / "cache" / "bench-export" / "hh.jsonl"
    train_rows, held_out = work / "train.jsonl", work / "eval.jsonl"
    lines = hh.read_text().splitlines()
    train_rows.write_text("\n".join(lines[:64]) + "\n")
    held_out.write_text("\n".join(lines[64:68]) + "\n")
    adapter = qlora_adapter(model_dir, work, train_rows, steps, lr)
    seqs = eval_ids(model_dir, held_out)
    cpu = torch.device("cpu")
    trained = all_logits(load_model(ModelSpec(str(model_dir), load_in_4bit=True, adapter=str(adapter)), cpu), seqs)
    on_fp32 = all_logits(load_model(ModelSpec(str(model_dir), adapter=str(adapter)), cpu), seqs)
    bare = all_logits(load_model(ModelSpec(str(model_dir)), cpu), seqs)
    z = max(float(x.abs().max()) for x in trained)
    rows = [[name, "PeftModel on the fp32 base (no export)", "-", max_diff(on_fp32, trained), "0", C.fmt(z, 1)],
            [name, "base without the adapter (no export)", "-", max_diff(bare, trained), max_diff(bare, on_fp32),
             C.fmt(z, 1)]]
    for into in ("original", "dequantized"):
        for dtype in (torch.float32, torch.bfloat16):
            out = work / f"export-{into}-{dtype}"
            out.mkdir()
            merge(MergeJob(model_dir, adapter, dtype, into, torch.float32, 5 * GB), out, say=lambda line: None)
            shutil.copy(model_dir / "config.json", out)
            got = all_logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype), seqs)
            rows.append([name, f"export `{into}`", str(dtype).removeprefix("torch."),
                         max_diff(got, trained), max_diff(got, on_fp32), C.fmt(z, 1)])
    return rows, sum(len(s) for s in seqs)


def logits(a) -> list:
    import gzip

    sys.path.insert(0, str(C.REPO))
    from tests.tiny import build_tiny_model

    if not C.HH_PATH.is_file():
        sys.exit(f"HH-RLHF data not found at {C.HH_PATH}")
    WORK.mkdir(parents=True, exist_ok=True)
    with gzip.open(C.HH_PATH, "rt") as f:
        (WORK / "hh.jsonl").write_text("".join(line for _, line in zip(range(68), f)))
    tiny = WORK / "tiny-llama"
    shutil.rmtree(tiny, ignore_errors=True)
    build_tiny_model(tiny, arch="llama", tie=True, seed=0)
    from stages.model.smollm import ensure_smollm2

    out = []
    smollm2 = ensure_smollm2(C.REPO / "cache" / "models", 2)
    for name, folder, lr in (("tiny Llama (random)", tiny, 1e-2), ("SmolLM2 slice (2 layers)", smollm2, 1e-3)):
        t0 = time.perf_counter()
        rows, tokens = logit_rows(name, folder, WORK / name.split()[0].lower(), a.steps, lr)
        out.append((name, lr, tokens, rows))
        if not a.keep:
            shutil.rmtree(WORK / name.split()[0].lower())
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return out


# ================================================================================================ report
def memory_report(rows: list, a) -> str:
    head = ["merge", "base read", "largest input file GB", "max shard", "output files", "largest output file GB",
            "adapter MB", "LoRA'd tensors", "RSS before GiB", "peak RSS GiB", "peak - before GiB", "s",
            "spot check vs W + s B A"]
    return (f"## `dpo export`'s streamed merge: peak RSS at Qwen2.5-72B widths (issue 25; section `export-memory`)\n\n"
            f"{C.provenance(1)}"
            "- base: random init from configs/models/qwen2.5-72b-width-2layers/config.json (hidden 8192, "
            "intermediate 29568, vocab 152064, untied head, 2 layers): 4.24 B parameters, 8.5 GB bf16, written one "
            f"tensor at a time in {a.shard_gb:g} GB shards (`sharded`; the 2.5 GB embedding and head alone) and "
            "re-sharded into one 8.5 GB file by the merge itself (`single`, first row)\n"
            "- adapter: LoRA r16 / alpha 32 on all 14 linear layers (A ~ N(0, 1/in), B ~ N(0, 0.01)), fp32 as PEFT "
            "saves it\n"
            "- each merge: a fresh process (`--worker`) with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072; "
            "RSS before = after importing torch, transformers and bitsandbytes; peak RSS = VmHWM, reset right before "
            "`merge` and read right after; output "
            "bf16; the largest tensor is the 2.5 GB embedding (and the head), the largest LoRA'd one the 0.48 GB MLP "
            "matrices; spot check: two merged tensors read back (after the peak) against W + (alpha / r) B @ A "
            "computed whole in fp32, worst |difference| in units of |expected| x 2^-8 (the bf16 cast's own rounding is "
            "<= 1 of them)\n\n"
            + C.table(head, rows) + "\n\n"
            "What it shows: the merge streams each tensor in row chunks of <= 64 MiB of fp32 work "
            "(stages/model/merge.py CHUNK_BYTES) straight into the output file, whose header is planned first, so "
            "its peak does not follow the shard size at all -- not the input files' (2 GB or one 8.5 GB file), "
            "not the output's, not even the largest tensor's: it is the runtime + the adapter + a few chunks. "
            "Issue 25 asked for peak ~ the largest shard + the adapter (2.5 GB here with 2 GB shards, 8.5 GB with "
            "one file); PeftModel.merge_and_unload().save_pretrained() holds the whole "
            "model (8.5 GB here, ~145 GB at 72B). Read and written bytes pass through the page cache, which is "
            "not the process's RSS.\n")


def logits_report(results: list, a) -> str:
    head = ["model", "logits of", "dtype", "max abs diff vs trained (PEFT on NF4 base)",
            "max abs diff vs PEFT on fp32 base", "max abs logit"]
    rows = [r for _, _, _, rs in results for r in rs]
    runs = "; ".join(f"{n}: lr {lr:g}, {tok} held-out tokens" for n, lr, tok, _ in results)
    return (f"## `dpo export`: logits of each export vs the trained model (issue 25; section `export-logits`)\n\n"
            f"{C.provenance(1)}"
            f"- adapters: real short QLoRA runs, `dpo precompute-ref --load-in-4bit` + `dpo train --load-in-4bit` "
            f"on the first 64 HH-RLHF harmless-test rows, {a.steps} steps, batch 4, LoRA r16 / alpha 32 (the "
            f"defaults), dropout 0, fp32 compute (CPU), max length 256 / prompt 128 ({runs})\n"
            "- compared over HH rows 64-67 (prompt + chosen, one unpadded forward each): trained = PeftModel on the "
            "NF4 base as stage two loads it (stages.model.models.load_model); fp32 base = the same adapter on the "
            "original fp32 weights; exports written by stages.model.merge (`original`: into the fp32 weights; "
            "`dequantized`: into their NF4 round trip, nf4 dtype fp32) in fp32 and bf16, loaded with "
            "AutoModelForCausalLM\n\n"
            + C.table(head, rows) + "\n\n"
            "Reading: `dequantized` in fp32 reproduces the trained model to fp32 rounding, and differs from the "
            "adapter on the fp32 base by the NF4 error; `original` is the reverse. How far apart the two are is the "
            "NF4 quantization error of the base (first row), whatever the adapter; bf16 files add bf16 rounding to "
            "either.\n")


def main() -> None:
    a = parse()
    C.set_threads(1)
    if a.worker:
        merge_worker(json.loads(a.worker))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if not a.skip_logits:
        body = logits_report(logits(a), a)
        print(body)
        if not a.no_write:
            C.update_results("export-logits", body)
    if not a.skip_memory:
        rows = memory(a)
        body = memory_report(rows, a)
        print(body)
        if not a.no_write:
            C.update_results("export-memory", body)


if __name__ == "__main__":
    main()
