"""`dpo`: a thin click group. Each command builds its frozen config (YAML, then flags) and calls one module."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import types

import click

from stages.base.errors import Interrupted, UserError, one_line, os_error_line
from stages.base.launcher import check_launcher, is_main_process, launched_dtype
from stages.settings import commands as settings, yamlconfig as cfgmod
from stages.settings.options import Option, options


def user_errors(fn):
    """The CLI's one error path: a UserError or an OSError (disk full, read-only, not a directory...) is ONE line on
    stderr (errors.one_line) and a non-zero exit, never a traceback. Anything else keeps its traceback: a bug.
    First the launcher's settings are checked (stages/base/launcher.py), before any setting is built."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            for note in check_launcher():
                _say(note)
            return fn(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()
            _report("stopped" if isinstance(e, Interrupted) else "error", one_line(str(e)))
            sys.exit(e.exit_code)
        except OSError as e:
            _close_progress_bars()
            _report("error", one_line(os_error_line(e)))
            sys.exit(2)
        finally:  # commands may run several stages in one process group (sweep); end it once, here
            if "torch.distributed" in sys.modules:
                from stages.model.distributed import end_process_group

                end_process_group()
    wrapper.one_line_errors = True  # tests/test_faults.py checks that every command has it
    return wrapper


def _say(line: str) -> None:
    if is_main_process():
        click.echo(line)


LINGER_S = 2.0  # an erring rank other than 0 waits this long: torchrun kills the others when the first one exits


def _report(kind: str, message: str) -> None:
    """`kind: message` on stderr from rank 0 only (one line, not one per process; every rank exits with the same
    code). Under torchrun the message also goes to the rank's error file (TORCHELASTIC_ERROR_FILE), so the
    launcher's failure block names it (the one trace of a failure only another rank had); another rank lingers
    before it exits, so that torchrun does not kill rank 0 before rank 0 has said the same error."""
    if is_main_process():
        click.echo(f"{kind}: {message}", err=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:  # torchrun's own format (its error_handler.record_exception); the block shows py_callstack
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": info}}, f)
        except OSError:
            pass  # rank 0's line is the message; the launcher's block then says <N/A>
    if kind == "error" and not is_main_process():
        time.sleep(LINGER_S)


def _settings(cls, config_path, flags: dict, section: str):
    """The command's settings (YAML, then flags); under `accelerate launch` its mixed precision becomes the dtype
    the user left at auto/unset (stages/base/launcher.py), said once."""
    cfg = cfgmod.build(cls, config_path, flags, section=section)
    dtype, line = launched_dtype(cfg.model.dtype)
    if line:
        _say(line)
    return cfgmod.build(cls, config_path, {**flags, "dtype": dtype}, section=section) if dtype else cfg


def _close_progress_bars() -> None:
    """A bar cut short by an error ends its line first, so the error is a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


class OneLineErrors(click.Group):
    """Click's own usage errors (a bad choice, a number that is not one, an unknown option) in the same one-line
    shape as ours, instead of click's Usage/Try/Error block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # Ctrl-C outside a run (a run stops itself and says what it saved)
            _report("stopped", "interrupted")
            sys.exit(130)
        except click.ClickException as e:
            where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            _report("error", f"{one_line(e.format_message())}{where}")
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpo-stages")
def main():
    """DPO on big models: cache the reference once (precompute-ref), train QLoRA policies against it (train)."""


def options_from(cls, config=True):
    """Click options generated from a command's settings (stages/settings/options.py): --name (+ older aliases),
    bools as --x/--no-x, Literal as a choice, tuples repeatable; help and the real default from the setting.
    Click's own defaults are None, so that only flags actually given override the YAML config."""
    def decorate(fn):
        for o in reversed(options(cls)):
            fn = _option(o)(fn)
        if not config:
            return fn
        return click.option("--config", "config_path", type=click.Path(), default=None,
                            help="YAML config (flat, or sectioned: shared + one block per command); flags "
                                 "override.")(fn)
    return decorate


def _option(o: Option):
    import typing

    hint = o.hint
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if o.metadata.get("argument"):  # positional; its help is in the command's docstring
        tuple_ = typing.get_origin(base) is tuple
        return click.argument(o.name, nargs=-1 if tuple_ else 1, required=True,
                              metavar=o.name.upper() + ("..." if tuple_ else ""))
    names = [f"-{n}" if len(n) == 1 else f"--{n.replace('_', '-')}"
             for n in (o.name, *o.metadata.get("aliases", ()), *o.metadata.get("flags", ()))]
    text = o.metadata.get("help", "") + _shown_default(o.default, base) + (" (required)" if o.required else "")
    if base is bool:
        return click.option(f"{names[0]}/--no-{names[0][2:]}", o.name, default=None, help=text)
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        return click.option(*names, o.name, multiple=True, type=inner if inner in (int, float) else str, help=text)
    if typing.get_origin(base) is typing.Literal:
        return click.option(*names, o.name, type=click.Choice(typing.get_args(base)), default=None, help=text)
    return click.option(*names, o.name, type=base if base in (int, float) else str, default=None, help=text)


def _shown_default(default, base) -> str:
    import dataclasses

    if default is dataclasses.MISSING or default is None or default == ():
        return ""
    if base is bool:
        return f"  [default: {'on' if default else 'off'}]"
    return f"  [default: {', '.join(map(str, default)) if isinstance(default, tuple) else default}]"


@main.command("precompute-ref", context_settings={"show_default": False})
@options_from(settings.PrecomputeConfig)
@user_errors
def precompute_ref(config_path, **flags):
    """Stage one: reference log-probs of every chosen/rejected reply, written once to Parquet."""
    from stages.stage1.precompute import run

    run(_settings(settings.PrecomputeConfig, config_path, flags, "precompute-ref"))


@main.group()
def cache():
    """Inspect and check a reference cache."""


@cache.command("info", context_settings={"show_default": False})
@options_from(settings.CacheInfoConfig, config=False)
@user_errors
def cache_info(**flags):
    """A cache's summary and statistics (--json: one JSON object with the whole metadata)."""
    from stages.cache.refcache import info_text

    c = cfgmod.build(settings.CacheInfoConfig, None, flags)
    click.echo(info_text(c.cache.path, as_json=c.format.json))


@cache.command("merge", context_settings={"show_default": False})
@options_from(settings.CacheMergeConfig, config=False)
@user_errors
def cache_merge(**flags):
    """Join the caches of `precompute-ref --num-shards N` jobs (SHARD_FILES) into one cache for `dpo train`."""
    from stages.cache.shards import merge_shards

    cfg = cfgmod.build(settings.CacheMergeConfig, None, flags)
    meta = merge_shards(list(cfg.shard_files), cfg.output)
    n = sum(s["examples"] for s in meta["merged_from"]["shards"])
    click.echo(f"merged {meta['merged_from']['num_shards']} shards, {n} examples -> {cfg.output}")


@cache.command("verify", context_settings={"show_default": False})
@options_from(settings.CacheVerifyConfig, config=False)
@user_errors
def cache_verify(**flags):
    """Check that every example of DATA has a finite entry in the cache (PATH) and the fingerprints match."""
    from stages.tools.verify import verify_cache

    c = cfgmod.build(settings.CacheVerifyConfig, None, flags)
    problems = verify_cache(c.cache.path, c.data, c.model.model, c.lengths)
    for p in problems:
        click.echo(f"MISMATCH {p}")
    if problems:
        sys.exit(1)
    click.echo(f"ok: {c.cache.path} covers every example of {', '.join(c.data.data)}")


@cache.command("export-trl", context_settings={"show_default": False})
@options_from(settings.ExportTrlConfig, config=False)
@user_errors
def cache_export_trl(**flags):
    """Write DATA's rows with the cache's (PATH) values as TRL's ref_chosen_logps / ref_rejected_logps columns.

    \b
    Rows are in TRL's formats: prompt/chosen/rejected as plain strings, or as
    lists of {role, content} messages for conversational data (as stage one
    scored them), plus example_id. Every row must be in the cache, else nothing
    is written. Train with TRL 1.16 without any reference pass:
      from datasets import load_dataset
      from stages.tools.export_trl import dpo_trainer_class
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
    from stages.tools.export_trl import export_trl

    c = cfgmod.build(settings.ExportTrlConfig, None, flags)
    report = export_trl(c.cache.path, c.data, c.export)
    for note in report.notes:
        click.echo(note)
    click.echo(report.summary())


@main.command(context_settings={"show_default": False})
@options_from(settings.TrainConfig)
@user_errors
def train(config_path, **flags):
    """Stage two: train a (Q)LoRA policy against a reference cache; no reference model is loaded."""
    from stages.stage2.train import run

    run(_settings(settings.TrainConfig, config_path, flags, "train"))


@main.command(context_settings={"show_default": False})
@options_from(settings.SweepConfig)
@user_errors
def sweep(config_path, **flags):
    """Train one policy per (--loss, --beta) against ONE reference cache (data read once), then compare them."""
    from stages.tools.sweep import run_sweep

    run_sweep(_settings(settings.SweepConfig, config_path, flags, "sweep"))


@main.command("compare", context_settings={"show_default": False})
@options_from(settings.CompareConfig, config=False)
@user_errors
def compare_cmd(**flags):
    """Table, CSV and plot of training runs (RUN_DIRS: `dpo train` outputs or whole `dpo sweep` folders)."""
    from stages.tools.compare import compare, format_table, samples_tables

    c = cfgmod.build(settings.CompareConfig, None, flags)
    rows, png, csv_path = compare(c.run_dirs, c.output)
    click.echo(format_table(rows))
    click.echo(f"plot: {png}\ntable: {csv_path}")
    if c.samples:
        click.echo(samples_tables(c.run_dirs))


@main.command(context_settings={"show_default": False})
@options_from(settings.PlanConfig)
@user_errors
def plan(config_path, **flags):
    """Per-GPU memory of naive DPO, QLoRA with an online reference, stage one and stage two, from the config.
    --config takes the stages' own YAML (shared, precompute-ref, train and plan sections)."""
    from stages.tools.plan import plan_memory
    from stages.tools.plantable import format_plan

    c = cfgmod.build(settings.PlanConfig, config_path, flags, section="plan")
    click.echo(format_plan(plan_memory(c)))


@main.command(context_settings={"show_default": False})
@options_from(settings.DemoConfig, config=False)
@user_errors
def demo(**flags):
    """The whole pipeline on SmolLM2-135M-Instruct and the shipped demo data: precompute, sweep, compare."""
    from stages.tools.demo import run_demo

    run_demo(quick=cfgmod.build(settings.DemoConfig, None, flags).quick)


@main.command("export", context_settings={"show_default": False})
@options_from(settings.ExportConfig, config=False)
@user_errors
def export_cmd(**flags):
    """A merged model from a trained run or adapter (RUN_DIR_OR_ADAPTER): sharded safetensors streamed shard by
    shard, config, tokenizer, a model card; --gguf adds a GGUF for llama.cpp."""
    from stages.tools.export import run_export

    run_export(cfgmod.build(settings.ExportConfig, None, flags))


@main.group("config")
def config_group():
    """Configs from elsewhere."""


@config_group.command("from-trl", context_settings={"show_default": False})
@options_from(settings.FromTrlConfig, config=False)
@user_errors
def config_from_trl(**flags):
    """Print our YAML (shared / precompute-ref / train) for a TRL DPOConfig YAML (PATH); unmapped keys are listed,
    with why, as comments at the top. Save it and run: dpo precompute-ref --config F && dpo train --config F."""
    from stages.tools.trlconfig import from_trl

    click.echo(from_trl(cfgmod.build(settings.FromTrlConfig, None, flags).path), nl=False)


@main.command("sample", context_settings={"show_default": False})
@options_from(settings.SampleConfig)
@user_errors
def sample_cmd(config_path, **flags):
    """Reference and policy replies side by side for held-out prompts, with each reply's implicit reward
    β·log π/π_ref; greedy unless --seed. Writes samples.md / samples.jsonl (into the run folder of --adapter)."""
    from stages.tools.sample import run

    run(_settings(settings.SampleConfig, config_path, flags, "sample"))


if __name__ == "__main__":
    main()
