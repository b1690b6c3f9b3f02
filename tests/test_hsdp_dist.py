"""HSDP (`--replicas 2`) under `torchrun --nproc-per-node 4` on CPU (gloo): a 2 x 2 device mesh, weights sharded
inside each pair of ranks and replicated across the pairs.

Pinned: the mesh and placements each rank really gets; stage one's values equal one process (the bound of
test_precompute_dist); stage two's loss / grad_norm / every train metric at every step, the eval metrics and the
saved adapter equal one process with the same global batch: 4 ranks x batch 2 x accumulation 1 == 1 process x
batch 2 x accumulation 4 (the bounds of test_train_dist); fp32 and NF4.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from stages.base.errors import UserError
from stages.settings.groups import Compute
from stages.stage2 import train
from stages.stage2.train import TrainConfig
from tests.bounds import logit_scale_of_files, sum_tol
from tests.test_precompute import MAXLEN, MAXPROMPT, SHORT, VALUE_COLS, run_inproc
from tests.test_train_dist import COMPARED, STEPS, common, free_port, read_jsonl, rel, setup  # noqa: F401 (fixture)

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[1]
WORLD, REPLICAS = 4, 2


def torchrun(*args: str, timeout: float = 600, world: int = WORLD) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_replicas_must_divide_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's: checked with the settings, before anything is read
    for good in (1, 2, 4):
        Compute(replicas=good).check()
    for bad in (0, 3, 8):
        with pytest.raises(UserError, match=f"--replicas {bad} must be >= 1 and divide the 4 processes"):
            Compute(replicas=bad).check()


MESH_PROBE = textwrap.dedent("""
    import sys, torch
    from torch.distributed.tensor import Replicate, Shard
    from transformers import AutoModelForCausalLM
    from stages.model.distributed import init_distributed, shard_model
    env = init_distributed()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    full = model.model.layers[0].self_attn.q_proj.weight.shape
    shard_model(model, env, replicas=int(sys.argv[2]))
    w = model.model.layers[0].self_attn.q_proj.weight
    mesh = w.device_mesh
    assert tuple(mesh.shape) == (2, 2) and mesh.mesh_dim_names == ("replicate", "shard"), mesh
    assert tuple(w.placements) == (Replicate(), Shard(0)), w.placements
    assert w.to_local().shape[0] * 2 == full[0] and w.full_tensor().shape == full
    group = mesh.get_local_rank("replicate")
    assert group == env.rank // 2, (env.rank, group)  # ranks 0,1 are one replica group (one node), 2,3 the other
    print(f"rank {env.rank}: mesh {tuple(mesh.shape)} group {group} placements {w.placements} "
          f"local {tuple(w.to_local().shape)}")
    torch.distributed.destroy_process_group()  # as the CLI ends (gloo's threads joined before the interpreter exits)
