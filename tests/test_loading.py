"""Sharded loading (stages/model/loading.py): values equal today's `from_pretrained` loading, bit for bit; each rank
materializes only its shard, counted (not timed); NF4 codes are uint8 and survive a float round trip.

The oracle is transformers' own loading (+ PEFT for adapters), as the stages did it before sharded loading:
`from_pretrained(dtype=...)` (NF4: BitsAndBytesConfig, bf16 or uint8 storage), then `PeftModel.from_pretrained` /
`get_peft_model`. Equality is exact (same bytes read, same conversions, same quantizer, same RNG draws).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.base.errors import UserError
from stages.model.loading import index_checkpoint, read_flat, read_rows
from stages.model.models import LoraSettings, ModelSpec, fix_bnb_cpu, load_model, load_policy
from tests.test_train_dist import free_port

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_load(path: Path, nf4: bool, storage: torch.dtype = torch.uint8):
    """Today's loading: transformers reads and (NF4) quantizes the whole model in one process."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict = dict(dtype=torch.float32, use_safetensors=True)
    if nf4:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=False, bnb_4bit_quant_storage=storage)
        kw["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    fix_bnb_cpu(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def assert_same_model(ours, oracle) -> None:
    a, b = ours.state_dict(), oracle.state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    bufs = dict(oracle.named_buffers())
    assert all(torch.equal(t, bufs[n]) for n, t in ours.named_buffers())
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, oracle(IDS).logits)


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_values_equal_from_pretrained(arch, nf4, request):
    path = request.getfixturevalue(arch)  # llama: tied head; qwen2: untied head, qkv biases
    assert_same_model(load_model(ModelSpec(str(path), "fp32", nf4), CPU), hf_load(path, nf4))


def test_nf4_equals_the_bf16_storage_it_replaces(tiny_qwen2):
    """The codes are the same bytes as with bf16 storage (the previous layout), so cached values are unchanged."""
    ours = load_model(ModelSpec(str(tiny_qwen2), "fp32", True), CPU)
    old = hf_load(tiny_qwen2, True, storage=torch.bfloat16)
    q, o = ours.model.layers[0].mlp.down_proj.weight, old.model.layers[0].mlp.down_proj.weight
    assert q.dtype == torch.uint8 and o.dtype == torch.bfloat16
    assert torch.equal(q.data.flatten(), o.data.flatten().view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, old(IDS).logits)


