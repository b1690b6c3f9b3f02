"""The settings, in frozen groups that own their defaults and their one check (stages/settings/options.py says how a
setting is declared). The commands (stages/settings/commands.py) are compositions of these groups; the code below a
command receives the groups it needs. Torch-free: `dpo --help` reads these."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stages.base.constants import CHUNK_HELP, DEFAULT_SPLIT, launched_world_size
from stages.base.errors import UserError
from stages.data.pairs import PAIR_RULES
from stages.objective.lossspec import (
    LOSS_TYPES,
    LossSpec,
    canonical_loss,
    check_loss,
    format_loss_spec,
    parse_loss_spec,
)
from stages.settings.options import Group, opt

DType = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Scheduler = Literal["cosine", "linear", "constant_with_warmup"]
Attention = Literal["dense", "segments", "auto"]  # stages/model/rowlayout.prepare_model
PairRuleName = Literal[PAIR_RULES]  # the rule names, declared once with the rule (stages/data/pairs.py)
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
FSDP2_OPTIMIZERS = ("adamw",)  # tested under FSDP2 (more than one process); torch AdamW: LoRA-sized state, small
DATA_HELP = ("Preference data (repeatable): .jsonl, .jsonl.gz, .json, .parquet, a save_to_disk folder, or a Hub "
             "dataset id owner/name[@config][:split].")


def at_least(name: str, value, low, inclusive: bool = True) -> None:
    """The one range rule: `--name value: must be >= low` (or > low)."""
    if value is not None and not (value >= low if inclusive else value > low):
        raise UserError(f"--{name.replace('_', '-')} {value}: must be {'>=' if inclusive else '>'} {low}")


@dataclass(frozen=True)
class DataSpec(Group):
    """Which rows: the sources, their split, the column names, and what an unusable row does."""

    data: tuple[str, ...] = opt(help=DATA_HELP)
    eval_data: tuple[str, ...] = opt((), "Held-out data (same forms; e.g. owner/name:test).")
    strict: bool = opt(False, "Rows with chosen == rejected, an empty reply, or no room within the lengths are errors, "
                              "not skipped.")
    prompt_field: str = opt("prompt", "Column holding the prompt.")
    chosen_field: str = opt("chosen", "Column holding the chosen reply.")
    rejected_field: str = opt("rejected", "Column holding the rejected reply.")
    data_split: str = opt(DEFAULT_SPLIT, "Split of a saved DatasetDict / Hub dataset given without :split.")
    replies_field: str | None = opt(None, "Many replies per prompt: the column holding the replies (default: "
                                          "completions, else answers).")
    scores_field: str = opt("scores", "Many replies per prompt: the column of scores (higher is better).")
    ranks_field: str = opt("ranks", "Many replies per prompt: the column of ranks (1 = best), instead of scores.")
    rank_by: str | None = opt(None, "Replies given as objects: the key ranking them, or an UltraFeedback aspect "
                                    "(helpfulness, honesty, ...) (default: overall_score, Nectar's rank).")
    pairs: PairRuleName = opt("all", "Many replies per prompt: which pairs train (all, best-worst, best-rest); "
                                     "ties never pair.")
    min_score_gap: float = opt(0.0, "Many replies per prompt: a pair needs at least this score difference.")

    def check(self) -> None:
        if not self.data:
            raise UserError("give the preference file(s) with --data (repeatable)")
        if not (self.min_score_gap >= 0 and math.isfinite(self.min_score_gap)):
            raise UserError(f"--min-score-gap {self.min_score_gap}: must be a finite number >= 0")

    def fields(self):
        """The column names as the data layer takes them."""
        from stages.data.rows import FieldMap

        return FieldMap(self.prompt_field, self.chosen_field, self.rejected_field)

    def load(self, paths: tuple[str, ...] | None = None):
        """The data layer's Loaded (pair rows, or reply sets and their pairs) of `paths` (default: --data)."""
        from stages.data.pairs import PairRule
        from stages.data.replies import ReplyFields, load_data

        replies = ReplyFields(self.prompt_field, self.replies_field, self.scores_field, self.ranks_field, self.rank_by)
        return load_data(self.data if paths is None else paths, self.fields(), replies,
                         PairRule(self.pairs, self.min_score_gap), self.strict, self.data_split)


