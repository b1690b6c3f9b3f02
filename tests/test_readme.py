"""The README cannot rot: every command in it parses against the real CLI, every config it names builds, and every
command of the tour runs VERBATIM (the README's own paths) in a folder laid out as the repository after `make demo`:
with the tiny random model in the default suite, with the real SmolLM2 in the slow one."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main
from stages.settings import yamlconfig as cfgmod

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def bash_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def dpo_args(line: str | list[str]) -> list[str] | None:
    """The arguments after `dpo` (or `[srun] torchrun ... -m stages.cli`), without shell comments."""
    words = shlex.split(line, comments=True) if isinstance(line, str) else list(line)
    if words[:1] == ["srun"]:  # a Slurm step: srun [srun options] torchrun ...
        words = words[words.index("torchrun"):] if "torchrun" in words else words
    if words[:1] == ["dpo"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "stages.cli" in words:
        return words[words.index("stages.cli") + 1:]
    return None


def parse(args: list[str]) -> tuple[str, dict]:
    """Resolve the subcommand chain with click and parse its options, without running anything."""
    ctx = main.make_context("dpo", list(args), resilient_parsing=False)
    cmd, name, rest = main, "", list(args)
    while hasattr(cmd, "commands"):
        sub_name, sub, rest = cmd.resolve_command(ctx, rest)
        name = f"{name} {sub_name}".strip()
        ctx = sub.make_context(sub_name, rest, parent=ctx)
        cmd = sub
    return name, ctx.params


def test_readme_has_the_two_commands_and_they_are_make_targets():
    lines = bash_lines()
    assert "make demo" in " ".join(lines) and "make test" in " ".join(lines)
    makefile = (REPO / "Makefile").read_text()
    for line in lines:
        if line.startswith("make "):
            target = line.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target


def yaml_commands() -> list[list[str]]:
    """`command:` lists of the containers in the README's YAML blocks (the Kubernetes recipe)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("command"), list):
                found.append([str(w) for w in node["command"]])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for block in re.findall(r"```yaml\n(.*?)```", README, flags=re.S):
        walk(cfgmod.yaml.safe_load(block))
    return found


def test_every_dpo_command_in_the_readme_parses():
    seen = set()
    for line in bash_lines() + yaml_commands():
        args = dpo_args(line)
        if args is None:
            continue
        name, params = parse(args)
        seen.add(name)
        if params.get("config_path"):  # the config it names exists and builds the command's config
            assert (REPO / params["config_path"]).is_file(), params["config_path"]
    assert {"precompute-ref", "train", "sweep", "compare", "cache info", "cache verify", "plan", "cache merge"} <= seen


def test_multi_node_recipes_parse_with_shards_and_replicas():
    """The Slurm array, the Kubernetes Indexed Job and the HSDP training line: real options, real values."""
    parsed = [parse(args) for args in map(dpo_args, bash_lines() + yaml_commands()) if args]
    shard_jobs = [p for name, p in parsed if name == "precompute-ref" and p.get("num_shards")]
    assert len(shard_jobs) >= 2 and all(p["num_shards"] == 4 and p["shard_index"] == "auto" for p in shard_jobs)
    assert any(name == "train" and p.get("replicas") == 4 for name, p in parsed)
    merges = [p for name, p in parsed if name == "cache merge"]
    assert merges and all(p["output"].endswith(".parquet") for p in merges)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_builds(path):
    from stages.stage1.precompute import PrecomputeConfig
    from stages.stage2.train import TrainConfig
    from stages.tools.sweep import SweepConfig

    raw = cfgmod.yaml.safe_load(path.read_text())
    classes = {"precompute-ref": PrecomputeConfig, "train": TrainConfig, "sweep": SweepConfig}
    if set(raw) <= set(cfgmod.SECTIONS):
        for section in set(raw) - {"shared"}:
            cfgmod.build(classes[section], str(path), {}, section=section)
    else:
        cfgmod.build(SweepConfig, str(path), {})