def test_uint8_codes_survive_the_float_round_trip_that_breaks_bf16(tiny_qwen2):
    """FSDP2's CUDA copy-in goes through float; reproduced here on CPU: uint8 codes come back unchanged, the same
    bytes stored as bf16 do not (NaN patterns are canonicalized) - the test can tell the two apart."""
    packed = load_model(ModelSpec(str(tiny_qwen2), "fp32", True), CPU).model.layers[0].mlp.up_proj.weight.data
    assert torch.equal(packed.float().to(torch.uint8), packed)
    words = torch.cat([packed.flatten(), torch.tensor([0xC1, 0x7F], dtype=torch.uint8)])  # + one NaN bf16 word
    as_bf16 = words[: words.numel() // 2 * 2].view(torch.bfloat16)
    assert not torch.equal(as_bf16.float().bfloat16().view(torch.uint8), words[: as_bf16.numel() * 2])


def test_cache_records_the_storage(tiny_llama, hh_path, tmp_path):
    from stages.cache import refcache
    from stages.settings.commands import PrecomputeConfig
    from stages.stage1 import precompute
    from tests.hhrows import hh_rows, write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", hh_rows(hh_path, 0, 3))
    out = tmp_path / "ref.parquet"
    precompute.run(PrecomputeConfig.flat(model=str(tiny_llama), data=(str(data),), output=str(out), load_in_4bit=True,
                                         max_length=64, max_prompt_length=32))
    meta = refcache.read_meta(out)
    assert meta["quantization"] == meta["manifest"]["quantization"] == "nf4(storage=uint8,double_quant=False)"
    packed = load_model(ModelSpec(str(tiny_llama), "fp32", True), CPU).model.layers[0].mlp.up_proj.weight
    assert packed.dtype == torch.uint8


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(hf_load(base, False), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter: B != 0
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_adapter_equals_peft_loading(tiny_llama, tmp_path, nf4):
    from peft import PeftModel

    adapter = make_adapter(tiny_llama, tmp_path / "sft")
    spec = ModelSpec(str(tiny_llama), "fp32", nf4, str(adapter))
    frozen = PeftModel.from_pretrained(hf_load(tiny_llama, nf4), str(adapter))
    assert_same_model(load_model(spec, CPU), frozen)
    trainable = PeftModel.from_pretrained(hf_load(tiny_llama, nf4), str(adapter), is_trainable=True)
    ours = load_policy(spec, LoraSettings(), CPU, False)
    assert_same_model(ours, trainable)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in trainable.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_new_lora_draws_what_peft_draws(tiny_llama, nf4):
    """Same seed, same LoRA init as get_peft_model on a loaded model (TRL's runs and ours start alike)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(11)
    ours = load_policy(ModelSpec(str(tiny_llama), "fp32", nf4), lora, CPU, False)
    torch.manual_seed(11)
    oracle = get_peft_model(hf_load(tiny_llama, nf4), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    assert_same_model(ours, oracle)
    assert any("lora_A" in n for n in ours.state_dict())


def test_reads_exactly_the_rows_asked(tiny_qwen2):
    stored = index_checkpoint(tiny_qwen2)
    full = load_file(next(tiny_qwen2.glob("*.safetensors")))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.bias", "lm_head.weight"):
        t = stored[name]
        assert torch.equal(read_rows(t, 3, 7), full[name][3:7])
        assert torch.equal(read_flat(t, 5, 50), full[name].flatten()[5:50])


def test_long_reads_continue_and_a_cut_file_is_one_line(tiny_qwen2, tmp_path, monkeypatch):
    """os.preadv returns at most 2 GiB per call on Linux: a short read goes on where it stopped."""
    import stages.model.loading as loading

    t = index_checkpoint(tiny_qwen2)["lm_head.weight"]
    real = os.preadv
    monkeypatch.setattr(loading.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))
    assert torch.equal(read_flat(t, 0, t.numel), load_file(t.file)["lm_head.weight"].flatten())
    monkeypatch.undo()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(t.file.read_bytes()[: t.offset + 100])
    with pytest.raises(UserError, match="ends inside a tensor"):
        read_flat(loading.StoredTensor(cut, t.dtype, t.shape, t.offset), 0, t.numel)


def copy_model(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(next(src.glob("*.safetensors")))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_incomplete_or_foreign_checkpoint_is_one_line(tiny_qwen2, tmp_path):
    missing = copy_model(tiny_qwen2, tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(UserError, match=r"no tensor model\.norm\.weight in its \*\.safetensors files"):
        load_model(ModelSpec(str(missing), "fp32"), CPU)

    def widen(t):
        t["model.norm.weight"] = torch.ones(t["model.norm.weight"].numel() + 1)
    shape = copy_model(tiny_qwen2, tmp_path / "shape", widen)
    with pytest.raises(UserError, match=r"model\.norm\.weight has shape \[\d+\] in the checkpoint but") as e:
        load_model(ModelSpec(str(shape), "fp32"), CPU)
    assert len(str(e.value)) <= 200 and "\n" not in str(e.value)


def test_unused_checkpoint_tensors_are_counted(tiny_qwen2, tmp_path, capsys):
    extra = copy_model(tiny_qwen2, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    model = load_model(ModelSpec(str(extra), "fp32"), CPU)
    assert "load: 1 tensor(s) in" in capsys.readouterr().out
    assert_same_model(model, hf_load(tiny_qwen2, False))
    load_model(ModelSpec(str(tiny_qwen2), "fp32"), CPU)
    assert "load:" not in capsys.readouterr().out


PROBE = textwrap.dedent("""
    import json, sys, torch
    from stages.model import loading
    from stages.model.distributed import init_distributed
    from stages.model.models import LoraSettings, ModelSpec, load_model, load_policy
    env = init_distributed()
    path, nf4, kind, out, dtype, adapter = sys.argv[1], sys.argv[2] == "1", *sys.argv[3:6], sys.argv[6] or None
    spec = ModelSpec(path, dtype, nf4, adapter)
    torch.manual_seed(11)
    model = (load_model(spec, env.device, env=env) if kind == "ref"
             else load_policy(spec, LoraSettings(r=4, alpha=8, dropout=0.0), env.device, False, env=env))
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    resident = sum(local(t).nbytes for _, t in model.named_parameters())
    resident += sum(t.nbytes for _, t in model.named_buffers())
    absmax = sum(m.quant_state.absmax.nbytes for m in model.modules() if getattr(m, "quant_state", None) is not None)
    with torch.no_grad():
        logits = model(torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))).logits
    full = {n: p.full_tensor() for n, p in model.named_parameters() if "lora" in n}
    if env.rank == 0:
        torch.save({"logits": logits, "lora": full}, out)
    with open(f"{out}.rank{env.rank}.json", "w") as f:  # a file each: 4 processes' stdout lines may interleave
        json.dump({"rank": env.rank, "resident": resident, "absmax": absmax, **loading.LOAD_STATS}, f)
