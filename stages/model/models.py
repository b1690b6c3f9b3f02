"""Loading models: plain or NF4 base, optional PEFT adapter, the CPU bitsandbytes fix (fingerprints: fingerprint.py).

Both stages load through `load_model`, so `--load-in-4bit` in stage one quantises exactly as stage two does and
the policy equals the reference at step 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.base.errors import UserError
from stages.base.progress import say
from stages.model.quiet import import_bitsandbytes, quiet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOAD_COUNT = {"models": 0}  # every model load; tests assert that stage two loads exactly one


@dataclass(frozen=True)
class ModelSpec:
    path: str
    dtype: str = "auto"            # fp32 | bf16 | fp16 | auto (fp32 on CPU, bf16 on GPU)
    load_in_4bit: bool = False
    adapter: str | None = None
    trust_remote_code: bool = False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype setting (checked by the settings: auto or a DTYPES key) on this device."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_model_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"--model {path}: no such folder; pass a local Hugging Face model folder "
                        "(nothing is downloaded)")
    if not p.is_dir():
        raise UserError(f"--model {path}: a file, not a folder; pass the model folder that holds config.json")
    if not (p / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json there; pass a local Hugging Face model folder")
    if not list(p.glob("*.safetensors")):
        raise UserError(f"--model {path}: no *.safetensors weights; only safetensors are loaded (convert .bin first)")
    return p


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # padding is always masked, so any id will do
        tok.pad_token = tok.eos_token
    return tok


def fix_bnb_cpu(model) -> int:
    """bitsandbytes on CPUs with AVX512-BF16 repacks Linear4bit weights in any no-grad forward, after which
    gradients through the base are silently wrong. Switch that path off on every Linear4bit; returns how many."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no Linear4bit anywhere (and no import just to look)
    if bnb is None:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_model(spec: ModelSpec, device: torch.device, trainable_adapter: bool = False, env=None, replicas: int = 1):
    """Causal LM from a local safetensors folder, frozen; adapter on top if given (trainable if asked). Under torchrun
    (`env` with several ranks) sharded with FSDP2, each rank loading only its own shard (stages/model/loading.py)."""
    model, dtype = _meta_base(spec, device)
    if spec.adapter:
        model = _with_adapter(model, spec.adapter, trainable_adapter)
    return _shard_and_fill(model, spec, device, dtype, env, replicas)


def _meta_base(spec: ModelSpec, device: torch.device):
    """The base on the meta device (NF4 layers swapped in when asked): nothing allocated, nothing read yet."""
    quiet()
    from transformers.utils import logging as hf_logging

    from stages.model.loading import meta_model, quantize_meta

    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars drown our own progress
    check_model_dir(spec.path)
    dtype = resolve_dtype(spec.dtype, device)
    model = meta_model(spec.path, dtype, spec.trust_remote_code)
    if spec.load_in_4bit:
        quantize_meta(model, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dtype


def _with_adapter(model, adapter: str, trainable: bool):
    import_bitsandbytes(required=False)  # PEFT imports it: first here, quietly
    from peft import PeftModel

    from stages.model.loading import lora_off_meta

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there; pass a PEFT adapter folder")
    with lora_off_meta():
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)


def _shard_and_fill(model, spec: ModelSpec, device: torch.device, dtype: torch.dtype, env, replicas: int):
    from stages.model.distributed import DistEnv, shard_model
    from stages.model.loading import materialize

    env = env or DistEnv(0, 1, 0, device)
    shard_model(model, env, replicas=replicas)
    unused = materialize(model, Path(spec.path), device, dtype, env)
    if unused:  # e.g. a tied head saved twice; anything else means the folder holds more than this architecture
        say(env, f"load: {len(unused)} tensor(s) in {spec.path} unused by the {model.config.model_type} "
                 f"architecture (first: {unused[0]})")
    LOAD_COUNT["models"] += 1
    fix_bnb_cpu(model)
    return model


def quantization_name(spec: ModelSpec) -> str:
    """What the cache records (and stage two compares): NF4's storage and double quantization, or none."""
    from stages.model.loading import NF4_STORAGE

    storage = str(NF4_STORAGE).removeprefix("torch.")
    return f"nf4(storage={storage},double_quant=False)" if spec.load_in_4bit else "none"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)  # PEFT's all-linear: every linear layer but the LM head


def load_policy(spec: ModelSpec, lora: LoraSettings, device: torch.device, gradient_checkpointing: bool,
                env=None, replicas: int = 1):
    """The one model stage two holds: frozen (NF4) base + trainable LoRA (new, or `spec.adapter` continued), sharded
    under torchrun. The LoRA weights are drawn on CPU as PEFT draws them (same seed, same values at any world size)."""
    import_bitsandbytes(required=False)  # PEFT imports it: first here, quietly
    from peft import LoraConfig, get_peft_model

    from stages.model.loading import lora_off_meta

    model, dtype = _meta_base(spec, device)
    if spec.adapter:
        model = _with_adapter(model, spec.adapter, trainable=True)
    if gradient_checkpointing:
        base = model.get_base_model() if spec.adapter else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if not spec.adapter:
        targets = "all-linear" if tuple(lora.target_modules) == ("all-linear",) else list(lora.target_modules)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=targets, task_type="CAUSAL_LM")
        with lora_off_meta():
            model = get_peft_model(model, config)
    return _shard_and_fill(model, spec, device, dtype, env, replicas)
