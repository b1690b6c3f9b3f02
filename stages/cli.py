"""`dpo`: a thin click group. Each command builds its frozen config (YAML, then flags) and calls one module."""

from __future__ import annotations

import functools
import sys

import click

from . import config as cfgmod
from .errors import Interrupted, UserError, one_line, os_error_line


def user_errors(fn):
    """The CLI's one error path: a UserError or an OSError (disk full, read-only, not a directory...) is ONE line on
    stderr (errors.one_line) and a non-zero exit, never a traceback. Anything else keeps its traceback: a bug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()
            click.echo(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            _close_progress_bars()
            click.echo(f"error: {one_line(os_error_line(e))}", err=True)
            sys.exit(2)
        finally:  # commands may run several stages in one process group (sweep); end it once, here
            if "torch.distributed" in sys.modules:
                from .distributed import end_process_group

                end_process_group()
    wrapper.one_line_errors = True  # tests/test_faults.py checks that every command has it
    return wrapper


def _close_progress_bars() -> None:
    """A bar cut short by an error ends its line first, so the error is a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpo-stages")
def main():
    """DPO on big models: cache the reference once (precompute-ref), train QLoRA policies against it (train)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars drown our own progress


def data_options(fn):
    for opt in reversed([
        click.option("--data", multiple=True, help="Preference data (repeatable): .jsonl, .jsonl.gz, .json, .parquet, "
                     "a save_to_disk folder, or a Hub dataset id owner/name[@config][:split]."),
        click.option("--data-split", default=None, help="Split of a saved DatasetDict / Hub dataset [train]."),
        click.option("--prompt-field", default=None, help="Column holding the prompt [prompt]."),
        click.option("--chosen-field", default=None, help="Column holding the chosen reply [chosen]."),
        click.option("--rejected-field", default=None, help="Column holding the rejected reply [rejected]."),
        click.option("--strict/--no-strict", default=None, help="Rows with chosen == rejected are errors, not skipped."),
        click.option("--max-length", type=int, default=None, help="Prompt + reply tokens [1024]."),
        click.option("--max-prompt-length", type=int, default=None, help="Prompt tokens, keeping the end [512]."),
        click.option("--trust-remote-code/--no-trust-remote-code", default=None, help="Run model code from the folder."),
        click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config; flags override."),
    ]):
        fn = opt(fn)
    return fn


@main.command("precompute-ref")
@click.option("--model", default=None, help="Reference model: a local HF folder (safetensors).")
@click.option("--out", default=None, help="Cache file [cache/ref.parquet].")
@click.option("--adapter", default=None, help="PEFT adapter on top of the base (e.g. the SFT adapter).")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None)
@click.option("--load-in-4bit/--no-load-in-4bit", default=None, help="NF4 base, exactly as `dpo train` loads it.")
@click.option("--max-tokens-per-batch", type=int, default=None, help="Padded tokens per forward [8192].")
@click.option("--share-prompt/--no-share-prompt", default=None, help="Run each prompt once for both replies [on].")
@click.option("--sort-by-length/--no-sort-by-length", default=None, help="Length-sorted batches [on].")
@click.option("--store-token-logps/--no-store-token-logps", default=None, help="Also store per-token log-probs.")
@click.option("--batches-per-part", type=int, default=None, help="Resume granularity [8].")
@click.option("--chunk-size", type=int, default=None, help="Positions per LM-head chunk [256].")
@click.option("--overwrite", is_flag=True, default=None, help="Discard unfinished parts made with other settings.")
@click.option("--full-hash", is_flag=True, default=None, help="SHA-256 every weight byte in the fingerprint.")
@click.option("--num-shards", type=int, default=None, help="Split the examples into N independent jobs [1].")
@click.option("--shard-index", default=None, help="This job's shard, 0..N-1, or auto (Slurm array / k8s index) [0].")
@click.option("--replicas", type=int, default=None, help="HSDP: replica groups (e.g. nodes); weights sharded within one [1].")
@data_options
@user_errors
def precompute_ref(config_path, **flags):
    """Stage one: reference log-probs of every chosen/rejected reply, written once to Parquet."""
    from .precompute import PrecomputeConfig, run

    run(cfgmod.build(PrecomputeConfig, config_path, flags, section="precompute-ref"))


@main.group()
def cache():
    """Inspect and check a reference cache."""


@cache.command("info")
@click.argument("path")
@user_errors
def cache_info(path):
    """Print a cache's metadata and statistics."""
    from .refcache import info_text

    click.echo(info_text(path))