""")


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def unit_bytes(model) -> tuple[int, int]:
    """(whole model, largest FSDP unit) in parameter bytes as loaded; a unit is a decoder layer or the rest."""
    total = sum(p.nbytes for p in model.parameters())
    layers = [sum(p.nbytes for p in layer.parameters()) for layer in model.model.layers]
    return total, max(*layers, total - sum(layers))


CASES = {"fp32-ref": (False, "ref", "fp32", False), "nf4-policy": (True, "policy", "fp32", False),
         "bf16-ref-adapter": (False, "ref", "bf16", True), "nf4-policy-adapter": (True, "policy", "fp32", True)}


@pytest.mark.dist
@pytest.mark.parametrize("world,case", [(2, c) for c in CASES] + [(4, "fp32-ref"), (4, "nf4-policy")])
def test_each_rank_materializes_its_shard(tiny_qwen2, tmp_path, world, case):
    """Counted on every rank: parameter bytes held <= model/N + the largest unit (and, tighter, <= model/N + one row
    of padding per tensor, + the whole NF4 absmax, which FSDP2 does not shard); file bytes read <= file/N + two NF4
    blocks per tensor; values equal one process exactly."""
    nf4, kind, dtype, with_adapter = CASES[case]
    adapter = str(make_adapter(tiny_qwen2, tmp_path / "sft")) if with_adapter else None
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "rank0.pt"
    proc = torchrun(world, str(probe), str(tiny_qwen2), "1" if nf4 else "0", kind, str(out), dtype, adapter or "")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    counts = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    assert sorted(c["rank"] for c in counts) == list(range(world))

    torch.manual_seed(11)
    spec = ModelSpec(str(tiny_qwen2), dtype, nf4, adapter)
    one = load_model(spec, CPU) if kind == "ref" else load_policy(spec, LoraSettings(r=4, alpha=8, dropout=0.0),
                                                                 CPU, False)
    total, largest_unit = unit_bytes(one.get_base_model() if hasattr(one, "get_base_model") else one)
    rows = sum(p.nbytes // p.shape[0] for p in one.parameters() if p.dim())  # one row of each tensor
    blocks = sum(1 for _ in one.parameters()) * 2 * 64 * 4  # NF4: up to a block of fp32 weights each side
    files = sum(f.stat().st_size for f in tiny_qwen2.glob("*.safetensors"))
    for c in counts:
        held = c["resident"] + c["absmax"]
        print(f"world {world} rank {c['rank']}: holds {held} B of {total} B (/N = {total // world}); "
              f"read {c['bytes_read']} of {files} B, largest read {c['largest_read']}")
        assert held <= total / world + largest_unit
        assert c["resident"] <= total / world + rows
        assert c["bytes_read"] <= files / world + blocks
    got = torch.load(out, weights_only=True)
    with torch.no_grad():
        assert torch.equal(got["logits"], one(IDS).logits)
    lora = {n: p for n, p in one.named_parameters() if "lora" in n}
    assert got["lora"].keys() == lora.keys() and all(torch.equal(got["lora"][n], lora[n]) for n in lora)
