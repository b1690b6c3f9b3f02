"""`dpo plan` against the article's arithmetic (naive DPO at 8 B/param: 560 GB for a "72B" model on 8 x 80 GB), and
the reference's SFT adapter (--ref-adapter-r) counted where a reference is held. Arithmetic only: no model is built."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.base.errors import UserError
from stages.cli import main
from stages.settings.commands import PlanConfig
from stages.tools.plan import GIB, plan_memory
from stages.tools.plancount import lora_parameters
from stages.tools.plantable import format_plan

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
# hidden 64, 2 layers, 4 heads of 16, 2 KV heads, intermediate 128, vocab 512 (tests/test_plan.py's SMALL): 106,816
SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}
# The article: policy 140 GB + reference 140 GB + AdamW states 280 GB = 560 GB, i.e. 2 + 2 + 4 = 8 bytes per
# parameter with 140 GB / 2 B = 70e9 parameters per bf16 copy (its "72B" model, rounded).
ARTICLE_PARAMS, ARTICLE_TOTAL = 70e9, 560e9


def small(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(SMALL))
    return str(p)


@pytest.mark.parametrize("name", ["qwen2.5-72b-instruct", "llama-3.1-70b-instruct"])
def test_article_convention_reproduces_560_gb(name):
    plan = plan_memory(PlanConfig(str(MODELS / name), gpus=8, gpu_memory="80GB"))
    P = plan.counts["total"]
    assert plan.article == {"policy": 2 * P, "reference": 2 * P, "AdamW m + v": 4 * P}
    total = sum(plan.article.values())
    # the article's 560 GB is 8 B x 70e9; at the exact count the total differs by 8 B per parameter of difference
    # and by nothing else: 72.71e9 -> 581.6 GB (+3.9%), 70.55e9 -> 564.4 GB (+0.8%)
    assert abs(total - ARTICLE_TOTAL) == pytest.approx(8 * abs(P - ARTICLE_PARAMS), abs=0.5)
    assert abs(total - ARTICLE_TOTAL) / ARTICLE_TOTAL <= abs(P - ARTICLE_PARAMS) / ARTICLE_PARAMS + 1e-12
    assert total <= 8 * 80e9                                                 # fits 640 GB as the article counts
    # the naive column's sharded terms are 18 B/param; the article's 8: the difference is bf16 grads (2) and fp32
    # master + m + v (12) instead of bf16 m + v (4), 10 B/param, up to the ceil of three per-GPU divisions
    naive = plan.scenario("naive").breakdown
    sharded = sum(naive[k] for k in ("policy weights + grads, bf16 (sharded)", "AdamW fp32 master + m + v (sharded)",
                                     "reference weights (sharded)"))
    assert 0 <= sharded - total / 8 - 10 * P / 8 < 3
    text = format_plan(plan)
    assert f"= {total / 1e9:.1f} GB in all" in text and "8 x 80 GB = 640 GB: fits as the article counts" in text
    assert "naive column vs the article convention" in text and "fp32 master + m + v" in text
    assert f"(the naive column above: {plan.scenario('naive').total / GIB:.1f} GiB per GPU)" in text


def test_article_on_the_72b_terms():
    """The article's three terms at Qwen2.5-72B's exact 72,706,203,648 parameters, in GB = 1e9 bytes."""
    plan = plan_memory(PlanConfig(str(MODELS / "qwen2.5-72b-instruct"), gpus=8, gpu_memory="80GB"))
    assert plan.counts["total"] == 72_706_203_648
    assert plan.article["policy"] == plan.article["reference"] == 145_412_407_296      # vs the article's 140
    assert plan.article["AdamW m + v"] == 290_824_814_592                              # vs 280
    assert "policy 145.4 + reference 145.4 + AdamW m + v 290.8 = 581.6 GB in all" in format_plan(plan)


REF_HELD = ("naive", "online_ref", "stage1_bf16", "stage1_nf4")


def test_sft_adapter_adds_exactly_its_bytes_on_one_gpu(tmp_path):
    """One GPU gathers nothing: each scenario that holds a reference grows by the adapter's fp32 bytes, 4·A_ref,
    in its run and in its load; stage two (reference from the cache) does not change."""
    path = small(tmp_path)
    kw = dict(gpus=1, max_length=64, lora_r=4, max_tokens_per_batch=256)
    base, ref = plan_memory(PlanConfig(path, **kw)), plan_memory(PlanConfig(path, **kw, ref_adapter_r=8))
    a_ref = lora_parameters(SMALL, 8)
    assert a_ref == 2 * 8192                            # r=8: twice r=4's 8192 (tests/test_plan.py, by hand)
    for key in REF_HELD:
        before, after = base.scenario(key), ref.scenario(key)
        assert after.breakdown["reference SFT adapter, fp32 (sharded)"] == 4 * a_ref
        assert after.run - before.run == after.load - before.load == 4 * a_ref, key
    assert ref.scenario("stage2") == base.scenario("stage2")
    assert ref.article["reference"] - base.article["reference"] == 2 * a_ref   # bf16 in the article's convention


def test_sft_adapter_on_two_gpus_by_hand(tmp_path):
    """Sharded: 4·A_ref/N per GPU; a gathered layer carries its 4·A_ref/L (stage one: current + prefetched layer,
    and the copy-out when a layer is the largest unit); naive DPO's peak is in the policy's backward, after the
    reference's layers were resharded, so only the shard counts there."""
    path = small(tmp_path)
    kw = dict(gpus=2, max_length=64, lora_r=4, max_tokens_per_batch=256)
    base, ref = plan_memory(PlanConfig(path, **kw)), plan_memory(PlanConfig(path, **kw, ref_adapter_r=8))
    shard, layer = 4 * 16384 // 2, 4 * 16384 // 2        # 4·A_ref/N, 4·A_ref/L (N = L = 2)
    for key in REF_HELD:
        assert ref.scenario(key).breakdown["reference SFT adapter, fp32 (sharded)"] == shard == 32768
    assert ref.scenario("naive").run - base.scenario("naive").run == shard
    s1, s1_ref = base.scenario("stage1_bf16").breakdown, ref.scenario("stage1_bf16").breakdown
    gathered = "all-gathered params (FSDP)"
    assert s1_ref[gathered] - s1[gathered] == 2 * layer
    # copy-out: the bf16 layer (73,984) beats the root (65,664), so it grows by the layer's adapter too
    copy = "all-gather copy-out, largest unit (transient)"
    assert s1_ref[copy] - s1[copy] == layer
    assert ref.scenario("stage1_bf16").run - base.scenario("stage1_bf16").run == shard + 3 * layer == 131072
    for key in REF_HELD:
        assert ref.scenario(key).load - base.scenario(key).load == shard
    # --cpu: the whole fp32 adapter exists once on the CPU before it is sharded (stage one's load)
    cpu, cpu_ref = (plan_memory(PlanConfig(path, **kw, cpu=True, ref_adapter_r=r)) for r in (0, 8))
    label = "load: whole LoRA weights, fp32, before sharding"
    assert label not in cpu.scenario("stage1_bf16").load_breakdown
    assert cpu_ref.scenario("stage1_bf16").load_breakdown[label] == 4 * 16384


def test_ref_adapter_r_option(tmp_path):
    path = small(tmp_path)
    with pytest.raises(UserError, match="--ref-adapter-r -1"):
        plan_memory(PlanConfig(path, ref_adapter_r=-1))
    res = CliRunner().invoke(main, ["plan", "--model", path, "--gpus", "2", "--ref-adapter-r", "-1"])
    assert res.exit_code == 2 and "--ref-adapter-r -1" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["plan", "--model", path, "--gpus", "2", "--ref-adapter-r", "8"])
    assert res.exit_code == 0, res.output
    assert "reference SFT adapter r=8 (fp32): 16,384" in res.output and "+ the SFT adapter in bf16" in res.output
    assert "reference SFT adapter" not in format_plan(plan_memory(PlanConfig(path)))