@cache.command("merge")
@click.argument("shard_files", nargs=-1, required=True, metavar="SHARD_FILE...")
@click.option("--out", required=True, help="The merged cache (written atomically).")
@user_errors
def cache_merge(shard_files, out):
    """Join the caches of `precompute-ref --num-shards N` jobs into one cache for `dpo train`."""
    from .shards import merge_shards

    meta = merge_shards(list(shard_files), out)
    n = sum(s["examples"] for s in meta["merged_from"]["shards"])
    click.echo(f"merged {meta['merged_from']['num_shards']} shards, {n} examples -> {out}")


@cache.command("verify")
@click.argument("path")
@click.option("--model", default=None, help="Also check the tokenizer and weights fingerprints against this model.")
@click.option("--max-length", type=int, default=None)
@click.option("--max-prompt-length", type=int, default=None)
@click.option("--data", multiple=True, required=True)
@click.option("--prompt-field", default="prompt")
@click.option("--chosen-field", default="chosen")
@click.option("--rejected-field", default="rejected")
@user_errors
def cache_verify(path, model, max_length, max_prompt_length, data, prompt_field, chosen_field, rejected_field):
    """Check that every example of DATA has a finite entry and the fingerprints match; list what differs."""
    from .verify import verify_cache

    problems = verify_cache(path, data, (prompt_field, chosen_field, rejected_field), model, max_length, max_prompt_length)
    for p in problems:
        click.echo(f"MISMATCH {p}")
    if problems:
        sys.exit(1)
    click.echo(f"ok: {path} covers every example of {', '.join(data)}")


@cache.command("export-trl")
@click.argument("path", metavar="CACHE")
@click.option("--data", multiple=True, required=True, help="Preference file(s) the cache was made from (repeatable).")
@click.option("--out", required=True, help="Output dataset: *.parquet, *.jsonl or *.jsonl.gz.")
@click.option("--prompt-field", default="prompt")
@click.option("--chosen-field", default="chosen")
@click.option("--rejected-field", default="rejected")
@click.option("--strict/--no-strict", default=False, help="Rows with chosen == rejected are errors, not skipped.")
@click.option("--trl-chat-convention", is_flag=True, default=False,
              help="Conversational rows: also score the template's text after the end-of-turn token, as TRL does "
                   "(loads the cache's reference model).")
@click.option("--model", default=None, help="With --trl-chat-convention: the reference model's folder, if it moved "
                                            "(same weights) [the path the cache records].")
@user_errors
def cache_export_trl(path, data, out, prompt_field, chosen_field, rejected_field, strict, trl_chat_convention, model):
    """Write DATA's rows with CACHE's values as TRL's ref_chosen_logps / ref_rejected_logps columns.

    \b
    Rows are in TRL's formats: prompt/chosen/rejected as plain strings, or as
    lists of {role, content} messages for conversational data (as stage one
    scored them), plus example_id. Every row must be in CACHE, else nothing is
    written. Train with TRL 1.16 without any reference pass:
      from datasets import load_dataset
      from stages.export_trl import dpo_trainer_class
      ds = load_dataset("parquet", data_files="OUT.parquet")["train"]
      dpo_trainer_class()(model, args=DPOConfig(precompute_ref_log_probs=True,
          max_length=<the cache's --max-length>, ...), train_dataset=ds, ...)
    (plain trl.DPOTrainer recomputes the columns, then fails on the duplicates).
    Same numbers as TRL's own precompute on text rows when the cache was made
    with --max-prompt-length equal to --max-length; on conversational rows TRL
    also scores the template's newline after the end-of-turn token, so its
    numbers differ by that token's log-prob (about 12 nats per reply on a weak
    model); --trl-chat-convention adds it, so the values equal TRL's own.
    """
    from .data import FieldMap
    from .export_trl import export_trl

    report = export_trl(path, data, out, FieldMap(prompt_field, chosen_field, rejected_field), strict,
                        trl_chat_convention, model)
    for note in report.notes:
        click.echo(note)
    click.echo(report.summary())


