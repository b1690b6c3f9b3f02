"""`dpo export RUN_DIR_OR_ADAPTER --output DIR`: a trained run (or a PEFT adapter) becomes a model folder that
transformers, vLLM, TGI and (with --gguf) llama.cpp load without PEFT, with a card saying how it was made.

  source   a `dpo train` folder (adapter/, config.yaml, its cache's metadata) or a PEFT adapter folder
  resolve  base, dtype, NF4 and SFT adapter as stage two loaded them (train.as_the_cache: the cache's reference
           where the run's flags said nothing); --base and --dtype override. A run that continued an SFT adapter
           trained THAT adapter further: its adapter/ holds SFT + DPO in the same LoRA weights, merged once
  check    everything before anything is written: the adapter mergeable, the GGUF architecture, the output free
           (or --overwrite), the disk space for every file
  write    `.DIR.partial` beside DIR, held by `.DIR.lock`: merged shards (streamed, stages/model/merge.py),
           config.json, generation_config.json, tokenizer, README.md (the card), dpo_config.yaml, export.json,
           [model.TYPE.gguf]; then renamed to DIR (with --overwrite the old DIR goes only after that). Each large
           file is renamed into the folder when whole, so the same command after a crash keeps them (the folder's
           `.export-job.json` says which job it holds; another job's folder is started again)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.base import fsio
from stages.base.errors import UserError
from stages.base.progress import say
from stages.settings.commands import ExportConfig
from stages.stage2.train import as_the_cache

GGUF_OF_DTYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CONFIG_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # our names -> config.json's
SPARE_BYTES = 64 * 2**20  # tokenizer, config, card: a generous bound for the small files
STAMP = ".export-job.json"  # in the partial folder: the job it holds (job_stamp)


@dataclass(frozen=True)
class Source:
    """What is exported and how it was made (`settings`, `meta`, `summary`: empty for an adapter alone)."""

    adapter: Path
    base: Path
    dtype: str            # of the written weights: fp32 | bf16 | fp16
    compute_dtype: str    # the run's dtype: what its NF4 codes were quantized from
    nf4: bool             # the run trained on an NF4 base
    sft_adapter: str | None
    run: Path | None = None
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def run_export(cfg: ExportConfig) -> Path:
    """The export, checked whole before anything is written; returns the output folder."""
    # resolve and check (nothing written yet)
    src = resolve(cfg)
    out = Path(cfg.output)
    job = merge_job(src, cfg)
    check_before_writing(cfg, src, job, out)
    say(None, f"export: {src.adapter} on {src.base} -> {out} ({src.dtype}, merged into the {cfg.merge_into} "
              f"weights{', NF4 round trip of ' + src.compute_dtype if cfg.merge_into == 'dequantized' else ''})")
    # write under a temporary name, held against a second writer
    with fsio.OutputLock(out.with_name(f".{out.name}.lock"), out, "--output"):
        fsio.remove_stale_temporaries(out.parent, (out.name,))  # what a killed --overwrite left
        work, resumed = partial_folder(out, job_stamp(cfg, src, job))
        write_all(cfg, src, job, work, resumed)  # interrupted: `work` stays, and the same command resumes it
        (work / STAMP).unlink()
        publish(work, out, cfg.overwrite)
    say(None, f"done: {out} (load it with AutoModelForCausalLM.from_pretrained or `dpo sample --model {out}`)")
    return out


def resolve(cfg: ExportConfig) -> Source:
    """The source folder read: a run (its adapter, settings, cache metadata, summary) or an adapter alone."""
    p = Path(cfg.run_dir_or_adapter)
    if not p.is_dir():
        raise UserError(f"{p}: no such folder; pass a `dpo train` output folder or a PEFT adapter folder")
    if (p / "adapter_config.json").is_file():
        config = _json(p / "adapter_config.json")
        base = Path(cfg.base or config.get("base_model_name_or_path") or "")
        dtype = cfg.dtype if cfg.dtype != "auto" else stored_dtype(_check_base(base, p), p)
        return Source(p, base, dtype, dtype, False, None)
    if not (p / "config.yaml").is_file():
        raise UserError(f"{p}: neither a `dpo train` output (config.yaml, adapter/) nor a PEFT adapter "
                        "(adapter_config.json); pass one of those")
    if not (p / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{p}: a run folder without an adapter (adapter/adapter_config.json); the run did not "
                        "finish: rerun the same `dpo train` to finish it, or pass a checkpoint's adapter folder")
    return _run_source(cfg, p)


def _run_source(cfg: ExportConfig, run: Path) -> Source:
    settings = yaml.safe_load((run / "config.yaml").read_text()) or {}
    meta = _cache_meta(settings.get("ref_cache"), settings)
    given = {k: settings.get(k) for k in ("load_in_4bit", "dtype", "adapter")}
    spec = as_the_cache(given, meta) if meta else given
    base = Path(cfg.base or settings.get("model") or "")
    _check_base(base, run)
    compute = spec["dtype"] if spec["dtype"] not in (None, "auto") else meta.get("dtype") or "fp32"
    dtype = compute if cfg.dtype == "auto" else cfg.dtype
    summary = _json(run / "summary.json") if (run / "summary.json").is_file() else {}
    return Source(run / "adapter", base, dtype, compute, bool(spec["load_in_4bit"]), spec["adapter"], run, settings,
                  meta, summary)


def _cache_meta(path: str | None, settings: dict) -> dict:
    """The run's cache metadata; a cache moved away is only a problem where the run's flags left a value to it."""
    from stages.cache.refcache import read_meta

    if path and Path(path).is_file():
        return read_meta(path)
    if any(settings.get(k) is None for k in ("load_in_4bit", "dtype", "adapter")):
        raise UserError(f"--ref-cache {path}: the run's cache is not there, and the run took its base's dtype, "
                        "quantization and SFT adapter from it; run from where it was trained, or export its "
                        "adapter/ folder with --base and --dtype")
    return {}


def _check_base(base: Path, source: Path) -> Path:
    if not str(base) or not (base / "config.json").is_file() or not list(base.glob("*.safetensors")):
        raise UserError(f"{source}: its base model {str(base) or '(none recorded)'} is not a local model folder "
                        "(config.json + *.safetensors); pass --base PATH")
    return base


def stored_dtype(base: Path, source: Path) -> str:
    """The base's own dtype (config.json's dtype / torch_dtype): what an adapter alone is exported in."""
    config = _json(base / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    known = {v: k for k, v in CONFIG_DTYPE.items()}
    if name not in known:
        raise UserError(f"{base}/config.json: dtype {name!r} is none of {', '.join(known)} (what --dtype auto "
                        "reads); pass --dtype")
    return known[name]


def merge_job(src: Source, cfg: ExportConfig):
    from stages.model.merge import MergeJob, adapter_problem
    from stages.model.models import DTYPES

    problem = adapter_problem(src.adapter)
    if problem:
        raise UserError(f"{src.adapter}: {problem}")
    if cfg.merge_into == "dequantized" and not src.nf4:
        raise UserError(f"--merge-into dequantized: {src.run or src.adapter} was not trained on an NF4 base (nothing "
                        "was quantized); use --merge-into original")
    return MergeJob(src.base, src.adapter, DTYPES[src.dtype], cfg.merge_into, DTYPES[src.compute_dtype],
                    cfg.shard_bytes, cfg.trust_remote_code)


def gguf_type(cfg: ExportConfig, src: Source) -> str:
    return GGUF_OF_DTYPE[src.dtype] if cfg.gguf_type == "auto" else cfg.gguf_type


def check_before_writing(cfg: ExportConfig, src: Source, job, out: Path) -> None:
    """The output free (or --overwrite), the GGUF architecture supported, enough disk: all before any write."""
    from stages.model.merge import output_bytes

    if out.exists() and not cfg.overwrite:
        raise UserError(f"--output {out}: exists; pass --overwrite to replace it (the old one goes only once the new "
                        "one is complete) or pick another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: a file, not a folder; pick another --output")
    need = output_bytes(job) + SPARE_BYTES
    if cfg.gguf:
        from stages.model.ggufwrite import gguf_bytes, gguf_problem

        problem = gguf_problem(src.base)
        if problem:
            raise UserError(f"--gguf: {problem}")
        need += gguf_bytes(src.base, gguf_type(cfg, src))
    partial = out.with_name(f".{out.name}.partial")  # an interrupted export's files count as written
    need -= sum(f.stat().st_size for f in partial.iterdir() if f.is_file()) if partial.is_dir() else 0
    parent = next(d for d in [out.parent, *out.parent.parents] if d.exists())
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"--output {out}: needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free on {parent}; "
                        "free space or export elsewhere")


def job_stamp(cfg: ExportConfig, src: Source, job) -> dict:
    """What decides the bytes of an export: a partial folder made under another stamp is not resumed."""
    from stages import __version__

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.base.glob("*.safetensors"))
    adapter = hashlib.sha256((src.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    return {"tool_version": __version__, "base": str(src.base.resolve()), "base_files": files, "adapter": adapter,
            "adapter_config": _json(src.adapter / "adapter_config.json"), "dtype": src.dtype,
            "merge_into": cfg.merge_into, "nf4_dtype": src.compute_dtype, "max_shard_bytes": job.max_shard_bytes,
            "gguf": gguf_type(cfg, src) if cfg.gguf else None}


def partial_folder(out: Path, stamp: dict) -> tuple[Path, bool]:
    """`.NAME.partial` beside `out`: an interrupted export of the same job is resumed (True), anything else there is
    replaced by an empty folder holding the stamp (False)."""
    work = out.with_name(f".{out.name}.partial")
    stamp = json.loads(json.dumps(stamp))  # as it reads back (tuples are lists)
    if (work / STAMP).is_file():
        try:
            if json.loads((work / STAMP).read_text()) == stamp:
                return work, True
        except json.JSONDecodeError:
            pass
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    fsio.write_text_atomic(work / STAMP, json.dumps(stamp))
    return work, False


def write_all(cfg: ExportConfig, src: Source, job, tmp: Path, resumed: bool = False) -> None:
    from stages.model.merge import merge
    from stages.tools.modelcard import model_card

    started = time.time()
    report = merge(job, tmp, say=lambda line: say(None, line), resume=resumed)
    write_model_files(src, tmp, cfg.trust_remote_code)
    gguf_file = None
    if cfg.gguf:
        from stages.model.ggufwrite import write_gguf

        gguf_file = tmp / f"model.{gguf_type(cfg, src)}.gguf"
        if gguf_file.is_file():  # renamed into place only when whole: an interrupted export's, kept
            say(None, f"{gguf_file.name}: already written")
        else:
            part = gguf_file.with_name(f".{gguf_file.name}.tmp")
            write_gguf(tmp, part, gguf_type(cfg, src), say=lambda line: say(None, line), name=Path(cfg.output).name)
            part.replace(gguf_file)
    provenance = export_record(cfg, src, report, gguf_file, time.time() - started)
    provenance["output"] = cfg.output
    fsio.write_text_atomic(tmp / "export.json", json.dumps(provenance, indent=1, default=str))
    if src.settings:
        fsio.write_text_atomic(tmp / "dpo_config.yaml", yaml.safe_dump(src.settings, sort_keys=False))
    fsio.write_text_atomic(tmp / "README.md", model_card(src, provenance))


def write_model_files(src: Source, tmp: Path, trust_remote_code: bool) -> None:
    """config.json (the written dtype, no quantization), generation_config.json, the tokenizer with its chat
    template: everything but the weights, from the base folder."""
    from transformers import AutoTokenizer

    config = _json(src.base / "config.json")
    config.pop("quantization_config", None)
    name = CONFIG_DTYPE[src.dtype]
    config.update({"dtype": name} if "dtype" in config or "torch_dtype" not in config else {"torch_dtype": name})
    fsio.write_text_atomic(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src.base / "generation_config.json").is_file():
        shutil.copyfile(src.base / "generation_config.json", tmp / "generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(src.base), trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(str(tmp))


def export_record(cfg: ExportConfig, src: Source, report, gguf_file: Path | None, seconds: float) -> dict:
    """export.json: what the card says, as data."""
    from stages import __version__

    record = {"tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "source": str(src.run or src.adapter), "adapter": str(src.adapter), "base": str(src.base),
              "sft_adapter": src.sft_adapter, "dtype": src.dtype, "merge_into": cfg.merge_into,
              "base_nf4_in_training": src.nf4, "training_dtype": src.compute_dtype,
              "max_shard_size": cfg.max_shard_size, "merge": getattr(report, "__dict__", report),
              "gguf": gguf_file.name if gguf_file else None, "seconds": round(seconds, 2)}
    if src.meta:
        record["cache"] = {"path": src.settings.get("ref_cache"), "manifest": src.meta.get("manifest"),
                           "data": src.meta.get("data"), "model": src.meta.get("model")}
    return record


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp -> out by rename; an old `out` (--overwrite) is moved aside first and deleted only after."""
    old = None
    if out.exists() and overwrite:
        old = out.with_name(f".{out.name}{fsio.TMP_MARK}old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); restore or regenerate it") from None
