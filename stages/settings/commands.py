"""Every command's settings: one frozen dataclass each, and each field the single source of its option.

A field's name is its YAML key and (with dashes) its `--option`; its type gives the option's type (`Literal[...]`
becomes a choice, `bool` a --x/--no-x flag, `tuple[...]` a repeatable option); its default is the default shown by
`--help`; its metadata holds the help text, whether it may change when a run is resumed (`resume=True`), old
spellings still accepted (`aliases`) and positional arguments. stages/cli.py builds every command from these;
nothing here imports torch, so `dpo --help` is instant.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass
from typing import Literal

from stages.base.constants import CHUNK_HELP, DEFAULT_SPLIT
from stages.objective.lossspec import LOSS_TYPES, LossSpec, canonical_loss

DType = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Scheduler = Literal["cosine", "linear", "constant_with_warmup"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def opt(default=MISSING, help: str = "", *, resume: bool = False, aliases: tuple[str, ...] = (),
        flags: tuple[str, ...] = (), argument: bool = False):
    """A config field: default, help text, `resume` = may differ from the run being resumed, `aliases` = older
    option names that are also accepted as YAML keys, `flags` = other option names only (--beta for betas),
    `argument` = a positional command-line argument."""
    meta = {"help": help, "resume": resume, "aliases": aliases, "flags": flags, "argument": argument}
    return dataclasses.field(default=default, metadata=meta)


def resume_free(cls) -> tuple[str, ...]:
    """The fields that may change between a run and its resume (the only list of them)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))


# ------------------------------------------------------------------------------------------- shared pieces
_COMMON = {  # options several commands share: declared here once, each class gets its own field object
    "strict": (False, "Rows with chosen == rejected or an empty reply are errors, not skipped."),
    "prompt_field": ("prompt", "Column holding the prompt."),
    "chosen_field": ("chosen", "Column holding the chosen reply."),
    "rejected_field": ("rejected", "Column holding the rejected reply."),
    "data_split": (DEFAULT_SPLIT, "Split of a saved DatasetDict / Hub dataset given without :split."),
    "trust_remote_code": (False, "Run model code from the model folder."),
    "chunk_size": (None, CHUNK_HELP),
    "replicas": (1, "HSDP: replica groups (e.g. nodes); weights sharded within one, replicated across."),
}


def common(name: str, **meta):
    """A fresh field for one of the shared options (a Field object must not be shared between dataclasses)."""
    default, help = _COMMON[name]
    return opt(default, help, **meta)


DATA_HELP = ("Preference data (repeatable): .jsonl, .jsonl.gz, .json, .parquet, a save_to_disk folder, or a Hub "
             "dataset id owner/name[@config][:split].")


@dataclass(frozen=True)
class PrecomputeConfig:
    """`dpo precompute-ref`: stage one."""

    model: str = opt(help="Reference model: a local HF folder (safetensors).")
    data: tuple[str, ...] = opt(help=DATA_HELP + " Give train AND eval data: the cache covers every row.")
    output: str = opt("cache/ref.parquet", "Cache file (*.parquet).", aliases=("out",))
    adapter: str | None = opt(None, "PEFT adapter on top of the base (e.g. the SFT adapter).")
    dtype: DType = opt("auto", "Reference weights (auto: fp32 on CPU, bf16 on GPU).")
    load_in_4bit: bool = opt(False, "NF4 base, exactly as `dpo train` loads it (then train inherits it).")
    trust_remote_code: bool = common("trust_remote_code")
    max_length: int = opt(1024, "Prompt + reply tokens (replies are cut at the end).")
    max_prompt_length: int = opt(512, "Prompt tokens (prompts are cut at the start).")
    max_tokens_per_batch: int = opt(8192, "Padded tokens per forward (below one example: one example per forward).")
    share_prompt: bool = opt(True, "Run each prompt once for both replies (same numbers).")
    sort_by_length: bool = opt(True, "Length-sorted batches (less padding).")
    store_token_logps: bool = opt(False, "Also store per-token log-probs (needed by --ld-alpha).")
    batches_per_part: int = opt(8, "Save a part every N batches (resume granularity).")
    part_seconds: float = opt(60.0, "... and at least every S seconds (a kill loses at most this much work).")
    chunk_size: int | None = common("chunk_size")
    overwrite: bool = opt(False, "Recompute: ignore a cache or parts made with other settings.")
    full_hash: bool = opt(False, "SHA-256 every weight byte in the fingerprint (slow on big models).")
    num_shards: int = opt(1, "Split the examples into N independent jobs (then `dpo cache merge`).")
    shard_index: str = opt("0", "This job's shard, 0..N-1, or auto (SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX).")
    replicas: int = common("replicas")
    strict: bool = common("strict")
    prompt_field: str = common("prompt_field")
    chosen_field: str = common("chosen_field")
    rejected_field: str = common("rejected_field")
    data_split: str = common("data_split")