@dataclass(frozen=True)
class ModelSettings(Group):
    """The model as loaded: weights folder, adapter, dtype, NF4. None (stage two): as the cache's reference."""

    model: str = opt(help="Local HF model folder (safetensors).")
    adapter: str | None = opt(None, "PEFT adapter on top of the base (e.g. the SFT adapter).")
    dtype: DType | None = opt("auto", "Weights dtype (auto: fp32 on CPU, bf16 on GPU).")
    load_in_4bit: bool | None = opt(False, "NF4 base.")
    trust_remote_code: bool = opt(False, "Run model code from the model folder.")

    def spec(self, **resolved):
        """The model layer's ModelSpec (with `resolved` values in place of unset ones)."""
        from stages.model.models import ModelSpec

        v = {"dtype": self.dtype, "load_in_4bit": self.load_in_4bit, "adapter": self.adapter, **resolved}
        return ModelSpec(self.model, v["dtype"], v["load_in_4bit"], v["adapter"], self.trust_remote_code)


@dataclass(frozen=True)
class Lengths(Group):
    """Token lengths. Stage one's are explicit; None elsewhere means the cache's (`tokenize` is the one place for
    that rule). A prompt length the user did not give never exceeds the maximum the user gave (`fill`)."""

    max_length: int | None = opt(1024, "Prompt + reply tokens (replies are cut at the end).")
    max_prompt_length: int | None = opt(512, "Prompt tokens (prompts are cut at the start; when not given and above "
                                             "--max-length, it is --max-length).")

    @classmethod
    def fill(cls, values: dict, given: set[str]) -> tuple[dict, list[str]]:
        length, prompt = values.get("max_length"), values.get("max_prompt_length")
        if "max_prompt_length" in given or length is None or prompt is None or prompt <= length:
            return values, []
        note = f"--max-prompt-length {length} (the default {prompt} exceeds --max-length {length})"
        return {**values, "max_prompt_length": length}, [note]

    def check(self) -> None:
        at_least("max_length", self.max_length, 1)
        at_least("max_prompt_length", self.max_prompt_length, 1)
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length > self.max_length:
            raise UserError(f"--max-prompt-length {self.max_prompt_length} cannot exceed --max-length "
                            f"{self.max_length}")

    def tokenize(self, meta: dict | None = None):
        """The data layer's TokenizeSettings: these lengths, unset ones from a cache's metadata (`meta`); a prompt
        length taken from the cache is cut to an explicit smaller --max-length (the rule of `fill`)."""
        from stages.data.encode import TokenizeSettings

        cached = (meta or {}).get("tokenization", {})
        length = cached.get("max_length") if self.max_length is None else self.max_length
        prompt = self.max_prompt_length
        if prompt is None:
            prompt = cached.get("max_prompt_length")
            if prompt is not None and length is not None and self.max_length is not None:
                prompt = min(prompt, length)
        return TokenizeSettings(length, prompt)


@dataclass(frozen=True)
class Compute(Group):
    """How the forward runs: memory and speed only, never the numbers."""

    chunk_size: int | None = opt(None, CHUNK_HELP, resume=True)  # memory and speed only
    share_prompt: bool = opt(True, "One [prompt|chosen|rejected] row per pair: the prompt runs once (same "
                                   "gradients).")
    replicas: int = opt(1, "HSDP: replica groups (e.g. nodes); weights sharded within one, replicated across.")
    max_row_tokens: int | None = opt(None, "Many replies per prompt: most tokens of one [prompt | replies] row; more "
                                           "replies go to further rows, each with its prompt (default: no limit).",
                                     resume=True)
    pack: bool = opt(False, "Pack several prompts (each with its replies) into one sequence up to the token budget "
                            "(--max-tokens-per-batch): no padding but at the end (same numbers).", resume=True)
    attention: Attention = opt("auto", "Attention of the shared rows: auto (segments where the model supports it, "
                                       "else dense), segments (per segment from the rows' boundaries, no mask), "
                                       "dense (a [T, T] mask); same numbers.", resume=True)

    def check(self) -> None:
        at_least("chunk_size", self.chunk_size, 1)
        at_least("max_row_tokens", self.max_row_tokens, 1)
        world_size = launched_world_size()
        if self.replicas < 1 or world_size % self.replicas:
            raise UserError(f"--replicas {self.replicas} must be >= 1 and divide the {world_size} processes "
                            f"(e.g. the number of nodes)")


