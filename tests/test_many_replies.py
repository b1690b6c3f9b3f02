"""Many replies per prompt through both stages (issue 23), on the tiny random model and real HH-RLHF prompts.

Reply sets are made from HH rows: prompt i with its own chosen/rejected and the replies of row i + 1 (K = 2..4,
one set with tied scores). The same pairs written as pair rows ("expanded") are the oracle:
- stage one: the reply cache holds each (prompt, reply) once, and every expanded pair's cached values equal its two
  replies' values (sums within tests/bounds.py, token counts exactly); a new reply costs that reply only; shard jobs
  merge; a cache of the other layout is refused in one line;
- stage two: one forward per prompt gives per-pair losses and LoRA gradients equal to the expanded pair rows holding
  the same pairs and reference values (float64 model: rounding only), for several loss types, mixtures, WPO and
  LD-DPO; plackett_luce equals sigmoid on two-reply prompts; a short run logs pairs and prompts per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from stages.cli import main as cli_main
from stages.data.rows import content_id, load_examples
from stages.stage1 import precompute
from stages.stage1.precompute import PrecomputeConfig
from stages.stage2 import train
from stages.stage2.forward import policy_forward
from stages.stage2.prepare import Item, prepare
from stages.stage2.train import TrainConfig, Trainer
from tests.bounds import EPS32, ULPS, logit_scale, logit_scale_of_files, sum_tol
from tests.hhrows import expanded_pairs, hh_rows, write_jsonl

MAXLEN, MAXPROMPT = 96, 48
SCORES = ([4, 1, 3, 2], [3, 1, 2], [2, 1], [5, 5, 1, 2], [1, 4, 2, 3], [2, 3, 1, 4])


def reply_sets(hh_path: Path, root: Path, n: int = 6) -> list[dict]:
    """Generic-shape rows: HH prompt i, replies chosen_i, rejected_i, chosen_{i+1}, rejected_{i+1} (cut to K)."""
    examples, _ = load_examples([write_jsonl(root / "hh.jsonl", hh_rows(hh_path, 0, n + 1))])
    out = []
    for i, scores in enumerate(SCORES[:n]):
        a, b = examples[i], examples[i + 1]
        replies = [a.chosen, a.rejected, b.chosen, b.rejected][:len(scores)]
        out.append({"prompt": a.prompt, "completions": replies, "scores": scores})
    return out


expanded = expanded_pairs  # tests/hhrows.py


def run_stage_one(model: Path, data: Path, out: Path, **kw) -> pl.DataFrame:
    kw = {"max_length": MAXLEN, "max_prompt_length": MAXPROMPT, "attention": "dense", **kw}  # dense: the reference
    precompute.run(PrecomputeConfig.flat(model=str(model), data=(str(data),), output=str(out), **kw))
    return pl.read_parquet(out)


@pytest.fixture(scope="module")
def made(hh_path, tiny_llama, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("replies")
    sets = reply_sets(hh_path, root)
    files = {"sets": write_jsonl(root / "sets.jsonl", sets), "pairs": write_jsonl(root / "pairs.jsonl", expanded(sets))}
    files["reply_cache"] = root / "replies.parquet"
    files["pair_cache"] = root / "pairs.parquet"
    files["reply_df"] = run_stage_one(tiny_llama, files["sets"], files["reply_cache"], store_token_logps=True)
    files["pair_df"] = run_stage_one(tiny_llama, files["pairs"], files["pair_cache"], store_token_logps=True)
    files["rows"], files["root"], files["model"] = sets, root, tiny_llama
    # the logit scale over every (prompt, reply) sequence (the expanded pairs hold them all)
    files["scale"] = logit_scale_of_files(tiny_llama, [files["pairs"]], MAXLEN, MAXPROMPT)
    return files


# ---------------------------------------------------------------------------------------------------- stage one
def test_stage_one_scores_each_reply_once_and_equals_the_expanded_pairs(made):
    from stages.data.replyset import reply_id

    replies = made["reply_df"]
    n_replies = sum(len(set(map(json.dumps, s["completions"]))) for s in made["rows"])
    assert replies.height == n_replies and replies["reply_id"].n_unique() == n_replies
    by_reply = {r["reply_id"]: r for r in replies.iter_rows(named=True)}
    scale = made["scale"]
    pairs = made["pair_df"]
    assert pairs.height == len(expanded(made["rows"]))
    for row in expanded(made["rows"]):
        pair = pairs.filter(pl.col("example_id") == content_id(row["prompt"], row["chosen"], row["rejected"]))
        assert pair.height == 1
        c = by_reply[reply_id(row["prompt"], row["chosen"])]
        r = by_reply[reply_id(row["prompt"], row["rejected"])]
        assert (pair["chosen_tokens"][0], pair["rejected_tokens"][0]) == (c["reply_tokens"], r["reply_tokens"])
        assert pair["prompt_tokens"][0] == c["prompt_tokens"]
        assert abs(pair["ref_chosen_logps"][0] - c["ref_logps"]) <= sum_tol(c["reply_tokens"], scale)
        assert abs(pair["ref_rejected_logps"][0] - r["ref_logps"]) <= sum_tol(r["reply_tokens"], scale)


@pytest.mark.parametrize("kw", [dict(max_tokens_per_batch=40), dict(max_row_tokens=60), dict(share_prompt=False)],
                         ids=["batch-budget", "row-budget", "plain-layout"])
def test_split_rows_and_the_plain_layout_give_the_same_values(made, tmp_path, kw):
    """A prompt whose replies exceed the budget is scored in several rows, each with its own copy of the prompt;
    the plain layout scores every (prompt, reply) as its own sequence: the same values, within the bound."""
    other = run_stage_one(made["model"], made["sets"], tmp_path / "ref.parquet", **kw).sort("reply_id")
    single = made["reply_df"].sort("reply_id")
    assert other["reply_id"].to_list() == single["reply_id"].to_list()
    assert other["reply_tokens"].to_list() == single["reply_tokens"].to_list()
    scale = made["scale"]
    diff = (other["ref_logps"] - single["ref_logps"]).abs()
    assert (diff <= sum_tol(single["reply_tokens"], scale)).all()


def test_a_new_reply_for_an_old_prompt_costs_that_reply_only(made, tmp_path):
    import shutil

    cache = tmp_path / "ref.parquet"
    shutil.copy(made["reply_cache"], cache)
    shutil.copy(made["reply_cache"].with_name("replies.parquet.config.yaml"), tmp_path / "ref.parquet.config.yaml")
    rows = [dict(s) for s in made["rows"]]
    rows[1] = {**rows[1], "completions": rows[1]["completions"] + [" A brand new reply."], "scores": [3, 1, 2, 0]}
    data = write_jsonl(tmp_path / "more.jsonl", rows)
    res = CliRunner().invoke(cli_main, ["precompute-ref", "--model", str(made["model"]), "--data", str(data),
                                        "--output", str(cache), "--max-length", str(MAXLEN), "--max-prompt-length",
                                        str(MAXPROMPT), "--store-token-logps"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    n = made["reply_df"].height
    assert f"cache: {n} of {n + 1} replies already in" in res.output and "1 to go" in res.output, res.output
    assert pl.read_parquet(cache).height == n + 1


def test_shard_jobs_merge_to_the_single_cache(made, tmp_path):
    out = tmp_path / "ref.parquet"
    for index in range(2):
        precompute.run(PrecomputeConfig.flat(model=str(made["model"]), data=(str(made["sets"]),), output=str(out),
                                             max_length=MAXLEN, max_prompt_length=MAXPROMPT, num_shards=2,
                                             shard_index=str(index)))
    shards = [str(tmp_path / f"ref.shard-{i}-of-2.parquet") for i in range(2)]
    res = CliRunner().invoke(cli_main, ["cache", "merge", *shards, "--output", str(tmp_path / "merged.parquet")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(cli_main, ["cache", "info", str(tmp_path / "merged.parquet")], catch_exceptions=False)
    assert "merged from 2 shards (replies per shard: " in info.output, info.output
    merged = pl.read_parquet(tmp_path / "merged.parquet").sort("reply_id")
    single = made["reply_df"].sort("reply_id")
    assert merged["reply_id"].to_list() == single["reply_id"].to_list()
    assert merged["reply_tokens"].to_list() == single["reply_tokens"].to_list()
    assert float((merged["ref_logps"] - single["ref_logps"]).abs().max()) < 1e-3


def test_a_cache_of_the_other_layout_is_refused_in_one_line(made, tmp_path):
    for data, cache in (("sets", "pair_cache"), ("pairs", "reply_cache")):
        res = CliRunner().invoke(cli_main, ["train", "--model", str(made["model"]), "--data", str(made[data]),
                                            "--ref-cache", str(made[cache]), "--output", str(tmp_path / data)])
        assert res.exit_code == 2, res.output
        lines = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "rerun `dpo precompute-ref` over this data" in lines[0], res.output


# ---------------------------------------------------------------------------------------------------- stage two
def _cfg(made, data: str, cache: str, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(made["model"]), data=(str(made[data]),), ref_cache=str(made[cache]), output=str(out),
                max_steps=2, batch_size=2, lora_r=4, lora_alpha=8, learning_rate=1e-3, load_in_4bit=False,
                gradient_checkpointing=False, attention="dense")  # the dense mask: the reference layout
    return TrainConfig.flat(**{**base, **kw})


def _policy64(made):
    from stages.model.models import LoraSettings, ModelSpec, load_policy

    model = load_policy(ModelSpec(str(made["model"]), "fp32", False, None, False), LoraSettings(4, 8, 0.0,
                        ("all-linear",)), torch.device("cpu"), False)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a LoRA away from zero, so the gradients reach every weight
            torch.nn.init.normal_(p, std=0.02)
    return model.double().eval()


def _grads(model, result) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    result.objective.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


# The model runs in float64 but the head computes its logits in float32 (logprobs._chunk_logps: as in training), so
# the two layouts' gradients differ by fp32 rounding in the head: relative ~ ULPS * EPS32 per token, summed.
GRAD_RTOL = ULPS * EPS32  # measured: 0.6-0.7 EPS32
SLOPE = 10  # |d loss / d log-prob| of every loss below at beta 0.1 (ipo: 2|h - 1/(2 beta)| / n <= 10)

LOSSES = [dict(), dict(loss="ipo"), dict(loss="aot"), dict(loss="sigmoid*0.8+bco_pair*0.2+sft"),
          dict(use_weighting=True), dict(ld_alpha=0.5), dict(sft_weight=0.5)]


@pytest.mark.parametrize("kw", LOSSES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "sigmoid")
def test_one_forward_per_prompt_equals_the_expanded_pairs(made, tmp_path, kw):
    """Loss per pair and LoRA gradients of one micro-batch of reply sets equal those of the pair rows of the same
    pairs with the same reference values. Float64 model: the two layouts differ only by rounding (~1e-12)."""
    cfg_sets = _cfg(made, "sets", "reply_cache", tmp_path / "a", **kw)
    sets = prepare(cfg_sets.data, cfg_sets.model, cfg_sets.cache, cfg_sets.lengths, cfg_sets.loss.ld_alpha).train
    items = [Item(_pair_encoded(s, c, r), *s.pair_ref[k]) for s in sets for k, (c, r) in enumerate(s.pairs)]
    model = _policy64(made)
    loss = Trainer.build(model, cfg_sets, 1).loss
    pad = 2
    one = policy_forward(model, sets, pad, cfg_sets, loss)
    g_one = _grads(model, one)
    two = policy_forward(model, items, pad, cfg_sets, loss)
    g_two = _grads(model, two)
    assert one.losses.shape == two.losses.shape == (len(items),)
    scale = logit_scale(model.float(), [list(s.enc.prompt_ids) + list(r) for s in sets for r in s.enc.replies])
    tol = SLOPE * sum_tol(2 * MAXLEN, scale)  # every reply sum within sum_tol; each loss moves by <= SLOPE x that
    assert float((one.losses - two.losses).detach().abs().max()) <= tol
    assert abs(float((one.objective - two.objective).detach())) <= tol
    assert float((g_one - g_two).norm()) <= GRAD_RTOL * float(g_two.norm())


def _pair_encoded(s, c: int, r: int):
    from stages.data.encode import Encoded

    return Encoded("x", s.enc.prompt_ids, s.enc.replies[c], s.enc.replies[r])


def test_plackett_luce_equals_sigmoid_on_two_reply_prompts(made, tmp_path):
    pairs = prepare(*_groups(_cfg(made, "pairs", "pair_cache", tmp_path / "p"))).train[:4]
    model = _policy64(made)
    results = []
    for name in ("sigmoid", "plackett_luce"):
        cfg = _cfg(made, "pairs", "pair_cache", tmp_path / name, loss=name)
        result = policy_forward(model, pairs, 2, cfg, Trainer.build(model, cfg, 1).loss)
        results.append((result.losses.detach(), _grads(model, result)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


def _groups(cfg):
    return cfg.data, cfg.model, cfg.cache, cfg.lengths, cfg.loss.ld_alpha


@pytest.mark.parametrize("loss", ["sigmoid", "plackett_luce"])
def test_a_short_run_logs_pairs_and_prompts_per_step(made, tmp_path, loss):
    summary = train.run(_cfg(made, "sets", "reply_cache", tmp_path / loss, loss=loss, logging_steps=1))
    records = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and summary["steps"] == 2
    for r in steps:
        assert r["prompts_per_step"] == 2 and r["pairs_per_step"] >= 2
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= set(r)


def test_a_step_is_the_mean_over_all_its_pairs_across_micro_batches(made, tmp_path):
    """Gradient accumulation over micro-batches holding different numbers of pairs: the step's gradient is that of
    the mean over all the step's pairs (train.step_objective), as on the expanded pair rows in one batch."""
    from stages.stage2.train import StepCount, step_objective

    for data, cache, loss_name in (("sets", "reply_cache", "sigmoid"), ("sets", "reply_cache", "plackett_luce"),
                                   ("pairs", "pair_cache", "sigmoid")):
        cfg = _cfg(made, data, cache, tmp_path / "a", loss=loss_name)
        items = prepare(*_groups(cfg)).train[:3]
        model = _policy64(made)
        loss = Trainer.build(model, cfg, 1).loss
        whole = _grads(model, policy_forward(model, items, 2, cfg, loss))
        model.zero_grad(set_to_none=True)
        count = StepCount(sum(len(getattr(i, "pairs", (None,))) for i in items), len(items))
        for micro in (items[:1], items[1:]):  # uneven: 1 example (prompt) and 2, holding different numbers of pairs
            result = policy_forward(model, micro, 2, cfg, loss)
            step_objective(result, 2, count, 1, loss_name != "sigmoid", even=False).backward()
        split = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        assert float((split - whole).norm()) <= GRAD_RTOL * float(whole.norm()), (data, loss_name)