@dataclass(frozen=True)
class TrainConfig:
    """`dpo train`: stage two. Model settings left unset (None) come from the cache."""

    model: str = opt(help="Local HF model folder (safetensors): the policy's base (normally the cache's model).")
    data: tuple[str, ...] = opt(help="Training data: " + DATA_HELP[len("Preference data (repeatable): "):])
    ref_cache: str = opt(help="Reference cache from `dpo precompute-ref`.")
    output: str = opt(help="Run folder (a rerun resumes from its newest checkpoint).", resume=True)
    eval_data: tuple[str, ...] = opt((), "Held-out data (same forms; e.g. owner/name:test).")
    adapter: str | None = opt(None, "Start from this PEFT adapter (default: the cache's adapter, else a new LoRA).")
    load_in_4bit: bool | None = opt(None, "NF4 base (QLoRA) (default: as the cache's reference was loaded).")
    dtype: DType | None = opt(None, "Weights/compute dtype (default: the cache's).")
    trust_remote_code: bool = common("trust_remote_code")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    target_modules: tuple[str, ...] = opt(("all-linear",), "LoRA targets (repeatable); all-linear = every linear "
                                          "layer but the LM head.")
    gradient_checkpointing: bool = opt(True, "Recompute activations in backward (less memory).")
    loss: LossSpec = opt("sigmoid", f"A loss type ({' '.join(LOSS_TYPES)}) or a mixture "
                                    "'sigmoid*0.8+bco_pair*0.2+sft'.")
    beta: float = opt(0.1, "DPO beta (multiplies the log-ratio difference).")
    label_smoothing: float = opt(0.0, "Epsilon of robust, exo_pair, aot*; with sigmoid it makes cDPO (TRL 1.16 "
                                      "ignores it there).")
    sft_weight: float = opt(0.0, "Adds w x per-token NLL of each chosen reply, averaged over pairs (the 'sft' loss "
                                 "type is TRL's: mean over all chosen tokens of the batch).")
    f_divergence: FDivergence = opt("reverse_kl", "f-DPO scores (TRL's f_divergence_type).")
    f_alpha: float = opt(0.5, "Alpha of alpha_divergence.")
    discopop_tau: float = opt(0.05, "Tau of the discopop loss.")
    use_weighting: bool = opt(False, "WPO: weight each pair by the policy's length-normalised probabilities.")
    ld_alpha: float | None = opt(None, "LD-DPO alpha in [0, 1]: weight of reply tokens beyond the pair's shared "
                                       "length (needs a cache made with --store-token-logps).")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    lr_scheduler: Scheduler = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    optimizer: Optimizer = opt("adamw", "Optimizer. The 8-bit ones (bitsandbytes) need a GPU and one process: under "
                                        "torchrun (FSDP2) only adamw runs (8-bit state on DTensors is untested, "
                                        "bitsandbytes #1633; AdamW's LoRA-sized state is small).")
    batch_size: int = opt(4, "Pairs per micro-batch per process.")
    eval_batch_size: int = opt(8, "Pairs per eval forward per process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (0: no clipping).")
    max_steps: int = opt(-1, "Optimizer steps (overrides --epochs when > 0).")
    epochs: float = opt(1.0, "Passes over the training data (when --max-steps is not set).")
    seed: int = opt(42, "Seed of the LoRA init and the data order.")
    logging_steps: int = opt(1, "Log every N steps.", resume=True)
    eval_steps: int = opt(0, "Eval every N steps (0: only at the end).", resume=True)
    save_steps: int = opt(0, "Checkpoint every N steps (0: only at the end).", resume=True)
    save_total_limit: int = opt(2, "Checkpoints kept.", resume=True)
    resume: bool = opt(True, "Resume from the newest checkpoint (--no-resume: start again).", resume=True)
    report_to: tuple[str, ...] = opt((), "Trackers: none, tensorboard, wandb, mlflow, trackio, all "
                                         "(comma-separated or repeated).", resume=True)
    tensorboard: bool = opt(False, "Same as --report-to tensorboard.", resume=True)
    allow_cache_mismatch: bool = opt(False, "Accept a cache made with another tokenizer/chat-template hash.")
    max_length: int | None = opt(None, "Prompt + reply tokens (default: the cache's).")
    max_prompt_length: int | None = opt(None, "Prompt tokens (default: the cache's).")
    chunk_size: int | None = common("chunk_size", resume=True)  # memory and speed only
    share_prompt: bool = opt(True, "One [prompt|chosen|rejected] row per pair: the prompt runs once (same "
                                   "gradients).")
    replicas: int = common("replicas")
    strict: bool = common("strict")
    prompt_field: str = common("prompt_field")
    chosen_field: str = common("chosen_field")
    rejected_field: str = common("rejected_field")
    data_split: str = common("data_split")

    def __post_init__(self):  # the canonical loss string: one spelling per mixture (YAML mappings included)
        object.__setattr__(self, "loss", canonical_loss(self.loss))


