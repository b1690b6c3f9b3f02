"""`dpo plan`'s byte terms, per GPU, that the scenarios of stages/tools/plan.py add up (the notation is in that module's
docstring): NF4 storage and its FSDP2 split, the weights FSDP2 keeps and all-gathers, the all-gather copy-out, the
loading peak's slice in flight, the activations of training and of stage one's forward, and the attention layout's
mask (--attention, --pack as the stages take them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.base.constants import CHUNK_BY_DEVICE
from stages.tools.plancount import KNOWN_MODEL_TYPES, Shape, linear_shapes, lora_parameters_from_shape

if TYPE_CHECKING:
    from stages.settings.commands import PlanConfig

NF4_DOUBLE_QUANT = False          # as stages/model/models.py loads NF4 (fp32 absmax per 64-block)
BF16, FP32 = 2, 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------- weights

def nf4_bytes(n: int, double_quant: bool | None = None) -> int:
    """Bytes of n weights in NF4: n/2 (4-bit codes) + one absmax per 64-block, fp32 (4n/64) by default as
    stages/model/models.py loads it, or 8-bit (n/64) plus fp32 second-level constants per 256 blocks with double
    quant."""
    return sum(nf4_split(n, double_quant))


def nf4_split(n: int, double_quant: bool | None = None) -> tuple[int, int]:
    """(sharded, whole) bytes of n NF4 weights under FSDP2: the packed 4-bit codes n/2 are the Linear4bit's
    parameter, so FSDP2 shards (and all-gathers) them; the quant state (absmax: 4n/64 fp32, or n/64 + 4·n/(64·256)
    with double quant) lives on the module outside the parameters, so every GPU holds all of it."""
    dq = NF4_DOUBLE_QUANT if double_quant is None else double_quant
    blocks = cdiv(n, 64)
    return cdiv(n, 2), (blocks + 4 * cdiv(blocks, 256) if dq else 4 * blocks)


def root_params(c: dict[str, int]) -> int:
    """FSDP's root unit (embed, final norm, lm_head: everything outside the decoder layers); unsharded in bf16
    from the forward through the backward under the usual transformer-layer wrap policy."""
    return c["embed"] + c["lm_head"] + c["final_norm"]


def layer_nf4_gathered(c: dict[str, int]) -> int:
    """One decoder layer as FSDP2 all-gathers it: the NF4 codes of its linears and its norms/biases in bf16 (the
    absmax is not gathered: every GPU already holds it whole, see nf4_split)."""
    return nf4_split(c["linear_per_layer"])[0] + BF16 * (c["per_layer"] - c["linear_per_layer"])


def base_nf4_per_gpu(c: dict[str, int], n: int) -> int:
    """Whole model, NF4 linears + bf16 rest, per GPU: (P_lin/2 + 2·P_oth)/N + absmax(P_lin) whole."""
    sharded, whole = nf4_split(c["linear_weights"])
    return cdiv(sharded + BF16 * c["other"], n) + whole


# ----------------------------------------------------------------------------------------------- reference adapter

def ref_adapter_params(s: Shape, cfg: PlanConfig) -> int:
    """A_ref: parameters of the reference's SFT adapter, a LoRA of rank --ref-adapter-r on every decoder linear
    (q,k,v,o,gate,up,down); 0 without one."""
    return lora_parameters_from_shape(s, cfg.ref_adapter_r)


def ref_adapter_sharded(s: Shape, cfg: PlanConfig) -> dict[str, int]:
    """The reference's SFT adapter as each GPU holds it, 4·A_ref/N: PEFT loads adapter weights in fp32
    (PeftModel.from_pretrained's autocast_adapter_dtype), FSDP2 shards them with their layer. Empty without one."""
    a = ref_adapter_params(s, cfg)
    return {"reference SFT adapter, fp32 (sharded)": cdiv(FP32 * a, cfg.gpus)} if a else {}


def ref_adapter_layer(s: Shape, cfg: PlanConfig) -> int:
    """Bytes of one layer's share of the reference's SFT adapter as all-gathered with that layer: 4·A_ref/L."""
    return FP32 * ref_adapter_params(s, cfg) // s.layers


# ----------------------------------------------------------------------------------------------- the article

def article_naive(c: dict[str, int], a_ref: int = 0) -> dict[str, int]:
    """Naive DPO as the article counts it, bytes for the whole job (not per GPU): bf16 policy 2P + bf16 reference
    2P (+ 2·A_ref for an SFT adapter, also bf16) + AdamW m and v in bf16 4P = 8 bytes/param; no gradients, no fp32
    master weights, no activations or overhead (the naive column counts 18 bytes/param and those)."""
    return {"policy": BF16 * c["total"], "reference": BF16 * (c["total"] + a_ref), "AdamW m + v": 2 * BF16 * c["total"]}


# ----------------------------------------------------------------------------------------------- FSDP2 and loading

def gathered_parts(n: int, sharded_units: int, dequant: int = 0) -> dict[str, int]:
    """FSDP's unsharded working set (n > 1), or, on one GPU where nothing is sharded, only the NF4 matmul's
    dequantised bf16 copy of the largest linear (bitsandbytes materialises it for batched inputs)."""
    if n > 1:
        return {"all-gathered params (FSDP)": sharded_units + dequant}
    return {"dequantised NF4 linear (one GPU)": dequant} if dequant else {}


def copy_out(n: int, root: int, layer: int) -> dict[str, int]:
    """FSDP2's all-gather copy-out (`copy` in stages/tools/plan.py's docstring): at N > 1 one more copy of the largest
    gathered unit, the root (never resharded) or one layer, in bytes as gathered."""
    return {"all-gather copy-out, largest unit (transient)": max(root, layer)} if n > 1 else {}


def _nf4_slice(w: int, n: int) -> int:
    """Weights one rank quantizes of an NF4 matrix of w weights: its ⌈⌈w/2⌉/N⌉ packed rows (2 weights each),
    widened to whole 64-blocks (one more block at most, for where the range starts inside one)."""
    mine = 2 * cdiv(cdiv(w, 2), n)
    return min(w, cdiv(mine, 64) * 64 + (64 if n > 1 else 0))


def _slice_in_flight(s: Shape, cfg: PlanConfig, nf4: bool) -> int:
    """Bytes per GPU of the largest tensor's slice while loading (`load` in stages/tools/plan.py's docstring): FSDP2
    shards dim 0 (embed/lm_head [V, h], each linear [out, in]); plain slices count only with --cpu (on a GPU the host
    buffer is not GPU memory), NF4 slices are quantized on the device in bf16."""
    n, read = cfg.gpus, s.ckpt_bytes + (BF16 if s.ckpt_bytes != BF16 else 0)
    linears = [(out, inp) for inp, out in linear_shapes(s).values()]
    plain = [(s.vocab, s.hidden)] + ([] if nf4 else linears)
    worst = read * max(cdiv(rows, n) * cols for rows, cols in plain) if cfg.cpu else 0
    for m in (_nf4_slice(rows * cols, n) for rows, cols in linears if nf4):
        worst = max(worst, m * (read if cfg.cpu else BF16) + cdiv(m, 2) + FP32 * cdiv(m, 64))
    return worst


def load_parts(s: Shape, cfg: PlanConfig, resident: int, nf4: bool, lora_params: int = 0) -> dict[str, int]:
    """The loading peak per GPU (`load` in stages/tools/plan.py's docstring): the stage's resident weight shards, the
    largest tensor's slice in flight, and, with --cpu in stage two, the whole fp32 LoRA weights held once on the CPU
    before sharding (on a GPU machine they sit in host memory, not on the GPU)."""
    parts = {"load: weights resident (sharded)": resident,
             "load: largest tensor's slice in flight": _slice_in_flight(s, cfg, nf4)}
    if cfg.cpu and lora_params:
        parts["load: whole LoRA weights, fp32, before sharding"] = FP32 * lora_params
    return parts


# ----------------------------------------------------------------------------------------------- activations

def logits_chunk(cfg: PlanConfig) -> int:
    """Positions per log-prob head chunk: the stages' default --chunk-size on the device planned for."""
    return CHUNK_BY_DEVICE["cpu" if cfg.cpu else "cuda"]


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
    """Activation bytes per GPU for one training micro-step over T = batch_size·2·max_length tokens.

    checkpointing on : L·T·h·2 (one bf16 hidden state per layer boundary)
                       + 2·T·a (the recomputed layer's saved tensors a = per-token layer bytes, plus their
                       gradients while its backward runs)
    checkpointing off: L·T·a (every layer's saved tensors) + T·a (gradients of one layer)
    log-prob head    : C·V·(2+4+4+2) (stages.model.logprobs checkpoints each chunk, so at most one chunk's bf16
                       logits, their fp32 copy, and the two gradients exist at once)
                       + 3·T·h·2 (final hidden states, the gathered completion positions, their gradient)
    """
    T = cfg.batch_size * 2 * cfg.max_length
    a = layer_activation_bytes_per_token(s) + (lora_input_bytes_per_token(s, cfg.lora_r) if lora else 0)
    C = min(logits_chunk(cfg), T)
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
    C = min(logits_chunk(cfg), T1)
    return {"activations: hidden states": 2 * T1 * s.hidden * BF16,
            "activations: one layer": T1 * inference_layer_bytes_per_token(s),
            "log-prob head": C * s.vocab * (BF16 + FP32) + T1 * s.hidden * BF16}


def full_logits_bytes(s: Shape, cfg: PlanConfig) -> int:
    """[2B, T, V] logits of one step when a trainer materialises them: bf16 logits + their fp32 log_softmax
    (saved for backward) for the policy, and the same for the reference forward held alongside."""
    return 2 * cfg.batch_size * 2 * cfg.max_length * s.vocab * (BF16 + FP32)


# ----------------------------------------------------------------------------------------------- attention layout

MASK_LABEL = "attention mask [B, 1, T, T] (dense)"
MASK_ENTRY_BYTES = 1              # sdpa's bool mask (eager's additive one would take the weights' dtype, 2 B in bf16)


def attention_assumed(s: Shape, cfg: PlanConfig) -> str:
    """"dense" or "segments": cfg.attention, with "auto" decided as the stages' rowlayout.prepare_model decides it
    (segments where the model's attention goes through transformers' attention interface, as the decoders of
    KNOWN_MODEL_TYPES do; any other model type is counted with the dense mask)."""
    if cfg.attention == "auto":
        return "segments" if s.model_type in KNOWN_MODEL_TYPES else "dense"
    return cfg.attention


def stage_sequences(cfg: PlanConfig, stage: int) -> tuple[int, int]:
    """(B, T): the sequences of one forward and the tokens of each, as the plan counts them.
        unpacked, stage one: rows of W1 = min(2·max_length, T1) tokens (a pair row [prompt | chosen | rejected], at
                             most 2·max_length, no wider than the budget), B1 = max(1, ⌊T1 / W1⌋) of them (padded
                             tokens <= --max-tokens-per-batch)
        unpacked, stage two: batch_size rows of 2·max_length (the T = batch_size·2·max_length tokens it counts)
        --pack             : one sequence of the budget: stage one T1, stage two the micro-batch's
                             batch_size·2·max_length (no padding; the activations count these same tokens)."""
    if stage == 1:
        t1 = cfg.max_tokens_per_batch
        if cfg.pack:
            return 1, t1
        width = min(2 * cfg.max_length, t1)
        return max(1, t1 // width), width
    if cfg.pack:
        return 1, cfg.batch_size * 2 * cfg.max_length
    return cfg.batch_size, 2 * cfg.max_length


def mask_bytes(cfg: PlanConfig, stage: int) -> int:
    """Bytes of the dense layout's [B, 1, T, T] mask of one forward of `stage` (1 or 2): B·T²·1 (bool, sdpa), alive
    through the forward (and, for stage two, its backward: each checkpointed layer keeps it as an input)."""
    b, t = stage_sequences(cfg, stage)
    return b * t * t * MASK_ENTRY_BYTES


def mask_parts(s: Shape, cfg: PlanConfig, stage: int) -> dict[str, int]:
    """{MASK_LABEL: mask_bytes} with dense attention; nothing with segments (segattn builds no [T, T] tensor; its
    largest intermediate, one segment's q·k, is an attention score, which the plan does not count)."""
    return {MASK_LABEL: mask_bytes(cfg, stage)} if attention_assumed(s, cfg) == "dense" else {}
