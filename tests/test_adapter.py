"""The common QLoRA setup: the reference is base + SFT adapter (stage one `--adapter`), and stage two continues
that adapter (`dpo train --adapter`), so at step 0 the policy equals the cached reference."""

from __future__ import annotations

import gzip
import json
import math

import polars as pl
import pytest
import torch

from stages.cache import refcache
from stages.data.encode import TokenizeSettings, encode_examples
from stages.data.rows import load_examples
from stages.model.logprobs import collate_pairs, sequence_logps
from stages.model.models import ModelSpec, load_model, load_tokenizer
from stages.stage1.precompute import PrecomputeConfig, run as precompute
from stages.stage2 import train
from tests.bounds import logit_scale, logit_scale_of_files, loss_tol, pair_sequences, sum_tol, token_tol


@pytest.fixture(scope="module")
def sft(tiny_llama, hh_path, tmp_path_factory):
    """A non-trivial LoRA 'SFT' adapter on the tiny model, and 12 HH rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B = 0 would make the adapter a no-op and the test vacuous
    model.save_pretrained(root / "sft")
    rows = [json.loads(line) for _, line in zip(range(12), gzip.open(hh_path, "rt"))]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_precompute_with_adapter_equals_base_plus_adapter(tiny_llama, sft):
    out = sft / "ref.parquet"
    precompute(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(sft / "rows.jsonl"),), output=str(out),
                                     adapter=str(sft / "sft"), max_length=256, max_prompt_length=128))
    df, meta = refcache.read_cache(out)
    assert meta["adapter"] and meta["manifest"]["adapter"] == meta["adapter"]["hash"]

    tok = load_tokenizer(str(tiny_llama))
    examples, _ = load_examples([sft / "rows.jsonl"])
    enc, _ = encode_examples(tok, examples, TokenizeSettings(256, 128))
    adapted = load_model(ModelSpec(str(tiny_llama), adapter=str(sft / "sft")), torch.device("cpu")).eval()
    z = logit_scale(adapted, pair_sequences(enc))  # tests/bounds.py
    with torch.inference_mode():
        with_adapter = sequence_logps(adapted, collate_pairs(enc, tok.pad_token_id))
        base_only = sequence_logps(load_model(ModelSpec(str(tiny_llama)), torch.device("cpu")).eval(),
                                   collate_pairs(enc, tok.pad_token_id))
    cached = df.sort("example_id")
    order = sorted(range(len(enc)), key=lambda i: enc[i].example_id)
    want = with_adapter.chosen_logps[order].numpy()
    bound = sum_tol(with_adapter.chosen_tokens[order].numpy(), z)
    assert (abs(cached["ref_chosen_logps"].to_numpy() - want) <= bound).all()
    # ...while the adapter's own effect is far outside that bound for every row (the bound can tell them apart)
    assert (abs(cached["ref_chosen_logps"].to_numpy() - base_only.chosen_logps[order].numpy())
            > sum_tol(with_adapter.chosen_tokens[order].numpy(), z)).all()


def test_train_continues_the_adapter_with_zero_drift(tiny_llama, sft, tmp_path):
    cache = sft / "ref.parquet"
    if not cache.is_file():
        pytest.skip("needs the cache of test_precompute_with_adapter_equals_base_plus_adapter")
    cfg = train.TrainConfig.flat(model=str(tiny_llama), data=(str(sft / "rows.jsonl"),), ref_cache=str(cache),
                                 output=str(tmp_path / "run"), adapter=str(sft / "sft"), load_in_4bit=False,
                                 max_steps=2, batch_size=4, learning_rate=1e-3, lora_dropout=0.0)
    train.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # policy == base + SFT adapter == reference: only rounding (tests/bounds.py), per token and in the first loss
    z = logit_scale_of_files(tiny_llama, cfg.data.data, 256, 128, adapter=str(sft / "sft"))
    assert records[0]["step"] == 0 and records[0]["ref_drift_per_token"] <= token_tol(z)
    steps = [r for r in records if "loss" in r]
    pair_tokens = max(r["chosen_tokens"] + r["rejected_tokens"] for r in pl.read_parquet(cache).iter_rows(named=True))
    assert abs(steps[0]["loss"] - math.log(2)) <= loss_tol(pair_tokens, z, cfg.loss.beta)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4  # the SFT adapter's own shape, continued rather than replaced
    assert pl.read_parquet(cache).height == 12