def test_micro_batches_filled_by_tokens(made, tmp_path):
    """--max-tokens-per-batch: whole prompts, longest first, at most --batch-size and the budget each (one prompt
    over it alone), the same micro-batches every epoch in another order; a run trains on them."""
    from stages.stage2.trainutil import batch_cost, batches_for_epoch, token_batches

    cfg = _cfg(made, "sets", "reply_cache", tmp_path / "a")
    sets = prepare(*_groups(cfg)).train
    budget = 2 * max(s.tokens for s in sets) - 1  # the longest prompt cannot share its micro-batch
    batches = token_batches(sets, 3, budget)
    assert sorted(id(s) for b in batches for s in b) == sorted(map(id, sets))
    assert all(len(b) <= 3 and (batch_cost(b) <= budget or len(b) == 1) for b in batches)
    assert len(batches[0]) == 1 and len(batches) < len(sets)
    epochs = [batches_for_epoch(sets, 3, 7, e, budget=budget) for e in range(3)]
    contents = [sorted(tuple(sorted(id(s) for s in b)) for b in e) for e in epochs]
    assert contents[0] == contents[1] == contents[2] and any(e != epochs[0] for e in epochs[1:])
    out = tmp_path / "run"
    summary = train.run(_cfg(made, "sets", "reply_cache", out, batch_size=3, max_tokens_per_batch=budget,
                             max_steps=-1, epochs=1.0))
    assert summary["steps"] == len(batches)


