"""Launchers: `accelerate launch` settings are honoured or refused in one line (stages/base/launcher.py), and an
error under torchrun is ONE `error:` line, from rank 0, before the launcher's own failure block.

The README's accelerate example (its YAML config and its command line) runs here verbatim, with the tiny model and
four rows in place of its paths, on CPU (FSDP2 over gloo; CUDA hidden so that accelerate starts torchrun, not GPUs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages import cli
from stages.base import launcher
from stages.base.errors import UserError

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ACC = {"ACCELERATE_MIXED_PRECISION": "no"}


# ------------------------------------------------------------------------------------------------ the module, fast
@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, "simple launcher"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed_precision fp8"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params true is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "NO_SHARD"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "4"}, "--replicas"),
    ({"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"}, "tensor parallelism"),
])
def test_refusals_are_one_short_line(env, words):
    with pytest.raises(UserError) as e:
        launcher.check_launcher({**ACC, **env})
    assert words in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) <= 200


def test_what_is_honoured_or_named():
    assert launcher.check_launcher({}) == []  # no launcher: nothing to say, even with MASTER_ADDR-like leftovers
    assert launcher.check_launcher({"MASTER_ADDR": "x"}) == []
    assert launcher.check_launcher({**ACC, "WORLD_SIZE": "2", "MASTER_ADDR": "x", "ACCELERATE_USE_FSDP": "true",
                                    "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false",
                                    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}) == []
    [note] = launcher.check_launcher({**ACC, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
                                      "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"})
    assert "fsdp_version 1" in note and "fsdp_state_dict_type SHARDED_STATE_DICT" in note
    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert launcher.launched_dtype("auto", bf16)[0] == "bf16" and launcher.launched_dtype(None, bf16)[0] == "bf16"
    dtype, note = launcher.launched_dtype("fp32", bf16)
    assert dtype is None and "not applied: --dtype fp32" in note
    assert launcher.launched_dtype("auto", {}) == (None, None)
    assert launcher.launched_dtype("auto", ACC) == (None, None)


def test_only_rank_zero_speaks_and_the_error_file_names_the_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "LINGER_S", 0)
    error_file = tmp_path / "error.json"
    args = ["precompute-ref", "--model", "m", "--data", "d.jsonl", "--output", "o.parquet", "--max-length", "0"]
    for rank, printed in (("0", 1), ("1", 0)):
        env = {"RANK": rank, "WORLD_SIZE": "2", "TORCHELASTIC_ERROR_FILE": str(error_file)}
        result = CliRunner().invoke(cli.main, args, env=env)
        assert result.exit_code == 2 and result.output.count("error:") == printed, result.output
        data = json.loads(error_file.read_text())["message"]
        assert data["extraInfo"]["py_callstack"] == "--max-length 0: must be >= 1"


# ------------------------------------------------------------------------------------------------ real launchers
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp_path: Path) -> dict:
    """CPU only, and no accelerate default config of this machine (HF_HOME here)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def readme_example(tmp_path: Path, model: Path, **fsdp) -> tuple[list[str], Path]:
    """The README's accelerate config (with `fsdp` changes) and command, on the tiny model and four rows."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("accelerate")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S) if "distributed_type: FSDP" in b)
    config = yaml.safe_load(block)
    config["fsdp_config"].update(fsdp)
    (tmp_path / "accelerate-fsdp.yaml").write_text(yaml.safe_dump(config))
    line = next(ln for ln in README.splitlines() if ln.startswith("accelerate launch --config_file"))
    words = shlex.split(line)
    rows = [{"prompt": f"Question {i}: why?", "chosen": f"Because {i}.", "rejected": f"No {i}."} for i in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ref.parquet"
    for flag, value in (("--model", model), ("--data", data), ("--output", out)):
        words[words.index(flag) + 1] = str(value)
    words[:2] = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    return words, out


@pytest.mark.dist
def test_readme_accelerate_example_shards_in_bf16_and_says_so(tiny_llama, tmp_path):
    from stages.cache import refcache

    cmd, out = readme_example(tmp_path, tiny_llama)
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("accelerate: mixed_precision bf16 -> --dtype bf16") == 1, proc.stdout
    assert "note:" not in proc.stdout  # the README's FSDP options are what this tool does anyway
    meta = refcache.read_meta(out)
    assert meta["dtype"] == "bf16" and meta["world_size"] == 2


@pytest.mark.dist
def test_accelerate_offload_is_refused_in_one_line(tiny_llama, tmp_path):
    cmd, out = readme_example(tmp_path, tiny_llama, fsdp_offload_params=True)
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert "fsdp_offload_params true is not supported" in errors[0] and not out.exists()


@pytest.mark.dist
def test_accelerate_simple_launcher_asked_for_two_is_refused(tiny_llama, tmp_path):
    cmd, out = readme_example(tmp_path, tiny_llama)
    at = cmd.index("--config_file")
    cmd[at:at + 2] = ["--quiet", "--num_processes", "2"]  # no config: accelerate's simple launcher, one process
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not out.exists()
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "simple launcher" in errors[0], proc.stderr


@pytest.mark.dist
def test_an_error_under_torchrun_is_one_line_from_rank_zero(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "stages.cli", "precompute-ref", "--model", "m", "--data",
           "d.jsonl", "--output", "o.parquet", "--max-length", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert proc.returncode != 0 and lines == ["error: --max-length 0: must be >= 1"], text
    assert proc.stderr.splitlines()[0] == lines[0]  # ours is the first line; torchrun's block follows
    assert "traceback : --max-length 0: must be >= 1" in text  # the block names our message, not <N/A>