""")


def test_mesh_is_two_by_two(tiny_llama, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(MESH_PROBE)
    proc = torchrun(str(probe), str(tiny_llama), str(REPLICAS), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("mesh (2, 2)") == WORLD  # 4 processes share stdout: lines may interleave


def test_stage_one_hsdp_equals_one_process(tiny_llama, setup, tmp_path):
    data = setup["train"]  # 40 HH rows
    out = tmp_path / "hsdp" / "ref.parquet"
    proc = torchrun("-m", "stages.cli", "precompute-ref", "--model", str(tiny_llama), "--data", str(data),
                    "--out", str(out), "--max-tokens-per-batch", "1024", "--replicas", str(REPLICAS), *SHORT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    hsdp = pl.read_parquet(out).sort("example_id")
    one = run_inproc(tiny_llama, [data], tmp_path / "one" / "ref.parquet", max_tokens_per_batch=1024)
    assert hsdp["example_id"].to_list() == one["example_id"].to_list() and hsdp.height == 40
    assert hsdp.select(VALUE_COLS[2:]).equals(one.select(VALUE_COLS[2:]))
    diff = max(float((hsdp[c] - one[c]).abs().max()) for c in VALUE_COLS[:2])
    print(f"stage one, 2x2 HSDP vs one process: max |diff| {diff:.3e}")
    assert_within_bounds(hsdp, one, tiny_llama, data)
    assert "Traceback" not in proc.stderr


def test_stage_one_one_process_per_replica_group(tiny_llama, setup, tmp_path):
    """2 processes as 2 replica groups of 1: FSDP2 shards over a single process (a forward under inference_mode
    once broke the second batch there); values equal one process."""
    out = tmp_path / "hsdp21" / "ref.parquet"
    proc = torchrun("-m", "stages.cli", "precompute-ref", "--model", str(tiny_llama), "--data", str(setup["train"]),
                    "--output", str(out), "--max-tokens-per-batch", "256", "--replicas", "2", *SHORT, world=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = pl.read_parquet(out).sort("example_id")
    one = run_inproc(tiny_llama, [setup["train"]], tmp_path / "one" / "ref.parquet", max_tokens_per_batch=256)
    assert got.height == 40 and got.select(VALUE_COLS[2:]).equals(one.select(VALUE_COLS[2:]))
    assert_within_bounds(got, one, tiny_llama, setup["train"])


def assert_within_bounds(got: pl.DataFrame, one: pl.DataFrame, model, data) -> None:
    """Each summed log-prob within its rounding bound (tests/bounds.py: n tokens x ULPS x EPS32 x logit scale)."""
    z = logit_scale_of_files(model, [data], MAXLEN, MAXPROMPT)
    for value, tokens in (("ref_chosen_logps", "chosen_tokens"), ("ref_rejected_logps", "rejected_tokens")):
        bound = sum_tol(one[tokens].to_numpy(), z)
        assert ((got[value] - one[value]).abs().to_numpy() <= bound).all(), value


@pytest.fixture(scope="module", params=["fp32", "nf4"])
def pair(request, setup: dict) -> dict:
    mode = request.param
    out1, out4 = setup["dir"] / f"hsdp-one-{mode}", setup["dir"] / f"hsdp-four-{mode}"
    train.run(TrainConfig.flat(**common(setup, mode), output=str(out1), gradient_accumulation_steps=4))
    c = common(setup, mode)
    args = ["--model", c["model"], "--data", c["data"][0], "--eval-data", c["eval_data"][0],
            "--ref-cache", c["ref_cache"], "--output", str(out4), "--max-steps", str(STEPS), "--batch-size", "2",
            "--eval-batch-size", "4", "--gradient-accumulation-steps", "1", "--lora-r", "8", "--lora-alpha", "16",
            "--lora-dropout", "0", "--learning-rate", str(c["learning_rate"]), "--save-steps", "2", "--seed", "3",
            "--load-in-4bit" if c["load_in_4bit"] else "--no-load-in-4bit", "--replicas", str(REPLICAS)]
    proc = torchrun("-m", "stages.cli", "train", *args)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return {"mode": mode, "one": out1, "four": out4}


def test_stage_two_hsdp_metrics_equal_one_process(pair):
    one = [r for r in read_jsonl(pair["one"] / "metrics.jsonl") if "loss" in r]
    four = [r for r in read_jsonl(pair["four"] / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in four] == list(range(1, STEPS + 1))
    for a, b in zip(one, four):
        bad = {k: (a[k], b[k]) for k in COMPARED if rel(a[k], b[k]) > 1e-5 and abs(a[k] - b[k]) > 1e-6
               and not (a["step"] == 1 and k == "rewards/accuracies")}
        assert not bad, (a["step"], bad)
    assert len({r["loss"] for r in one}) == STEPS, "losses must move for the comparison to mean anything"
    e1 = [r for r in read_jsonl(pair["one"] / "metrics.jsonl") if "eval/loss" in r]
    e4 = [r for r in read_jsonl(pair["four"] / "metrics.jsonl") if "eval/loss" in r]
    assert len(e1) == len(e4) == 1
    # the same floor as the train metrics: logits/* are means near 0 (3e-5 here), where 1e-5 relative is rounding
    bad = {k: (e1[0][k], e4[0][k]) for k in e1[0] if k != "step" and rel(e1[0][k], e4[0][k]) > 1e-5
           and abs(e1[0][k] - e4[0][k]) > 1e-6}
    assert not bad, bad


def test_stage_two_hsdp_adapter_equals_one_process(pair):
    from safetensors.torch import load_file

    a = load_file(str(pair["one"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(pair["four"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert float((a[k] - b[k]).abs().max()) <= 1e-5 * max(float(a[k].abs().max()), 1.0), k
    assert any(float(v.abs().max()) > 1e-3 for k, v in b.items() if "lora_B" in k), "LoRA B never moved"
    assert (pair["four"] / "checkpoint-2" / "rng-rank3.pt").is_file()
