"""Every command's settings: a frozen composition of groups (stages/settings/groups.py), plus the few groups only
one command has. A `part` may leave settings of its group out (`omit`) or word one for its command (`words`: help
and default); the type and the check stay the group's. stages/cli.py builds every command's options from these
(stages/settings/options.py); nothing here imports torch, so `dpo --help` is instant.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stages.base.errors import UserError
from stages.objective.lossspec import LossSpec, canonical_loss
from stages.settings.groups import (
    DATA_HELP,
    Attention,
    CacheInput,
    Compute,
    DataSpec,
    DType,
    Lengths,
    LoraSettings,
    LossSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    Schedule,
    at_least,
)
from stages.settings.options import Command, Group, opt, part

CACHE_LENGTHS = {"max_length": (None, "Prompt + reply tokens (default: the cache's)."),
                 "max_prompt_length": (None, "Prompt tokens (default: the cache's, or --max-length when that is "
                                                    "lower).")}


# ------------------------------------------------------------------------------------------------ stage one
@dataclass(frozen=True)
class Scoring(Group):
    """Stage one's cache file and how it scores: batches, parts (resume granularity), fingerprint, shard jobs."""

    output: str = opt("cache/ref.parquet", "Cache file (*.parquet).", aliases=("out",))
    max_tokens_per_batch: int = opt(8192, "Padded tokens per forward (below one example: one example per forward).")
    sort_by_length: bool = opt(True, "Length-sorted batches (less padding).")
    store_token_logps: bool = opt(False, "Also store per-token log-probs (needed by --ld-alpha).")
    batches_per_part: int = opt(8, "Save a part every N batches (resume granularity).")
    part_seconds: float = opt(60.0, "... and at least every S seconds (a kill loses at most this much work).")
    overwrite: bool = opt(False, "Recompute: ignore a cache or parts made with other settings.")
    full_hash: bool = opt(False, "SHA-256 every weight byte in the fingerprint (slow on big models).")
    num_shards: int = opt(1, "Split the examples into N independent jobs (then `dpo cache merge`).")
    shard_index: str = opt("0", "This job's shard, 0..N-1, or auto (SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX).")

    def check(self) -> None:
        at_least("max_tokens_per_batch", self.max_tokens_per_batch, 1)
        at_least("batches_per_part", self.batches_per_part, 1)
        if not self.part_seconds > 0:
            raise UserError(f"--part-seconds {self.part_seconds}: must be > 0")
        if Path(self.output).suffix != ".parquet":
            raise UserError(f"--output {self.output}: the cache is a Parquet file; name it *.parquet")
        if self.num_shards < 1:
            raise UserError(f"--num-shards must be >= 1, got {self.num_shards}")
        if self.num_shards == 1 and str(self.shard_index).strip() not in ("0", "auto"):
            raise UserError(f"--shard-index {self.shard_index} needs --num-shards > 1")


@dataclass(frozen=True)
class PrecomputeConfig(Command):
    """`dpo precompute-ref`: stage one."""

    model: ModelSettings = part(ModelSettings, words={
        "model": "Reference model: a local HF folder (safetensors).",
        "dtype": ("auto", "Reference weights (auto: fp32 on CPU, bf16 on GPU)."),
        "load_in_4bit": (False, "NF4 base, exactly as `dpo train` loads it (then train inherits it).")})
    data: DataSpec = part(DataSpec, omit=("eval_data",), words={
        "data": DATA_HELP + " Give train AND eval data: the cache covers every row."})
    scoring: Scoring = part(Scoring)
    lengths: Lengths = part(Lengths)
    compute: Compute = part(Compute, words={"share_prompt": (True, "Run each prompt once for both replies (same "
                                                                   "numbers).")})


# ------------------------------------------------------------------------------------------------ stage two
TRAIN_MODEL = {"model": "Local HF model folder (safetensors): the policy's base (normally the cache's model).",
               "adapter": (None, "Start from this PEFT adapter (default: the cache's adapter, else a new LoRA)."),
               "load_in_4bit": (None, "NF4 base (QLoRA) (default: as the cache's reference was loaded)."),
               "dtype": (None, "Weights/compute dtype (default: the cache's).")}
TRAIN_DATA = {"data": "Training data: " + DATA_HELP[len("Preference data (repeatable): "):]}