@pytest.mark.parametrize("share", [True, False])
def test_packed_micro_batches_count_real_tokens(made, tmp_path, share):
    """--pack with --max-tokens-per-batch: the budget counts the real tokens of the one packed sequence (prompt
    once with --share-prompt, else once per reply), not padded rows, so a packed micro-batch fills its budget
    and the forward packs it into ONE sequence."""
    from stages.data.encode import Encoded
    from stages.model import packing
    from stages.settings.options import replace
    from stages.stage2.trainutil import PackCost, batch_cost, cost_of, token_batches

    cfg = _cfg(made, "pairs", "pair_cache", tmp_path / "a", pack=True, share_prompt=share, max_tokens_per_batch=500)
    assert cost_of(cfg.compute) == PackCost(share)
    assert cost_of(_cfg(made, "pairs", "pair_cache", tmp_path).compute) is batch_cost
    g = torch.Generator().manual_seed(0)
    ids = lambda n: tuple(torch.randint(3, 500, (n,), generator=g).tolist())  # noqa: E731
    items = [Item(Encoded(f"x{k}", ids(30 + k % 7), ids(10 + k % 5), ids(12 + k % 3)), -1.0, -2.0) for k in range(24)]
    real = [(1 if share else 2) * len(i.enc.prompt_ids) + len(i.enc.chosen_ids) + len(i.enc.rejected_ids)
            for i in items]
    assert [i.packed_tokens(share) for i in items] == real
    packed, padded = token_batches(items, 64, 500, PackCost(share)), token_batches(items, 64, 500)
    assert all(sum(i.packed_tokens(share) for i in b) <= 500 for b in packed)
    assert all(sum(i.packed_tokens(share) for i in b) + min(real) > 500 for b in packed[:-1])  # each one is full
    # shared: padded rows count the prompt twice and the shorter reply as the longer (half-full packed sequences)
    assert len(packed) < len(padded) if share else len(packed) <= len(padded)
    seen = []
    real_pack = packing.pack
    with pytest.MonkeyPatch.context() as m:
        m.setattr("stages.model.rowlayout.pack", lambda rows, b, s: seen.append(real_pack(rows, b, s)) or seen[-1])
        model = _policy64(made)
        policy_forward(model, packed[0], 2, replace(cfg), Trainer.build(model, cfg, 1).loss)
    assert len(seen) == 1 and len(seen[0]) == 1 and len(seen[0][0]) == len(packed[0])  # ONE sequence, all of it


