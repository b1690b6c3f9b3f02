"""Logs a scheduler captures (Slurm, Kubernetes: stderr not a terminal) are readable: every line a whole line of
ours, no redrawn bar with a metric line glued to it, no third-party warnings (bitsandbytes, kernels, transformers).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.base import progress
from tests.hhrows import hh_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
# a plain progress line: `desc: n/total unit (p%), elapsed, eta, key=value ...`
PROGRESS = re.compile(r"^[a-z][\w ]*: \d+/\d+ \w+ \(\d+%\), [\d:]+ elapsed, eta [\d:]+( [\w/]+=\S+)*$")
NOISE = re.compile(r"Skipping publisher trust check|gemm_4bit_forward|kernels-community|trust_remote_code|"
                   r"is_gradient_checkpointing|Warning:|warnings\.warn|site-packages|Traceback|huggingface\.co")
GLUED = re.compile(r"\](step|step=|[a-z][\w ]*:)")  # a tqdm bar's `...tok_s=445]` with a line of ours after it


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_progress_is_plain_whole_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)  # a line per update
    bar = progress.Progress(None, total=3, unit="step", desc="train")
    bar.bar.update(1)  # a resumed run's steps: counted, not timed
    for step in (2, 3):
        bar.update(1, tokens=100, loss="0.6931")
        progress.say(None, f"step={step}  loss=0.6931")
    bar.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["step=2  loss=0.6931", "step=3  loss=0.6931"]
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 3 and all(PROGRESS.match(line) for line in lines), err
    assert lines[0] == "train: 1/3 step (33%), 00:00 elapsed, eta 00:00", lines  # where a resumed run starts
    assert lines[-1].startswith("train: 3/3 step (100%)") and "tok_s=" in lines[-1], lines


def test_log_progress_throttled_and_closed_where_it_stopped(capsys):
    bar = progress.Progress(None, total=10, unit="ex", desc="reference")
    bar.update(4, tokens=10)  # < LOG_SECONDS since the start: no line yet
    assert capsys.readouterr().err == ""
    bar.close()  # stopped early: one line says where
    bar.close()
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("reference: 4/10 ex (40%)"), err


def test_terminal_bar_keeps_messages_on_lines_of_their_own(monkeypatch):
    screen = Terminal()  # stdout and stderr on one terminal, as a user sees them
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", screen)
    bar = progress.Progress(None, total=2, unit="step", desc="train")
    bar.update(1, tokens=50)
    progress.say(None, "step=1  loss=0.6931")
    bar.close()
    progress.say(None, "done: here")
    lines = [line.strip() for line in re.split(r"[\r\n]", screen.getvalue())]
    assert "step=1  loss=0.6931" in lines and "done: here" in lines, screen.getvalue()
    assert not GLUED.search(screen.getvalue()) and not progress._LIVE


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONWARNINGS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_clean(proc: subprocess.CompletedProcess) -> None:
    """stderr: only our plain progress lines; stdout: no third-party line; neither has a bar glued to a line."""
    assert "\r" not in proc.stderr, proc.stderr
    for line in proc.stderr.splitlines():
        assert PROGRESS.match(line), f"not one of our progress lines on stderr: {line!r}\n{proc.stderr}"
    for line in proc.stdout.splitlines():
        assert not NOISE.search(line) and not GLUED.search(line), f"noise on stdout: {line!r}"


@pytest.mark.parametrize("quant", [pytest.param([], id="fp32"),
                                   pytest.param(["--load-in-4bit"], id="nf4", marks=pytest.mark.slow)])
def test_cli_runs_log_only_our_lines(quant, tiny_llama, hh_path, tmp_path):
    """`dpo precompute-ref` then `dpo train`, stderr a pipe, no HF_HUB_OFFLINE: nothing but our lines. (fp32
    imports bitsandbytes too, through PEFT; the AVX512-BF16 noise this box may lack is the test below.)"""
    data = write_jsonl(tmp_path / "rows.jsonl", hh_rows(hh_path, 0, 8))
    common = ["--model", str(tiny_llama), "--data", str(data)]
    first = _run(["precompute-ref", *common, "--output", "ref.parquet", "--max-length", "160",
                  "--max-prompt-length", "96", *quant], tmp_path)
    second = _run(["train", *common, "--ref-cache", "ref.parquet", "--output", "run", "--max-steps", "2",
                   "--batch-size", "2", "--lora-r", "4", "--logging-steps", "1"], tmp_path)
    for proc in (first, second):
        _assert_clean(proc)
    assert re.search(r"^reference: 8/8 ex \(100%\)", first.stderr, re.M), first.stderr
    assert re.search(r"^train: 2/2 step \(100%\).* tok_s=\d+", second.stderr, re.M), second.stderr
    assert sum(line.startswith("step=") for line in second.stdout.splitlines()) == 2, second.stdout


# bitsandbytes imported as on a CPU with AVX512-BF16 (whatever this one has): the path that fetches a kernel
AVX512BF16 = """
import importlib.abc, importlib.machinery, socket, sys

class PretendAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            lib = module.lib

            class Lib:
                def __getattr__(self, key):
                    return (lambda: True) if key == "has_avx512bf16_cpu" else getattr(lib, key)
            module.lib = Lib()
        spec.loader.exec_module = exec_module
        return spec


def no_network(host, *args, **kwargs):
    print("network:", host)
    raise OSError("no network in this test")


sys.meta_path.insert(0, PretendAvx512Bf16())
socket.getaddrinfo = no_network
from stages.model.quiet import import_bitsandbytes
import_bitsandbytes()
import bitsandbytes.backends.cpu.ops
print("imported")
"""


def test_bitsandbytes_import_neither_reaches_the_hub_nor_speaks():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", AVX512BF16], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "imported\n" and proc.stderr == "", (proc.stdout, proc.stderr)
