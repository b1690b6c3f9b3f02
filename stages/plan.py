"""`dpo plan`: per-GPU memory estimates from a model's config.json alone (no weights are read).

Units: 1 GiB = 2**30 bytes. A GPU sold as "80GB" (H100, A100-80G) has 80 GiB of memory, so `--gpu-memory 80GB`
is read as 80 GiB; every figure printed is GiB. Estimates are upper-bound-ish arithmetic, not measurements:
expect the real peak to be within roughly ±15%, allocator fragmentation not included.

Notation used in the docstrings (all per GPU unless stated):
    P      total parameters (count_parameters()["total"]); P_lin = decoder linear weights (what NF4 quantises),
           P_oth = P − P_lin (embeddings, lm_head, norms, biases: kept in bf16 under NF4)
    P_lay  parameters of one decoder layer; P_root = max(embed, lm_head) (the biggest non-layer FSDP unit)
    A      LoRA parameters (lora_parameters())
    N      GPUs; L layers; h hidden; i intermediate; V vocab; q_d = heads·head_dim; kv_d = kv_heads·head_dim
    T      training tokens per GPU per step = batch · 2 · seq_len (chosen and rejected of each example)
    T1     stage-one tokens per forward = max_tokens_per_batch
    C      logits chunk = min(LOGITS_CHUNK_TOKENS, tokens)
    nf4(n) = n/2 + 4n/64 bytes: 4-bit codes + one fp32 absmax per 64-block, as stages/models.py loads NF4
           (bnb_4bit_use_double_quant=False). With double quantisation (NF4_DOUBLE_QUANT = True) the absmax
           is 8-bit: n/2 + n/64 + 4·n/(64·256).
A fixed OVERHEAD_BYTES = 2 GiB per GPU is added to every scenario for the CUDA context, cuBLAS workspaces and
NCCL buffers (not with --cpu: then a "GPU" is one CPU process and the figures are what its tensors hold, weights
counted whole as a GPU holds them, whether or not a CPU run has paged them in). Attention is assumed to be
SDPA/flash (no seq_len² score matrix is stored). With one GPU nothing is sharded, so nothing is all-gathered.
--layers N counts the model with N decoder layers (the widths unchanged): what bench/bench_72b.py measures.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from stages.errors import UserError

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB          # CUDA context + cuBLAS workspace + NCCL buffers, per GPU
LOGITS_CHUNK_TOKENS = 256         # = stages.logprobs.DEFAULT_CHUNK: positions per chunk in the log-prob head
NF4_DOUBLE_QUANT = False          # as stages/models.py loads NF4 (fp32 absmax per 64-block)
BF16, FP32 = 2, 4
# Model types whose decoder layer is exactly: RMSNorm, q/k/v/o attention, RMSNorm, gate/up/down SwiGLU MLP.
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class PlanConfig:
    model: str                          # a model folder with config.json, or a config JSON file
    gpus: int = 8
    gpu_memory_gb: float = 80.0         # GiB per GPU
    seq_len: int = 2048                 # max tokens of prompt + completion, per sequence
    batch: int = 1                      # preference pairs per GPU per optimizer micro-step (stage two)
    lora_r: int = 16
    max_tokens_per_batch: int = 16384   # stage-one token budget per forward, per GPU
    gradient_checkpointing: bool = True
    layers: int | None = None           # count the model with this many decoder layers (default: the config's)
    cpu: bool = False                   # one CPU process per "GPU": no CUDA/NCCL overhead


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


@dataclass(frozen=True)
class Scenario:
    key: str                     # "naive", "online_ref", "stage1_bf16", "stage1_nf4", "stage2"
    title: str
    breakdown: dict[str, int]    # label -> bytes per GPU, in display order; sums to total
    total: int                   # bytes per GPU
    fits: bool


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    model_type: str
    counts: dict[str, int]       # count_parameters()
    lora_params: int
    capacity: int                # bytes per GPU
    scenarios: tuple[Scenario, ...]
    suggestions: tuple[str, ...]
    notes: tuple[str, ...]
    shape: Shape

    def scenario(self, key: str) -> Scenario:
        return next(s for s in self.scenarios if s.key == key)


# ----------------------------------------------------------------------------------------------- config

def load_model_config(path: str | Path) -> dict:
    """Read config.json from a model folder, or a config JSON file; unwrap `text_config` (multimodal)."""
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
                 mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type == "qwen3")


def _linear_shapes(s: Shape) -> dict[str, tuple[int, int]]:
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
    shapes = _linear_shapes(s)
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


# ----------------------------------------------------------------------------------------------- memory

def nf4_bytes(n: int, double_quant: bool | None = None) -> int:
    """Bytes of n weights in NF4: n/2 (4-bit codes) + one absmax per 64-block, fp32 (4n/64) by default as
    stages/models.py loads it, or 8-bit (n/64) plus fp32 second-level constants per 256 blocks with double quant."""
    dq = NF4_DOUBLE_QUANT if double_quant is None else double_quant
    blocks = _cdiv(n, 64)
    return _cdiv(n, 2) + (blocks + 4 * _cdiv(blocks, 256) if dq else 4 * blocks)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_activation_bytes_per_token(s: Shape) -> int:
    """Bytes one decoder layer keeps per token for its backward (also used as stage one's per-layer peak):

        bf16 tensors: 5h (norm1 out, o_proj out, residual, norm2 out, down out) + 3·q_d (q, rotated q,
                      attention out) + 3·kv_d (k, v, rotated k) + 4i (gate, up, act(gate), act·up)
        fp32:         2h (the RMSNorm inputs upcast to fp32, both norms) + heads (SDPA logsumexp)
        => 2·(5h + 3·q_d + 3·kv_d + 4i) + 4·(2h + heads)
    """
    q_d, kv_d = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return BF16 * (5 * s.hidden + 3 * q_d + 3 * kv_d + 4 * s.intermediate) + FP32 * (2 * s.hidden + s.heads)


def lora_input_bytes_per_token(s: Shape, r: int) -> int:
    """Extra per-token bytes LoRA keeps in one layer: each adapted linear saves its dropout-ed input (peft
    copies x when lora_dropout > 0; an overestimate at dropout 0) and its r-dim A·x output, in bf16:
        2·(3h [q,k,v] + q_d [o] + 2h [gate, up] + i [down]) + 2·7r"""
    q_d = s.heads * s.head_dim
    return BF16 * (5 * s.hidden + q_d + s.intermediate) + BF16 * 7 * r


def training_activations(s: Shape, cfg: PlanConfig, lora: bool) -> dict[str, int]:
    """Activation bytes per GPU for one training micro-step over T = batch·2·seq_len tokens.

    checkpointing on : L·T·h·2 (one bf16 hidden state per layer boundary)
                       + 2·T·a (the recomputed layer's saved tensors a = per-token layer bytes, plus their
                       gradients while its backward runs)
    checkpointing off: L·T·a (every layer's saved tensors) + T·a (gradients of one layer)
    log-prob head    : C·V·(2+4+4+2) (stages.logprobs checkpoints each chunk, so at most one chunk's bf16
                       logits, their fp32 copy, and the two gradients exist at once)
                       + 3·T·h·2 (final hidden states, the gathered completion positions, their gradient)
    """
    T = cfg.batch * 2 * cfg.seq_len
    a = layer_activation_bytes_per_token(s) + (lora_input_bytes_per_token(s, cfg.lora_r) if lora else 0)
    C = min(LOGITS_CHUNK_TOKENS, T)
    head = C * s.vocab * (BF16 + FP32 + FP32 + BF16) + 3 * T * s.hidden * BF16
    if cfg.gradient_checkpointing:
        return {"activations: layer checkpoints": s.layers * T * s.hidden * BF16,
                "activations: one layer recomputed + grads": 2 * T * a, "log-prob head": head}
    return {"activations: all layers saved": s.layers * T * a, "activations: one layer grads": T * a,
            "log-prob head": head}


def inference_layer_bytes_per_token(s: Shape) -> int:
    """Bytes alive at once inside one decoder layer's no-grad forward (nothing is saved for a backward, so
    tensors die as soon as they are used): the larger of the attention phase (2h: normed input + attention
    out; 3·q_d + 3·kv_d: q, k, v and their rotated copies) and the MLP phase (h + 3i: normed input, gate, up,
    act(gate) - then gate dies and act·up takes its place), in bf16, plus the RMSNorm's fp32 input and output
    (4·2h). Measured at Qwen2.5-72B widths (bench/bench_72b.py): the training figure
    layer_activation_bytes_per_token() overstated stage one's transient 1.7x."""
    q_d, kv_d = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return BF16 * max(2 * s.hidden + 3 * q_d + 3 * kv_d, s.hidden + 3 * s.intermediate) + FP32 * 2 * s.hidden


def inference_activations(s: Shape, cfg: PlanConfig) -> dict[str, int]:
    """Stage-one forward (no grad) over T1 = max_tokens_per_batch tokens:
    hidden states 2·T1·h·2 (residual stream into and out of a layer) + T1·inference_layer_bytes_per_token
    + C·V·(2+4) + T1·h·2 (one chunk of bf16 logits and its fp32 copy; the gathered completion positions)."""
    T1 = cfg.max_tokens_per_batch
    C = min(LOGITS_CHUNK_TOKENS, T1)
    return {"activations: hidden states": 2 * T1 * s.hidden * BF16,
            "activations: one layer": T1 * inference_layer_bytes_per_token(s),
            "log-prob head": C * s.vocab * (BF16 + FP32) + T1 * s.hidden * BF16}


def _root_params(c: dict[str, int]) -> int:
    """FSDP's root unit (embed, final norm, lm_head: everything outside the decoder layers); unsharded in bf16
    from the forward through the backward under the usual transformer-layer wrap policy."""
    return c["embed"] + c["lm_head"] + c["final_norm"]


def _layer_nf4_bytes(c: dict[str, int]) -> int:
    """One decoder layer with its linear weights in NF4 and its norms/biases in bf16."""
    return nf4_bytes(c["linear_per_layer"]) + BF16 * (c["per_layer"] - c["linear_per_layer"])


def _base_nf4_bytes(c: dict[str, int]) -> int:
    """Whole model, NF4 linears + bf16 rest: nf4(P_lin) + 2·P_oth."""
    return nf4_bytes(c["linear_weights"]) + BF16 * c["other"]


def _finish(key: str, title: str, parts: dict[str, int], capacity: int, cpu: bool = False) -> Scenario:
    parts = parts if cpu else {**parts, "CUDA/NCCL overhead (fixed)": OVERHEAD_BYTES}
    total = sum(parts.values())
    return Scenario(key, title, parts, total, total <= capacity)


def _gathered(n: int, sharded_units: int, dequant: int = 0) -> dict[str, int]:
    """FSDP's unsharded working set (n > 1), or, on one GPU where nothing is sharded, only the NF4 matmul's
    dequantised bf16 copy of the largest linear (bitsandbytes materialises it for batched inputs)."""
    if n > 1:
        return {"all-gathered params (FSDP)": sharded_units + dequant}
    return {"dequantised NF4 linear (one GPU)": dequant} if dequant else {}


def scenario_naive(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int) -> Scenario:
    """Naive two-model DPO, full fine-tuning in bf16 with AdamW, policy and reference both FSDP-sharded:
        sharded    : 4P/N (policy bf16 weights + bf16 grads) + 12P/N (AdamW fp32 master, m, v)
                     + 2P/N (bf16 reference)                       = 18 bytes/param / N
        gathered   : 3·2·P_lay (current + prefetched layer, and that layer's unsharded grads)
                     + 2·2·P_root (root unit weights and grads); none on one GPU
        activations: training_activations (same batch and checkpointing as stage two, no LoRA); the
                     reference forward runs before the policy's and needs less, so it adds nothing at peak.
    """
    n = cfg.gpus
    parts = {"policy weights + grads, bf16 (sharded)": _cdiv(4 * c["total"], n),
             "AdamW fp32 master + m + v (sharded)": _cdiv(12 * c["total"], n),
             "reference weights (sharded)": _cdiv(BF16 * c["total"], n),
             **_gathered(n, 3 * BF16 * c["per_layer"] + 2 * BF16 * _root_params(c)),
             **training_activations(s, cfg, lora=False)}
    return _finish("naive", "naive DPO", parts, capacity, cfg.cpu)


def scenario_stage1(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int, nf4: bool) -> Scenario:
    """Stage one, reference log-probs, forward only, reference FSDP-sharded:
        bf16: sharded 2P/N; gathered 2·2·P_lay (current + prefetched layer) + 2·P_root
        nf4 : sharded (nf4(P_lin) + 2·P_oth)/N; gathered 2·layer_nf4 + 2·P_root (embeddings and lm_head are not
              quantised) + 2·h·i (the largest linear, dequantised to bf16 for its matmul; also on one GPU)
        activations: inference_activations over max_tokens_per_batch tokens.
    """
    n = cfg.gpus
    if nf4:
        weights = _cdiv(_base_nf4_bytes(c), n)
        gathered = _gathered(n, 2 * _layer_nf4_bytes(c) + BF16 * _root_params(c), BF16 * _largest_linear(s))
    else:
        weights = _cdiv(BF16 * c["total"], n)
        gathered = _gathered(n, 2 * BF16 * c["per_layer"] + BF16 * _root_params(c))
    parts = {"reference weights (sharded)": weights, **gathered, **inference_activations(s, cfg)}
    key, title = ("stage1_nf4", "stage 1 NF4") if nf4 else ("stage1_bf16", "stage 1 bf16")
    return _finish(key, title, parts, capacity, cfg.cpu)


def _stage2_parts(s: Shape, c: dict[str, int], cfg: PlanConfig) -> dict[str, int]:
    n, a = cfg.gpus, lora_parameters_from_shape(s, cfg.lora_r)
    a_lay = a // s.layers
    return {"base weights NF4 (sharded)": _cdiv(_base_nf4_bytes(c), n),
            "LoRA weights + grads + AdamW (sharded)": _cdiv(18 * a, n),
            **_gathered(n, 2 * (_layer_nf4_bytes(c) + BF16 * a_lay) + FP32 * a_lay + BF16 * _root_params(c),
                        BF16 * _largest_linear(s)),
            **training_activations(s, cfg, lora=True)}


def scenario_stage2(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int) -> Scenario:
    """Stage two, QLoRA policy against cached reference log-probs (no reference model in memory):
        sharded    : (nf4(P_lin) + 2·P_oth)/N for the frozen base
                     + 18A/N for LoRA (bf16 weights 2 + fp32 grads 4 + AdamW fp32 master, m, v 12)
        gathered   : 2·(layer_nf4 + 2·A_lay) (current + prefetched layer with its adapters) + 4·A_lay
                     (that layer's unsharded fp32 LoRA grads) + 2·P_root; + 2·h·i (largest linear dequantised,
                     forward and again in backward; also on one GPU)
        activations: training_activations with the LoRA inputs added per layer.
    """
    return _finish("stage2", "stage 2 QLoRA", _stage2_parts(s, c, cfg), capacity, cfg.cpu)


def scenario_online_ref(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int) -> Scenario:
    """What users would really run instead: QLoRA with the reference computed online by switching the adapters
    off (TRL's default with a PEFT model). Same weights as stage two, no second copy. TRL 1.16 (`_compute_loss`)
    runs the policy forward, THEN the no-grad reference forward while the policy's saved tensors are held, then
    the backward. So the reference adds its forward transient on top of the policy's saved activations:
        reference forward: 2·T·h·2 (residual stream in and out of a layer) + T·a (one layer's intermediates)
                           + one head chunk C·V·(2+4) (TRL 1.16's fused head also works in tiles)
        extra at peak     = max(0, reference forward − the backward's own transient (2·T·a with checkpointing,
                            T·a without)): usually 0 with checkpointing — the online reference costs time (one
                            more forward per step), hardly memory. A trainer that materialises full logits
                            (a plain HF forward) pays [2B, T, V] instead of a chunk: see format_plan's notes."""
    parts = _stage2_parts(s, cfg=cfg, c=c)
    T = cfg.batch * 2 * cfg.seq_len
    a = layer_activation_bytes_per_token(s) + lora_input_bytes_per_token(s, cfg.lora_r)
    ref = 2 * T * s.hidden * BF16 + T * layer_activation_bytes_per_token(s) + \
        min(LOGITS_CHUNK_TOKENS, T) * s.vocab * (BF16 + FP32)
    backward = (2 if cfg.gradient_checkpointing else 1) * T * a
    parts["reference forward, adapters off (extra at peak)"] = max(0, ref - backward)
    return _finish("online_ref", "QLoRA+online ref", parts, capacity, cfg.cpu)


def full_logits_bytes(s: Shape, cfg: PlanConfig) -> int:
    """[2B, T, V] logits of one step when a trainer materialises them: bf16 logits + their fp32 log_softmax
    (saved for backward) for the policy, and the same for the reference forward held alongside."""
    return 2 * cfg.batch * 2 * cfg.seq_len * s.vocab * (BF16 + FP32)


def _largest_linear(s: Shape) -> int:
    return max(a * b for a, b in _linear_shapes(s).values())


def lora_parameters_from_shape(s: Shape, r: int) -> int:
    """L · Σ r·(in + out) over q,k,v,o,gate,up,down."""
    return s.layers * sum(r * (a + b) for a, b in _linear_shapes(s).values())


# ----------------------------------------------------------------------------------------------- plan

def _check(cfg: PlanConfig) -> None:
    for name in ("gpus", "seq_len", "batch", "lora_r", "max_tokens_per_batch") + (("layers",) if cfg.layers else ()):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"dpo plan: --{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not cfg.gpu_memory_gb > 0:
        raise UserError(f"dpo plan: --gpu-memory must be > 0, got {cfg.gpu_memory_gb!r}")


def _all_scenarios(s: Shape, c: dict[str, int], cfg: PlanConfig) -> tuple[Scenario, ...]:
    cap = int(cfg.gpu_memory_gb * GIB)
    return (scenario_naive(s, c, cfg, cap), scenario_online_ref(s, c, cfg, cap),
            scenario_stage1(s, c, cfg, cap, nf4=False), scenario_stage1(s, c, cfg, cap, nf4=True),
            scenario_stage2(s, c, cfg, cap))


def _fits(s: Shape, c: dict[str, int], cfg: PlanConfig, key: str) -> bool:
    cap = int(cfg.gpu_memory_gb * GIB)
    if key == "naive":
        return scenario_naive(s, c, cfg, cap).fits
    if key == "stage2":
        return scenario_stage2(s, c, cfg, cap).fits
    if key == "online_ref":
        return scenario_online_ref(s, c, cfg, cap).fits
    return scenario_stage1(s, c, cfg, cap, nf4=key == "stage1_nf4").fits


def _min_gpus(s: Shape, c: dict[str, int], cfg: PlanConfig, key: str, limit: int = 4096) -> int | None:
    """Fewest GPUs (of this size) on which `key` fits; None if the unsharded part alone is too big."""
    for n in range(1, limit + 1):
        if _fits(s, c, replace(cfg, gpus=n), key):
            return n
    return None


def _largest(s: Shape, c: dict[str, int], cfg: PlanConfig, key: str, field: str, start: int, stop: int):
    """Largest value of `field`, halving from `start` down to `stop`, at which `key` fits (None if none)."""
    v = start
    while v >= stop:
        if _fits(s, c, replace(cfg, **{field: v}), key):
            return v
        v //= 2
    return None


def _gpus_text(n: int | None) -> str:
    if n is None:
        return "does not fit on any number of these GPUs at this seq_len/batch"
    return f"needs at least {n} such GPUs" + (f" ({math.ceil(n / 8)} nodes of 8)" if n > 8 else "")


def _suggest_stage1(s: Shape, c: dict[str, int], cfg: PlanConfig, sc: dict[str, Scenario]) -> list[str]:
    """When the bf16 reference does not fit: a smaller token budget, an NF4 reference, more GPUs."""
    if sc["stage1_bf16"].fits:
        return []
    out = []
    t = _largest(s, c, cfg, "stage1_bf16", "max_tokens_per_batch", cfg.max_tokens_per_batch // 2, cfg.seq_len)
    if t:
        out.append(f"stage 1: --max-tokens-per-batch {t} fits with a bf16 reference")
    if sc["stage1_nf4"].fits:
        out.append(f"stage 1: load the reference in NF4 ({sc['stage1_nf4'].total / GIB:.1f} GiB per GPU); it then "
                   f"equals stage two's NF4 base, so the policy starts exactly at the reference")
    out.append(f"stage 1 with a bf16 reference {_gpus_text(_min_gpus(s, c, cfg, 'stage1_bf16'))}")
    if not sc["stage1_nf4"].fits:
        t = _largest(s, c, cfg, "stage1_nf4", "max_tokens_per_batch", cfg.max_tokens_per_batch // 2, cfg.seq_len)
        if t:
            out.append(f"stage 1: an NF4 reference with --max-tokens-per-batch {t} fits")
        out.append(f"stage 1 with an NF4 reference {_gpus_text(_min_gpus(s, c, cfg, 'stage1_nf4'))}")
    return out


def _suggest_stage2(s: Shape, c: dict[str, int], cfg: PlanConfig, sc: dict[str, Scenario]) -> list[str]:
    """Headroom hints when stage two fits; otherwise the first of these that fixes it, applied in turn:
    gradient checkpointing on, a smaller --batch, a shorter --seq-len; and the GPU count that would do."""
    out = []
    if sc["stage2"].fits:
        b = _largest_batch(s, c, cfg)
        if b > cfg.batch:
            out.append(f"stage 2 has room for --batch {b} per GPU (fewer gradient-accumulation steps)")
        if cfg.gradient_checkpointing and _fits(s, c, replace(cfg, gradient_checkpointing=False), "stage2"):
            out.append("stage 2 also fits with gradient checkpointing off (faster: no recompute)")
        return out
    base = cfg
    if not cfg.gradient_checkpointing:
        base = replace(cfg, gradient_checkpointing=True)
        fixed = _fits(s, c, base, "stage2")
        out.append("stage 2: turn gradient checkpointing on" + (" (then it fits)" if fixed else ""))
        if fixed:
            return out
    if base.batch > 1 and (b := _largest(s, c, base, "stage2", "batch", base.batch // 2, 1)):
        return out + [f"stage 2: --batch {b} with more gradient-accumulation steps"]
    if (n := _largest(s, c, base, "stage2", "seq_len", base.seq_len // 2, 128)):
        out.append(f"stage 2: --seq-len {n} fits (longer rows are truncated)")
    return out + [f"stage 2 {_gpus_text(_min_gpus(s, c, base, 'stage2'))}"]


def _largest_batch(s: Shape, c: dict[str, int], cfg: PlanConfig, limit: int = 64) -> int:
    b = cfg.batch
    while b < limit and _fits(s, c, replace(cfg, batch=b + 1), "stage2"):
        b += 1
    return b


def plan_memory(cfg: PlanConfig) -> Plan:
    """Read the model config, count parameters, and estimate per-GPU bytes for: naive DPO, stage one with a
    bf16 and with an NF4 reference, and stage two (see the scenario_* docstrings for the arithmetic)."""
    _check(cfg)
    config = load_model_config(cfg.model)
    if cfg.layers is not None:
        if not isinstance(cfg.layers, int) or cfg.layers < 1:
            raise UserError(f"dpo plan: --layers must be a positive integer, got {cfg.layers!r}")
        config = {**config, "num_hidden_layers": cfg.layers}
    try:
        s, counts = model_shape(config), count_parameters(config)
    except UserError as e:
        raise UserError(f"{e} (in {cfg.model})") from None
    scen = _all_scenarios(s, counts, cfg)
    by_key = {x.key: x for x in scen}
    sugg = []
    if not by_key["naive"].fits:
        sugg.append(f"naive DPO {_gpus_text(_min_gpus(s, counts, cfg, 'naive'))}: use the two stages instead")
    sugg += _suggest_stage1(s, counts, cfg, by_key) + _suggest_stage2(s, counts, cfg, by_key)
    notes = []
    if s.model_type not in KNOWN_MODEL_TYPES:
        notes.append(f"model_type {s.model_type!r} is not one of {', '.join(KNOWN_MODEL_TYPES)}: "
                     f"counted as a Llama-style decoder (RMSNorm, q/k/v/o attention, gate/up/down MLP)")
    if cfg.max_tokens_per_batch < cfg.seq_len:
        notes.append(f"max_tokens_per_batch {cfg.max_tokens_per_batch} < seq_len {cfg.seq_len}: the longest "
                     f"rows cannot be scored in stage one")
    return Plan(cfg, s.model_type, counts, lora_parameters_from_shape(s, cfg.lora_r), int(cfg.gpu_memory_gb * GIB),
                scen, tuple(sugg), tuple(notes), s)


def parse_gpu_memory(text: str | float | int) -> float:
    """'80GB', '80G', '80GiB', '80' -> 80.0 (GiB); '81920MB'/'MiB' -> 80.0; '1.5TB' -> 1536.0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"dpo plan: --gpu-memory {text!r} is not a size; write e.g. 80GB (read as GiB)")
    unit = (m.group(2) or "g").lower()[0]
    return float(m.group(1)) * {"t": 1024.0, "g": 1.0, "m": 1 / 1024}[unit]


_ROW_ORDER = ("policy weights + grads, bf16 (sharded)", "AdamW fp32 master + m + v (sharded)",
              "reference weights (sharded)", "base weights NF4 (sharded)", "LoRA weights + grads + AdamW (sharded)",
              "all-gathered params (FSDP)", "dequantised NF4 linear (one GPU)", "activations: hidden states", "activations: one layer",
              "activations: layer checkpoints", "activations: one layer recomputed + grads",
              "activations: all layers saved", "activations: one layer grads", "log-prob head",
              "reference forward, adapters off (extra at peak)", "CUDA/NCCL overhead (fixed)")


def _b(n: float) -> str:
    """A parameter count in billions or millions."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _header(plan: Plan) -> list[str]:
    c, cfg, s = plan.counts, plan.config, plan.shape
    tokens = cfg.batch * 2 * cfg.seq_len
    return [
        f"model: {cfg.model}",
        f"  {s.model_type}, {s.layers} layers{' (--layers override)' if cfg.layers else ''}, hidden {s.hidden}, intermediate {s.intermediate}, "
        f"{s.heads} heads / {s.kv_heads} KV heads x {s.head_dim}, vocab {s.vocab}, "
        f"{'tied' if s.tied else 'untied'} lm_head",
        f"  parameters {c['total']:,} ({_b(c['total'])}): decoder linear weights {_b(c['linear_weights'])} "
        f"(NF4-quantisable), other {_b(c['other'])}",
        f"  LoRA r={cfg.lora_r} on q,k,v,o,gate,up,down: {plan.lora_params:,} ({_b(plan.lora_params)}, "
        f"{100 * plan.lora_params / c['total']:.2f}% of the model)",
        f"setting: {cfg.gpus} {'CPU processes' if cfg.cpu else 'GPUs'} x {cfg.gpu_memory_gb:g} GiB; "
        f"training {cfg.batch} pair(s) x 2 x seq_len "
        f"{cfg.seq_len} = {tokens:,} tokens per GPU per step, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; stage 1 {cfg.max_tokens_per_batch:,} tokens per forward",
    ]


def format_plan(plan: Plan) -> str:
    """The plan as a table of GiB per GPU (one column per scenario), with fits/does-not-fit and suggestions."""
    labels: list[str] = []
    for sc in plan.scenarios:  # union of breakdown rows: weights, gathered, activations, head, overhead
        labels += [k for k in sc.breakdown if k not in labels]
    labels.sort(key=lambda k: _ROW_ORDER.index(k) if k in _ROW_ORDER else len(_ROW_ORDER))
    width, col = max(len(x) for x in labels + ["per GPU, GiB"]) + 2, max(len(sc.title) for sc in plan.scenarios) + 2
    lines = _header(plan) + ["", "per GPU, GiB".ljust(width) + "".join(sc.title.rjust(col) for sc in plan.scenarios)]
    for label in labels:
        cells = [f"{sc.breakdown[label] / GIB:.1f}" if label in sc.breakdown else "-" for sc in plan.scenarios]
        lines.append(f"  {label}".ljust(width) + "".join(x.rjust(col) for x in cells))
    lines.append("  total".ljust(width) + "".join(f"{sc.total / GIB:.1f}".rjust(col) for sc in plan.scenarios))
    cap = f"fits in {plan.config.gpu_memory_gb:g} GiB?"
    lines.append(cap.ljust(width) + "".join(("yes" if sc.fits else "NO").rjust(col) for sc in plan.scenarios))
    lines += ["", "suggestions:"] + [f"  - {x}" for x in plan.suggestions or ("everything fits as set",)]
    lines += ["", "notes:"] + [f"  - {x}" for x in plan.notes] + [
        "  - estimates from the config alone (expect about +-15%); 1 GiB = 2^30 bytes, '80GB' GPUs have 80 GiB",
        "  - --cpu: one CPU process per 'GPU', no CUDA overhead; weights counted whole as a GPU holds them (the "
        "process's Python/torch runtime is not counted)" if plan.config.cpu else
        f"  - every column includes a fixed {OVERHEAD_BYTES / GIB:.0f} GiB per GPU for the CUDA context, "
        f"cuBLAS workspaces and NCCL buffers",
        "  - weights and optimizer state are FSDP-sharded over all GPUs; activations and all-gathered layers are not"
        if plan.config.gpus > 1 else "  - one GPU: nothing is sharded, so nothing is all-gathered",
        "  - naive DPO = full fine-tuning of a bf16 policy with AdamW (16 B/param) plus a resident bf16 "
        "reference (2 B/param); its activations are counted as in stage two, so the gap is weights and optimizer",
        "  - QLoRA+online ref = what most users run (TRL's default with PEFT): the same NF4 base + LoRA as stage 2, "
        "the reference recomputed each step with the adapters off - same memory give or take the reference "
        "forward's transient, but one more forward per step (~+25% compute with checkpointing)",
        f"  - a trainer that materialises full logits (plain HF forward) holds [2B, T, V] bf16 + fp32 for the "
        f"policy and the online reference: +{full_logits_bytes(plan.shape, plan.config) / GIB:.1f} GiB per GPU "
        f"at this batch and seq_len (chunked here and in TRL 1.16)",
    ]
    return "\n".join(lines)
