"""Our reference log-probs against TRL 1.16's DPOTrainer, and TRL training from our exported cache.

Pinned here:
- Convention check (issue 2): on plain-text HH rows, `dpo precompute-ref` (prompt shared or not, i.e. both
  `shared_prompt_logps` and `sequence_logps`) gives TRL's own precomputed ref_chosen_logps / ref_rejected_logps,
  untruncated and truncated (cache --max-prompt-length = --max-length = TRL max_length), and both tokenize every
  HH row to the same ids.
- Where TRL 1.16 tokenizes differently (so the numbers differ), each case pinned with token ids:
  1. (now the same) tokenizers that add a BOS: TRL's prompt starts with BOS, and so does ours;
  2. a token that merges across the prompt/completion boundary (prompt ending in a space or mid-word): TRL tokenizes
     prompt + completion as ONE string and starts the completion where the ids diverge, so the merged token is
     scored as completion and the prompt loses its last token; we tokenize the two texts apart;
  3. (now the same) a completion text already ending with the EOS string: neither side adds a second EOS;
  4. conversational rows: TRL's completion is everything the full render adds after the generation prompt, so it
     includes what the template writes after the end-of-turn token (ChatML: "\\n"); ours stops at the end-of-turn
     token. Our `sequence_logps` on TRL's ids gives TRL's numbers: the gap is that one token, not arithmetic.
  5. truncation: TRL 1.16 has no max_prompt_length (keeps the start of prompt + completion); ours cuts long prompts
     from the left. Same numbers when the cache's --max-prompt-length equals --max-length (tested).
- Interop: TRL 1.16 with precompute_ref_log_probs=True ALWAYS runs its reference pass (even when the columns are
  there) and then fails on the duplicated columns; `stages.tools.export_trl.dpo_trainer_class()` keeps the exported
  columns: no reference forward runs (counted on the backbone and on compute_ref_log_probs), two steps train, and
  at step 1 rewards are 0 and the loss is ln 2 (a control with shifted values moves the rewards by -β·shift).
- `dpo cache export-trl`: formats (text strings, conversational message lists, parquet/jsonl) and its errors.

Tolerance (tests/bounds.py): the two sides are fp32 sums from different code paths (batching, padding, kernels),
so each value is within sum_tol(its completion's tokens, Z) of TRL's, plus one float32 spacing of the value because
TRL stores its columns as float32 (6e-5 at |x| in [512, 1024): the random tiny model has ~6 nats per token).
Z is the model's logit scale on TRL's own token ids of the rows compared.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from datasets import Dataset, load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from bench.vs_trl import chat_source_rows, explicit_rows, trl_tokenize, write_jsonl  # noqa: E402
from stages.cache import refcache  # noqa: E402
from stages.cli import main as cli_main  # noqa: E402
from stages.data.encode import Encoded, TokenizeSettings, encode_examples, tokenize_example  # noqa: E402
from stages.data.rows import load_examples  # noqa: E402
from stages.model.logprobs import collate_pairs, sequence_logps  # noqa: E402
from stages.stage1 import precompute  # noqa: E402
from stages.stage1.precompute import PrecomputeConfig  # noqa: E402
from stages.tools.export_trl import dpo_trainer_class  # noqa: E402
from tests.bounds import EPS32, logit_scale, logit_scale_of_files, loss_tol, pair_sequences, sum_tol  # noqa: E402

BETA = 0.1


# ---------------------------------------------------------------------------------------------------- helpers
def hh_raw(hh_path: Path, n: int) -> list[dict]:
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def text_rows(hh_path: Path, tmp: Path, n: int) -> tuple[Path, list[dict]]:
    """The first n HH rows as explicit prompt/chosen/rejected text (our loader splits the implicit prompt)."""
    src = write_jsonl(tmp / "hh_src.jsonl", hh_raw(hh_path, n), keys=("chosen", "rejected"))
    examples, _ = load_examples([src])
    rows = explicit_rows(examples)
    return write_jsonl(tmp / "text.jsonl", rows), rows


def chat_rows(hh_path: Path, tmp: Path, n: int) -> tuple[Path, list[dict]]:
    """The first n cleanly alternating HH transcripts as user/assistant messages, explicit prompt."""
    src, _ = chat_source_rows(hh_raw(hh_path, n))
    examples, _ = load_examples([write_jsonl(tmp / "chat_src.jsonl", src, keys=("chosen", "rejected"))])
    rows = explicit_rows(examples)
    return write_jsonl(tmp / "chat.jsonl", rows), rows


def trl_args(tmp: Path, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp / "trl_out"), report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
                save_strategy="no", logging_steps=1, seed=0, beta=BETA, gradient_checkpointing=False)
    return DPOConfig(**{**base, **kw})


def load(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def trl_precompute(model_dir: Path, rows: list[dict], tmp: Path, max_length: int | None) -> dict[str, tuple]:
    """TRL's own reference pass (no ref model: the untouched policy is the reference), read from its columns."""
    model, tok = load(model_dir)
    trainer = DPOTrainer(model=model, args=trl_args(tmp, precompute_ref_log_probs=True, precompute_ref_batch_size=4,
                                                    max_length=max_length),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    ds = trainer.train_dataset
    return {r["example_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"], r) for r in ds}


