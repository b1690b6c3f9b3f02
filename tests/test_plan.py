"""`dpo plan`: parameter counts and memory arithmetic against numbers worked out by hand."""

import json
from pathlib import Path

import pytest
import torch

from stages.base.errors import UserError
from stages.settings.commands import PlanConfig
from stages.tools.plan import (
    GIB,
    OVERHEAD_BYTES,
    parse_gpu_memory,
    plan_memory,
)
from stages.tools.plancount import count_parameters, lora_parameters
from stages.tools.plantable import format_plan
from stages.tools.planterms import MASK_LABEL, nf4_split

torch.set_num_threads(1)

# hidden 64, 2 layers, 4 heads of 16, 2 KV heads (kv_d = 32), intermediate 128, vocab 512
SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}

QWEN25_72B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
              "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}

LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False}


def write(tmp_path, config, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(config))
    return p


def test_small_tied_counts_by_hand():
    c = count_parameters(SMALL)
    # attn: q 64·64 = 4096, k 64·32 = 2048, v 2048, o 64·64 = 4096 → 12288
    assert c["attn_per_layer"] == 4096 + 2048 + 2048 + 4096 == 12288
    # mlp: gate 64·128 + up 64·128 + down 128·64 = 3·8192 = 24576; norms 2·64 = 128
    assert c["mlp_per_layer"] == 24576 and c["norms_per_layer"] == 128
    assert c["per_layer"] == 12288 + 24576 + 128 == 36992
    # embed 512·64 = 32768, tied lm_head 0, final norm 64: total 2·36992 + 32768 + 64
    assert c["embed"] == 32768 and c["lm_head"] == 0 and c["final_norm"] == 64
    assert c["total"] == 2 * 36992 + 32768 + 64 == 106816
    # linear weights (NF4): 2 layers · (12288 + 24576) = 73728; other = embed + norms = 32768 + 2·128 + 64
    assert c["linear_weights"] == 73728 and c["linear_per_layer"] == 36864
    assert c["other"] == 32768 + 256 + 64 == 33088


def test_small_untied_and_qwen2_bias_by_hand():
    untied = count_parameters({**SMALL, "tie_word_embeddings": False})
    assert untied["lm_head"] == 32768 and untied["total"] == 106816 + 32768 == 139584
    # qwen2: q/k/v biases 64 + 32 + 32 = 128 per layer, no o_proj bias
    q = count_parameters({**SMALL, "model_type": "qwen2", "tie_word_embeddings": False})
    assert q["attn_per_layer"] == 12288 + 128
    assert q["total"] == 2 * (36992 + 128) + 2 * 32768 + 64 == 139840
    assert q["linear_weights"] == 73728  # biases are not quantised
    # llama attention_bias: q, k, v AND o biases: 64 + 32 + 32 + 64 = 192; mlp_bias: 128 + 128 + 64 = 320
    b = count_parameters({**SMALL, "attention_bias": True, "mlp_bias": True})
    assert b["attn_per_layer"] == 12288 + 192 and b["mlp_per_layer"] == 24576 + 320


def test_lora_parameters_by_hand():
    # r·(in+out): q 4·(64+64) = 512, k 4·(64+32) = 384, v 384, o 512, gate/up 4·(64+128) = 768, down 768
    assert lora_parameters(SMALL, 4) == 2 * (512 + 384 + 384 + 512 + 3 * 768) == 8192


def test_qwen25_72b_count():
    c = count_parameters(QWEN25_72B)
    # q 8192·8192 + bias 8192; k, v 8192·1024 + bias 1024 each; o 8192·8192 (no bias)
    attn = 8192 * 8192 + 8192 + 2 * (8192 * 1024 + 1024) + 8192 * 8192
    assert attn == 151_005_184
    mlp = 3 * 8192 * 29568  # 726,663,168
    per_layer = attn + mlp + 2 * 8192  # 877,684,736
    total = 80 * per_layer + 2 * 152064 * 8192 + 8192  # untied embed + lm_head, final norm
    assert total == 72_706_203_648
    assert c["total"] == total
    assert abs(c["total"] - 72.7e9) < 0.1e9


