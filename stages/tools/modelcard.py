"""The exported model's README.md: a Hugging Face model card (YAML front matter: base model, license when the
base's own card states one, library, tags) that says how the model was made, from export.json's record and the
run's settings, cache metadata and summary.json. Nothing here is guessed: what the run did not record is left out.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import yaml

LOSS_KEYS = ("loss", "beta", "label_smoothing", "sft_weight", "use_weighting", "ld_alpha", "f_divergence")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
OPTIM_KEYS = ("learning_rate", "lr_scheduler", "warmup_ratio", "batch_size", "gradient_accumulation_steps",
              "max_steps", "epochs", "seed")
METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
           "eval/rewards/rejected")


def model_card(src, record: dict) -> str:
    """The card for `src` (tools.export.Source) and its export record."""
    front = {"base_model": str(src.base), "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["dpo", "dpo-stages", "lora", "merged"] + (["qlora"] if src.nf4 else [])}
    license_ = base_license(src.base)
    if license_:
        front["license"] = license_
    body = [f"# {Path(record['source']).name} (merged)", "",
            f"{src.base} with a LoRA adapter trained by DPO, merged into the weights: load it with transformers, "
            "vLLM, TGI or (with the GGUF) llama.cpp, no PEFT needed. Made with dpo-stages "
            f"{record['tool_version']} on {record['created']}.", "",
            "## How it was made", "", *made_lines(src, record), "",
            *metric_lines(src.summary), *command_lines(src, record), *use_lines(record)]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body).rstrip() + "\n"


def base_license(base: Path) -> str | None:
    """The `license` of the base's own model card front matter, if it has one."""
    card = base / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def manifest_digest(manifest: dict | None) -> str | None:
    """A short identity of the cache's fingerprint (its manifest: model, adapter, dtype, quantization, tokenizer,
    lengths, example ids): the first 16 hex digits of its canonical JSON's SHA-256."""
    if not manifest:
        return None
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def made_lines(src, record: dict) -> list[str]:
    s, meta = src.settings, src.meta
    weights = ((meta.get("model") or {}).get("weights") or {}).get("hash")
    lines = [f"- Base: `{src.base}`" + (f" (weights fingerprint `{weights}`)" if weights else ""),
             f"- Training: {'NF4 base (QLoRA), ' if src.nf4 else ''}compute dtype {src.compute_dtype}; exported "
             f"in {src.dtype}, LoRA merged into the {record['merge_into']} base weights"
             + (" (their NF4 round trip, what the adapter was trained against)"
                if record["merge_into"] == "dequantized" else ""),
             f"- SFT adapter: `{src.sft_adapter}` (the run continued it: its weights are part of the merged "
             "adapter)" if src.sft_adapter else "- SFT adapter: none"]
    if meta.get("data"):
        files = ", ".join(f"`{f}` ({n} rows)" for f, n in meta["data"].get("files", {}).items())
        lines.append(f"- Reference cache data: {files}; {meta['data'].get('rows_kept', '?')} rows kept")
    if s:
        lines.append(f"- Training data: {', '.join(f'`{d}`' for d in s.get('data') or ())}"
                     + (f"; eval: {', '.join(f'`{d}`' for d in s['eval_data'])}" if s.get("eval_data") else ""))
        manifest = meta.get("manifest") or {}
        lines.append(f"- Reference cache: `{s.get('ref_cache')}`, fingerprint `{manifest_digest(manifest)}` (SHA-256 "
                     f"of its manifest), example ids digest `{manifest.get('ids_digest')}`")
        lines.append("- Loss: " + _pairs(s, LOSS_KEYS) + (f"; {src.summary['steps']} steps" if src.summary else ""))
        lines.append("- LoRA: " + _pairs(s, LORA_KEYS))
        lines.append("- Optimizer and schedule: " + _pairs(s, OPTIM_KEYS))
    return lines


def metric_lines(summary: dict) -> list[str]:
    out = []
    for title, key in (("Final eval", "final_eval"), ("Best eval (by reward accuracy)", "best_eval")):
        record = summary.get(key) or {}
        values = [f"{m.removeprefix('eval/')} {record[m]:.4g}" for m in METRICS if m in record]
        if values:
            out.append(f"- {title} at step {record.get('step')}: " + ", ".join(values))
    return ["## Metrics", "", *out, ""] if out else []


def command_lines(src, record: dict) -> list[str]:
    lines = ["## Commands", "", "```bash"]
    if src.meta:
        lines.append("# stage one, reconstructed from the cache's metadata")
        lines.append(precompute_command(src.meta, src.settings.get("ref_cache")))
    if src.settings:
        lines.append("# stage two: the run's resolved settings, shipped next to this card")
        lines.append("dpo train --config dpo_config.yaml")
    lines.append(export_command(record))
    return lines + ["```", ""]


def precompute_command(meta: dict, cache: str | None) -> str:
    tok = meta.get("tokenization") or {}
    words = ["dpo", "precompute-ref", "--model", str((meta.get("model") or {}).get("path"))]
    for f in (meta.get("data") or {}).get("files", {}):
        words += ["--data", f]
    words += ["--output", str(cache), "--max-length", str(tok.get("max_length")),
              "--max-prompt-length", str(tok.get("max_prompt_length")), "--dtype", str(meta.get("dtype"))]
    if meta.get("quantization", "none") != "none":
        words.append("--load-in-4bit")
    if (meta.get("adapter") or {}).get("path"):
        words += ["--adapter", meta["adapter"]["path"]]
    return " ".join(shlex.quote(w) for w in words)


def export_command(record: dict) -> str:
    words = ["dpo", "export", record["source"], "--output", record.get("output", "OUT"), "--dtype", record["dtype"],
             "--merge-into", record["merge_into"], "--max-shard-size", record["max_shard_size"]]
    return " ".join(shlex.quote(w) for w in words) + (" --gguf" if record.get("gguf") else "")


def use_lines(record: dict) -> list[str]:
    lines = ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("OUT")',
             'tokenizer = AutoTokenizer.from_pretrained("OUT")', "```", "", "```bash", "vllm serve OUT"]
    if record.get("gguf"):
        lines.append(f"llama-server -m OUT/{record['gguf']}")
    return lines + ["```"]


def _pairs(settings: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {settings[k]}" for k in keys if settings.get(k) not in (None, (), []))
