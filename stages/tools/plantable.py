"""`dpo plan`'s table: the Plan of stages/tools/plan.py as GiB per GPU, one column per scenario, with the run rows, the
loading rows, the peak (max of the two), fits/does-not-fit, suggestions and notes."""

from __future__ import annotations

from stages.tools.plan import GIB, OVERHEAD_BYTES, Plan, gpu_memory_gib
from stages.tools.planterms import BF16, MASK_LABEL, full_logits_bytes, mask_bytes, nf4_split, stage_sequences

_ROW_ORDER = ("policy weights + grads, bf16 (sharded)", "AdamW fp32 master + m + v (sharded)",
              "reference weights (sharded)", "reference SFT adapter, fp32 (sharded)", "base weights NF4 (sharded)",
              "LoRA weights + grads + AdamW (sharded)",
              "all-gathered params (FSDP)", "all-gather copy-out, largest unit (transient)",
              "dequantised NF4 linear (one GPU)", "activations: hidden states",
              "activations: one layer",
              "activations: layer checkpoints", "activations: one layer recomputed + grads",
              "activations: all layers saved", "activations: one layer grads", MASK_LABEL, "log-prob head",
              "reference forward, adapters off (extra at peak)", "CUDA/NCCL overhead (fixed)",
              "load: weights resident (sharded)", "load: largest tensor's slice in flight",
              "load: whole LoRA weights, fp32, before sharding", "load: CUDA/NCCL overhead (fixed)")


def _b(n: float) -> str:
    """A parameter count in billions or millions."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _header(plan: Plan) -> list[str]:
    c, cfg, s = plan.counts, plan.config, plan.shape
    tokens = cfg.batch_size * 2 * cfg.max_length
    lines = [
        f"model: {cfg.model}",
        f"  {s.model_type}, {s.layers} layers{' (--layers override)' if cfg.layers else ''}, hidden {s.hidden}, "
        f"intermediate {s.intermediate}, "
        f"{s.heads} heads / {s.kv_heads} KV heads x {s.head_dim}, vocab {s.vocab}, "
        f"{'tied' if s.tied else 'untied'} lm_head",
        f"  parameters {c['total']:,} ({_b(c['total'])}): decoder linear weights {_b(c['linear_weights'])} "
        f"(NF4-quantisable), other {_b(c['other'])}",
        f"  LoRA r={cfg.lora_r} on q,k,v,o,gate,up,down: {plan.lora_params:,} ({_b(plan.lora_params)}, "
        f"{100 * plan.lora_params / c['total']:.2f}% of the model)",
        f"  reference SFT adapter r={cfg.ref_adapter_r} (fp32): {_ref_adapter(plan):,} ({_b(_ref_adapter(plan))}), "
        f"held by naive, online-ref and stage 1; stage 2 reads the cache" if cfg.ref_adapter_r else None,
        f"setting: {cfg.gpus} {'CPU processes' if cfg.cpu else 'GPUs'} x {gpu_memory_gib(cfg):g} GiB; "
        f"training {cfg.batch_size} pair(s) x 2 x seq_len "
        f"{cfg.max_length} = {tokens:,} tokens per GPU per step, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; stage 1 {cfg.max_tokens_per_batch:,} tokens per forward",
        *attention_lines(plan),
    ]
    return [x for x in lines if x is not None]


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1: '64 MiB', '1.5 GiB', '32 KiB', '256 B'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def attention_lines(plan: Plan) -> list[str]:
    """The attention and the layout the stage columns assume: the dense mask's B x T^2 x 1 B per forward of each
    stage, or segments (no mask); unpacked rows or --pack's sequences (planterms.stage_sequences)."""
    cfg, model_type = plan.config, plan.shape.model_type
    (b1, t1), (b2, t2) = stage_sequences(cfg, 1), stage_sequences(cfg, 2)
    if plan.attention == "segments":
        auto = f"; --attention auto takes it for {model_type}" if cfg.attention == "auto" else ""
        head = f"attention: segments (no [T, T] mask: per segment from the rows' boundaries{auto})"
    else:
        auto = f" (--attention auto: model_type {model_type!r} is counted dense)" if cfg.attention == "auto" else ""
        head = (f"attention: dense [B, 1, T, T] bool mask (sdpa){auto}, per forward: stage one {b1} x {t1}^2 x 1 B = "
                f"{_size(mask_bytes(cfg, 1))}, stage two {b2} x {t2}^2 x 1 B = {_size(mask_bytes(cfg, 2))}")
    if cfg.pack:
        layout = (f"layout: packed (--pack), prompts back to back, no padding but at the end: stage one 1 sequence "
                  f"of {t1:,} tokens per forward, stage two 1 sequence of {t2:,}")
    else:
        layout = (f"layout: unpacked, one [prompt | chosen | rejected] row per pair padded to the longest: stage one "
                  f"{_n(b1, 'row')} of {t1:,} tokens per forward, stage two {_n(b2, 'row')} of {t2:,}")
    return [head, layout]


def _attention_notes(plan: Plan) -> list[str]:
    """What the attention terms count and what they leave out."""
    if plan.attention == "segments":
        return ["  - attention scores are not counted anywhere here: --attention segments builds no [T, T] tensor; "
                "its largest attention intermediate is one segment's q.k (the math kernel's; CUDA's flash and "
                "memory-efficient kernels make none)"]
    return ["  - attention scores are not counted anywhere here (SDPA keeps no [T, T] score matrix); the dense "
            "layout's [B, 1, T, T] mask is counted as sdpa's bool (1 B per entry; eager's additive mask would take 2 B "
            "in bf16); it keeps SDPA off the flash kernel, --attention segments drops it; the naive and online-ref "
            "columns are other trainers' layouts: no mask counted there",
            "  - --pack with the dense mask: one [T, T] mask over the whole packed sequence (it grows with the budget "
            "squared)" if plan.config.pack else None]