def test_length_grouping_sorts_by_the_shared_row_it_pads_to():
    """With --share-prompt a pair's forward is ONE row [prompt | chosen | rejected]: grouping by that width pads
    less than grouping by prompt + longer reply (the plain layout's rows), with the same examples per epoch."""
    from types import SimpleNamespace

    from stages.data.encode import Encoded
    from stages.stage2.trainutil import batches_for_epoch, width_of

    g = torch.Generator().manual_seed(1)
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    items = [Item(Encoded(f"x{k}", (5,) * n(10, 400), (6,) * n(5, 300), (7,) * n(5, 300)), 0.0, 0.0)
             for k in range(512)]
    width = width_of(SimpleNamespace(share_prompt=True))
    assert [width(i) for i in items] == [i.packed_tokens(True) for i in items]
    assert width_of(SimpleNamespace(share_prompt=False))(items[0]) == items[0].length

    def padding(batches) -> float:
        positions = sum(len(b) * max(width(i) for i in b) for b in batches)
        return 1 - sum(width(i) for b in batches for i in b) / positions
    by_length, by_width = (batches_for_epoch(items, 8, 0, 0, width=w) for w in (None, width))
    assert sorted(id(i) for b in by_width for i in b) == sorted(id(i) for b in by_length for i in b)
    assert padding(by_width) < 0.8 * padding(by_length), (padding(by_width), padding(by_length))


