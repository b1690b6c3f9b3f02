"""Stage one (`dpo precompute-ref`) end to end on the tiny random models and a few real HH-RLHF rows.

What is pinned here: the cache's columns, dtypes, values (against a direct `sequence_logps` and a plain full-logits
computation), metadata and saved config; prompt sharing / length sorting do not change the numbers; per-token lists
sum to the totals; kill -9 at random points then resume gives the uninterrupted result; a rerun with other settings
refuses (exit 2, one line) until --overwrite; user errors are one line; `dpo cache info` / `dpo cache verify`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cache import refcache
from stages.cli import main as cli_main
from stages.data.encode import TokenizeSettings, encode_examples
from stages.data.rows import ids_digest, load_examples
from stages.model import logprobs
from stages.model.logprobs import collate_pairs, sequence_logps
from stages.stage1 import precompute, units
from stages.stage1.precompute import PrecomputeConfig

REPO = Path(__file__).resolve().parents[1]
MAXLEN, MAXPROMPT = 256, 128  # keeps the HH rows short (and exercises truncation)
SHORT = ("--max-length", str(MAXLEN), "--max-prompt-length", str(MAXPROMPT))
VALUE_COLS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens", "prompt_tokens")

# Multi-turn chat rows (the eval file): prompts long enough that prompt sharing has something to share.
CHAT_ROWS = [
    {
        "prompt": [
            {"role": "user", "content": f"Question {i}: how do I bake bread at home?"},
            {"role": "assistant", "content": "You need flour, water, yeast and salt."},
            {"role": "user", "content": f"And how long should it rise, version {i}?"},
        ],
        "chosen": [{"role": "assistant", "content": f"Let it rise for about {i + 1} hours, then bake it."}],
        "rejected": [{"role": "assistant", "content": "I cannot help with that request." + " No." * i}],
    }
    for i in range(5)
]


# ---------------------------------------------------------------------------------------------------- helpers
from tests.bounds import leaky_triple_mask, logit_scale_of_files, min_token_nats, sum_tol, token_tol  # noqa: E402
from tests.hhrows import hh_rows, write_jsonl  # noqa: E402  (shared with the other stage tests)
from tests.tiny import VOCAB_SIZE  # noqa: E402


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`dpo ARGS` in a fresh process (what a user runs)."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def invoke(*args: str):
    """`dpo ARGS` in this process (fast; no torch/transformers import per call)."""
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=True)


def run_inproc(model: Path, data: list[Path], out: Path, **kw) -> pl.DataFrame:
    kw = {"max_length": MAXLEN, "max_prompt_length": MAXPROMPT, **kw}
    precompute.run(PrecomputeConfig.flat(model=str(model), data=tuple(map(str, data)), output=str(out), **kw))
    return pl.read_parquet(out).sort("example_id")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def max_abs_diff(a: pl.DataFrame, b: pl.DataFrame, cols=("ref_chosen_logps", "ref_rejected_logps")) -> float:
    assert a["example_id"].to_list() == b["example_id"].to_list()
    return max(float((a[c] - b[c]).abs().max()) for c in cols)


def direct_values(model_dir: Path, data: list[Path]) -> dict[str, tuple[float, float, int, int, int]]:
    """Independent of precompute: each example alone through `sequence_logps` (fp32, no padding)."""
    from transformers import AutoModelForCausalLM

    from stages.model.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    examples, _ = load_examples(data)
    encoded, _ = encode_examples(tok, examples, TokenizeSettings(MAXLEN, MAXPROMPT))
    out = {}
    with torch.inference_mode():
        for e in encoded:
            o = sequence_logps(model, collate_pairs([e], tok.pad_token_id))
            out[e.example_id] = (float(o.chosen_logps[0]), float(o.rejected_logps[0]), int(o.chosen_tokens[0]),
                                 int(o.rejected_tokens[0]), len(e.prompt_ids))
    return out


def full_logits_logp(model, prompt_ids, reply_ids) -> float:
    """Textbook: log_softmax over full logits, sum over reply tokens."""
    ids = torch.tensor([list(prompt_ids) + list(reply_ids)])
    logits = model(input_ids=ids).logits[0].double().log_softmax(-1)
    p = len(prompt_ids)
    return float(sum(logits[p - 1 + j, t] for j, t in enumerate(reply_ids)))


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(hh_path: Path, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pc_data")
    return {
        "train": write_jsonl(d / "train.jsonl", hh_rows(hh_path, 0, 25)),
        "eval": write_jsonl(d / "eval.jsonl", CHAT_ROWS),
        "train40": write_jsonl(d / "train40.jsonl", hh_rows(hh_path, 0, 35)),  # + 5 chat rows = 40
        "extra": write_jsonl(d / "extra.jsonl", hh_rows(hh_path, 0, 28)),  # train + 3 rows not cached
        "seven": write_jsonl(d / "seven.jsonl", hh_rows(hh_path, 40, 47)),
    }


@pytest.fixture(scope="module")
def e2e(tiny_llama: Path, files, tmp_path_factory):
    """One real CLI run: tiny llama over train (25 HH rows) + eval (5 chat rows)."""
    out = tmp_path_factory.mktemp("pc_e2e") / "cache" / "ref.parquet"
    t0 = time.perf_counter()
    proc = run_cli("precompute-ref", "--model", str(tiny_llama), "--data", str(files["train"]),
                   "--data", str(files["eval"]), "--out", str(out), "--max-tokens-per-batch", "2048", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------- 1. end to end
def test_e2e_one_row_per_example_with_schema(e2e, files):
    out = e2e["out"]
    examples, _ = load_examples([files["train"], files["eval"]])
    assert len(examples) == 30
    table = pq.read_table(out)
    assert table.num_rows == 30
    assert sorted(table.column("example_id").to_pylist()) == sorted(e.example_id for e in examples)
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {"example_id": "string", "ref_chosen_logps": "double", "ref_rejected_logps": "double",
                     "chosen_tokens": "int32", "rejected_tokens": "int32", "prompt_tokens": "int32"}
    assert not (out.parent / (out.name + ".parts")).exists(), "parts folder must be removed after the merge"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == [], "temporary files left behind"


def compare_to_direct(df: pl.DataFrame, want: dict, z: float) -> float:
    """Worst |cached - direct| as a fraction of its sum_tol(tokens, Z) (tests/bounds.py): <= 1 passes."""
    assert set(df["example_id"]) == set(want)
    worst = 0.0
    for r in df.iter_rows(named=True):
        c, rj, ct, rt, pt = want[r["example_id"]]
        worst = max(worst, abs(r["ref_chosen_logps"] - c) / sum_tol(ct, z),
                    abs(r["ref_rejected_logps"] - rj) / sum_tol(rt, z))
        assert (r["chosen_tokens"], r["rejected_tokens"], r["prompt_tokens"]) == (ct, rt, pt)
        assert r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0
    return worst


def test_e2e_values_equal_direct_sequence_logps(e2e, tiny_llama, files, tmp_path):
    """Default run (shared prompt, padded batches) and the plain unbatched path within sum_tol(tokens, Z) of
    one-example-at-a-time sequence_logps (tests/bounds.py). On this random model every token costs at least
    min_token_nats (~log V) > any sum_tol here, so a dropped or added token cannot pass."""
    data = [files["train"], files["eval"]]
    want = direct_values(tiny_llama, data)
    z = logit_scale_of_files(tiny_llama, data, MAXLEN, MAXPROMPT)
    assert min_token_nats(VOCAB_SIZE, z) > sum_tol(max(max(w[2], w[3]) for w in want.values()), z)
    assert compare_to_direct(pl.read_parquet(e2e["out"]), want, z) <= 1
    plain = run_inproc(tiny_llama, data, tmp_path / "plain.parquet", share_prompt=False, max_tokens_per_batch=1)
    assert compare_to_direct(plain, want, z) <= 1


def test_e2e_values_equal_full_logits_textbook(e2e, tiny_llama, files):
    """sequence_logps itself against log_softmax over the full logits, for a text row and a chat row."""
    from transformers import AutoModelForCausalLM

    from stages.model.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    df = pl.read_parquet(e2e["out"])
    cached = {r["example_id"]: r for r in df.iter_rows(named=True)}
    train, _ = load_examples([files["train"]])
    chat, _ = load_examples([files["eval"]])
    encoded, _ = encode_examples(tok, [train[0], train[7], chat[0], chat[4]], TokenizeSettings(MAXLEN, MAXPROMPT))
    z = logit_scale_of_files(tiny_llama, [files["train"], files["eval"]], MAXLEN, MAXPROMPT)  # tests/bounds.py
    with torch.inference_mode():
        for e in encoded:
            for reply, col in ((e.chosen_ids, "ref_chosen_logps"), (e.rejected_ids, "ref_rejected_logps")):
                diff = abs(full_logits_logp(model, e.prompt_ids, reply) - cached[e.example_id][col])
                assert diff <= sum_tol(len(reply), z)


def test_e2e_readable_by_polars_pyarrow_pandas(e2e):
    out = e2e["out"]
    df = pl.read_parquet(out)
    assert df.schema["ref_chosen_logps"] == pl.Float64 and df.schema["chosen_tokens"] == pl.Int32
    assert df.height == 30 and df["example_id"].n_unique() == 30
    t = pq.read_table(out)
    assert t.num_rows == 30
    pd = pytest.importorskip("pandas")
    pdf = pd.read_parquet(out)
    assert len(pdf) == 30
    assert str(pdf["ref_chosen_logps"].dtype) == "float64" and str(pdf["chosen_tokens"].dtype) == "int32"
    assert sorted(pdf["example_id"]) == sorted(df["example_id"].to_list())


def test_e2e_metadata_fields(e2e, tiny_llama, files):
    out = e2e["out"]
    meta = json.loads(pq.read_schema(out).metadata[refcache.META_KEY])
    assert meta == refcache.read_meta(out)
    assert meta["format_version"] == refcache.FORMAT_VERSION and meta["tool_version"]
    assert Path(meta["model"]["path"]).resolve() == tiny_llama.resolve()
    assert len(meta["model"]["config_hash"]) == 32
    w = meta["model"]["weights"]
    assert w["files"] == ["model.safetensors"] and w["bytes"] > 0 and len(w["hash"]) == 32 and w["full_hash"] is False
    assert "adapter" in meta and meta["adapter"] is None
    assert meta["quantization"] == "none" and "dtype" in meta
    tok = meta["tokenization"]
    assert len(tok["tokenizer_hash"]) == 32 and len(tok["chat_template_hash"]) == 32
    assert (tok["max_length"], tok["max_prompt_length"]) == (MAXLEN, MAXPROMPT) and tok["truncation"]
    data = meta["data"]
    assert data["files"] == {str(files["train"]): 25, str(files["eval"]): 5}
    assert data["examples"] == 30
    assert data["ids_digest"] == ids_digest(pl.read_parquet(out)["example_id"].to_list())
    assert meta["world_size"] == 1
    assert time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ")
    assert isinstance(meta["elapsed_seconds"], float) and meta["elapsed_seconds"] >= 0


def test_metadata_records_the_dtype_actually_used(e2e):
    """`--dtype auto` (default) computes in fp32 on CPU; the cache must say fp32, not 'auto' (which is bf16 on GPU)."""
    meta = refcache.read_meta(e2e["out"])
    assert meta["dtype"] in ("fp32", "float32", "torch.float32"), meta["dtype"]


def test_e2e_config_yaml_and_summary(e2e, tiny_llama, files):
    out = e2e["out"]
    saved = yaml.safe_load((out.parent / (out.name + ".config.yaml")).read_text())
    assert saved["model"] == str(tiny_llama) and saved["data"] == [str(files["train"]), str(files["eval"])]
    assert (saved["max_length"], saved["max_prompt_length"], saved["max_tokens_per_batch"]) == (MAXLEN, MAXPROMPT, 2048)
    # the saved YAML is a valid --config for the same command
    from stages.settings import yamlconfig as cfgmod
    assert cfgmod.build(PrecomputeConfig, str(out.parent / (out.name + ".config.yaml")), {}) \
        == PrecomputeConfig.flat(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    done = [line for line in e2e["proc"].stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1, e2e["proc"].stdout
    assert "30 examples" in done[0] and "tokens/s" in done[0] and "padding waste" in done[0] and "%" in done[0]
    assert "Traceback" not in e2e["proc"].stderr


# ------------------------------------------------------------------------------- 2. equivalent settings
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_share_prompt_and_sorting_do_not_change_values(arch, request, files, tmp_path, monkeypatch):
    model = request.getfixturevalue(arch)
    data = [files["train"], files["eval"]]
    calls = {"shared": 0}
    real = logprobs.shared_prompt_logps  # what precompute's pair_logps calls when it shares the prompt

    def spy(*a, **k):
        calls["shared"] += 1
        return real(*a, **k)

    monkeypatch.setattr(logprobs, "shared_prompt_logps", spy)
    # the dense-mask path (--attention dense) is the one that calls shared_prompt_logps; segments: test_packing
    shared = run_inproc(model, data, tmp_path / "s.parquet", max_tokens_per_batch=1500, attention="dense")
    assert calls["shared"] > 0, "--share-prompt did not take the shared path on an sdpa model"
    calls["shared"] = 0
    plain = run_inproc(model, data, tmp_path / "p.parquet", max_tokens_per_batch=1500, share_prompt=False,
                       attention="dense")
    assert calls["shared"] == 0
    unsorted = run_inproc(model, data, tmp_path / "u.parquet", max_tokens_per_batch=1500, sort_by_length=False)
    assert shared.height == plain.height == unsorted.height == 30
    z = logit_scale_of_files(model, data, MAXLEN, MAXPROMPT)  # tests/bounds.py; every token >= min_token_nats
    longest = max(shared["chosen_tokens"].max(), shared["rejected_tokens"].max())
    assert min_token_nats(VOCAB_SIZE, z) > sum_tol(longest, z)
    for other in (plain, unsorted):
        assert shared.select(VALUE_COLS[2:]).equals(other.select(VALUE_COLS[2:]))
        for side in ("chosen", "rejected"):
            diff = (shared[f"ref_{side}_logps"] - other[f"ref_{side}_logps"]).abs()
            assert (diff <= sum_tol(shared[f"{side}_tokens"], z)).all(), diff.max()


@pytest.mark.parametrize("share", [False, True], ids=["no-share", "share"])
def test_store_token_logps_lists_sum_to_totals(share, tiny_llama, files, tmp_path):
    df = run_inproc(tiny_llama, [files["train"], files["eval"]], tmp_path / "t.parquet",
                    store_token_logps=True, share_prompt=share, max_tokens_per_batch=1500)
    schema = pq.read_schema(tmp_path / "t.parquet")
    assert str(schema.field("ref_chosen_token_logps").type) == "list<element: float>"
    for r in df.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            toks = r[f"ref_{side}_token_logps"]
            assert len(toks) == r[f"{side}_tokens"]
            assert all(t <= 0 for t in toks)
            assert abs(math.fsum(toks) - r[f"ref_{side}_logps"]) <= 1e-6 * max(1.0, abs(r[f"ref_{side}_logps"]))


# -------------------------------------------------------------------------------------------- 3. resume
KILL_DRIVER = """\
import os, sys, time
import stages.cache.refcache as rc
_write = rc.write_part
def slow_write(*a, **k):  # stretch the run so a kill lands mid-way (before and after a part is written)
    s = float(os.environ.get("SLOW_PART_S", "0"))
    time.sleep(s / 2)
    _write(*a, **k)
    time.sleep(s / 2)