def ours(model_dir: Path, data: Path, out: Path, max_length: int | None, share: bool = True) -> dict[str, tuple]:
    precompute.run(PrecomputeConfig.flat(model=str(model_dir), data=(str(data),), output=str(out),
                                         max_length=max_length, max_prompt_length=max_length, share_prompt=share,
                                         max_tokens_per_batch=2048))
    df, _ = refcache.read_cache(out)
    return {r["example_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in df.iter_rows(named=True)}


def assert_close_to_trl(mine: float, theirs: float, what: str, n_tokens: int, z: float) -> None:
    """Sums of n_tokens fp32 log-probs by two code paths: sum_tol (tests/bounds.py) + TRL's float32 storage."""
    tol = sum_tol(n_tokens, z) + float(np.spacing(np.float32(abs(theirs))))
    assert abs(mine - theirs) <= tol, f"{what}: ours {mine:.6f}, TRL {theirs:.6f}, diff {abs(mine - theirs):.1e}"


def trl_scale(model_dir: Path, theirs: dict) -> float:
    """Logit scale Z (tests/bounds.py) of the model on TRL's token ids of these rows (any cut is a prefix of them)."""
    model, _ = load(model_dir)
    return logit_scale(model.eval(), [list(r["prompt_ids"]) + list(r[k]) for *_, r in theirs.values()
                                      for k in ("chosen_ids", "rejected_ids")])


def compare(mine: dict, theirs: dict, z: float) -> float:
    """Every value within its bound; TRL's uncut completion length bounds the tokens summed on either side."""
    assert set(mine) == set(theirs)  # the same rows survive truncation on both sides
    worst = 0.0
    for i, (c, r) in mine.items():
        assert_close_to_trl(c, theirs[i][0], f"{i} chosen", len(theirs[i][2]["chosen_ids"]), z)
        assert_close_to_trl(r, theirs[i][1], f"{i} rejected", len(theirs[i][2]["rejected_ids"]), z)
        worst = max(worst, abs(c - theirs[i][0]), abs(r - theirs[i][1]))
    return worst


@pytest.fixture(scope="module")
def text_data(hh_path: Path, tmp_path_factory) -> tuple[Path, list[dict]]:
    return text_rows(hh_path, tmp_path_factory.mktemp("trl_text"), 12)


# ----------------------------------------------------------------------------------- tokenization (tokenizer only)
def encoded_by_id(tok, path: Path, max_length=None) -> dict[str, Encoded]:
    examples, _ = load_examples([path])
    encoded, _ = encode_examples(tok, examples, TokenizeSettings(max_length, max_length))
    return {e.example_id: e for e in encoded}


def trl_ids(row: dict) -> tuple:
    return tuple(row["prompt_ids"]), tuple(row["chosen_ids"]), tuple(row["rejected_ids"])


def test_text_tokenization_matches_trl_on_hh(tiny_llama: Path, hh_path: Path, tmp_path: Path):
    path, rows = text_rows(hh_path, tmp_path, 300)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    mine = encoded_by_id(tok, path)
    theirs = trl_tokenize(tok, rows, None, str(tmp_path / "trl_out"))
    assert len(theirs) == len(mine) > 250
    differ = [r["example_id"] for r in theirs
              if trl_ids(r) != (mine[r["example_id"]].prompt_ids, mine[r["example_id"]].chosen_ids,
                                mine[r["example_id"]].rejected_ids)]
    assert differ == []


def one_trl(tok, prompt, chosen, rejected, tmp: Path) -> tuple:
    return trl_ids(trl_tokenize(tok, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}], None, str(tmp))[0])


