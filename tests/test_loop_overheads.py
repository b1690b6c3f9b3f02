"""Issue 20, item 6: the loops' overheads. The batch order is built once per epoch (and a resume still replays
the same steps); the cache rows and the metrics take ONE device->host copy per batch with unchanged values; the
finished-cache broadcast sends ids, not the table; the LM-head chunk has a per-device default that is not part of
the cache's fingerprint."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from stages.base import constants
from stages.cache import refcache
from stages.cli import main as cli_main
from stages.data.encode import Encoded
from stages.model import logprobs
from stages.model.distributed import DistEnv
from stages.objective.loss import LOSS_TYPES
from stages.settings import commands as settings
from stages.settings.options import options
from stages.stage1 import precompute
from stages.stage2 import train, trainutil
from stages.stage2.metrics import SUM_KEYS, Accumulator
from tests.bounds import logit_scale, pair_sequences, sum_tol
from tests.hhrows import hh_rows, write_jsonl

MAXLEN, MAXPROMPT = 160, 96
HOST_READS = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class OnDevice(torch.Tensor):
    """A tensor standing for one on an accelerator: every read to the host (.cpu(), .item(), .tolist(), float(),
    int(), ...) is counted and gives a plain (host) tensor; anything computed from it stays OnDevice."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if name in HOST_READS or to_host:
            cls.reads.append(name)
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return super().__torch_function__(func, types, args, kwargs)


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t.clone().as_subclass(OnDevice)