def test_demo_config_equals_the_embedded_demo_settings():
    from stages.tools.demo import SETTINGS

    assert cfgmod.yaml.safe_load((REPO / "configs" / "smollm2-135m-cpu.yaml").read_text()) == SETTINGS


def tour_lines() -> list[str]:
    """The `dpo` commands of the "## Tour" section, in order, exactly as written."""
    tour = README[README.index("\n## Tour"):]
    tour = tour[: tour.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", tour, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("dpo ")]


def workdir(root: Path, model: Path) -> Path:
    """A fresh folder laid out as the repository after `make demo`: the shipped data and configs, and the model
    at cache/models/smollm2-135m-instruct (the tiny random model, or the real SmolLM2). Outputs land here."""
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "demo_data").symlink_to(REPO / "stages" / "demo_data")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "cache" / "models").mkdir(parents=True)
    (root / "cache" / "models" / "smollm2-135m-instruct").symlink_to(model)
    return root


def run_tour(root: Path, monkeypatch) -> list[str]:
    """Run every tour command verbatim (paths as printed, relative to `root`); returns the command names run."""
    monkeypatch.chdir(root)
    runner, ran = CliRunner(), []
    for line in tour_lines():
        args = dpo_args(line)
        res = runner.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, f"{line}\n{res.output[-3000:]}"
        ran.append(parse(args)[0])
    return ran


TOUR = ["precompute-ref", "cache info", "cache verify", "cache export-trl", "train", "sample", "compare", "sweep",
        "compare", "precompute-ref", "train", "train", "config from-trl", "export"]


def check_tour_outputs(root: Path, ran: list[str]) -> None:
    assert ran == TOUR
    assert (root / "runs" / "beta0.1" / "adapter" / "adapter_config.json").is_file()
    assert list((root / "runs" / "beta0.1" / "tensorboard").glob("events.out.tfevents.*"))  # --report-to
    assert len((root / "runs" / "beta0.1" / "samples.jsonl").read_text().splitlines()) == 4
    assert (root / "runs" / "sweep" / "compare.png").is_file()
    for run in ("replies", "replies-pl"):  # many replies per prompt: both pair rules and the listwise loss trained
        records = [json.loads(x) for x in (root / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("prompts_per_step") == 2 for r in records), run
        assert (root / "runs" / run / "adapter" / "adapter_config.json").is_file()
    export = root / "models" / "smollm2-dpo"  # the tour ends with the exported model, its card and a GGUF
    assert (export / "config.json").is_file() and (export / "model.f32.gguf").is_file()
    assert "base_model: cache/models/smollm2-135m-instruct" in (export / "README.md").read_text()


@pytest.fixture(scope="module")
def tour(tiny_llama, tmp_path_factory):
    """The tour, run verbatim in a repository-like folder whose model is the tiny random one (fast)."""
    root = workdir(tmp_path_factory.mktemp("readme"), tiny_llama)
    with pytest.MonkeyPatch.context() as mp:
        ran = run_tour(root, mp)
    return root, ran


def test_the_readme_tour_runs_verbatim(tour):
    root, ran = tour
    check_tour_outputs(root, ran)


@pytest.mark.slow
def test_the_readme_tour_runs_verbatim_on_smollm2(smollm2_slice, tmp_path, monkeypatch):
    """The same commands on SmolLM2-135M-Instruct's real tokenizer, chat template, embeddings and head (its 2-layer
    slice: the code paths of the 30-layer model at 1/8 of the forward; the whole tour on all 30 layers took 5.6 min
    of CI's ~20, and `make demo` / tests/test_demo.py run the full model)."""
    root = workdir(tmp_path, smollm2_slice)
    check_tour_outputs(root, run_tour(root, monkeypatch))


def test_the_readme_python_snippet_loads_the_adapter(tour, monkeypatch):
    root, _ = tour
    monkeypatch.chdir(root)
    snippet = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README, run verbatim
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