@dataclass(frozen=True)
class LossSettings(Group):
    """Everything that decides the loss besides the log-probs; `check` refuses what would silently differ.
    stages/objective/loss.py turns it into the loss callable, once per run."""

    loss: LossSpec = opt("sigmoid", f"A loss type ({' '.join(LOSS_TYPES)}; any case; dpo = sigmoid) or a mixture "
                                    "'sigmoid*0.8+bco_pair*0.2+sft'; or plackett_luce (pl): the ranking of all a "
                                    "prompt's replies.")
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

    def __post_init__(self):  # the canonical loss string: one spelling per mixture (YAML mappings included)
        object.__setattr__(self, "loss", canonical_loss(self.loss))

    @classmethod
    def from_saved(cls, saved: dict) -> "LossSettings":
        """From a run's config.yaml (older runs lack the newer keys: their defaults apply)."""
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})

    @property
    def components(self):
        return parse_loss_spec(self.loss)

    def describe(self) -> str:
        """The loss in one short line: the spec, then only the settings that differ from plain DPO's (β aside):
        "sigmoid", "robust eps=0.1", "sigmoid*0.8+sft f=js_divergence ld=0.5 wpo"."""
        parts = [format_loss_spec(self.loss)]
        parts += [f"eps={self.label_smoothing:g}"] if self.label_smoothing else []
        parts += [f"sft_weight={self.sft_weight:g}"] if self.sft_weight else []
        if self.f_divergence != "reverse_kl":
            alpha = f"({self.f_alpha:g})" if self.f_divergence == "alpha_divergence" else ""
            parts.append(f"f={self.f_divergence}{alpha}")
        parts += [f"tau={self.discopop_tau:g}"] if "discopop" in self.loss and self.discopop_tau != 0.05 else []
        parts += [f"ld={self.ld_alpha:g}"] if self.ld_alpha is not None else []
        parts += ["wpo"] if self.use_weighting else []
        return " ".join(parts)

    def check(self) -> None:
        check_loss(self)  # the loss's rules live with the loss names (stages/objective/lossspec.py)


@dataclass(frozen=True)
class LoraSettings(Group):
    """The adapter stage two trains."""

    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    target_modules: tuple[str, ...] = opt(("all-linear",), "LoRA targets (repeatable); all-linear = every linear "
                                          "layer but the LM head.")
    gradient_checkpointing: bool = opt(True, "Recompute activations in backward (less memory).")

    def check(self) -> None:
        at_least("lora_r", self.lora_r, 1)
        at_least("lora_alpha", self.lora_alpha, 0, inclusive=False)
        at_least("lora_dropout", self.lora_dropout, 0)
        if self.lora_dropout >= 1:
            raise UserError("--lora-dropout must be below 1 and --warmup-ratio at most 1")

    def lora(self):
        """The model layer's LoraSettings."""
        from stages.model.models import LoraSettings as ModelLora

        return ModelLora(self.lora_r, self.lora_alpha, self.lora_dropout, self.target_modules)


@dataclass(frozen=True)
class OptimSettings(Group):
    """The optimizer and its learning-rate schedule. `check` also holds the optimizer rules that depend on the
    launch (torchrun's WORLD_SIZE, a GPU), so they fail before any data, cache or model is read."""

    learning_rate: float = opt(5e-5, "Peak learning rate.")
    lr_scheduler: Scheduler = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    optimizer: Optimizer = opt("adamw", "Optimizer. The 8-bit ones (bitsandbytes) need a GPU and one process: under "
                                        "torchrun (FSDP2) only adamw runs (8-bit state on DTensors is untested, "
                                        "bitsandbytes #1633; AdamW's LoRA-sized state is small).")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (0: no clipping).")

    def check(self) -> None:
        at_least("learning_rate", self.learning_rate, 0, inclusive=False)
        at_least("warmup_ratio", self.warmup_ratio, 0)
        at_least("weight_decay", self.weight_decay, 0)
        at_least("max_grad_norm", self.max_grad_norm, 0)
        if self.warmup_ratio > 1:
            raise UserError("--lora-dropout must be below 1 and --warmup-ratio at most 1")
        world_size = launched_world_size()
        if world_size > 1 and self.optimizer not in FSDP2_OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer} is refused with {world_size} processes: bitsandbytes' "
                            "8-bit state on FSDP2 DTensors is untested (bitsandbytes #1633); use --optimizer adamw "
                            "(LoRA-sized state)")
        if self.optimizer != "adamw" and not _cuda_available():
            raise UserError(f"--optimizer {self.optimizer} needs a GPU (bitsandbytes); use adamw on CPU")