# ------------------------------------------------------------------------------- the batch order, per epoch
@pytest.fixture(scope="module")
def cache8(tiny_llama, hh_path, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("loop")
    data = write_jsonl(d / "rows.jsonl", hh_rows(hh_path, 0, 8))
    cache = d / "ref.parquet"
    precompute.run(settings.PrecomputeConfig.flat(model=str(tiny_llama), data=(str(data),), output=str(cache),
                                                  max_length=MAXLEN, max_prompt_length=MAXPROMPT))
    return {"model": tiny_llama, "data": data, "cache": cache, "dir": d}


def _tcfg(files: dict, out: Path) -> settings.TrainConfig:
    """8 rows, 2 per step: 4 steps per epoch; 6 steps touch epochs 0 and 1."""
    return settings.TrainConfig.flat(model=str(files["model"]), data=(str(files["data"]),),
                                     ref_cache=str(files["cache"]), output=str(out), max_steps=6, batch_size=2,
                                     lora_r=4, lora_alpha=8, learning_rate=1e-2, save_steps=2, load_in_4bit=False)


def _losses(out: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_batch_order_built_once_per_epoch_and_resume_still_exact(cache8, tmp_path, monkeypatch):
    calls: list[int] = []
    real = trainutil.batches_for_epoch

    def counting(items, batch_size, seed, epoch, *rest, **kw):
        calls.append(epoch)
        return real(items, batch_size, seed, epoch, *rest, **kw)

    monkeypatch.setattr(train, "batches_for_epoch", counting)
    train.run(_tcfg(cache8, tmp_path / "a"))
    assert calls == [0, 1], calls  # 6 steps in 2 epochs: two orders, not six

    calls.clear()
    real_write = train.MetricsWriter.write

    def crash_after_step_5(self, record):
        real_write(self, record)
        if record.get("step") == 5 and "loss" in record:
            raise RuntimeError("simulated kill")

    with monkeypatch.context() as m:
        m.setattr(train.MetricsWriter, "write", crash_after_step_5)
        with pytest.raises(RuntimeError, match="simulated kill"):
            train.run(_tcfg(cache8, tmp_path / "b"))
    assert calls == [0, 1], calls
    calls.clear()
    train.run(_tcfg(cache8, tmp_path / "b"))  # resumes from checkpoint-4: steps 5 and 6, both in epoch 1
    assert calls == [1], calls
    got, want = _losses(tmp_path / "b"), _losses(tmp_path / "a")
    assert got.keys() == want.keys() == set(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (got, want)  # same steps replayed (see test_train)


# --------------------------------------------------------------------------- one device->host copy per batch
def _policy_pass(b: int, seed: int, wrap):
    g = torch.Generator().manual_seed(seed)
    vec = lambda dtype=torch.float64: wrap(torch.randn(b, generator=g, dtype=dtype) * 30)  # noqa: E731
    tokens = lambda: wrap(torch.randint(1, 200, (b,), generator=g))  # noqa: E731
    lp = SimpleNamespace(chosen_logps=vec(), rejected_logps=vec(), chosen_logits_sum=vec(torch.float32),
                         rejected_logits_sum=vec(torch.float32), chosen_tokens=tokens(), rejected_tokens=tokens())
    loss = SimpleNamespace(chosen_rewards=vec(), rejected_rewards=vec(),
                           components={"sigmoid": vec(torch.float32), "sft": vec(torch.float32)})
    ref = torch.randn(2, b, generator=g, dtype=torch.float64) * 30
    return SimpleNamespace(losses=vec(torch.float32), logps=lp, loss=loss, ref_chosen=ref[0], ref_rejected=ref[1])


def _reference_sums(p) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """What Accumulator.add computed before issue 20 (one .cpu() per metric), on host tensors."""
    c, r = p.loss.chosen_rewards.double(), p.loss.rejected_rewards.double()
    pc, pr = p.logps.chosen_logps.double(), p.logps.rejected_logps.double()
    drift = ((pc - p.ref_chosen).abs() + (pr - p.ref_rejected).abs()) / 2
    values = [p.losses.double().sum(), c.sum(), r.sum(), (c > r).double().sum(), (c - r).sum(), pc.sum(), pr.sum(),
              p.logps.chosen_logits_sum.double().sum(), p.logps.rejected_logits_sum.double().sum(), drift.sum()]
    terms = torch.zeros(2 * len(LOSS_TYPES), dtype=torch.float64)
    for name, term in p.loss.components.items():
        terms[LOSS_TYPES.index(name)] += term.double().sum()
        terms[len(LOSS_TYPES) + LOSS_TYPES.index(name)] += term.shape[0]
    counts = (p.losses.shape[0], int(p.logps.chosen_tokens.sum()), int(p.logps.rejected_tokens.sum()))
    return torch.stack(values), terms, counts


def test_metrics_take_one_copy_per_batch_with_the_same_bits():
    acc, counts = Accumulator(), [0, 0, 0]
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    terms = torch.zeros(2 * len(LOSS_TYPES), dtype=torch.float64)
    for seed in range(3):
        OnDevice.reads.clear()
        acc.add(_policy_pass(5, seed, on_device))
        assert OnDevice.reads == ["cpu"], OnDevice.reads  # one copy per batch (was one per metric: ~15)
        s, t, c = _reference_sums(_policy_pass(5, seed, lambda x: x))
        sums, terms, counts = sums + s, terms + t, [a + b for a, b in zip(counts, c)]
    assert torch.equal(acc.sums, sums) and torch.equal(acc.terms, terms)  # bit for bit
    assert [acc.examples, acc.chosen_tokens, acc.rejected_tokens] == counts


def _logp_output(b: int, wrap):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (2 * b,), generator=g).tolist()
    flat = torch.randn(sum(lengths), generator=g)  # fp32 per-token log-probs, as the head gives them
    return SimpleNamespace(chosen_logps=wrap(torch.randn(b, generator=g, dtype=torch.float64) * 40),
                           rejected_logps=wrap(torch.randn(b, generator=g, dtype=torch.float64) * 40),
                           chosen_tokens=wrap(torch.tensor(lengths[:b])),
                           rejected_tokens=wrap(torch.tensor(lengths[b:])),
                           token_logps=list(torch.split(wrap(flat), lengths)))


@pytest.mark.parametrize("token_logps", [False, True], ids=["sums", "token-logps"])
def test_cache_rows_take_one_copy_per_batch_with_the_same_values(token_logps):
    batch = [Encoded(f"id{i}", (1,) * (i + 1), (2,), (3,)) for i in range(4)]
    OnDevice.reads.clear()
    rows = precompute.result_rows(batch, _logp_output(4, on_device), token_logps)
    assert OnDevice.reads == ["cpu"], OnDevice.reads  # one copy for the whole batch (was 4 per example)
    plain = _logp_output(4, lambda x: x)
    for i, (e, row) in enumerate(zip(batch, rows)):  # what the per-example float()/int()/tolist() gave
        want = {"example_id": e.example_id, "ref_chosen_logps": float(plain.chosen_logps[i]),
                "ref_rejected_logps": float(plain.rejected_logps[i]), "chosen_tokens": int(plain.chosen_tokens[i]),
                "rejected_tokens": int(plain.rejected_tokens[i]), "prompt_tokens": i + 1}
        if token_logps:
            want["ref_chosen_token_logps"] = plain.token_logps[i].tolist()
            want["ref_rejected_token_logps"] = plain.token_logps[4 + i].tolist()
        assert row == want and all(type(row[k]) is type(want[k]) for k in want), (row, want)


# ------------------------------------------------------------------------- the finished-cache broadcast: ids
@pytest.mark.parametrize("rank", [0, 1])
def test_finished_cache_broadcast_sends_ids_not_the_table(rank, cache8, monkeypatch):
    manifest = refcache.read_meta(cache8["cache"])["manifest"]
    ids = set(refcache.finished_rows(cache8["cache"], manifest, False).column("example_id").to_pylist())
    sent = []

    def broadcast(obj, env):
        sent.append(obj)
        return ids if env.rank else obj  # rank 1 receives what rank 0 sends

    monkeypatch.setattr(precompute, "broadcast_object", broadcast)
    env = DistEnv(rank, 2, rank, torch.device("cpu"))
    base, have = precompute.open_cache_everywhere(cache8["cache"], manifest, False, env)
    assert have == ids and len(ids) == 8
    if rank == 0:
        assert sent == [ids] and base is not None and base.num_rows == 8  # rank 0 keeps its table to merge
    else:
        assert sent == [None] and base is None


@pytest.mark.dist
def test_incremental_cache_under_torchrun(tiny_llama, cache8, tmp_path):
    """Two ranks add rows to a finished cache: the ids reach rank 1, the table stays on rank 0."""
    import polars as pl

    from tests.test_precompute_dist import BUDGET, torchrun

    four = write_jsonl(tmp_path / "four.jsonl", [row for row, _ in zip(_read(cache8["data"]), range(4))])
    out = tmp_path / "ref.parquet"
    args = dict(max_length=MAXLEN, max_prompt_length=MAXPROMPT, max_tokens_per_batch=BUDGET, batches_per_part=2)
    precompute.run(settings.PrecomputeConfig.flat(model=str(tiny_llama), data=(str(four),), output=str(out), **args))
    before = pl.read_parquet(out)
    proc = torchrun(tiny_llama, cache8["data"], out, "--max-length", str(MAXLEN), "--max-prompt-length",
                    str(MAXPROMPT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "cache: 4 of 8 examples already in" in proc.stdout and "4 to go" in proc.stdout, proc.stdout
    after = pl.read_parquet(out)
    assert after.height == 8 and after.filter(pl.col("example_id").is_in(before["example_id"].to_list())).sort(
        "example_id").equals(before.sort("example_id"))
    again = torchrun(tiny_llama, cache8["data"], out, "--max-length", str(MAXLEN), "--max-prompt-length",
                     str(MAXPROMPT))
    assert again.returncode == 0 and "already holds all 8 examples" in again.stdout, again.stdout[-2000:]


def _read(path: Path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -------------------------------------------------------------------------------- the LM-head chunk per device
def test_chunk_size_resolves_per_device():
    assert constants.chunk_size_for(None, "cpu") == 256 == constants.CHUNK_BY_DEVICE["cpu"]
    assert constants.chunk_size_for(None, "cuda") == 2048 == constants.CHUNK_BY_DEVICE["cuda"]
    assert constants.chunk_size_for(None, "mps") == 256  # any other device: CPU's
    assert constants.chunk_size_for(7, "cuda") == 7 and constants.chunk_size_for(7, "cpu") == 7
    for command in (settings.TrainConfig, settings.PrecomputeConfig):
        assert {o.name: o.default for o in options(command)}["chunk_size"] is None


@pytest.mark.parametrize("command", ["train", "precompute-ref", "sweep"])
def test_chunk_size_help_states_both_defaults(command):
    text = re.sub(r"\s+", " ", CliRunner().invoke(cli_main, [command, "--help"]).output)
    match = re.search(r"--chunk-size INTEGER (.*?) --", text)
    assert match, text
    assert "256 on CPU" in match.group(1) and "2048 on CUDA" in match.group(1), match.group(1)


def test_unset_chunk_size_uses_the_devices_default_in_the_head(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), torch_dtype=torch.float32).eval()
    encoded = [Encoded(f"e{i}", (5, 6, 7), tuple(range(10, 10 + 3 + i)), tuple(range(20, 24 + i))) for i in range(3)]
    sizes, real = [], logprobs._chunk_logps

    def recording(project, h, *args):
        sizes.append(h.shape[0])
        return real(project, h, *args)

    monkeypatch.setattr(logprobs, "_chunk_logps", recording)
    with torch.no_grad():
        want = logprobs.pair_logps(model, encoded, 0, 10_000)
        monkeypatch.setitem(constants.CHUNK_BY_DEVICE, "cpu", 4)
        sizes.clear()
        got = logprobs.pair_logps(model, encoded, 0)  # chunk_size unset: the CPU default (4 here)
    assert max(sizes) == 4 and len(sizes) > 3, sizes
    z = logit_scale(model, pair_sequences(encoded))  # chunking changes rounding at most (tests/bounds.py)
    for side in ("chosen", "rejected"):
        diff = (getattr(got, f"{side}_logps") - getattr(want, f"{side}_logps")).abs()
        assert (diff <= sum_tol(getattr(want, f"{side}_tokens"), z)).all(), side


def test_chunk_size_is_not_in_the_cache_fingerprint(cache8, capsys):
    """A rerun with another chunk size finds the same finished cache: nothing to compute."""
    assert "chunk" not in str(refcache.read_meta(cache8["cache"])["manifest"])
    precompute.run(settings.PrecomputeConfig.flat(model=str(cache8["model"]), data=(str(cache8["data"]),),
                                                  output=str(cache8["cache"]), max_length=MAXLEN,
                                                  max_prompt_length=MAXPROMPT, chunk_size=3))
    assert "already holds all 8 examples" in capsys.readouterr().out