def _ref_adapter(plan: Plan) -> int:
    """A_ref, the reference's SFT adapter parameters (the article's reference term holds them in bf16)."""
    return (plan.article["reference"] - BF16 * plan.counts["total"]) // BF16


def article_lines(plan: Plan) -> list[str]:
    """Naive DPO in the article's convention (Plan.article, 8 B/param), in GB = 10^9 bytes as the article writes,
    against N GPUs x the --gpu-memory figure taken as the article takes a GPU's size."""
    a, n, g = plan.article, plan.config.gpus, gpu_memory_gib(plan.config)
    total, naive = sum(a.values()), plan.scenario("naive").total
    return ["naive DPO, article convention (bf16 policy 2 + bf16 reference 2 + AdamW m, v in bf16 4 = 8 B/param"
            + (", + the SFT adapter in bf16" if plan.config.ref_adapter_r else "") + "), GB = 10^9 bytes:",
            "  " + " + ".join(f"{k} {v / 1e9:.1f}" for k, v in a.items()) + f" = {total / 1e9:.1f} GB in all, "
            f"{total / n / 1e9:.1f} GB ({total / n / GIB:.1f} GiB) per GPU",
            f"  vs {n} x {g:g} GB = {n * g:g} GB: {'fits' if total <= n * g * 1e9 else 'does not fit'} as the "
            f"article counts (the naive column above: {naive / GIB:.1f} GiB per GPU)"]


def _labels(plan: Plan, field: str) -> list[str]:
    """The union of the scenarios' rows of one phase (breakdown or load_breakdown), in _ROW_ORDER."""
    labels: list[str] = []
    for sc in plan.scenarios:
        labels += [k for k in getattr(sc, field) if k not in labels]
    return sorted(labels, key=lambda k: _ROW_ORDER.index(k) if k in _ROW_ORDER else len(_ROW_ORDER))


def _rows(plan: Plan, labels: list[str], field: str, width: int, col: int) -> list[str]:
    lines = []
    for label in labels:
        cells = [f"{getattr(sc, field)[label] / GIB:.1f}" if label in getattr(sc, field) else "-"
                 for sc in plan.scenarios]
        lines.append(f"  {label}".ljust(width) + "".join(x.rjust(col) for x in cells))
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as a table of GiB per GPU (one column per scenario), with fits/does-not-fit and suggestions."""
    labels = _labels(plan, "breakdown")
    width = max(len(x) for x in labels + _labels(plan, "load_breakdown") + ["per GPU, GiB"]) + 2
    col = max(len(sc.title) for sc in plan.scenarios) + 2
    lines = _header(plan) + ["", "per GPU, GiB".ljust(width) + "".join(sc.title.rjust(col) for sc in plan.scenarios)]
    lines += _rows(plan, labels, "breakdown", width, col)
    lines.append("  run peak".ljust(width) + "".join(f"{sc.run / GIB:.1f}".rjust(col) for sc in plan.scenarios))
    lines += _rows(plan, _labels(plan, "load_breakdown"), "load_breakdown", width, col)
    lines.append("  load peak".ljust(width) + "".join(f"{sc.load / GIB:.1f}".rjust(col) for sc in plan.scenarios))
    lines.append("  total = max(run, load)".ljust(width) +
                 "".join(f"{sc.total / GIB:.1f}".rjust(col) for sc in plan.scenarios))
    cap = f"fits in {gpu_memory_gib(plan.config):g} GiB?"
    lines.append(cap.ljust(width) + "".join(("yes" if sc.fits else "NO").rjust(col) for sc in plan.scenarios))
    lines += [""] + article_lines(plan)
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
        "  - naive column vs the article convention: the article keeps AdamW m and v in bf16 (4 B/param) and counts "
        "no gradients; here bf16 grads (2) + fp32 master + m + v (12) and the gathers, activations and overhead",
        "  - QLoRA+online ref = what most users run (TRL's default with PEFT): the same NF4 base + LoRA as stage 2, "
        "the reference recomputed each step with the adapters off - same memory give or take the reference "
        "forward's transient, but one more forward per step (~+25% compute with checkpointing)",
        f"  - a trainer that materialises full logits (plain HF forward) holds [2B, T, V] bf16 + fp32 for the "
        f"policy and the online reference: +{full_logits_bytes(plan.shape, plan.config) / GIB:.1f} GiB per GPU "
        f"at this batch and seq_len (chunked here and in TRL 1.16)",
        "  - load = the loading peak: each GPU's weight shards + the largest tensor's 1/N slice in flight (" +
        ("read in the checkpoint dtype, converted if it is not bf16; NF4 quantized" if plan.config.cpu else
         "plain weights pass through host memory; NF4 quantized on the GPU from bf16") +
        (") + stage two's whole fp32 LoRA weights before sharding" if plan.config.cpu else ")") +
        "; each column's total is the larger of its run and load peaks",
        "  - all-gather copy-out: FSDP2 copies a gathered unit out of its buffer while both exist; the root "
        "(embeddings, head) stays gathered, so one more copy of the largest unit is counted"
        if plan.config.gpus > 1 else None,
        f"  - NF4 absmax (fp32, one per 64 weights) is not sharded by FSDP2: "
        f"{nf4_split(plan.counts['linear_weights'])[1] / GIB:.2f} GiB whole on every GPU in the NF4 columns",
        *_attention_notes(plan),
    ]
    return "\n".join(x for x in lines if x is not None)