def _cuda_available() -> bool:
    """Asked only for an 8-bit optimizer (importing torch here keeps `--help` torch-free)."""
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Schedule(Group):
    """How long, in what batches, and when to log, evaluate and save."""

    batch_size: int = opt(4, "Pairs (prompts, with several replies per prompt) per micro-batch per process.")
    eval_batch_size: int = opt(8, "Pairs (prompts) per eval forward per process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_tokens_per_batch: int | None = opt(None, "Fill micro-batches by tokens: whole pairs (prompts) up to this many "
                                                 "padded tokens and --batch-size; built once by length, shuffled each "
                                                 "epoch.")
    max_steps: int = opt(-1, "Optimizer steps (overrides --epochs when > 0).")
    epochs: float = opt(1.0, "Passes over the training data (when --max-steps is not set).")
    logging_steps: int = opt(1, "Log every N steps.", resume=True)
    eval_steps: int = opt(0, "Eval every N steps (0: only at the end).", resume=True)
    save_steps: int = opt(0, "Checkpoint every N steps (0: only at the end).", resume=True)
    save_total_limit: int = opt(2, "Checkpoints kept.", resume=True)

    def check(self) -> None:
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UserError("set --max-steps N or --epochs E (> 0)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise UserError("--batch-size and --gradient-accumulation-steps must be >= 1")
        for name in ("eval_batch_size", "logging_steps", "max_tokens_per_batch"):
            at_least(name, getattr(self, name), 1)
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            at_least(name, getattr(self, name), 0)


# the trackers --report-to names, in order, and the package each needs (stages/stage2/trackers.py implements them)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None


def parse_report_to(values, tensorboard: bool = False) -> tuple[str, ...]:
    """`--report-to` values (repeatable, each comma-separated) -> tracker names, in order, without repeats.
    `none` alone means none; `all` means every installed tracker (as in Trainer); `--tensorboard` (the old flag)
    adds tensorboard."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or ():
        for name in (n.strip().lower() for n in str(value).split(",")):
            if not name or name == "none":
                continue
            if name == "all":
                names += [n for n in TRACKER_PACKAGES if _installed(n)]
            elif name in TRACKER_PACKAGES:
                names.append(name)
            else:
                raise UserError(f"--report-to {name!r} is not a tracker; use none, {', '.join(TRACKER_PACKAGES)} "
                                "or all (comma-separated)")
    if tensorboard:
        names.append("tensorboard")
    return tuple(dict.fromkeys(names))


def check_installed(names) -> None:
    """One line naming the extra to install, before any model loads."""
    for name in names:
        if not _installed(name):
            raise UserError(f"--report-to {name} needs the {name} package: pip install 'dpo-stages[{name}]'")


@dataclass(frozen=True)
class RunSettings(Group):
    """Where a training run lives, whether it resumes, its seed and its trackers."""

    output: str = opt(help="Run folder (a rerun resumes from its newest checkpoint).", resume=True)
    seed: int = opt(42, "Seed of the LoRA init and the data order.")
    resume: bool = opt(True, "Resume from the newest checkpoint (--no-resume: start again).", resume=True)
    report_to: tuple[str, ...] = opt((), "Trackers: none, tensorboard, wandb, mlflow, trackio, all "
                                         "(comma-separated or repeated).", resume=True)
    tensorboard: bool = opt(False, "Same as --report-to tensorboard.", resume=True)

    def check(self) -> None:  # a misspelled or missing tracker package: before any model
        check_installed(self.trackers())

    def trackers(self) -> tuple[str, ...]:
        return parse_report_to(self.report_to, self.tensorboard)


@dataclass(frozen=True)
class CacheInput(Group):
    """The reference cache stage two trains against."""

    ref_cache: str = opt(help="Reference cache from `dpo precompute-ref`.")
    allow_cache_mismatch: bool = opt(False, "Accept a cache made with another tokenizer/chat-template hash.")
    allow_reference_mismatch: bool = opt(False, "Train against a cache whose reference had other weights, adapter, "
                                                "quantization or dtype than this policy (e.g. a continued run): "
                                                "rewards then do not start at 0 and the step-0 drift check only "
                                                "warns.")
    # no check of its own: read_cache says in one line what is wrong with a cache (missing, not ours, corrupt)
