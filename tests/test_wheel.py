"""The wheel is the product: built from the sources, installed into a fresh venv, `dpo` runs from outside the repo.

The fresh venv sees the dependencies of the test interpreter's environment through one `.pth` line (its
site-packages path). Python adds that folder to sys.path but does not process the .pth files inside it, so the
editable install's finder there stays off: `stages` must come from the installed wheel, which the test checks.
The sources are copied to a temporary folder first, so the build writes no build/ or egg-info into the repo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.hhrows import write_jsonl

REPO = Path(__file__).resolve().parents[1]
PATHS = "import json, sysconfig; p = sysconfig.get_paths(); print(json.dumps([p['purelib'], p['platlib']]))"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1"}


def _run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _site_packages(python) -> list[str]:
    return list(dict.fromkeys(json.loads(_run([python, "-c", PATHS], REPO).stdout)))


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel . --no-deps --no-build-isolation` over a copy of what the wheel is built from."""
    src = tmp / "src"
    shutil.copytree(REPO / "stages", src / "stages", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", tmp / "dist"], src,
         timeout=180)
    (wheel,) = (tmp / "dist").glob("dpo_stages-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A venv whose only view of the dependencies is one .pth line per site-packages folder of this environment."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp)
    python = venv / "bin" / "python"
    (site,) = _site_packages(python)[:1]
    Path(site, "_deps_of_the_test_env.pth").write_text("".join(p + "\n" for p in _site_packages(sys.executable)))
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path, tiny_llama):
    wheel = _build_wheel(tmp_path)
    # 1. the wheel ships every package of stages/ and the demo data
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "stages").rglob("__init__.py")}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set(), names
    assert any(n.startswith("stages/demo_data/") and n.endswith(".jsonl") for n in names), names

    # 2. installed into a fresh venv, `stages` resolves to the venv's copy, not the repo
    venv = _fresh_venv(tmp_path)
    _run([venv / "bin" / "pip", "install", "--no-deps", wheel], tmp_path, timeout=180)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([venv / "bin" / "python", "-c", "import stages; print(stages.__file__)"], outside).stdout.strip()
    (site,) = _site_packages(venv / "bin" / "python")[:1]
    assert Path(where).resolve().is_relative_to(Path(site).resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO), where

    # 3. the console script: --help, and stage one on a tiny random model and three rows writes the cache
    dpo = venv / "bin" / "dpo"
    assert "precompute-ref" in _run([dpo, "--help"], outside).stdout
    rows = [{"prompt": f"Question {i}: how long does bread rise?", "chosen": f"About {i + 1} hours.",
             "rejected": "No idea." * (i + 1)} for i in range(3)]
    data = write_jsonl(outside / "rows.jsonl", rows)
    out = outside / "ref.parquet"
    _run([dpo, "precompute-ref", "--model", tiny_llama, "--data", data, "--out", out, "--max-length", "64",
          "--max-prompt-length", "32"], outside, timeout=180)
    info = _run([dpo, "cache", "info", out], outside).stdout
    assert out.is_file() and "rows: 3" in info, info