def test_llama31_8b_count():
    c = count_parameters(LLAMA31_8B)
    attn = 2 * 4096 * 4096 + 2 * 4096 * 1024     # q, o + k, v = 41,943,040
    mlp = 3 * 4096 * 14336                         # 176,160,768
    total = 32 * (attn + mlp + 2 * 4096) + 2 * 128256 * 4096 + 4096
    assert total == 8_030_261_248
    assert c["total"] == total
    assert abs(c["total"] - 8.03e9) < 0.01e9


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {"tie_word_embeddings": True}), ("llama", {"tie_word_embeddings": False}),
    ("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 32}), ("mistral", {}),
])
def test_counts_match_transformers(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = {k: v for k, v in SMALL.items() if k != "model_type"} | extra
    hf = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(hf)
    c = count_parameters({**hf.to_dict(), "model_type": model_type})
    assert c["total"] == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert c["linear_weights"] == linear


def test_lora_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = AutoConfig.for_model("qwen2", **{k: v for k, v in SMALL.items() if k != "model_type"})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_config(hf), LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_parameters({**SMALL, "model_type": "qwen2"}, 4) == 8192


def test_small_memory_by_hand(tmp_path):
    cfg = PlanConfig(str(write(tmp_path, SMALL)), gpus=2, gpu_memory="1GB", max_length=64, batch_size=1, lora_r=4,
                     attention="dense", max_tokens_per_batch=256)
    plan = plan_memory(cfg)
    # per-token bytes of one layer: 2·(5h + 3q_d + 3kv_d + 4i) + 4·(2h + heads)
    a = 2 * (5 * 64 + 3 * 64 + 3 * 32 + 4 * 128) + 4 * (2 * 64 + 4)
    assert a == 2768
    s1 = plan.scenario("stage1_bf16").breakdown
    assert s1["reference weights (sharded)"] == 2 * 106816 // 2 == 106816
    # two bf16 layers (current + prefetch) + the root unit (embed + final norm; tied) in bf16
    assert s1["all-gathered params (FSDP)"] == 2 * 2 * 36992 + 2 * (32768 + 64) == 213632
    assert s1["activations: hidden states"] == 2 * 256 * 64 * 2 == 65536
    # no-grad layer: 2·max(2h + 3q_d + 3kv_d, h + 3i) + 4·2h = 2·max(128 + 192 + 96, 64 + 384) + 512 = 1408
    assert s1["activations: one layer"] == 256 * 1408 == 360448
    # chunk = min(1024, 256) tokens of bf16 + fp32 logits, plus the gathered hidden rows in bf16
    assert s1["log-prob head"] == 256 * 512 * (2 + 4) + 256 * 64 * 2 == 819200
    assert s1["CUDA/NCCL overhead (fixed)"] == OVERHEAD_BYTES == 2 * GIB
    # FSDP2's copy-out: one more copy of the largest gathered unit, here a bf16 layer 2·36992 > the root 2·32832
    assert s1["all-gather copy-out, largest unit (transient)"] == max(2 * 36992, 2 * (32768 + 64)) == 73984
    # the dense layout's bool mask (issue 24): 256 // 128 = 2 pair rows of 2·64 = 128 tokens, 2·128² bytes
    assert s1[MASK_LABEL] == 2 * 128 * 128 == 32768
    total = 106816 + 213632 + 73984 + 65536 + 360448 + 819200 + 32768 + 2 * GIB
    assert plan.scenario("stage1_bf16").run == plan.scenario("stage1_bf16").total == total
    assert not plan.scenario("stage1_bf16").fits        # the 2 GiB overhead alone exceeds 1 GiB

    s2 = plan.scenario("stage2").breakdown
    # NF4 as stages/model/models.py loads it (no double quant): codes n/2 sharded, fp32 absmax 4n/64 whole on each GPU
    # 73728 linear weights: codes 36864 + the other 33088 params in bf16, / 2 GPUs; absmax 4·1152 = 4608 whole
    assert s2["base weights NF4 (sharded)"] == (36864 + 2 * 33088) // 2 + 4 * 1152 == 56128
    assert s2["LoRA weights + grads + AdamW (sharded)"] == 18 * 8192 // 2 == 73728
    layer_nf4 = 36864 // 2 + 2 * (36992 - 36864)  # gathered: codes 18432 + bf16 norms 256 (absmax not gathered)
    a_lay = 8192 // 2
    assert s2["all-gathered params (FSDP)"] == (2 * (layer_nf4 + 2 * a_lay) + 4 * a_lay + 2 * 64 * 128
                                                + 2 * (32768 + 64)) == 152192
    # copy-out: the NF4 layer with its bf16 adapters (18688 + 8192 = 26880) is smaller than the bf16 root 65664
    assert s2["all-gather copy-out, largest unit (transient)"] == max(layer_nf4 + 2 * a_lay, 65664) == 65664
    assert plan.scenario("stage1_nf4").breakdown["all-gather copy-out, largest unit (transient)"] == 65664
    T = 1 * 2 * 64
    assert s2["activations: layer checkpoints"] == 2 * T * 64 * 2 == 32768
    lora_in = 2 * (5 * 64 + 64 + 128) + 2 * 7 * 4                      # 1080
    assert s2["activations: one layer recomputed + grads"] == 2 * T * (a + lora_in) == 985088
    # one checkpointed chunk (128 tokens): bf16 + fp32 logits and both gradients; 3 bf16 [T, h] tensors
    assert s2["log-prob head"] == T * 512 * (2 + 4 + 4 + 2) + 3 * T * 64 * 2 == 835584
    assert s2[MASK_LABEL] == 1 * 128 * 128 == 16384  # one pair row of 2·64 tokens

    naive = plan.scenario("naive").breakdown
    assert naive["policy weights + grads, bf16 (sharded)"] == 4 * 106816 // 2
    assert naive["AdamW fp32 master + m + v (sharded)"] == 12 * 106816 // 2
    assert naive["reference weights (sharded)"] == 2 * 106816 // 2
    assert naive["all-gather copy-out, largest unit (transient)"] == 73984
    for sc in plan.scenarios:
        assert sc.run == sum(sc.breakdown.values()) and sc.load == sum(sc.load_breakdown.values())
        assert sc.total == max(sc.run, sc.load)


def test_72b_naive_does_not_fit_stage_two_does(tmp_path):
    plan = plan_memory(PlanConfig(str(write(tmp_path, QWEN25_72B)), gpus=8, gpu_memory="80GB"))
    naive, s2 = plan.scenario("naive"), plan.scenario("stage2")
    # 18 bytes/param / 8 GPUs = 72.7e9·18/8 ≈ 163.6e9 bytes ≈ 152 GiB before activations
    assert naive.breakdown["policy weights + grads, bf16 (sharded)"] + \
        naive.breakdown["AdamW fp32 master + m + v (sharded)"] + \
        naive.breakdown["reference weights (sharded)"] == pytest.approx(72_706_203_648 * 18 / 8, abs=8)
    assert not naive.fits and naive.total > 150 * GIB
    assert s2.fits and s2.total < 40 * GIB
    assert plan.scenario("stage1_bf16").fits and plan.scenario("stage1_nf4").fits
    assert any("naive DPO needs at least" in x for x in plan.suggestions)
    text = format_plan(plan)
    assert "72,706,203,648" in text and "NO" in text and "stage 2 QLoRA" in text


def test_suggestions_when_things_do_not_fit(tmp_path):
    path = str(write(tmp_path, QWEN25_72B))
    plan = plan_memory(PlanConfig(path, gpus=2, gpu_memory="80GB", gradient_checkpointing=False))
    assert not plan.scenario("stage1_bf16").fits and plan.scenario("stage1_nf4").fits
    assert any("NF4" in x for x in plan.suggestions)
    assert any("gradient checkpointing on" in x for x in plan.suggestions)
    small = plan_memory(PlanConfig(path, gpus=1, gpu_memory="32GB"))
    assert any("stage 2 needs at least" in x for x in small.suggestions)
    # 24 GiB: what no number of GPUs shards (the 4.1 GiB of absmax, the gathered layers, the activations, the
    # 2048-position head chunk, the 2 GiB overhead) already exceeds it at seq_len 2048
    tiny = plan_memory(PlanConfig(path, gpus=1, gpu_memory="24GB"))
    assert any("stage 2 does not fit on any number" in x for x in tiny.suggestions)


def test_llama_8b_single_gpu(tmp_path):
    plan = plan_memory(PlanConfig(str(write(tmp_path, LLAMA31_8B)), gpus=1, gpu_memory="80GB"))
    assert not plan.scenario("naive").fits     # 8.03e9 · 18 B ≈ 135 GiB
    assert plan.scenario("stage1_bf16").fits and plan.scenario("stage2").fits


def test_config_loading(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write(folder, SMALL)
    assert plan_memory(PlanConfig(str(folder))).counts["total"] == 106816
    wrapped = write(tmp_path, {"model_type": "llava", "text_config": SMALL}, "mm.json")
    assert plan_memory(PlanConfig(str(wrapped))).counts["total"] == 106816
    with pytest.raises(UserError, match="no such folder or config JSON"):
        plan_memory(PlanConfig(str(tmp_path / "nope")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        plan_memory(PlanConfig(str(bad)))
    missing = write(tmp_path, {k: v for k, v in SMALL.items() if k != "intermediate_size"}, "m.json")
    with pytest.raises(UserError, match="intermediate_size"):
        plan_memory(PlanConfig(str(missing)))
    moe = write(tmp_path, {**SMALL, "num_local_experts": 8}, "moe.json")
    with pytest.raises(UserError, match="mixture of experts"):
        plan_memory(PlanConfig(str(moe)))
    with pytest.raises(UserError, match="--gpus"):
        plan_memory(PlanConfig(str(folder), gpus=0))
    with pytest.raises(UserError, match="--gpu-memory 'lots' is not a size"):  # the setting's text, parsed in the plan
        plan_memory(PlanConfig(str(folder), gpu_memory="lots"))
    assert plan_memory(PlanConfig(str(folder), gpu_memory="24GB")).capacity == 24 * GIB


def test_nf4_bytes():
    from stages.tools.planterms import nf4_bytes
    # 64·256·3 = 49152 weights: 24576 bytes of codes; 768 blocks
    assert nf4_bytes(49152, double_quant=False) == 24576 + 4 * 768          # fp32 absmax per block
    assert nf4_bytes(49152, double_quant=True) == 24576 + 768 + 4 * 3       # 8-bit absmax + fp32 per 256 blocks


def test_parse_gpu_memory():
    assert parse_gpu_memory("80GB") == 80.0
    assert parse_gpu_memory("80") == 80.0
    assert parse_gpu_memory("141GiB") == 141.0
    assert parse_gpu_memory("81920MB") == 80.0
    assert parse_gpu_memory(24) == 24.0
    with pytest.raises(UserError, match="gpu-memory"):
        parse_gpu_memory("lots")


# ------------------------------------------------------------------------------ issue 13: shipped configs, modes
MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.mark.parametrize("name,total", [
    ("qwen2.5-72b-instruct", 72_706_203_648),     # test_qwen25_72b_count's hand arithmetic
    ("llama-3.1-8b-instruct", 8_030_261_248),     # test_llama31_8b_count's
    # 80·(2·8192² + 2·8192·1024 + 3·8192·28672 + 2·8192) + 2·128256·8192 + 8192
    ("llama-3.1-70b-instruct", 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192)
     + 2 * 128256 * 8192 + 8192),
    ("qwen2.5-72b-width-2layers", 2 * 877_684_736 + 2 * 152064 * 8192 + 8192),
])
def test_shipped_model_configs_count_exactly(name, total):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert name != "llama-3.1-70b-instruct" or total == 70_553_706_496
    plan = plan_memory(PlanConfig(str(MODELS / name)))  # `dpo plan --model configs/models/<name>` on a fresh clone
    assert plan.counts["total"] == total
    with torch.device("meta"):  # transformers builds the same architecture without allocating it
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODELS / name))
    assert sum(p.numel() for p in model.parameters()) == total


def test_the_qwen_constants_here_are_the_shipped_config():
    shipped = json.loads((MODELS / "qwen2.5-72b-instruct" / "config.json").read_text())
    assert {k: shipped[k] for k in QWEN25_72B} == QWEN25_72B
    shipped = json.loads((MODELS / "llama-3.1-8b-instruct" / "config.json").read_text())
    assert {k: shipped[k] for k in LLAMA31_8B} == LLAMA31_8B


def test_layer_override_and_cpu_mode(tmp_path):
    path = str(write(tmp_path, SMALL))
    one = plan_memory(PlanConfig(path, gpus=2, layers=1, cpu=True, max_length=64, max_tokens_per_batch=256, lora_r=4))
    # 1 layer: 36992 + embed 32768 (tied) + final norm 64
    assert one.counts["total"] == 36992 + 32768 + 64 and one.shape.layers == 1
    assert one.lora_params == 8192 // 2
    for sc in one.scenarios:
        assert "CUDA/NCCL overhead (fixed)" not in sc.breakdown and sc.run == sum(sc.breakdown.values())
        assert "load: CUDA/NCCL overhead (fixed)" not in sc.load_breakdown
    gpu = plan_memory(PlanConfig(path, gpus=2, layers=1, max_length=64, max_tokens_per_batch=256, lora_r=4))
    assert gpu.scenario("stage1_bf16").total == one.scenario("stage1_bf16").total + OVERHEAD_BYTES
    text = format_plan(one)
    assert "1 layers (--layers override)" in text and "CPU processes" in text and "CUDA" not in text.split("notes:")[0]
    with pytest.raises(UserError, match="--layers"):
        plan_memory(PlanConfig(path, layers=0))


def test_one_gpu_gathers_nothing(tmp_path):
    plan = plan_memory(PlanConfig(str(write(tmp_path, SMALL)), gpus=1, max_length=64, max_tokens_per_batch=256,
                                  lora_r=4))
    s1 = plan.scenario("stage1_bf16").breakdown
    assert "all-gathered params (FSDP)" not in s1 and s1["reference weights (sharded)"] == 2 * 106816
    # NF4 still dequantises its largest linear (h·i = 64·128) to bf16 for the matmul
    assert plan.scenario("stage1_nf4").breakdown["dequantised NF4 linear (one GPU)"] == 2 * 64 * 128
    assert plan.scenario("stage2").breakdown["dequantised NF4 linear (one GPU)"] == 2 * 64 * 128
    assert "all-gathered params (FSDP)" not in plan.scenario("naive").breakdown
    assert not any("copy-out" in k for sc in plan.scenarios for k in sc.breakdown)  # one process: no FSDP2
    assert "nothing is all-gathered" in format_plan(plan)


def test_online_reference_scenario_by_hand(tmp_path):
    path = str(write(tmp_path, SMALL))
    cfg = PlanConfig(path, gpus=2, gpu_memory="1GB", max_length=64, batch_size=1, lora_r=4, max_tokens_per_batch=256)
    plan = plan_memory(cfg)
    online, s2 = plan.scenario("online_ref").breakdown, plan.scenario("stage2").breakdown
    extra = "reference forward, adapters off (extra at peak)"
    # same weights and policy activations; the dense mask is the stages' layout, not the online trainer's
    assert {k: v for k, v in online.items() if k != extra} == {k: v for k, v in s2.items() if k != MASK_LABEL}
    # T = 128 tokens. reference forward: 2·T·h·2 + T·a + chunk(128)·V·(2+4) = 32768 + 128·2768 + 393216 = 780288;
    # the backward's own transient with checkpointing: 2·T·(a + lora_in) = 2·128·(2768 + 1080) = 985088 -> 0 extra
    assert online[extra] == max(0, 780288 - 985088) == 0
    off = plan_memory(PlanConfig(path, gpus=2, gpu_memory="1GB", max_length=64, batch_size=1, lora_r=4,
                                 max_tokens_per_batch=256, gradient_checkpointing=False))
    assert off.scenario("online_ref").breakdown[extra] == 780288 - 128 * (2768 + 1080) == 287744
    from stages.tools.planterms import full_logits_bytes
    assert full_logits_bytes(plan.shape, cfg) == 2 * 128 * 512 * (2 + 4) == 786432
    text = format_plan(plan)
    assert "QLoRA+online ref" in text and "TRL's default with PEFT" in text


def test_plan_cli_options():
    from click.testing import CliRunner

    from stages.cli import main
    res = CliRunner().invoke(main, ["plan", "--model", str(MODELS / "qwen2.5-72b-instruct"), "--gpus", "2",
                                    "--layers", "1", "--cpu", "--seq-len", "256", "--max-tokens-per-batch", "1024"])
    assert res.exit_code == 0, res.output
    assert "3,369,109,504" in res.output and "QLoRA+online ref" in res.output  # 1 layer: 877,684,736 + 2·V·h + h


# ------------------------------------------------------------------------------ issue 20: absmax whole, loading peak
@pytest.mark.parametrize("gpus", [1, 2, 3, 4])
def test_nf4_absmax_is_whole_on_every_gpu(tmp_path, gpus):
    """FSDP2 shards the NF4 codes (the parameter) but not the quant state bitsandbytes keeps on the module."""
    assert nf4_split(73728) == (36864, 4 * 1152)  # SMALL's linear weights: n/2 codes, fp32 absmax per 64-block
    plan = plan_memory(PlanConfig(str(write(tmp_path, SMALL)), gpus=gpus, max_length=64, max_tokens_per_batch=256,
                                  lora_r=4))
    # codes 36864 + the other 33088 params in bf16, sharded (rounded up); the 4608 bytes of absmax whole
    weights = -(-(36864 + 2 * 33088) // gpus) + 4608
    assert plan.scenario("stage1_nf4").breakdown["reference weights (sharded)"] == weights
    assert plan.scenario("stage2").breakdown["base weights NF4 (sharded)"] == weights
    assert plan.scenario("online_ref").breakdown["base weights NF4 (sharded)"] == weights


def test_loading_peak_by_hand(tmp_path):
    """stages/model/loading.py reads each slice into a host buffer in the checkpoint dtype and copies it into the shard
    (one more copy only if the dtype differs); NF4 slices are quantized on the device from bf16."""
    path = str(write(tmp_path, SMALL))  # no torch_dtype: the checkpoint is taken as bf16
    plan = plan_memory(PlanConfig(path, gpus=2, cpu=True, max_length=64, batch_size=1, lora_r=4,
                                  max_tokens_per_batch=256))
    # the largest tensor is the embedding [512, 64]: 256 rows per process x 64 = 16384 weights, read in bf16 and
    # copied into the shard as they are (2 bytes); the linears' slices are smaller (gate [128, 64]: 64 x 64)
    s1 = plan.scenario("stage1_bf16")
    assert s1.load_breakdown == {"load: weights resident (sharded)": 106816,
                                 "load: largest tensor's slice in flight": 2 * 16384}
    # stage two: the NF4 base shards (absmax whole) + fp32 LoRA shards 4·8192/2 + the embedding's slice (bf16,
    # larger than any NF4 slice, below) + (--cpu) the whole fp32 LoRA weights 4·8192 held once before sharding
    s2 = plan.scenario("stage2")
    assert s2.load_breakdown == {"load: weights resident (sharded)": 56128 + 16384,
                                 "load: largest tensor's slice in flight": 32768,
                                 "load: whole LoRA weights, fp32, before sharding": 32768}
    assert s2.load == 56128 + 16384 + 32768 + 32768 == 138048
    assert s1.total == s1.run > s1.load and s2.total == s2.run > s2.load  # the run dominates here
    fp32 = str(write(tmp_path, {**SMALL, "torch_dtype": "float32"}, "fp32.json"))
    conv = plan_memory(PlanConfig(fp32, gpus=2, cpu=True, max_length=64, lora_r=4, max_tokens_per_batch=256))
    # an fp32 checkpoint loaded as bf16: the fp32 host buffer (4 bytes) + its bf16 conversion (2 bytes)
    assert conv.scenario("stage1_bf16").load_breakdown["load: largest tensor's slice in flight"] == 6 * 16384


def test_loading_nf4_slice_by_hand(tmp_path):
    """NF4: this rank's packed rows as weights, widened to whole 64-blocks, in bf16 + their codes + their absmax."""
    small_vocab = {**SMALL, "vocab_size": 16}  # so the NF4 slices, not the embedding's, are the largest
    key = "load: largest tensor's slice in flight"
    # the largest linears hold 64·128 = 8192 weights. 2 processes: 2·⌈4096/2⌉ = 4096 weights, widened to
    # ⌈4096/64⌉·64 + 64 = 4160: bf16 host buffer 2·4160 + codes 2080 + absmax 4·65 = 10660
    cpu = plan_memory(PlanConfig(str(write(tmp_path, small_vocab)), gpus=2, cpu=True, max_length=64, lora_r=4,
                                 max_tokens_per_batch=256))
    assert cpu.scenario("stage2").load_breakdown[key] == 2 * 4160 + 2080 + 4 * 65 == 10660
    assert cpu.scenario("stage1_nf4").load_breakdown[key] == 10660
    assert cpu.scenario("stage1_bf16").load_breakdown[key] == 2 * 64 * 64  # plain gate/up/down slices [64, 64]
    fp32 = str(write(tmp_path, {**small_vocab, "torch_dtype": "float32"}, "fp32.json"))
    conv = plan_memory(PlanConfig(fp32, gpus=2, cpu=True, max_length=64, lora_r=4, max_tokens_per_batch=256))
    assert conv.scenario("stage2").load_breakdown[key] == (4 + 2) * 4160 + 2080 + 4 * 65 == 27300
    # GPUs (3): plain slices pass through host memory (0 on the GPU); NF4: 2·⌈4096/3⌉ = 2732 weights, widened to
    # 43·64 + 64 = 2816, moved to the GPU in bf16 (2 bytes) + codes 1408 + absmax 4·44
    path = str(write(tmp_path, SMALL, "big_vocab.json"))
    gpu = plan_memory(PlanConfig(path, gpus=3, max_length=64, batch_size=1, lora_r=4, max_tokens_per_batch=256))
    assert gpu.scenario("stage2").load_breakdown == {
        "load: weights resident (sharded)": -(-(36864 + 2 * 33088) // 3) + 4608 + -(-4 * 8192 // 3),
        key: 2 * 2816 + 1408 + 4 * 44,
        "load: CUDA/NCCL overhead (fixed)": OVERHEAD_BYTES}  # the whole LoRA copy sits in host memory
    assert gpu.scenario("stage1_bf16").load_breakdown[key] == 0
    # one process: the whole matrix, 8192 weights in bf16 + 4096 codes + 4·128 absmax; plain weights 0 on a GPU
    one = plan_memory(PlanConfig(path, gpus=1, max_length=64, lora_r=4, max_tokens_per_batch=256))
    assert one.scenario("stage1_nf4").load_breakdown[key] == 2 * 8192 + 4096 + 512


def test_loading_peak_can_decide_the_fit(tmp_path):
    """A big vocabulary and a short stage-one batch: loading, not scoring, is the peak, and decides the fit."""
    path = str(write(tmp_path, {**SMALL, "vocab_size": 65536}))
    cfg = PlanConfig(path, gpus=1, cpu=True, max_length=16, max_tokens_per_batch=16, lora_r=4, gpu_memory="0.015GB",
                     attention="dense")
    s1 = plan_memory(cfg).scenario("stage1_bf16")
    weights = 2 * (2 * 36992 + 65536 * 64 + 64)                      # P = 4,268,352 in bf16, one GPU
    assert s1.load == weights + 2 * 65536 * 64 == 16925312            # + the whole embedding read in bf16
    # run: hidden states 2·16·64·2 + one layer 16·1408 + head 16·65536·(2+4) + 16·64·2 + the dense mask 16²
    assert s1.run == weights + 4096 + 22528 + 6291456 + 2048 + 256 == 14857088
    assert s1.total == s1.load and s1.run < 0.015 * GIB < s1.total and not s1.fits  # the run alone would fit
    assert plan_memory(PlanConfig(path, gpus=1, cpu=True, max_length=16, max_tokens_per_batch=16, lora_r=4,
                                  gpu_memory="0.016GB")).scenario("stage1_bf16").fits
    text = format_plan(plan_memory(cfg))
    assert "load peak" in text and "total = max(run, load)" in text and "  run peak" in text


def test_72b_on_8_gpus_absmax_whole_and_loading_peak(tmp_path):
    plan = plan_memory(PlanConfig(str(write(tmp_path, QWEN25_72B)), gpus=8, gpu_memory="80GB"))
    p_lin = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568)   # 70,212,648,960 NF4-quantised
    p_oth = 72_706_203_648 - p_lin                                         # 2,493,554,688 kept in bf16
    codes, absmax = p_lin // 2, 4 * p_lin // 64                           # 35,106,324,480 and 4,388,290,560
    before = (codes + absmax + 2 * p_oth) // 8                            # absmax divided by 8 (the old plan)
    after = (codes + 2 * p_oth) // 8 + absmax
    assert after - before == 7 * absmax // 8 == 3_839_754_240             # 3.58 GiB more per GPU
    assert 3.5 * GIB < after - before < 3.6 * GIB
    assert plan.scenario("stage2").breakdown["base weights NF4 (sharded)"] == after == 9_399_969_792
    assert plan.scenario("stage1_nf4").breakdown["reference weights (sharded)"] == after
    # loading, stage one bf16 on GPUs: 2P/8 (each slice passes through host memory, not the GPU)
    s1 = plan.scenario("stage1_bf16")
    assert s1.load == 2 * 72_706_203_648 // 8 + OVERHEAD_BYTES
    assert s1.total == s1.run > s1.load  # at 8 GPUs the scoring peak dominates
    # the root unit (embedding + untied head + final norm, bf16) is the largest gathered unit: 4.64 GiB once more
    root = 2 * (2 * 152064 * 8192 + 8192)
    assert root > 2 * 877_684_736  # a bf16 layer
    assert s1.breakdown["all-gather copy-out, largest unit (transient)"] == root == 4_982_849_536
    assert plan.scenario("stage2").breakdown["all-gather copy-out, largest unit (transient)"] == root
    # NF4 on GPUs: the largest linear (29568 x 8192) gives each GPU 2·⌈⌈w/2⌉/8⌉ = 30277632 weights, whole
    # 64-blocks + 1 = 30277696, in bf16 + codes + absmax
    m = 30277632 + 64
    key = "load: largest tensor's slice in flight"
    assert plan.scenario("stage2").load_breakdown[key] == 2 * m + m // 2 + 4 * m // 64


def test_log_prob_head_chunk_is_the_devices_default(tmp_path):
    """--chunk-size defaults per device (stages.base.constants.CHUNK_BY_DEVICE): 2048 positions on CUDA, 256 on CPU."""
    path = str(write(tmp_path, QWEN25_72B))
    gpu, cpu = (plan_memory(PlanConfig(path, gpus=8, cpu=c)) for c in (False, True))
    # stage one, T1 = 8192 tokens per forward (the default --max-tokens-per-batch): one chunk of bf16 + fp32 logits,
    # plus the gathered rows [T1, h] in bf16
    assert gpu.scenario("stage1_bf16").breakdown["log-prob head"] == 2048 * 152064 * 6 + 8192 * 8192 * 2
    assert cpu.scenario("stage1_bf16").breakdown["log-prob head"] == 256 * 152064 * 6 + 8192 * 8192 * 2
    # stage two, T = 4096: chunk min(2048, T) with both gradients (2+4+4+2), plus 3 bf16 [T, h]
    assert gpu.scenario("stage2").breakdown["log-prob head"] == 2048 * 152064 * 12 + 3 * 4096 * 8192 * 2


# ------------------------------------------------------------------------------ issue 24: the layout, the dense mask
STAGE_KEYS = {"stage1_bf16": 1, "stage1_nf4": 1, "stage2": 2}


@pytest.mark.parametrize("flags,stage1,stage2", [
    # T = 2048: one pair row of 2·1024 tokens in each stage, packed or not: 2048² = 4 MiB per forward
    (dict(max_length=1024, batch_size=1, max_tokens_per_batch=2048, pack=False), (1, 2048), (1, 2048)),
    (dict(max_length=1024, batch_size=1, max_tokens_per_batch=2048, pack=True), (1, 2048), (1, 2048)),
    # T = 8192 as one row: pair rows of 2·4096, one per forward: 8192² = 64 MiB
    (dict(max_length=4096, batch_size=1, max_tokens_per_batch=8192, pack=False), (1, 8192), (1, 8192)),
    # 8192 tokens as 4 rows of 2048 (4·2048² = 16 MiB), or --pack's one sequence of 8192 (8192² = 64 MiB)
    (dict(max_length=1024, batch_size=4, max_tokens_per_batch=8192, pack=False), (4, 2048), (4, 2048)),
    (dict(max_length=1024, batch_size=4, max_tokens_per_batch=8192, pack=True), (1, 8192), (1, 8192)),
])
def test_dense_mask_term_by_hand(tmp_path, flags, stage1, stage2):
    """Dense attention holds a [B, 1, T, T] bool mask per forward, B·T² bytes; segments none: the stage columns differ
    by exactly that term, every other row (and the naive and online-ref columns) the same."""
    from stages.tools.planterms import mask_bytes, stage_sequences

    path = str(write(tmp_path, SMALL))
    dense = plan_memory(PlanConfig(path, gpus=2, lora_r=4, attention="dense", **flags))
    seg = plan_memory(PlanConfig(path, gpus=2, lora_r=4, attention="segments", **flags))
    assert (dense.attention, seg.attention) == ("dense", "segments")
    by_hand = {1: stage1[0] * stage1[1] ** 2, 2: stage2[0] * stage2[1] ** 2}
    assert by_hand[1] in (2048 ** 2, 4 * 2048 ** 2, 8192 ** 2) and 8192 ** 2 == 64 * 2 ** 20
    assert (stage_sequences(dense.config, 1), stage_sequences(dense.config, 2)) == (stage1, stage2)
    for key, stage in STAGE_KEYS.items():
        d, s = dense.scenario(key), seg.scenario(key)
        assert d.breakdown[MASK_LABEL] == mask_bytes(dense.config, stage) == by_hand[stage], key
        assert MASK_LABEL not in s.breakdown
        assert d.run - s.run == by_hand[stage] and d.load == s.load
        assert {k: v for k, v in d.breakdown.items() if k != MASK_LABEL} == s.breakdown
    for key in ("naive", "online_ref"):  # other trainers' layouts: no mask term
        assert dense.scenario(key) == seg.scenario(key) and MASK_LABEL not in dense.scenario(key).breakdown


def test_pack_changes_only_the_sequences(tmp_path):
    """--pack: one sequence of the budget per forward (stage one T1, stage two batch_size·2·max_length), no padding;
    unpacked: ⌊T1 / W1⌋ rows of W1 = min(2·max_length, T1) in stage one, batch_size rows of 2·max_length in stage
    two. The activations count the full budget either way, so only the mask's shape changes."""
    from stages.tools.planterms import stage_sequences

    path = str(write(tmp_path, SMALL))
    kw = dict(gpus=2, lora_r=4, max_length=1024, batch_size=3, max_tokens_per_batch=8192)
    flat, packed = (plan_memory(PlanConfig(path, pack=p, attention="dense", **kw)) for p in (False, True))
    assert stage_sequences(flat.config, 1) == (8192 // 2048, 2048) and stage_sequences(flat.config, 2) == (3, 2048)
    assert stage_sequences(packed.config, 1) == (1, 8192) and stage_sequences(packed.config, 2) == (1, 3 * 2048)
    # a budget below one pair row: one row of the budget (the longest rows are cut, as the plan's note says)
    short = PlanConfig(path, max_length=1024, max_tokens_per_batch=1500)
    assert stage_sequences(short, 1) == (1, 1500)
    mask = {1: (4 * 2048 ** 2, 8192 ** 2), 2: (3 * 2048 ** 2, 6144 ** 2)}
    for key, stage in STAGE_KEYS.items():
        a, b = flat.scenario(key).breakdown, packed.scenario(key).breakdown
        assert (a[MASK_LABEL], b[MASK_LABEL]) == mask[stage]
        assert {k: v for k, v in a.items() if k != MASK_LABEL} == {k: v for k, v in b.items() if k != MASK_LABEL}
    seg = [plan_memory(PlanConfig(path, attention="segments", pack=p, **kw)) for p in (False, True)]
    assert seg[0].scenarios == seg[1].scenarios  # segments, no mask: packing changes nothing the plan counts


def test_attention_and_layout_lines(tmp_path):
    """The printed plan names the attention and the layout it assumed, with the mask's arithmetic per stage."""
    path = str(MODELS / "qwen2.5-72b-instruct")
    text = format_plan(plan_memory(PlanConfig(path, pack=True, attention="dense")))
    assert ("attention: dense [B, 1, T, T] bool mask (sdpa), per forward: stage one 1 x 8192^2 x 1 B = 64 MiB, "
            "stage two 1 x 4096^2 x 1 B = 16 MiB") in text
    assert ("layout: packed (--pack), prompts back to back, no padding but at the end: stage one 1 sequence of 8,192 "
            "tokens per forward, stage two 1 sequence of 4,096") in text
    assert "--pack with the dense mask: one [T, T] mask over the whole packed sequence" in text
    assert f"  {MASK_LABEL}" in text and "attention scores are not counted anywhere here" in text
    text = format_plan(plan_memory(PlanConfig(path, attention="dense")))
    assert "stage one 2 x 4096^2 x 1 B = 32 MiB, stage two 1 x 4096^2 x 1 B = 16 MiB" in text
    assert ("layout: unpacked, one [prompt | chosen | rejected] row per pair padded to the longest: stage one 2 rows "
            "of 4,096 tokens per forward, stage two 1 row of 4,096") in text
    seg = format_plan(plan_memory(PlanConfig(path, attention="segments")))
    assert "attention: segments (no [T, T] mask: per segment from the rows' boundaries)" in seg
    assert MASK_LABEL not in seg and "largest attention intermediate is one segment's q.k" in seg
    # auto: segments for the model types the plan counts (their attention goes through transformers' interface)
    auto = plan_memory(PlanConfig(path))  # the default: auto
    assert auto.attention == "segments" and "--attention auto takes it for qwen2" in format_plan(auto)
    other = plan_memory(PlanConfig(str(write(tmp_path, {**SMALL, "model_type": "olmo"})), attention="auto"))
    assert other.attention == "dense" and "(--attention auto: model_type 'olmo' is counted dense)" in format_plan(other)


def test_attention_and_pack_options(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main
    path = str(write(tmp_path, SMALL))
    with pytest.raises(UserError, match="--attention 'flash' is not one of dense, segments, auto"):
        plan_memory(PlanConfig(path, attention="flash"))
    with pytest.raises(UserError, match="--pack takes true or false"):
        plan_memory(PlanConfig(path, pack="yes"))
    res = CliRunner().invoke(main, ["plan", "--model", path, "--gpus", "2", "--attention", "segments", "--pack"])
    assert res.exit_code == 0, res.output
    assert "attention: segments" in res.output and "layout: packed (--pack)" in res.output
    res = CliRunner().invoke(main, ["plan", "--model", path, "--attention", "flash"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    # the stages' own file: `dpo plan --config` takes their --attention and --pack
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"shared:\n  model: {path}\ntrain:\n  attention: auto\n  pack: true\n  learning_rate: 1.0e-5\n")
    res = CliRunner().invoke(main, ["plan", "--config", str(cfg), "--gpus", "1"])
    assert res.exit_code == 0, res.output
    assert "--attention auto takes it for llama" in res.output and "layout: packed (--pack)" in res.output