@dataclass(frozen=True)
class TrainConfig(Command):
    """`dpo train`: stage two. Model settings left unset (None) come from the cache."""

    model: ModelSettings = part(ModelSettings, words=TRAIN_MODEL)
    data: DataSpec = part(DataSpec, words=TRAIN_DATA)
    cache: CacheInput = part(CacheInput)
    run: RunSettings = part(RunSettings)
    lora: LoraSettings = part(LoraSettings)
    loss: LossSettings = part(LossSettings)
    optim: OptimSettings = part(OptimSettings)
    schedule: Schedule = part(Schedule)
    lengths: Lengths = part(Lengths, words=CACHE_LENGTHS)
    compute: Compute = part(Compute)


@dataclass(frozen=True)
class SweepGrid(Group):
    """The runs of a sweep: every (loss, β) pair."""

    betas: tuple[float, ...] = opt((), "β of one run; repeat for more (required).", resume=True, flags=("beta",))
    losses: tuple[LossSpec, ...] = opt(("sigmoid",), "Loss type or mixture of one run "
                                                     "('sigmoid*0.8+bco_pair*0.2+sft'); repeat for more.",
                                       resume=True, flags=("loss",))

    def __post_init__(self):  # each loss in its canonical spelling, so "a*1" and "a" are one run (YAML mappings too)
        object.__setattr__(self, "losses", tuple(canonical_loss(v) for v in self.losses))

    def check(self) -> None:
        if not self.betas:
            raise UserError("give at least one --beta (repeatable: --beta 0.01 --beta 0.1), or `betas: [...]` in the "
                            "YAML")
        if not self.losses:
            raise UserError("give at least one --loss (default sigmoid), or `losses: [...]` in the YAML")
        bad = [b for b in self.betas if not (b > 0 and b < float("inf"))]
        if bad:
            raise UserError(f"--beta {bad[0]}: β must be a positive number")


@dataclass(frozen=True)
class SweepConfig(TrainConfig):
    """`dpo sweep`: every `dpo train` option except beta/loss, plus betas and losses (the grid of runs)."""

    loss: LossSettings = part(LossSettings, omit=("loss", "beta"))
    grid: SweepGrid = part(SweepGrid)