def one_ours(tok, prompt, chosen, rejected) -> tuple:
    from stages.data.rows import Example

    chat = not isinstance(prompt, str)
    to = (lambda v: tuple(v)) if chat else (lambda v: v)  # noqa: E731
    ex = Example("x" * 32, to(prompt), to(chosen), to(rejected), chat, "t", 1)
    return tuple(tuple(x) for x in tokenize_example(tok, ex))


def test_where_trl_tokenizes_differently(tiny_llama: Path, tmp_path: Path):
    """Cases 1-4 of the module docstring: 1 and 3 now agree, 2 and 4 with the exact id difference."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    eos = tok.eos_token_id
    # 1. a BOS-adding tokenizer: TRL's prompt gains the BOS, completions are the same ids (after another context)
    bos_tok = AutoTokenizer.from_pretrained(tiny_llama)
    bos_tok.bos_token = "<|im_start|>"
    bos_tok.add_bos_token = True
    args = ("Human: hi\n\nAssistant:", " Hello there", " No")
    p, c, r = one_trl(bos_tok, *args, tmp_path)
    mp, mc, mr = one_ours(bos_tok, *args)
    assert p == mp and p[0] == bos_tok.bos_token_id and (c, r) == (mc, mr)
    # 2. a merge across the boundary ("bro" + "wn" -> "brown"): TRL moves the prompt's last token into the completion
    args = ("The quick bro", "wn fox", "wn dog")
    p, c, _ = one_trl(tok, *args, tmp_path)
    mp, mc, _ = one_ours(tok, *args)
    assert len(p) < len(mp) and p == mp[: len(p)] and c != mc and c[-1] == eos == mc[-1]
    # 3. the EOS string already at the end of the completion: one EOS on both sides
    args = ("Human: hi\n\nAssistant:", " Hello there" + tok.eos_token, " No" + tok.eos_token)
    _, c, _ = one_trl(tok, *args, tmp_path)
    _, mc, _ = one_ours(tok, *args)
    assert mc == c and c[-1] == eos and c[-2] != eos
    # 4. conversational: TRL's completion also holds the template's "\n" after the end-of-turn token
    user, reply, other = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "Hello there"}], \
        [{"role": "assistant", "content": "No"}]
    p, c, r = one_trl(tok, user, reply, other, tmp_path)
    mp, mc, mr = one_ours(tok, user, reply, other)
    newline = tuple(tok("\n", add_special_tokens=False)["input_ids"])
    assert p == mp and c == mc + newline and r == mr + newline and mc[-1] == eos


# ----------------------------------------------------------------------------------------- the convention check
@pytest.mark.parametrize("max_length", [None, 160], ids=["untruncated", "truncated"])
def test_ref_logps_equal_trl_precompute(tiny_llama: Path, text_data, tmp_path: Path, max_length):
    """`dpo precompute-ref` with and without prompt sharing (shared_prompt_logps / sequence_logps) = TRL's column."""
    path, rows = text_data
    theirs = trl_precompute(tiny_llama, rows, tmp_path, max_length)
    if max_length is not None:  # some completions (and prompts) really are cut here
        cut = [r for *_, r in theirs.values() if len(r["prompt_ids"]) + len(r["chosen_ids"]) > max_length]
        assert len(theirs) >= 6 and cut
    for share in (True, False):
        mine = ours(tiny_llama, path, tmp_path / f"ref-{share}.parquet", max_length, share)
        compare(mine, theirs, trl_scale(tiny_llama, theirs))