HELP = {
    "model": "Local HF model folder (safetensors): the policy's base.",
    "data": "Training data: files, a save_to_disk folder or a Hub id owner/name[@config][:split].",
    "eval_data": "Held-out data (same forms; e.g. owner/name:test).",
    "ref_cache": "Reference cache from `dpo precompute-ref`.", "output": "Run folder (resumes if it has checkpoints).",
    "adapter": "Continue training this PEFT adapter instead of a new LoRA.",
    "load_in_4bit": "NF4 base (QLoRA).", "dtype": "auto | fp32 | bf16 | fp16 (auto: fp32 CPU, bf16 GPU).",
    "target_modules": "LoRA targets (repeatable); all-linear = every linear layer but the LM head.",
    "loss": "A TRL loss type (sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero "
            "apo_down discopop sft sigmoid_norm) or a mixture: 'sigmoid*0.8+bco_pair*0.2+sft'.",
    "beta": "DPO beta (multiplies the log-ratio difference).",
    "label_smoothing": "Epsilon of robust, exo_pair, aot*; with sigmoid it makes cDPO (TRL 1.16 ignores it there).",
    "sft_weight": "Adds w x per-token NLL of each chosen reply, averaged over pairs (the 'sft' loss type is TRL's: "
                  "mean over all chosen tokens of the batch).",
    "f_divergence": "reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO scores, TRL's f_divergence_type).",
    "f_alpha": "Alpha of alpha_divergence.", "discopop_tau": "Tau of the discopop loss.",
    "use_weighting": "WPO: weight each pair by the policy's length-normalised probabilities (TRL's use_weighting).",
    "ld_alpha": "LD-DPO alpha in [0, 1]: weight of reply tokens beyond the pair's shared length (needs a cache made "
                "with --store-token-logps).",
    "optimizer": "adamw | adamw_8bit | paged_adamw_8bit (GPU).", "lr_scheduler": "cosine | linear | constant_with_warmup.",
    "batch_size": "Pairs per micro-batch per process.", "max_steps": "Optimizer steps (overrides --epochs).",
    "eval_steps": "Eval every N steps (0: only at the end).", "save_steps": "Checkpoint every N steps (0: only at the end).",
    "allow_cache_mismatch": "Accept a cache made with another tokenizer/chat-template hash.",
    "max_length": "Prompt + reply tokens (default: the cache's).", "max_prompt_length": "Prompt tokens (default: the cache's).",
    "chunk_size": "Positions per LM-head chunk.", "share_prompt": "Prompt runs once per pair (same numbers).",
    "strict": "Rows with chosen == rejected or empty replies are errors.", "resume": "Resume from the newest checkpoint.",
    "report_to": "Trackers: none, tensorboard, wandb, mlflow, trackio, all (comma-separated or repeated).",
    "tensorboard": "Same as --report-to tensorboard.",
    "data_split": "Split of a saved DatasetDict / Hub dataset given without :split.",
    "ref_adapter": "Reference = base + this adapter (default: the base, adapters off).",
    "max_new_tokens": "Tokens generated per reply.", "temperature": "Sampling temperature (with --seed).",
    "top_p": "Nucleus sampling (with --seed).",
    "replicas": "HSDP: replica groups (e.g. nodes); weights sharded within one, replicated across.",
}