# ------------------------------------------------------------------------------------------------ tools
@dataclass(frozen=True)
class PlanConfig(Group):
    """`dpo plan`: reads the same --config file as the stages (its `plan:` section, then `shared:`)."""

    model: str = opt(help="Model folder with config.json, or a config JSON file (no weights needed).")
    gpus: int = opt(8, "GPUs (processes).")
    gpu_memory: str = opt("80GB", "Memory per GPU, e.g. 80GB, 24GB.")
    max_length: int = opt(2048, "Prompt + reply tokens per sequence.", aliases=("seq_len",))
    batch_size: int = opt(1, "Pairs per GPU per micro-batch (stage two).", aliases=("batch",))
    lora_r: int = opt(16, "LoRA rank (stage two).")
    max_tokens_per_batch: int = opt(8192, "Stage-one token budget per forward (precompute-ref's default).")
    gradient_checkpointing: bool = opt(True, "Stage two recomputes activations in backward.")
    layers: int | None = opt(None, "Count the model with this many decoder layers (same widths).")
    cpu: bool = opt(False, "One CPU process per GPU: no CUDA overhead (compare with a CPU run).")
    ref_adapter_r: int = opt(0, "LoRA rank of the reference's SFT adapter on every decoder linear (0: none); its "
                                "fp32 weights are counted wherever a reference is held.")
    attention: Attention = opt("auto", "Mirrors the stages' --attention: dense (a [B, 1, T, T] mask per forward, "
                                        "counted), segments (no mask), auto (segments for the model types counted "
                                        "here).")
    pack: bool = opt(False, "Mirrors the stages' --pack: prompts back to back in one sequence up to the token budget "
                            "(no padding; with dense attention one mask over the whole sequence).")

    def check(self) -> None:
        counts = ("gpus", "max_length", "batch_size", "lora_r", "max_tokens_per_batch")
        for name in counts + (("layers",) if self.layers else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"dpo plan: --{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.ref_adapter_r, int) or self.ref_adapter_r < 0:
            raise UserError(f"--ref-adapter-r {self.ref_adapter_r!r}: must be a whole number >= 0 (0: the reference "
                            f"has no SFT adapter)")
        if self.attention not in typing.get_args(Attention):
            raise UserError(f"dpo plan: --attention {self.attention!r} is not one of "
                            f"{', '.join(typing.get_args(Attention))}")
        if not isinstance(self.pack, bool):
            raise UserError(f"dpo plan: --pack takes true or false, got {self.pack!r}")


@dataclass(frozen=True)
class Sampling(Group):
    """`dpo sample`'s own settings: which prompts, how replies are generated, where they go."""

    ref_adapter: str | None = opt(None, "Reference = base + this adapter (default: the base, adapters off).")
    n: int = opt(8, "Held-out prompts to sample.")
    max_new_tokens: int = opt(128, "Tokens generated per reply.")
    seed: int | None = opt(None, "Sample with this seed (default: greedy).")
    temperature: float = opt(0.7, "Sampling temperature (with --seed).")
    top_p: float = opt(0.95, "Nucleus sampling (with --seed).")
    beta: float | None = opt(None, "β of the implicit reward (default: the run's, from RUN/config.yaml).")
    output: str | None = opt(None, "Folder for samples.md / samples.jsonl (default: the run folder of --adapter, "
                                   "else ./samples).", aliases=("out",))
    max_prompt_length: int | None = opt(512, "Prompt tokens (cut at the start).")

    def check(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise UserError("-n and --max-new-tokens must be >= 1")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p must be in (0, 1] (1: no nucleus cut), got {self.top_p}")
        if not 0 < self.temperature < float("inf"):
            raise UserError(f"--temperature must be > 0 (for greedy replies leave out --seed), got {self.temperature}")


@dataclass(frozen=True)
class SampleConfig(Command):
    """`dpo sample`: reference and policy replies side by side, with implicit rewards."""

    model: ModelSettings = part(ModelSettings, words={
        "model": "Base model folder (the cache's model).",
        "adapter": "The trained policy: RUN/adapter (absent: the base's replies only)."})
    data: DataSpec = part(DataSpec, omit=("eval_data", "strict"), words={
        "data": "Held-out data (files, a save_to_disk folder or a Hub id)."})
    sampling: Sampling = part(Sampling)

    def check(self) -> None:
        if self.sampling.ref_adapter and self.model.adapter is None:
            raise UserError("--ref-adapter needs --adapter (the policy); without it only the reference is sampled")


@dataclass(frozen=True)
class CachePath(Group):
    """The cache file a `dpo cache` command reads."""

    path: str = opt(help="The cache file.", argument=True)


@dataclass(frozen=True)
class InfoFormat(Group):
    """How `dpo cache info` prints."""

    json: bool = opt(False, "Print one JSON object with the whole metadata and the statistics (not the summary).")


@dataclass(frozen=True)
class CacheInfoConfig(Command):
    """`dpo cache info CACHE [--json]`."""

    cache: CachePath = part(CachePath)
    format: InfoFormat = part(InfoFormat)


@dataclass(frozen=True)
class VerifyModel(Group):
    """`dpo cache verify`'s optional model."""

    model: str | None = opt(None, "Also check the tokenizer and weights fingerprints against this model.")


@dataclass(frozen=True)
class CacheVerifyConfig(Command):
    """`dpo cache verify CACHE --data ...`."""

    cache: CachePath = part(CachePath)
    data: DataSpec = part(DataSpec, omit=("eval_data", "strict", "data_split"), words={
        "data": "The data the cache should cover (repeatable)."})
    model: VerifyModel = part(VerifyModel)
    lengths: Lengths = part(Lengths, words=CACHE_LENGTHS)


@dataclass(frozen=True)
class TrlExport(Group):
    """`dpo cache export-trl`'s output and convention."""

    output: str = opt(help="Output dataset: *.parquet, *.jsonl or *.jsonl.gz.", aliases=("out",))
    trl_chat_convention: bool = opt(False, "Conversational rows: also score the template's text after the "
                                           "end-of-turn token, as TRL does (loads the cache's reference model).")
    model: str | None = opt(None, "With --trl-chat-convention: the reference model's folder, if it moved (same "
                                  "weights; default: the path the cache records).")


@dataclass(frozen=True)
class ExportTrlConfig(Command):
    """`dpo cache export-trl CACHE --data ... --output ...`."""

    cache: CachePath = part(CachePath)
    data: DataSpec = part(DataSpec, omit=("eval_data", "data_split"), words={
        "data": "Preference file(s) the cache was made from (repeatable)."})
    export: TrlExport = part(TrlExport)


@dataclass(frozen=True)
class CacheMergeConfig(Group):
    """`dpo cache merge SHARD_FILE... --output FILE`."""

    shard_files: tuple[str, ...] = opt(help="The shard caches of `precompute-ref --num-shards N`.", argument=True)
    output: str = opt(help="The merged cache (written atomically).", aliases=("out",))


@dataclass(frozen=True)
class CompareConfig(Group):
    """`dpo compare RUN_DIR...`."""

    run_dirs: tuple[str, ...] = opt(help="`dpo train` outputs or whole `dpo sweep` folders.", argument=True)
    output: str | None = opt(None, "Folder for compare.png / compare.csv (default: the folder holding the runs).",
                             aliases=("out",))
    samples: bool = opt(False, "Also one table of samples per run (RUN/samples.jsonl from `dpo sample`).")


@dataclass(frozen=True)
class DemoConfig(Group):
    """`dpo demo`."""

    quick: bool = opt(False, "A smoke test of every stage in about two minutes.")


@dataclass(frozen=True)
class FromTrlConfig(Group):
    """`dpo config from-trl DPOConfig.yaml`."""

    path: str = opt(help="A TRL DPOConfig / TrainingArguments YAML file.", argument=True)


# ------------------------------------------------------------------------------------------------ export
MergeInto = Literal["original", "dequantized"]  # stages/model/merge.py applies them
GgufType = Literal["auto", "f32", "f16", "bf16"]  # stages/model/ggufwrite.GGUF_TYPES (a test holds them equal)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}  # as transformers' save_pretrained reads max_shard_size


@dataclass(frozen=True)
class ExportConfig(Group):
    """`dpo export RUN_DIR_OR_ADAPTER --output DIR`: the merged model, its card, optionally a GGUF."""

    run_dir_or_adapter: str = opt(help="A `dpo train` output folder (its adapter/, config.yaml and cache) or a "
                                       "PEFT adapter folder.", argument=True)
    output: str = opt(help="Folder for the merged model (written under a temporary name, renamed when complete).",
                      aliases=("out",))
    base: str | None = opt(None, "The base model folder (default: the run's --model, else the adapter's "
                                 "base_model_name_or_path).", aliases=("model",))
    dtype: DType = opt("auto", "Dtype of the written weights (auto: the run's, as its cache records; an adapter "
                               "alone: the base's stored dtype).")
    merge_into: MergeInto = opt("original", "Merge LoRA into the original base weights (what serving stacks "
                                            "load) or into their NF4 round trip (dequantized: what a QLoRA "
                                            "adapter was trained against).")
    max_shard_size: str = opt("5GB", "Largest safetensors file, e.g. 500MB, 5GB, 2GiB (GB = 10^9 bytes, as "
                                     "save_pretrained).")
    gguf: bool = opt(False, "Also write DIR/model.<type>.gguf for llama.cpp (llama, qwen2, mistral).")
    gguf_type: GgufType = opt("auto", "GGUF tensor type (auto: as --dtype: fp32 -> f32, bf16 -> bf16, "
                                      "fp16 -> f16).")
    overwrite: bool = opt(False, "Replace an existing DIR (the old one goes only once the new one is complete).")
    trust_remote_code: bool = opt(False, "Let transformers run code shipped with the base model (off: "
                                         "nothing from a model folder is executed).")

    def check(self) -> None:
        if not self.run_dir_or_adapter:
            raise UserError("dpo export: name a run folder or an adapter folder (RUN_DIR_OR_ADAPTER)")
        if Path(self.output).resolve() in (src := Path(self.run_dir_or_adapter).resolve(), *src.parents):
            raise UserError(f"--output {self.output}: would replace the run or adapter it exports; pick a new folder")
        parse_size(self.max_shard_size)  # a size that does not parse is one line, before anything is read

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


def parse_size(text: str) -> int:
    """--max-shard-size in bytes (the one place it is read): 5GB = 5·10^9, 2GiB = 2·2^30, a bare number = bytes."""
    clean = str(text).strip().upper().replace(" ", "")
    number = clean.rstrip("KMGTIB")
    try:
        value = float(number) * SIZE_UNITS[clean[len(number):]]
    except (ValueError, KeyError):
        value = 0
    if not 1 <= value < 2**63:  # also NaN and inf
        raise UserError(f"--max-shard-size {text!r}: not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(value)