def test_conversational_gap_is_the_template_newline(tiny_llama: Path, hh_path: Path, tmp_path: Path):
    """On chat rows TRL's value = ours + log p(template "\\n" after <|im_end|>); our sequence_logps on TRL's token
    ids gives TRL's numbers, so the gap is that one convention token, not arithmetic."""
    path, rows = chat_rows(hh_path, tmp_path, 8)
    theirs = trl_precompute(tiny_llama, rows, tmp_path, None)
    mine = ours(tiny_llama, path, tmp_path / "chat.parquet", None)
    assert set(mine) == set(theirs)
    gaps = [abs(mine[i][0] - theirs[i][0]) for i in mine]
    assert min(gaps) > 1e-2  # a whole token's log-prob under a random model: clearly not rounding
    model, _ = load(tiny_llama)
    pad = AutoTokenizer.from_pretrained(tiny_llama).pad_token_id
    trl_encoded = [Encoded(i, *trl_ids(r)) for i, (*_, r) in theirs.items()]
    with torch.no_grad():
        out = sequence_logps(model.eval(), collate_pairs(trl_encoded, pad))
    z = logit_scale(model, pair_sequences(trl_encoded))  # tests/bounds.py
    for k, e in enumerate(trl_encoded):
        assert_close_to_trl(float(out.chosen_logps[k]), theirs[e.example_id][0], "chosen on TRL's ids",
                            len(e.chosen_ids), z)
        assert_close_to_trl(float(out.rejected_logps[k]), theirs[e.example_id][1], "rejected on TRL's ids",
                            len(e.rejected_ids), z)