def options_from(cls, skip=()):
    """Click options generated from a config dataclass: --field-name, bools as --x/--no-x, tuples repeatable.
    Defaults are None so that only flags actually given override the YAML config."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            name, hint = f.name.replace("_", "-"), hints[f.name]
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f" [{default}]" if default not in (None, ()) else ""
            text = HELP.get(f.name, "") + shown
            if base is bool:
                opt = click.option(f"--{name}/--no-{name}", f.name, default=None, help=text)
            elif typing.get_origin(base) is tuple:
                opt = click.option(f"--{name}", f.name, multiple=True, help=text)
            else:
                opt = click.option(f"--{name}", f.name, type=base, default=None, help=text)
            fn = opt(fn)
        return click.option("--config", "config_path", type=click.Path(), default=None,
                            help="YAML config; flags override.")(fn)
    return decorate


def _train_config_cls():
    from .train import TrainConfig

    return TrainConfig


@main.command(context_settings={"show_default": False})
@options_from(_train_config_cls())
@user_errors
def train(config_path, **flags):
    """Stage two: train a (Q)LoRA policy against a reference cache; no reference model is loaded."""
    from .train import TrainConfig, run

    run(cfgmod.build(TrainConfig, config_path, flags, section="train"))


def _sweep_config_cls():
    from .sweep import SweepConfig

    return SweepConfig


@main.command(context_settings={"show_default": False})
@options_from(_sweep_config_cls(), skip=("betas", "losses"))
@click.option("--beta", "betas", type=float, multiple=True, help="β of one run; repeat for more (required).")
@click.option("--loss", "losses", multiple=True,
              help="Loss type or mixture ('sigmoid*0.8+bco_pair*0.2+sft') of one run; repeat for more [sigmoid].")
@user_errors
def sweep(config_path, **flags):
    """Train one policy per (--loss, --beta) against ONE reference cache (data read once), then compare them."""
    from .sweep import SweepConfig, run_sweep

    run_sweep(cfgmod.build(SweepConfig, config_path, flags, section="sweep"))


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default=None, help="Folder for compare.png / compare.csv [the folder holding the runs].")
@click.option("--samples", is_flag=True, default=False, help="Also one table of samples per run (RUN/samples.jsonl "
              "from `dpo sample`).")
@user_errors
def compare_cmd(run_dirs, out, samples):
    """Table, CSV and plot of training runs (RUN_DIR: a `dpo train` output or a whole `dpo sweep` folder)."""
    from .compare import compare, format_table, samples_tables

    rows, png, csv_path = compare(run_dirs, out)
    click.echo(format_table(rows))
    click.echo(f"plot: {png}\ntable: {csv_path}")
    if samples:
        click.echo(samples_tables(run_dirs))


@main.command()
@click.option("--model", required=True, help="Model folder with config.json, or a config JSON file (no weights needed).")
@click.option("--gpus", type=int, default=8, show_default=True)
@click.option("--gpu-memory", default="80GB", show_default=True, help="Memory per GPU, e.g. 80GB, 24GB.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Prompt + reply tokens per sequence.")
@click.option("--batch", type=int, default=1, show_default=True, help="Pairs per GPU per micro-batch (stage two).")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--max-tokens-per-batch", type=int, default=16384, show_default=True, help="Stage-one token budget.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--layers", type=int, default=None, help="Count the model with this many decoder layers (same widths).")
@click.option("--cpu", is_flag=True, help="One CPU process per GPU: no CUDA overhead (compare with a CPU run).")
@user_errors
def plan(model, gpus, gpu_memory, seq_len, batch, lora_r, max_tokens_per_batch, gradient_checkpointing, layers, cpu):
    """Per-GPU memory of naive DPO, QLoRA with an online reference, stage one and stage two, from the config."""
    from .plan import PlanConfig, format_plan, parse_gpu_memory, plan_memory

    cfg = PlanConfig(model, gpus, parse_gpu_memory(gpu_memory), seq_len, batch, lora_r, max_tokens_per_batch,
                     gradient_checkpointing, layers, cpu)
    click.echo(format_plan(plan_memory(cfg)))


@main.command()
@click.option("--quick", is_flag=True, help="A smoke test of every stage in about two minutes.")
@user_errors
def demo(quick):
    """The whole pipeline on SmolLM2-135M-Instruct and the shipped demo data: precompute, sweep, compare."""
    from .demo import run_demo

    run_demo(quick=quick)


@main.group("config")
def config_group():
    """Configs from elsewhere."""


@config_group.command("from-trl")
@click.argument("path", metavar="DPOConfig.yaml")
@user_errors
def config_from_trl(path):
    """Print our YAML (shared / precompute-ref / train) for a TRL DPOConfig YAML; unmapped keys are listed, with
    why, as comments at the top. Save it and run: dpo precompute-ref --config F && dpo train --config F."""
    from .trlconfig import from_trl

    click.echo(from_trl(path), nl=False)


def _sample_config_cls():
    from .sample import SampleConfig

    return SampleConfig


@main.command("sample", context_settings={"show_default": False})
@options_from(_sample_config_cls(), skip=("n", "model", "data", "adapter", "out", "seed"))
@click.option("--model", default=None, help="Base model folder (the cache's model).")
@click.option("--data", multiple=True, help="Held-out data (files, a save_to_disk folder or a Hub id).")
@click.option("--adapter", default=None, help="The trained policy: RUN/adapter (absent: the base's replies only).")
@click.option("-n", "n", type=int, default=None, help="Held-out prompts to sample [8].")
@click.option("--seed", type=int, default=None, help="Sample with this seed (default: greedy).")
@click.option("--out", default=None, help="Folder for samples.md / samples.jsonl [the adapter's run folder].")
@user_errors
def sample_cmd(config_path, **flags):
    """Reference and policy replies side by side for held-out prompts, with each reply's implicit reward
    β·log π/π_ref; greedy unless --seed. Writes samples.md / samples.jsonl (into the run folder of --adapter)."""
    from .sample import SampleConfig, run

    run(cfgmod.build(SampleConfig, config_path, flags, section="sample"))


if __name__ == "__main__":
    main()
