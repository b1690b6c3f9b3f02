"""`dpo plan`: per-GPU memory estimates from a model's config.json alone (no weights are read). The config and
the parameter counts: stages/tools/plancount.py; the byte terms the scenarios add up (NF4, FSDP2 gathers and copy-out,
the loading slice, activations): stages/tools/planterms.py; the printed table: stages/tools/plantable.py.

Units: 1 GiB = 2**30 bytes. A GPU sold as "80GB" (H100, A100-80G) has 80 GiB of memory, so `--gpu-memory 80GB`
is read as 80 GiB; every figure printed is GiB. Estimates are upper-bound-ish arithmetic, not measurements:
expect the real peak to be within roughly ±15%, allocator fragmentation not included.

Notation used in the docstrings (all per GPU unless stated):
    P      total parameters (count_parameters()["total"]); P_lin = decoder linear weights (what NF4 quantises),
           P_oth = P − P_lin (embeddings, lm_head, norms, biases: kept in bf16 under NF4)
    P_lay  parameters of one decoder layer; P_root = max(embed, lm_head) (the biggest non-layer FSDP unit)
    A      LoRA parameters (lora_parameters())
    N      GPUs; L layers; h hidden; i intermediate; V vocab; q_d = heads·head_dim; kv_d = kv_heads·head_dim
    T      training tokens per GPU per step = batch_size · 2 · max_length (chosen and rejected of each example)
    T1     stage-one tokens per forward = max_tokens_per_batch
    C      logits chunk = min(the default --chunk-size of the device, tokens): stages.base.constants.CHUNK_BY_DEVICE,
           the CUDA one (2048) for GPUs, the CPU one (256) with --cpu
    nf4(n) = n/2 + 4n/64 bytes: 4-bit codes + one fp32 absmax per 64-block, as stages/model/models.py loads NF4
           (bnb_4bit_use_double_quant=False). With double quantisation (NF4_DOUBLE_QUANT = True) the absmax
           is 8-bit: n/2 + n/64 + 4·n/(64·256).
           Per GPU (nf4_split): FSDP2 shards the packed codes (the Linear4bit's parameter), n/2 / N, but not the
           quant state: bitsandbytes keeps the absmax on the module, outside the parameters, so every GPU holds
           all 4n/64 of it; an all-gathered NF4 layer brings only its codes.
    load   the loading peak (stages/model/loading.py: meta model, fully_shard, each rank allocates its shards and reads
           only its own rows of each tensor from the safetensors files, one tensor at a time):
               the stage's resident weights (sharded as above, before any gradient or optimizer state exists)
               + the largest tensor's slice in flight (_slice_in_flight), k = ⌈rows/N⌉·cols its 1/N slice,
                 c = the checkpoint's bytes per weight (config.json's torch_dtype, bf16 if absent):
                 plain weights: read into a host buffer in the checkpoint dtype and copied into the shard
                   (converted with .to(bf16) first only if c ≠ 2: one more copy, 2 bytes): with --cpu
                   k·(c + [c ≠ 2]·2); on a GPU the buffer is host memory, so nothing beyond the shard;
                 NF4 linears (w weights; m = this rank's ⌈w/2⌉/N packed rows as weights, widened to whole
                   64-blocks): the slice in bf16 where it is quantized, + its codes m/2 + its absmax 4m/64:
                   --cpu m·(c + [c ≠ 2]·2) (the host buffer is that slice), GPU m·2;
               + 4A with --cpu in stage two (the whole fp32 LoRA weights, held once on the CPU before sharding).
           Measured (bench/RESULTS.md, load-sharded): 72B widths, 2 layers, bf16, N = 1: 10.23 GiB = the weights
           7.91 + one bf16 slice of the 152064×8192 embedding, 2.32.
    copy   FSDP2's all-gather copy-out (N > 1, copy_out): a unit is all-gathered into a flat buffer and then copied
           out into the unsharded parameters while both exist, so its gather costs twice its size for a moment. The
           root unit (embeddings, untied lm_head, final norm) is never resharded (shard_model:
           reshard_after_forward=False at the root), so it stays gathered while the layers run; the plan counts
           one more copy of the largest gathered unit, max(root, one layer), on top of the run's working set.
           Measured (load-sharded): Qwen2.5-72B vocabulary with a quarter of its other widths, stage one, N = 2:
           3.52 GiB = the shard + the root twice + one layer (3.41) + activations. None at N = 1: shard_model
           does not shard one process, so nothing is gathered.
           Each scenario's peak (its total) = max(load, run), run = the sum of its breakdown.
A fixed OVERHEAD_BYTES = 2 GiB per GPU is added to every scenario for the CUDA context, cuBLAS workspaces and
NCCL buffers (not with --cpu: then a "GPU" is one CPU process and the figures are what its tensors hold, weights
counted whole as a GPU holds them, whether or not a CPU run has paged them in). Attention is assumed to be
SDPA/flash (no seq_len² score matrix is stored): attention scores are counted nowhere. With one GPU nothing is sharded,
so nothing is all-gathered. The stages' layout (--attention, --pack: planterms.stage_sequences): dense attention holds
a [B, 1, T, T] bool mask per forward in stage one and two, B·T² bytes; segments none (its largest intermediate, one
segment's q·k, is a score). --pack only reshapes the mask (the activations already count the full token budget).
--layers N counts the model with N decoder layers (the widths unchanged): what bench/bench_72b.py measures.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from stages.base.errors import UserError
from stages.tools.plancount import (
    KNOWN_MODEL_TYPES,
    Shape,
    count_parameters,
    largest_linear,
    load_model_config,
    lora_parameters_from_shape,
    model_shape,
)
from stages.tools.planterms import (
    BF16,
    FP32,
    article_naive,
    attention_assumed,
    base_nf4_per_gpu,
    cdiv,
    copy_out,
    gathered_parts,
    inference_activations,
    layer_activation_bytes_per_token,
    layer_nf4_gathered,
    load_parts,
    logits_chunk,
    lora_input_bytes_per_token,
    mask_parts,
    ref_adapter_layer,
    ref_adapter_params,
    ref_adapter_sharded,
    root_params,
    training_activations,
)

if TYPE_CHECKING:
    from stages.settings.commands import PlanConfig  # the one config of `dpo plan`: the CLI's options, YAML keys

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB          # CUDA context + cuBLAS workspace + NCCL buffers, per GPU


@dataclass(frozen=True)
class Scenario:
    key: str                     # "naive", "online_ref", "stage1_bf16", "stage1_nf4", "stage2"
    title: str
    breakdown: dict[str, int]    # label -> bytes per GPU while running, in display order; sums to run
    total: int                   # bytes per GPU: the peak, max(load, run)
    fits: bool
    load_breakdown: dict[str, int]  # label -> bytes per GPU at the loading peak; sums to load
    run: int
    load: int


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
    article: dict[str, int] = field(default_factory=dict)  # article_naive: naive DPO at 8 B/param, whole job
    attention: str = "dense"     # the attention the stage columns assume (planterms.attention_assumed)

    def scenario(self, key: str) -> Scenario:
        return next(s for s in self.scenarios if s.key == key)


# ----------------------------------------------------------------------------------------------- memory

def _finish(key: str, title: str, parts: dict[str, int], load: dict[str, int], capacity: int,
            cpu: bool = False) -> Scenario:
    """Add the fixed CUDA overhead to both phases (not with --cpu); the peak is the larger phase."""
    if not cpu:
        parts = {**parts, "CUDA/NCCL overhead (fixed)": OVERHEAD_BYTES}
        load = {**load, "load: CUDA/NCCL overhead (fixed)": OVERHEAD_BYTES}
    run, loading = sum(parts.values()), sum(load.values())
    total = max(run, loading)
    return Scenario(key, title, parts, total, total <= capacity, load, run, loading)


def scenario_naive(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int) -> Scenario:
    """Naive two-model DPO, full fine-tuning in bf16 with AdamW, policy and reference both FSDP-sharded:
        sharded    : 4P/N (policy bf16 weights + bf16 grads) + 12P/N (AdamW fp32 master, m, v)
                     + 2P/N (bf16 reference)                       = 18 bytes/param / N
                     + 4·A_ref/N (the reference's SFT adapter, fp32, with --ref-adapter-r)
        gathered   : 3·2·P_lay (current + prefetched layer, and that layer's unsharded grads)
                     + 2·2·P_root (root unit weights and grads); none on one GPU
        copy-out   : max(2·P_root, 2·P_lay) at N > 1 (copy_out)
        activations: training_activations (same batch and checkpointing as stage two, no LoRA); the
                     reference forward runs before the policy's and needs less, so it adds nothing at peak
                     (nor do its gathered layers: resharded by then).
    """
    n, ref = cfg.gpus, ref_adapter_sharded(s, cfg)
    parts = {"policy weights + grads, bf16 (sharded)": cdiv(4 * c["total"], n),
             "AdamW fp32 master + m + v (sharded)": cdiv(12 * c["total"], n),
             "reference weights (sharded)": cdiv(BF16 * c["total"], n), **ref,
             **gathered_parts(n, 3 * BF16 * c["per_layer"] + 2 * BF16 * root_params(c)),
             **copy_out(n, BF16 * root_params(c), BF16 * c["per_layer"]),
             **training_activations(s, cfg, lora=False)}
    load = load_parts(s, cfg, 2 * cdiv(BF16 * c["total"], n) + sum(ref.values()), nf4=False,  # no grads yet
                      lora_params=ref_adapter_params(s, cfg))
    return _finish("naive", "naive DPO", parts, load, capacity, cfg.cpu)


def scenario_stage1(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int, nf4: bool) -> Scenario:
    """Stage one, reference log-probs, forward only, reference FSDP-sharded:
        bf16: sharded 2P/N; gathered 2·2·P_lay (current + prefetched layer) + 2·P_root
        nf4 : sharded (P_lin/2 + 2·P_oth)/N + absmax(P_lin) whole; gathered 2·layer_nf4 (codes + bf16 norms and
              biases) + 2·P_root (embeddings and lm_head are not quantised) + 2·h·i (the largest linear,
              dequantised to bf16 for its matmul; also on one GPU)
        SFT adapter (--ref-adapter-r): + 4·A_ref/N sharded; each gathered layer carries its 4·A_ref/L.
        activations: inference_activations over max_tokens_per_batch tokens.
        mask: dense attention's [B, 1, T, T] bool mask, B·T² (mask_parts; none with segments).
        copy-out: one more root or layer at N > 1 (copy_out).
        load: the sharded weights + the largest tensor's slice in flight (load_parts).
    """
    n, ref, layer = cfg.gpus, ref_adapter_sharded(s, cfg), ref_adapter_layer(s, cfg)
    if nf4:
        weights, layer = base_nf4_per_gpu(c, n), layer + layer_nf4_gathered(c)
        gathered = gathered_parts(n, 2 * layer + BF16 * root_params(c), BF16 * largest_linear(s))
    else:
        weights, layer = cdiv(BF16 * c["total"], n), layer + BF16 * c["per_layer"]
        gathered = gathered_parts(n, 2 * layer + BF16 * root_params(c))
    parts = {"reference weights (sharded)": weights, **ref, **gathered,
             **copy_out(n, BF16 * root_params(c), layer), **inference_activations(s, cfg), **mask_parts(s, cfg, 1)}
    key, title = ("stage1_nf4", "stage 1 NF4") if nf4 else ("stage1_bf16", "stage 1 bf16")
    load = load_parts(s, cfg, weights + sum(ref.values()), nf4, lora_params=ref_adapter_params(s, cfg))
    return _finish(key, title, parts, load, capacity, cfg.cpu)


def _stage2_parts(s: Shape, c: dict[str, int], cfg: PlanConfig, ref: bool = False) -> dict[str, int]:
    """Stage two's run terms; `ref`: the online reference's frozen copy of the SFT adapter rides along."""
    n, a = cfg.gpus, lora_parameters_from_shape(s, cfg.lora_r)
    lay = layer_nf4_gathered(c) + BF16 * (a // s.layers) + (ref_adapter_layer(s, cfg) if ref else 0)
    return {"base weights NF4 (sharded)": base_nf4_per_gpu(c, n),
            "LoRA weights + grads + AdamW (sharded)": cdiv(18 * a, n), **(ref_adapter_sharded(s, cfg) if ref else {}),
            **gathered_parts(n, 2 * lay + FP32 * (a // s.layers) + BF16 * root_params(c), BF16 * largest_linear(s)),
            **copy_out(n, BF16 * root_params(c), lay),
            **training_activations(s, cfg, lora=True)}


def _stage2_load(s: Shape, c: dict[str, int], cfg: PlanConfig, ref: bool = False) -> dict[str, int]:
    """Stage two's loading peak: the NF4 base shards and the fp32 LoRA weight shards (4A/N, as PEFT creates
    them; no gradient or optimizer state yet), with `ref` the SFT adapter's (4·A_ref/N), plus load_parts' transient."""
    a = lora_parameters_from_shape(s, cfg.lora_r) + (ref_adapter_params(s, cfg) if ref else 0)
    return load_parts(s, cfg, base_nf4_per_gpu(c, cfg.gpus) + cdiv(FP32 * a, cfg.gpus), True, lora_params=a)


def scenario_stage2(s: Shape, c: dict[str, int], cfg: PlanConfig, capacity: int) -> Scenario:
    """Stage two, QLoRA policy against cached reference log-probs (no reference model in memory):
        sharded    : (P_lin/2 + 2·P_oth)/N + absmax(P_lin) whole for the frozen base
                     + 18A/N for LoRA (bf16 weights 2 + fp32 grads 4 + AdamW fp32 master, m, v 12)
        gathered   : 2·(layer_nf4 + 2·A_lay) (current + prefetched layer with its adapters; layer_nf4 = its
                     codes + bf16 norms/biases, the absmax being resident) + 4·A_lay
                     (that layer's unsharded fp32 LoRA grads) + 2·P_root; + 2·h·i (largest linear dequantised,
                     forward and again in backward; also on one GPU)
        copy-out   : max(2·P_root, layer_nf4 + 2·A_lay) at N > 1 (copy_out)
        activations: training_activations with the LoRA inputs added per layer.
        mask       : dense attention's [B, 1, T, T] bool mask, B·T² (mask_parts), held through the backward.
        load       : _stage2_load.
    """
    parts = {**_stage2_parts(s, c, cfg), **mask_parts(s, cfg, 2)}
    return _finish("stage2", "stage 2 QLoRA", parts, _stage2_load(s, c, cfg), capacity, cfg.cpu)


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
                            (a plain HF forward) pays [2B, T, V] instead of a chunk: see the notes of
                            plantable.format_plan.
    With an SFT reference (--ref-adapter-r) adapters off would give the base, so the reference is a frozen copy of
    the SFT adapter held next to the policy's LoRA (TRL's ref_adapter_name): + 4·A_ref/N, 4·A_ref/L per layer."""
    parts = _stage2_parts(s, c, cfg, ref=True)
    T = cfg.batch_size * 2 * cfg.max_length
    a = layer_activation_bytes_per_token(s) + lora_input_bytes_per_token(s, cfg.lora_r)
    ref = 2 * T * s.hidden * BF16 + T * layer_activation_bytes_per_token(s) + \
        min(logits_chunk(cfg), T) * s.vocab * (BF16 + FP32)
    backward = (2 if cfg.gradient_checkpointing else 1) * T * a
    parts["reference forward, adapters off (extra at peak)"] = max(0, ref - backward)
    return _finish("online_ref", "QLoRA+online ref", parts, _stage2_load(s, c, cfg, ref=True), capacity, cfg.cpu)


# ----------------------------------------------------------------------------------------------- plan

def gpu_memory_gib(cfg: PlanConfig) -> float:
    """GiB per GPU: cfg.gpu_memory ("80GB", "24", "141GiB") read by parse_gpu_memory, the one place the setting is
    parsed; a UserError if it is not a positive size."""
    return parse_gpu_memory(cfg.gpu_memory)


def capacity_bytes(cfg: PlanConfig) -> int:
    """Bytes per GPU (gpu_memory_gib, 1 GiB = 2**30 bytes)."""
    return int(gpu_memory_gib(cfg) * GIB)


def _check(cfg: PlanConfig) -> None:
    """A UserError naming the option for a --gpu-memory that is not a size (the counts: PlanConfig.check)."""
    gpu_memory_gib(cfg)
    cfg.check()


def _all_scenarios(s: Shape, c: dict[str, int], cfg: PlanConfig) -> tuple[Scenario, ...]:
    cap = capacity_bytes(cfg)
    return (scenario_naive(s, c, cfg, cap), scenario_online_ref(s, c, cfg, cap),
            scenario_stage1(s, c, cfg, cap, nf4=False), scenario_stage1(s, c, cfg, cap, nf4=True),
            scenario_stage2(s, c, cfg, cap))


def _fits(s: Shape, c: dict[str, int], cfg: PlanConfig, key: str) -> bool:
    cap = capacity_bytes(cfg)
    if (build := {"naive": scenario_naive, "stage2": scenario_stage2, "online_ref": scenario_online_ref}.get(key)):
        return build(s, c, cfg, cap).fits
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
    t = _largest(s, c, cfg, "stage1_bf16", "max_tokens_per_batch", cfg.max_tokens_per_batch // 2, cfg.max_length)
    if t:
        out.append(f"stage 1: --max-tokens-per-batch {t} fits with a bf16 reference")
    if sc["stage1_nf4"].fits:
        out.append(f"stage 1: load the reference in NF4 ({sc['stage1_nf4'].total / GIB:.1f} GiB per GPU); it then "
                   f"equals stage two's NF4 base, so the policy starts exactly at the reference")
    out.append(f"stage 1 with a bf16 reference {_gpus_text(_min_gpus(s, c, cfg, 'stage1_bf16'))}")
    if not sc["stage1_nf4"].fits:
        t = _largest(s, c, cfg, "stage1_nf4", "max_tokens_per_batch", cfg.max_tokens_per_batch // 2, cfg.max_length)
        if t:
            out.append(f"stage 1: an NF4 reference with --max-tokens-per-batch {t} fits")
        out.append(f"stage 1 with an NF4 reference {_gpus_text(_min_gpus(s, c, cfg, 'stage1_nf4'))}")
    return out


def _suggest_stage2(s: Shape, c: dict[str, int], cfg: PlanConfig, sc: dict[str, Scenario]) -> list[str]:
    """Headroom hints when stage two fits; otherwise the first of these that fixes it, applied in turn:
    gradient checkpointing on, a smaller --batch-size, a shorter --max-length; and the GPU count that would do."""
    out = []
    if sc["stage2"].fits:
        b = _largest_batch(s, c, cfg)
        if b > cfg.batch_size:
            out.append(f"stage 2 has room for --batch-size {b} per GPU (fewer gradient-accumulation steps)")
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
    if base.batch_size > 1 and (b := _largest(s, c, base, "stage2", "batch_size", base.batch_size // 2, 1)):
        return out + [f"stage 2: --batch-size {b} with more gradient-accumulation steps"]
    if (n := _largest(s, c, base, "stage2", "max_length", base.max_length // 2, 128)):
        out.append(f"stage 2: --max-length {n} fits (longer rows are truncated)")
    return out + [f"stage 2 {_gpus_text(_min_gpus(s, c, base, 'stage2'))}"]


def _largest_batch(s: Shape, c: dict[str, int], cfg: PlanConfig, limit: int = 64) -> int:
    b = cfg.batch_size
    while b < limit and _fits(s, c, replace(cfg, batch_size=b + 1), "stage2"):
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
    if cfg.max_tokens_per_batch < cfg.max_length:
        notes.append(f"max_tokens_per_batch {cfg.max_tokens_per_batch} < max_length {cfg.max_length}: the longest "
                     f"rows cannot be scored in stage one")
    return Plan(cfg, s.model_type, counts, lora_parameters_from_shape(s, cfg.lora_r), capacity_bytes(cfg),
                scen, tuple(sugg), tuple(notes), s, article_naive(counts, ref_adapter_params(s, cfg)),
                attention_assumed(s, cfg))


def parse_gpu_memory(text: str | float | int) -> float:
    """'80GB', '80G', '80GiB', '80' -> 80.0 (GiB); '81920MB'/'MiB' -> 80.0; '1.5TB' -> 1536.0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"dpo plan: --gpu-memory {text!r} is not a size; write e.g. 80GB (read as GiB)")
    unit = (m.group(2) or "g").lower()[0]
    return float(m.group(1)) * {"t": 1024.0, "g": 1.0, "m": 1 / 1024}[unit]