@pytest.mark.parametrize("truncated", [False, True], ids=["untruncated", "truncated"])
def test_export_trl_chat_convention_equals_trl_precompute(tiny_llama: Path, hh_path: Path, tmp_path: Path,
                                                          truncated):
    """Issue 14, item 6: `export-trl --trl-chat-convention` adds the reference log-prob of what the template writes
    after the end-of-turn token, so exported conversational values equal TRL's own precompute (also where TRL's
    max_length cut falls on or before that token); text rows are unchanged; a model with other weights is refused."""
    path, rows = chat_rows(hh_path, tmp_path, 8)
    max_length = None
    if truncated:  # every prompt fits (we never cut one, nor does TRL), the longest prompt's replies are cut
        max_length = 3 + max(len(e.prompt_ids) for e in encoded_by_id(AutoTokenizer.from_pretrained(tiny_llama),
                                                                      path).values())
    theirs = trl_precompute(tiny_llama, rows, tmp_path, max_length)
    cache = tmp_path / "chat.parquet"
    # --max-prompt-length one below --max-length cuts no prompt here: TRL's convention
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(path),), output=str(cache),
                                         max_length=max_length, max_prompt_length=max_length and max_length - 1))
    df, _ = refcache.read_cache(cache)
    mine = {r["example_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in df.iter_rows(named=True)}
    assert set(mine) == set(theirs)
    out = tmp_path / "chat_trl.jsonl"
    res = export([str(cache), "--data", str(path), "--out", str(out), "--trl-chat-convention"])
    assert res.exit_code == 0, res.output
    assert "--trl-chat-convention: added" in res.output and "differ by that token" not in res.output
    got = {g["example_id"]: (g["ref_chosen_logps"], g["ref_rejected_logps"]) for g in map(json.loads, out.open())}
    compare({i: got[i] for i in theirs}, theirs, trl_scale(tiny_llama, theirs))
    assert max(abs(got[i][0] - mine[i][0]) for i in theirs) > 1e-2  # without the flag they differ by a token
    if max_length is not None:  # some replies really are cut, so no tail is scored for them
        assert any(len(r["prompt_ids"]) + len(r["chosen_ids"]) >= max_length for *_, r in theirs.values())
    # a folder with other weights is not the reference: one line, nothing written
    other = tmp_path / "other_model"
    shutil.copytree(tiny_llama, other)
    cfg_path = other / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace("{", '{"_changed": 1, ', 1))
    res = export([str(cache), "--data", str(path), "--out", str(tmp_path / "x.jsonl"), "--trl-chat-convention",
                  "--model", str(other)])
    assert res.exit_code == 2 and "not the cache's reference model" in res.output
    assert not (tmp_path / "x.jsonl").exists()


def test_export_trl_chat_convention_leaves_text_rows(tiny_llama: Path, text_data, tmp_path: Path):
    path, _ = text_data
    cache = tmp_path / "ref.parquet"
    mine = ours(tiny_llama, path, cache, None)
    out = tmp_path / "t.jsonl"
    res = export([str(cache), "--data", str(path), "--out", str(out), "--trl-chat-convention"])
    assert res.exit_code == 0 and "changes nothing on text rows" in res.output
    got = {g["example_id"]: (g["ref_chosen_logps"], g["ref_rejected_logps"]) for g in map(json.loads, out.open())}
    assert got == mine


# ------------------------------------------------------------------------------------------------------ interop
class Count:
    def __init__(self):
        self.n = 0

    def hook(self, *args):
        self.n += 1


@pytest.fixture()
def exported(tiny_llama: Path, text_data, tmp_path: Path) -> Path:
    path, _ = text_data
    cache = tmp_path / "ref.parquet"
    ours(tiny_llama, path, cache, None)
    out = tmp_path / "trl.parquet"
    res = CliRunner().invoke(cli_main, ["cache", "export-trl", str(cache), "--data", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 12 text rows" in res.output
    return out


def counted_trainer(cls, model_dir: Path, ds, tmp: Path, monkeypatch, **kw):
    """A trainer plus counters: backbone forwards (any model call) and TRL reference passes."""
    ref_calls, forwards = Count(), Count()
    original = DPOTrainer.compute_ref_log_probs

    def counting(self, *a, **k):
        ref_calls.n += 1
        return original(self, *a, **k)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counting)
    model, tok = load(model_dir)
    model.model.register_forward_hook(forwards.hook)
    args = trl_args(tmp, **{**dict(precompute_ref_log_probs=True, max_length=None, per_device_train_batch_size=2,
                                   max_steps=2, learning_rate=1e-3), **kw})
    return (lambda: cls(model=model, args=args, train_dataset=ds, processing_class=tok)), ref_calls, forwards


def exported_tols(model_dir: Path, exported: Path, data: Path) -> dict:
    """Bounds on TRL's first logged rewards/loss when the policy is the reference (tests/bounds.py): TRL's fp32
    policy sums vs our cached ones, each within sum_tol(longest reply, Z) plus one float32 spacing (TRL holds the
    reference column as float32), times beta; the loss moves by <= that over both replies, plus its own float32
    rounding (8 ulps of a value < 1)."""
    df = pl.read_parquet(exported.parent / "ref.parquet")
    z = logit_scale_of_files(model_dir, [data])
    nc, nr = int(df["chosen_tokens"].max()), int(df["rejected_tokens"].max())
    spacing = max(float(np.spacing(np.float32(abs(v)))) for c in ("ref_chosen_logps", "ref_rejected_logps")
                  for v in df[c].to_list())
    return {"chosen": BETA * (sum_tol(nc, z) + spacing), "rejected": BETA * (sum_tol(nr, z) + spacing),
            "loss": loss_tol(nc + nr, z, BETA) + 2 * BETA * spacing + 8 * EPS32}


def test_plain_trl_recomputes_and_fails_on_existing_columns(tiny_llama: Path, exported: Path, tmp_path, monkeypatch):
    """Why `dpo_trainer_class` exists: TRL 1.16 runs its reference pass although the columns are there, then fails."""
    ds = Dataset.from_parquet(str(exported), cache_dir=str(tmp_path / "hf"))
    build, ref_calls, forwards = counted_trainer(DPOTrainer, tiny_llama, ds, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="duplicated"):
        build()
    assert ref_calls.n > 0 and forwards.n > 0


def test_trl_trains_from_exported_columns_without_reference_pass(tiny_llama: Path, exported: Path, tmp_path,
                                                                  monkeypatch, text_data):
    ds = load_dataset("parquet", data_files=str(exported), cache_dir=str(tmp_path / "hf"))["train"]
    assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(ds.column_names)
    build, ref_calls, forwards = counted_trainer(dpo_trainer_class(), tiny_llama, ds, tmp_path, monkeypatch)
    trainer = build()
    assert (ref_calls.n, forwards.n) == (0, 0) and trainer.ref_model is None  # nothing ran, no reference model held
    trainer.train()
    assert ref_calls.n == 0 and forwards.n == 2  # one policy forward (chosen + rejected) per step, no reference forward
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    first = logs[0]  # before any update the policy IS the reference: our values make every reward 0
    tol = exported_tols(tiny_llama, exported, text_data[0])  # up to rounding of two code paths (tests/bounds.py)
    assert abs(first["rewards/chosen"]) <= tol["chosen"] and abs(first["rewards/rejected"]) <= tol["rejected"]
    assert abs(first["loss"] - math.log(2)) <= tol["loss"]


def test_trl_reads_the_exported_values(tiny_llama: Path, exported: Path, tmp_path, monkeypatch, text_data):
    """Control: the same run with ref_chosen_logps shifted by +1 starts at rewards/chosen = -β (the column is used)."""
    ds = Dataset.from_parquet(str(exported), cache_dir=str(tmp_path / "hf"))
    ds = ds.map(lambda r: {"ref_chosen_logps": r["ref_chosen_logps"] + 1.0})
    build, ref_calls, _ = counted_trainer(dpo_trainer_class(), tiny_llama, ds, tmp_path, monkeypatch, max_steps=1)
    trainer = build()
    trainer.train()
    first = next(h for h in trainer.state.log_history if "rewards/chosen" in h)
    assert ref_calls.n == 0
    tol = exported_tols(tiny_llama, exported, text_data[0])  # tests/bounds.py; the shift (1 nat) is far above them
    assert abs(first["rewards/chosen"] + BETA) <= tol["chosen"] and abs(first["rewards/rejected"]) <= tol["rejected"]


# ------------------------------------------------------------------------------------------ export-trl: formats
def export(args: list[str]):
    return CliRunner().invoke(cli_main, ["cache", "export-trl", *args])


def test_export_trl_chat_rows_as_messages(tiny_llama: Path, hh_path: Path, tmp_path: Path):
    path, rows = chat_rows(hh_path, tmp_path, 6)
    cache = tmp_path / "chat.parquet"
    mine = ours(tiny_llama, path, cache, None)
    out = tmp_path / "chat_trl.jsonl"
    res = export([str(cache), "--data", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "conversational rows" in res.output and "end-of-turn" in res.output  # the convention note
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["example_id"] for g in got] == [r["example_id"] for r in rows]
    for g, r in zip(got, rows):
        assert (g["prompt"], g["chosen"], g["rejected"]) == (r["prompt"], r["chosen"], r["rejected"])
        assert (g["ref_chosen_logps"], g["ref_rejected_logps"]) == mine[g["example_id"]]
        assert trl.data_utils.is_conversational(g)


def test_export_trl_errors(tiny_llama: Path, text_data, hh_path: Path, tmp_path: Path):
    path, rows = text_data
    cache = tmp_path / "ref.parquet"
    ours(tiny_llama, write_jsonl(tmp_path / "first8.jsonl", rows[:8]), cache, None)
    # a row the cache does not cover: one line, exit 2, nothing written
    res = export([str(cache), "--data", str(path), "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2 and "4 of 12 rows are not in the cache" in res.output and "row 9" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x.parquet").exists()
    # unknown output format
    res = export([str(cache), "--data", str(path), "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "*.parquet, *.jsonl" in res.output
    # text and conversational rows in one export
    chat_path, _ = chat_rows(hh_path, tmp_path, 3)
    both = tmp_path / "both.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(path), str(chat_path)), output=str(both),
                                         max_length=None, max_prompt_length=None))
    res = export([str(both), "--data", str(path), "--data", str(chat_path), "--out", str(tmp_path / "y.parquet")])
    assert res.exit_code == 2 and "mix text rows" in res.output
    # the cache covering more than the data is fine (counted)
    res = export([str(both), "--data", str(path), "--out", str(tmp_path / "z.parquet")])
    assert res.exit_code == 0 and "cached examples are not in these data" in res.output


# ----------------------------------------------------------------------------------------- slow: real SmolLM2
@pytest.mark.slow
def test_smollm2_slice_ref_logps_equal_trl(smollm2_slice: Path, hh_path: Path, tmp_path: Path):
    path, rows = text_rows(hh_path, tmp_path, 8)
    theirs = trl_precompute(smollm2_slice, rows, tmp_path, 1024)
    z = trl_scale(smollm2_slice, theirs)  # every value within sum_tol(tokens, Z) + float32 spacing (tests/bounds.py)
    for share in (True, False):
        compare(ours(smollm2_slice, path, tmp_path / f"ref-{share}.parquet", 1024, share), theirs, z)


@pytest.mark.slow
def test_smollm2_tokenization_matches_trl_on_all_hh_rows(smollm2_dir: Path, hh_path: Path, tmp_path: Path):
    """Every HH row: same ids as TRL on text rows; on chat rows TRL's completions = ours + the template's "\\n".
    And the realistic boundary merge (case 2): a prompt ending in a space."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    path, rows = text_rows(hh_path, tmp_path, 2312)
    mine = encoded_by_id(tok, path)
    theirs = trl_tokenize(tok, rows, None, str(tmp_path / "trl_out"))
    assert len(theirs) == len(mine) == 2308
    assert all(trl_ids(r) == (mine[r["example_id"]].prompt_ids, mine[r["example_id"]].chosen_ids,
                              mine[r["example_id"]].rejected_ids) for r in theirs)
    chat_path, chat = chat_rows(hh_path, tmp_path, 400)
    mine = encoded_by_id(tok, chat_path)
    newline = tuple(tok("\n", add_special_tokens=False)["input_ids"])
    for r in trl_tokenize(tok, chat, None, str(tmp_path / "trl_out")):
        e = mine[r["example_id"]]
        assert trl_ids(r) == (e.prompt_ids, e.chosen_ids + newline, e.rejected_ids + newline)
    p, c, _ = one_trl(tok, "Human: hi\n\nAssistant: ", "Sure, here", "No", tmp_path)
    mp, mc, _ = one_ours(tok, "Human: hi\n\nAssistant: ", "Sure, here", "No")
    assert p == mp[:-1] and c[0] != mc[0]  # " Sure" is one token for TRL; " " + "Sure" for us