def test_a_sweep_over_reply_sets_reads_the_cache_once_and_trains_each_beta(made, tmp_path):
    res = CliRunner().invoke(cli_main, ["sweep", "--model", str(made["model"]), "--data", str(made["sets"]),
                                        "--ref-cache", str(made["reply_cache"]), "--output", str(tmp_path / "sweep"),
                                        "--beta", "0.1", "--beta", "0.5", "--max-steps", "1", "--batch-size", "2",
                                        "--no-load-in-4bit", "--no-gradient-checkpointing", "--pairs", "best-worst"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("train pairs: 6 prompts, 21 replies -> 6 pairs (--pairs best-worst)") == 1, res.output
    for beta in ("0.1", "0.5"):
        assert (tmp_path / "sweep" / f"beta-{beta}-sigmoid" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_on_the_smollm2_slice_replies_equal_the_expanded_pairs(hh_path, smollm2_slice, tmp_path):
    """The values on a real model (SmolLM2's first 2 layers, real embeddings and tokenizer): each expanded pair's
    cached sums equal its two replies' (tests/bounds.py), and one stage-two micro-batch gives the same per-pair
    losses as the expanded pair rows."""
    from stages.data.replyset import reply_id

    sets = reply_sets(hh_path, tmp_path, n=4)
    files = {"sets": write_jsonl(tmp_path / "sets.jsonl", sets), "pairs": write_jsonl(tmp_path / "pairs.jsonl",
                                                                                     expanded(sets)),
             "reply_cache": tmp_path / "r.parquet", "pair_cache": tmp_path / "p.parquet", "model": smollm2_slice}
    replies = run_stage_one(smollm2_slice, files["sets"], files["reply_cache"])
    pairs = run_stage_one(smollm2_slice, files["pairs"], files["pair_cache"])
    scale = logit_scale_of_files(smollm2_slice, [files["pairs"]], MAXLEN, MAXPROMPT)
    by_reply = {r["reply_id"]: r for r in replies.iter_rows(named=True)}
    for row in expanded(sets):
        pair = pairs.filter(pl.col("example_id") == content_id(row["prompt"], row["chosen"], row["rejected"])).row(
            0, named=True)
        for side in ("chosen", "rejected"):
            reply = by_reply[reply_id(row["prompt"], row[side])]
            assert pair[f"{side}_tokens"] == reply["reply_tokens"]
            assert abs(pair[f"ref_{side}_logps"] - reply["ref_logps"]) <= sum_tol(reply["reply_tokens"], scale)
    cfg = _cfg(files, "sets", "reply_cache", tmp_path / "run")
    items = prepare(*_groups(cfg)).train[:2]
    pair_items = [Item(_pair_encoded(s, c, r), *s.pair_ref[k]) for s in items for k, (c, r) in enumerate(s.pairs)]
    model = _policy64(files)
    loss = Trainer.build(model, cfg, 1).loss
    one, two = (policy_forward(model, x, 2, cfg, loss) for x in (items, pair_items))
    tol = SLOPE * sum_tol(2 * MAXLEN, scale)
    assert float((one.losses - two.losses).detach().abs().max()) <= tol


# ---------------------------------------------------------------------------------------- packed rows, segments
LAYOUTS = [dict(pack=True), dict(attention="segments"), dict(pack=True, attention="segments"),
           dict(pack=True, attention="segments", share_prompt=False)]


def _layout_id(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", LAYOUTS, ids=_layout_id)
def test_stage_one_packed_and_segment_attention_give_the_same_cache(made, tmp_path, kw):
    """--pack (several prompts in one sequence) and --attention segments (no [T, T] mask) change neither the values
    nor the token counts, for reply sets and pair rows; a packed batch has no padding."""
    for data, ref, key, value in (("sets", "reply_df", "reply_id", "ref_logps"),
                                  ("pairs", "pair_df", "example_id", "ref_chosen_logps")):
        other = run_stage_one(made["model"], made[data], tmp_path / f"{data}.parquet", store_token_logps=True,
                              max_tokens_per_batch=256, **kw).sort(key)
        base = made[ref].sort(key)
        assert other[key].to_list() == base[key].to_list()
        counts = "reply_tokens" if data == "sets" else "chosen_tokens"
        assert other[counts].to_list() == base[counts].to_list()
        assert ((other[value] - base[value]).abs() <= sum_tol(base[counts], made["scale"])).all(), (data, kw)


@pytest.mark.parametrize("kw", LAYOUTS[:3], ids=_layout_id)
def test_stage_two_packed_and_segment_attention_give_the_same_losses_and_gradients(made, tmp_path, kw):
    for data, cache in (("sets", "reply_cache"), ("pairs", "pair_cache")):
        base_cfg = _cfg(made, data, cache, tmp_path / "a", ld_alpha=0.5, use_weighting=True)
        cfg = _cfg(made, data, cache, tmp_path / "b", ld_alpha=0.5, use_weighting=True, **kw)
        items = prepare(*_groups(base_cfg)).train[:4]
        model = _policy64(made)
        loss = Trainer.build(model, base_cfg, 1).loss
        one = policy_forward(model, items, 2, base_cfg, loss)
        g_one = _grads(model, one)
        two = policy_forward(model, items, 2, cfg, loss)
        g_two = _grads(model, two)
        tol = SLOPE * sum_tol(2 * MAXLEN, made["scale"])
        assert float((one.losses - two.losses).detach().abs().max()) <= tol, data
        assert float((g_one - g_two).norm()) <= GRAD_RTOL * float(g_one.norm()), data


def test_a_packed_segment_attention_run_with_checkpointing_trains_as_the_default(made, tmp_path):
    """The whole stage two with --pack --attention segments under activation checkpointing (the layers recomputed
    in backward): the first step's gradient norm equals the default layout's (rounding only)."""
    from tests.bounds import grad_norm_tol

    norms = []
    for name, kw in (("dense", {}), ("segments", dict(pack=True, attention="segments"))):
        train.run(_cfg(made, "sets", "reply_cache", tmp_path / name, gradient_checkpointing=True, max_steps=1,
                       lora_dropout=0.0, **kw))  # no dropout: its random masks depend on the tensor shapes
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        norms.append(next(r["grad_norm"] for r in records if "grad_norm" in r))
    n_params = 8192  # LoRA r4 on the tiny model (the test of the expanded pairs counts them)
    assert abs(norms[0] - norms[1]) <= grad_norm_tol(norms[0], n_params), norms


def test_attention_auto_takes_segments_and_says_so(made, tmp_path):
    args = ["precompute-ref", "--model", str(made["model"]), "--data", str(made["sets"]), "--output",
            str(tmp_path / "ref.parquet"), "--max-length", str(MAXLEN), "--max-prompt-length", str(MAXPROMPT),
            "--attention", "auto", "--pack"]
    res = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "attention: segments (--attention auto: per segment from the rows' boundaries, no [T, T] mask)" in \
        res.output, res.output
    assert "padding waste 0.0%" in res.output, res.output
    from stages.cache.refcache import read_cache

    assert read_cache(tmp_path / "ref.parquet")[1]["share_prompt"] is True  # segments share the prompt (no 4-D mask)
    other = pl.read_parquet(tmp_path / "ref.parquet").sort("reply_id")
    base = made["reply_df"].sort("reply_id")
    assert ((other["ref_logps"] - base["ref_logps"]).abs() <= sum_tol(base["reply_tokens"], made["scale"])).all()