rc.write_part = slow_write
from stages.cli import main
main(prog_name="dpo")
"""


def part_ids(parts: Path) -> list[str]:
    ids: list[str] = []
    for p in sorted(parts.glob("part-*.parquet")):
        ids += pq.read_table(p, columns=["example_id"]).column(0).to_pylist()
    return ids


def test_kill9_resume_equals_uninterrupted_run(tiny_llama, files, tmp_path):
    data = [files["train40"], files["eval"]]
    base = run_inproc(tiny_llama, data, tmp_path / "base" / "ref.parquet", max_tokens_per_batch=1, batches_per_part=1)
    assert base.height == 40

    out = tmp_path / "resume" / "ref.parquet"
    parts = out.with_name(out.name + ".parts")
    args = ["precompute-ref", "--model", str(tiny_llama), "--data", str(data[0]), "--data", str(data[1]),
            "--out", str(out), "--max-tokens-per-batch", "1", "--batches-per-part", "1", *SHORT]
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    rng = random.Random(20240601)
    done_before, t0 = 0, time.perf_counter()
    for attempt in range(3):
        log = tmp_path / f"kill{attempt}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    env={**cli_env(), "SLOW_PART_S": "0.1"})
            target = done_before + rng.randint(1, 6)
            deadline = time.monotonic() + 120
            while len(list(parts.glob("part-*.parquet"))) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.12))
            proc.kill()
            proc.wait()
        assert proc.returncode == -9, (f"attempt {attempt}: the run finished before it was killed\n"
                                       f"{log.read_text()[-2000:]}")
        assert not out.exists()
        ids = part_ids(parts)
        assert len(ids) == len(set(ids)), "a resumed run wrote an example twice"
        assert len(ids) > done_before, f"attempt {attempt} made no progress"
        if attempt:
            assert f"cache: {done_before} of 40 examples already in" in log.read_text()
        done_before = len(ids)
        print(f"kill {attempt}: {done_before} of 40 done, {time.perf_counter() - t0:.1f}s")
    assert done_before < 40

    # other settings: refuse to mix, one line, exit 2, parts untouched
    n_parts = len(list(parts.glob("part-*.parquet")))
    other = [a if a != str(MAXLEN) else "200" for a in args]
    refused = invoke(*other)
    assert refused.exit_code == 2, refused.output[-2000:]
    assert_one_line_error(refused.stderr, str(parts), "--overwrite")
    assert len(list(parts.glob("part-*.parquet"))) == n_parts
    snapshot = tmp_path / "parts_snapshot"
    shutil.copytree(parts, snapshot)

    # same settings: finish the job
    final = invoke(*args)
    assert final.exit_code == 0, final.output[-3000:]
    assert f"cache: {done_before} of 40 examples already in" in final.stdout
    assert not parts.exists()
    resumed = pl.read_parquet(out).sort("example_id")
    assert resumed.height == 40 and resumed["example_id"].n_unique() == 40
    assert resumed.select("example_id", *VALUE_COLS).equals(base.select("example_id", *VALUE_COLS)), \
        f"max diff {max_abs_diff(resumed, base)}"

    # --overwrite discards the unfinished parts made with other settings and starts again
    shutil.copytree(snapshot, parts)
    res = invoke(*other, "--overwrite")
    assert res.exit_code == 0, res.output[-3000:]
    assert refcache.read_meta(out)["tokenization"]["max_length"] == 200
    assert "cache: 0 of 40 examples already in" in res.stdout
    assert not parts.exists()


def test_finished_parts_are_merged_without_recomputing(tiny_llama, files, tmp_path, monkeypatch):
    """A crash after the last part but before the merge: the rerun only merges."""
    out = tmp_path / "ref.parquet"
    parts = out.with_name(out.name + ".parts")
    full = run_inproc(tiny_llama, [files["eval"]], tmp_path / "full.parquet", batches_per_part=1,
                      max_tokens_per_batch=1)

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the merge")

    monkeypatch.setattr(refcache, "merge_parts", killed)  # every part written, no merged file yet
    with pytest.raises(RuntimeError, match="killed before the merge"):
        run_inproc(tiny_llama, [files["eval"]], out, batches_per_part=1, max_tokens_per_batch=1)
    monkeypatch.undo()
    assert parts.is_dir() and len(list(parts.glob("part-*.parquet"))) == 5 and not out.exists()
    calls = []
    monkeypatch.setattr(units.PairUnits, "forward", staticmethod(lambda *a, **k: calls.append(1)))
    again = run_inproc(tiny_llama, [files["eval"]], out, batches_per_part=1, max_tokens_per_batch=1)
    assert calls == [] and again.equals(full)


# --------------------------------------------------------------------------------------------- 4. errors
def test_missing_model_folder_is_one_line(files, tmp_path):
    missing = tmp_path / "no" / "such-model"
    res = invoke("precompute-ref", "--model", str(missing), "--data", str(files["eval"]),
                 "--out", str(tmp_path / "r.parquet"))
    assert res.exit_code == 2, f"{res.exception!r}"
    assert_one_line_error(res.stderr, str(missing))


def test_model_folder_without_weights_is_one_line(files, tmp_path, tiny_llama):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    for w in bare.glob("*.safetensors"):
        w.unlink()
    res = invoke("precompute-ref", "--model", str(bare), "--data", str(files["eval"]),
                 "--out", str(tmp_path / "r.parquet"))
    assert res.exit_code == 2, res.output[-3000:]
    assert_one_line_error(res.stderr, "safetensors")


def test_bad_data_file_is_one_line(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT_ROWS[0]) + "\n{not json\n")
    res = run_cli("precompute-ref", "--model", str(tiny_llama), "--data", str(bad),
                  "--out", str(tmp_path / "r.parquet"))
    assert res.returncode == 2
    line = assert_one_line_error(res.stderr, "/".join(bad.parts[-2:]))  # long absolute paths keep their tail
    assert "row 2" in line or "line 2" in line, line
    assert not (tmp_path / "r.parquet").exists()


def test_missing_data_file_is_one_line(tiny_llama, tmp_path):
    res = invoke("precompute-ref", "--model", str(tiny_llama), "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "r.parquet"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "nope.jsonl")


@pytest.mark.parametrize("share", [True, False], ids=["share", "no-share"])
def test_non_finite_logps_is_an_error_naming_the_example(share, tiny_llama, files, tmp_path, monkeypatch):
    examples, _ = load_examples([files["eval"]])
    victim = examples[2].example_id
    name = "shared_prompt_logps" if share else "sequence_logps"
    real = getattr(logprobs, name)  # the path precompute's pair_logps takes

    def poisoned(model, batch, *a, **k):
        out = real(model, batch, *a, **k)
        ids = [e.example_id for e in (batch.encoded if hasattr(batch, "encoded") else batch)]
        if victim in ids:
            out.rejected_logps[ids.index(victim)] = float("nan")
        return out

    monkeypatch.setattr(logprobs, name, poisoned)
    out = tmp_path / "r.parquet"
    with pytest.raises(UserError) as err:
        run_inproc(tiny_llama, [files["eval"]], out, share_prompt=share, batches_per_part=1, max_tokens_per_batch=1,
                   attention="dense")  # the dense path's functions are poisoned; segments: the same check
    msg = str(err.value)
    assert victim in msg and "non-finite" in msg and "\n" not in msg
    assert not out.exists()
    assert victim not in part_ids(out.with_name(out.name + ".parts"))


def test_unknown_yaml_key_is_one_line(tiny_llama, files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_llama), "data": [str(files["eval"])], "max_lenght": 64}))
    res = invoke("precompute-ref", "--config", str(cfg), "--out", str(tmp_path / "r.parquet"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "max_lenght", str(cfg))


def test_config_file_then_flags_override(tiny_llama, files, tmp_path):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "r.parquet"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_llama), "data": [str(files["eval"])], "out": str(tmp_path / "never.parquet"),
        "max_length": 64, "max-prompt-length": 48, "max_tokens_per_batch": 999, "share_prompt": False,
    }))
    res = invoke("precompute-ref", "--config", str(cfg), "--out", str(out), "--max-length", "96", "--share-prompt")
    assert res.exit_code == 0, res.output[-3000:]
    assert out.exists() and not (tmp_path / "never.parquet").exists()
    saved = yaml.safe_load((tmp_path / "r.parquet.config.yaml").read_text())
    assert saved["max_length"] == 96 and saved["share_prompt"] is True  # flags win
    assert saved["max_prompt_length"] == 48 and saved["max_tokens_per_batch"] == 999  # YAML where no flag
    tok = refcache.read_meta(out)["tokenization"]
    assert (tok["max_length"], tok["max_prompt_length"]) == (96, 48)


def test_ill_typed_yaml_value_is_one_line(tiny_llama, files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_llama), "data": [str(files["eval"])], "max_length": "long"}))
    res = invoke("precompute-ref", "--config", str(cfg))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "max_length")


# ------------------------------------------------------------------------------------ 5. cache info/verify
def test_cache_info_prints_rows_and_means(e2e):
    out = e2e["out"]
    res = invoke("cache", "info", str(out))
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(out)
    assert "rows: 30" in res.stdout
    assert f"mean {df['ref_chosen_logps'].mean():.4f}" in res.stdout
    assert f"mean {df['ref_rejected_logps'].mean():.4f}" in res.stdout
    assert f"total {df['chosen_tokens'].sum()}" in res.stdout
    full = json.loads(invoke("cache", "info", str(out), "--json").stdout)  # the whole metadata behind --json
    assert full["rows"] == 30 and "ids_digest" in full["metadata"]["data"] and "world_size" in full["metadata"]


def test_cache_info_on_a_non_cache_is_one_line(tmp_path):
    junk = tmp_path / "x.parquet"
    junk.write_bytes(b"not parquet")
    res = invoke("cache", "info", str(junk))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "/".join(junk.parts[-2:]), "not a cache")
    res = invoke("cache", "info", str(tmp_path / "missing.parquet"))
    assert res.exit_code == 2
    assert_one_line_error(res.stderr, "missing.parquet")


def test_cache_verify_passes_on_the_right_data(e2e, files, tiny_llama):
    out = e2e["out"]
    for extra in ([], ["--model", str(tiny_llama)]):
        res = invoke("cache", "verify", str(out), "--data", str(files["train"]), "--data", str(files["eval"]), *extra)
        assert res.exit_code == 0, res.output
        assert "MISMATCH" not in res.output and res.stdout.startswith("ok:")
    res = invoke("cache", "verify", str(out), "--data", str(files["eval"]))  # a subset (the eval split) is covered
    assert res.exit_code == 0, res.output


def test_cache_verify_lists_missing_rows(e2e, files):
    res = invoke("cache", "verify", str(e2e["out"]), "--data", str(files["extra"]))
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stdout.splitlines() if line.startswith("MISMATCH")]
    assert len(lines) == 1 and "3 of 28 examples are not in the cache" in lines[0], res.stdout


def test_cache_verify_lists_a_different_max_length(e2e, files, tiny_llama):
    res = invoke("cache", "verify", str(e2e["out"]), "--data", str(files["train"]), "--model", str(tiny_llama),
                 "--max-length", "200")
    assert res.exit_code == 1, res.output
    mism = [line for line in res.stdout.splitlines() if line.startswith("MISMATCH")]
    assert any("max_length" in m and "256" in m and "200" in m for m in mism), res.stdout
    assert any("tokenize to other lengths" in m for m in mism), res.stdout


def test_cache_verify_lists_other_weights(e2e, files, tiny_qwen2):
    res = invoke("cache", "verify", str(e2e["out"]), "--data", str(files["eval"]), "--model", str(tiny_qwen2))
    assert res.exit_code == 1, res.output
    assert any("model weights" in line for line in res.stdout.splitlines() if line.startswith("MISMATCH")), res.stdout


def test_cache_verify_accepts_a_full_hash_cache(files, tmp_path, tiny_llama):
    """A cache made with --full-hash must verify against the very same model folder."""
    out = tmp_path / "full.parquet"
    run_inproc(tiny_llama, [files["eval"]], out, full_hash=True)
    assert refcache.read_meta(out)["model"]["weights"]["full_hash"] is True
    res = invoke("cache", "verify", str(out), "--data", str(files["eval"]), "--model", str(tiny_llama))
    assert res.exit_code == 0, res.output


def test_cache_verify_flags_non_finite_entries(e2e, files, tmp_path):
    import pyarrow as pa

    bad = tmp_path / "bad.parquet"
    orig = pq.read_table(e2e["out"])
    col = orig.column("ref_chosen_logps").to_pylist()
    col[3] = float("inf")
    table = orig.set_column(1, "ref_chosen_logps", pa.array(col, pa.float64()))
    table = table.replace_schema_metadata(orig.schema.metadata)
    pq.write_table(table, bad)
    res = invoke("cache", "verify", str(bad), "--data", str(files["train"]), "--data", str(files["eval"]))
    assert res.exit_code == 2, res.output  # a value stage one never writes: the file is refused, in one line
    assert_one_line_error(res.stderr, "ref_chosen_logps is inf (non-finite)")


# ----------------------------------------------------------------------------------------------- slow: real
@pytest.mark.slow
def test_smollm2_slice_share_prompt_matches_plain(smollm2_slice, files, tmp_path, monkeypatch):
    """Prompt sharing on the real SmolLM2 embeddings/tokenizer (2-layer slice): each token's log-prob within
    token_tol and each sum within sum_tol(tokens) of the plain path, both from the logit scale Z of this model on
    these rows (tests/bounds.py: rounding only, any CPU kernel). The same bounds fail, on the same rows, for a
    dropped/added token and for a mask that lets the rejected reply see the chosen one."""
    data = [files["train"], files["eval"]]
    kw = {"max_tokens_per_batch": 4096, "store_token_logps": True, "attention": "dense"}  # the [T, T] mask path
    shared = run_inproc(smollm2_slice, data, tmp_path / "s.parquet", **kw)
    plain = run_inproc(smollm2_slice, data, tmp_path / "p.parquet", share_prompt=False, **kw)
    assert shared.height == plain.height == 30
    assert shared.select(VALUE_COLS[2:]).equals(plain.select(VALUE_COLS[2:]))
    z = logit_scale_of_files(smollm2_slice, data, MAXLEN, MAXPROMPT)  # ~81 here
    for side in ("chosen", "rejected"):
        col, tol = f"ref_{side}_logps", sum_tol(plain[f"{side}_tokens"], z)
        assert ((shared[col] - plain[col]).abs() <= tol).all(), float((shared[col] - plain[col]).abs().max())
        tok = (shared[f"ref_{side}_token_logps"].explode() - plain[f"ref_{side}_token_logps"].explode()).abs()
        assert tok.max() <= token_tol(z), tok.max()
        # off by one token: a sum with its last token dropped (or the next one added) moves by that token's own
        # |log-prob|; near-certain tokens hide inside the bound, but on these rows most examples are caught
        last = plain[f"ref_{side}_token_logps"].list.last().abs()
        assert (last > tol).sum() >= plain.height // 2, (last / tol).to_list()
    # wrong mask: the rejected reply attends to the chosen one -> far outside the bound
    monkeypatch.setattr("stages.model.logprobs._triple_mask", leaky_triple_mask)
    leaky = run_inproc(smollm2_slice, data, tmp_path / "l.parquet", **kw)
    gap = (leaky["ref_rejected_logps"] - plain["ref_rejected_logps"]).abs()
    assert (gap > sum_tol(plain["rejected_tokens"], z)).all()