VARIED = ("beta", "loss")  # TrainConfig fields a sweep varies


def _sweep_config_class():
    """TrainConfig's fields minus beta/loss, plus betas (--beta, repeatable) and losses (--loss, repeatable)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in VARIED:
            continue
        fields.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata)))
        if f.name == "output":  # right after the required fields, so the saved YAML reads naturally
            fields += [
                ("betas", tuple[float, ...], opt((), "β of one run; repeat for more (required).", resume=True,
                                                 flags=("beta",))),
                ("losses", tuple[LossSpec, ...], opt(("sigmoid",), "Loss type or mixture of one run "
                                                      "('sigmoid*0.8+bco_pair*0.2+sft'); repeat for more.",
                                                      resume=True, flags=("loss",))),
            ]
    def __post_init__(self):  # each loss in its canonical spelling, so "a*1" and "a" are one run (YAML mappings too)
        object.__setattr__(self, "losses", tuple(canonical_loss(v) for v in self.losses))

    cls = dataclasses.make_dataclass("SweepConfig", fields, frozen=True, namespace={"__post_init__": __post_init__})
    cls.__module__ = __name__
    cls.__doc__ = "`dpo sweep`: every `dpo train` option except beta/loss, plus betas and losses."
    return cls


SweepConfig = _sweep_config_class()


@dataclass(frozen=True)
class PlanConfig:
    """`dpo plan`: reads the same --config file as the stages (its `plan:` section, then `shared:`)."""

    model: str = opt(help="Model folder with config.json, or a config JSON file (no weights needed).")
    gpus: int = opt(8, "GPUs (processes).")
    gpu_memory: str = opt("80GB", "Memory per GPU, e.g. 80GB, 24GB.")
    max_length: int = opt(2048, "Prompt + reply tokens per sequence.", aliases=("seq_len",))
    batch_size: int = opt(1, "Pairs per GPU per micro-batch (stage two).", aliases=("batch",))
    lora_r: int = opt(16, "LoRA rank.")
    max_tokens_per_batch: int = opt(8192, "Stage-one token budget per forward (precompute-ref's default).")
    gradient_checkpointing: bool = opt(True, "Stage two recomputes activations in backward.")
    layers: int | None = opt(None, "Count the model with this many decoder layers (same widths).")
    cpu: bool = opt(False, "One CPU process per GPU: no CUDA overhead (compare with a CPU run).")


@dataclass(frozen=True)
class SampleConfig:
    """`dpo sample`: reference and policy replies side by side, with implicit rewards."""

    model: str = opt(help="Base model folder (the cache's model).")
    data: tuple[str, ...] = opt(help="Held-out data (files, a save_to_disk folder or a Hub id).")
    adapter: str | None = opt(None, "The trained policy: RUN/adapter (absent: the base's replies only).")
    ref_adapter: str | None = opt(None, "Reference = base + this adapter (default: the base, adapters off).")
    n: int = opt(8, "Held-out prompts to sample.")
    max_new_tokens: int = opt(128, "Tokens generated per reply.")
    seed: int | None = opt(None, "Sample with this seed (default: greedy).")
    temperature: float = opt(0.7, "Sampling temperature (with --seed).")
    top_p: float = opt(0.95, "Nucleus sampling (with --seed).")
    beta: float | None = opt(None, "β of the implicit reward (default: the run's, from RUN/config.yaml).")
    output: str | None = opt(None, "Folder for samples.md / samples.jsonl (default: the run folder of --adapter, "
                                   "else ./samples).", aliases=("out",))
    dtype: DType = opt("auto", "Weights dtype (auto: fp32 on CPU, bf16 on GPU).")
    load_in_4bit: bool = opt(False, "NF4 base.")
    trust_remote_code: bool = common("trust_remote_code")
    max_prompt_length: int | None = opt(512, "Prompt tokens (cut at the start).")
    data_split: str = common("data_split")
    prompt_field: str = common("prompt_field")
    chosen_field: str = common("chosen_field")
    rejected_field: str = common("rejected_field")


@dataclass(frozen=True)
class CacheInfoConfig:
    """`dpo cache info CACHE`."""

    path: str = opt(help="The cache file.", argument=True)


@dataclass(frozen=True)
class CacheVerifyConfig:
    """`dpo cache verify CACHE --data ...`."""

    path: str = opt(help="The cache file.", argument=True)
    data: tuple[str, ...] = opt(help="The data the cache should cover (repeatable).")
    model: str | None = opt(None, "Also check the tokenizer and weights fingerprints against this model.")
    max_length: int | None = opt(None, "Prompt + reply tokens (default: the cache's).")
    max_prompt_length: int | None = opt(None, "Prompt tokens (default: the cache's).")
    prompt_field: str = common("prompt_field")
    chosen_field: str = common("chosen_field")
    rejected_field: str = common("rejected_field")


@dataclass(frozen=True)
class ExportTrlConfig:
    """`dpo cache export-trl CACHE --data ... --output ...`."""

    path: str = opt(help="The cache file.", argument=True)
    data: tuple[str, ...] = opt(help="Preference file(s) the cache was made from (repeatable).")
    output: str = opt(help="Output dataset: *.parquet, *.jsonl or *.jsonl.gz.", aliases=("out",))
    trl_chat_convention: bool = opt(False, "Conversational rows: also score the template's text after the "
                                           "end-of-turn token, as TRL does (loads the cache's reference model).")
    model: str | None = opt(None, "With --trl-chat-convention: the reference model's folder, if it moved (same "
                                  "weights; default: the path the cache records).")
    strict: bool = common("strict")
    prompt_field: str = common("prompt_field")
    chosen_field: str = common("chosen_field")
    rejected_field: str = common("rejected_field")


@dataclass(frozen=True)
class CacheMergeConfig:
    """`dpo cache merge SHARD_FILE... --output FILE`."""

    shard_files: tuple[str, ...] = opt(help="The shard caches of `precompute-ref --num-shards N`.", argument=True)
    output: str = opt(help="The merged cache (written atomically).", aliases=("out",))


@dataclass(frozen=True)
class CompareConfig:
    """`dpo compare RUN_DIR...`."""

    run_dirs: tuple[str, ...] = opt(help="`dpo train` outputs or whole `dpo sweep` folders.", argument=True)
    output: str | None = opt(None, "Folder for compare.png / compare.csv (default: the folder holding the runs).",
                             aliases=("out",))
    samples: bool = opt(False, "Also one table of samples per run (RUN/samples.jsonl from `dpo sample`).")


@dataclass(frozen=True)
class DemoConfig:
    """`dpo demo`."""

    quick: bool = opt(False, "A smoke test of every stage in about two minutes.")


@dataclass(frozen=True)
class FromTrlConfig:
    """`dpo config from-trl DPOConfig.yaml`."""

    path: str = opt(help="A TRL DPOConfig / TrainingArguments YAML file.", argument=True)


def fields_with_aliases(cls) -> dict[str, str]:
    """{alias: field name} for the older spellings a config class still accepts."""
    return {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
