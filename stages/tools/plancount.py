"""`dpo plan`'s model side: a Hugging Face config.json read into the sizes the arithmetic needs, and exact
parameter counts of a dense Llama/Qwen-style decoder (no weights are read). The memory arithmetic:
stages/tools/plan.py."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from stages.base.errors import UserError

# Model types whose decoder layer is exactly: RMSNorm, q/k/v/o attention, RMSNorm, gate/up/down SwiGLU MLP.
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """The config keys the arithmetic needs, with Hugging Face defaults filled in."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool     # qwen2 always; llama-style `attention_bias`
    o_bias: bool       # llama-style `attention_bias` only (qwen2 has no o_proj bias)
    mlp_bias: bool
    qk_norm: bool      # qwen3: RMSNorm over head_dim on q and k
    ckpt_bytes: int = 2  # bytes per weight in the checkpoint files: config's torch_dtype/dtype (bf16 if absent)


def _check_model_path(model: str) -> None:
    """A model that is no local folder or file (a Hub id, another machine's path) is refused naming the shipped
    config JSON nearest its name (configs/models/NAME/config.json, here or in the checkout), else a few of them."""
    roots = (Path("configs/models"), Path(__file__).resolve().parents[2] / "configs" / "models")
    root = next((r for r in roots if r.is_dir() and any(r.glob("*/config.json"))), None)
    if Path(model).exists() or root is None:  # else load_model_config says what is missing
        return
    names = sorted(p.parent.name for p in root.glob("*/config.json"))
    near = difflib.get_close_matches(Path(model).name.lower(), names, n=1, cutoff=0.6)
    where = f"dpo plan: --model {model}: no such folder or config JSON (nothing is downloaded)"
    more = f" (+{len(names) - 2} more)" if len(names) > 2 else ""
    fix = f"--model {root / near[0]}" if near else f"--model {root}/NAME, NAME one of {', '.join(names[:2])}{more}"
    raise UserError(f"{where}; pass {fix}")


def load_model_config(path: str | Path) -> dict:
    """Read config.json from a model folder, or a config JSON file; unwrap `text_config` (multimodal)."""
    _check_model_path(str(path))
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"dpo plan: {f} not found; pass --model a model folder with config.json or a config JSON file")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"dpo plan: {f} is not valid JSON ({e}); pass the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"dpo plan: {f} holds a JSON {type(config).__name__}, expected an object (config.json)")
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    return config


def model_shape(config: dict) -> Shape:
    """Pull the sizes out of a Hugging Face config dict; UserError naming the key when one is missing."""
    for key in _MOE_KEYS:
        if config.get(key):
            raise UserError(f"dpo plan: config has {key}={config[key]} (mixture of experts); only dense "
                            f"Llama/Qwen-style decoders are supported")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for key in need:
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise UserError(f"dpo plan: model config lacks a positive integer {key!r} (got {config.get(key)!r})")
    h, heads = config["hidden_size"], config["num_attention_heads"]
    model_type = str(config.get("model_type", "unknown"))
    attention_bias = bool(config.get("attention_bias", False))
    return Shape(model_type=model_type, hidden=h, intermediate=config["intermediate_size"],
                 layers=config["num_hidden_layers"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads,
                 head_dim=config.get("head_dim") or h // heads, vocab=config["vocab_size"],
                 tied=bool(config.get("tie_word_embeddings", False)),
                 qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                 mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
                 ckpt_bytes=_DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2))


def linear_shapes(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in one decoder layer."""
    q_d, kv_d = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"q": (s.hidden, q_d), "k": (s.hidden, kv_d), "v": (s.hidden, kv_d), "o": (q_d, s.hidden),
            "gate": (s.hidden, s.intermediate), "up": (s.hidden, s.intermediate),
            "down": (s.intermediate, s.hidden)}


def count_parameters(config: dict) -> dict[str, int]:
    """Exact parameter counts of a dense Llama/Qwen2/Qwen3-style decoder.

    per layer: attn = h·q_d + 2·h·kv_d + q_d·h (+ q_d + 2·kv_d biases if qkv bias, + h if o bias)
                      (+ 2·head_dim for qwen3's q_norm/k_norm)
               mlp  = 3·h·i (+ 2·i + h with mlp_bias);  norms = 2·h (input and post-attention RMSNorm)
    total = V·h (embed) + V·h (lm_head, 0 if tied) + L·(attn + mlp + norms) + h (final norm).
    linear_weights = L · (weights of q,k,v,o,gate,up,down) — what NF4 quantises; other = total − that.
    """
    s = model_shape(config)
    shapes = linear_shapes(s)
    lin = {name: a * b for name, (a, b) in shapes.items()}
    q_d, kv_d = shapes["q"][1], shapes["k"][1]
    attn = lin["q"] + lin["k"] + lin["v"] + lin["o"]
    attn += (q_d + 2 * kv_d) * s.qkv_bias + s.hidden * s.o_bias + 2 * s.head_dim * s.qk_norm
    mlp = lin["gate"] + lin["up"] + lin["down"] + (2 * s.intermediate + s.hidden) * s.mlp_bias
    norms = 2 * s.hidden
    per_layer = attn + mlp + norms
    embed = s.vocab * s.hidden
    lm_head = 0 if s.tied else s.vocab * s.hidden
    total = embed + lm_head + s.layers * per_layer + s.hidden
    linear = s.layers * sum(lin.values())
    return {"embed": embed, "lm_head": lm_head, "attn_per_layer": attn, "mlp_per_layer": mlp,
            "norms_per_layer": norms, "per_layer": per_layer, "num_layers": s.layers, "final_norm": s.hidden,
            "total": total, "linear_weights": linear, "linear_per_layer": sum(lin.values()),
            "other": total - linear}


def lora_parameters(config: dict, r: int) -> int:
    """LoRA on every decoder linear (q,k,v,o,gate,up,down): A is in×r, B is r×out, so r·(in+out) each."""
    return lora_parameters_from_shape(model_shape(config), r)


def largest_linear(s: Shape) -> int:
    return max(a * b for a, b in linear_shapes(s).values())


def lora_parameters_from_shape(s: Shape, r: int) -> int:
    """L · Σ r·(in + out) over q,k,v,o,gate,up,down."""
    return s.layers * sum(r * (a + b) for a, b in linear_shapes(s).values())
