"""The streamed LoRA merge (stages/model/merge.py, issue 25): merged logits == PeftModel(base, adapter) logits in
the same precision (tests/bounds.py merge_logit_tol), into original or NF4-dequantized weights; shards, errors,
and what the merge holds in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.multiprocessing.reductions import StorageWeakRef

from stages.base.errors import MAX_CHARS, UserError
from stages.model import merge as M
from stages.model.merge import MergeJob, adapter_problem, merge, output_bytes
from stages.model.quiet import import_bitsandbytes
from tests.bounds import merge_logit_tol, own_rounding

IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.double()


def hf(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def peft_logits(folder: Path, adapter: Path | None, dtype: torch.dtype) -> torch.Tensor:
    """PeftModel(base loaded in `dtype`, adapter): what the merged model must equal (no adapter: the base)."""
    import_bitsandbytes(required=False)
    from peft import PeftModel

    model = hf(folder, dtype)
    return logits(PeftModel.from_pretrained(model, str(adapter)) if adapter else model)


def run_merge(base: Path, adapter: Path | None, out: Path, dtype=torch.float32, merge_into="original",
              nf4_dtype=torch.float32, max_shard_bytes=10**9) -> M.MergeReport:
    out.mkdir(parents=True)
    job = MergeJob(base, adapter, dtype, merge_into, nf4_dtype, max_shard_bytes)
    report = merge(job, out, say=lambda line: None)
    assert report.bytes == output_bytes(job) == sum(f.stat().st_size for f in out.iterdir())
    shutil.copy(base / "config.json", out)  # the caller's part (stages/tools/export.py)
    return report


def random_lora(base: Path, out: Path, seed: int, std: float, **config) -> Path:
    """A LoRA on every linear layer with B drawn (std) so that it is not a no-op; saved as PEFT saves it."""
    import_bitsandbytes(required=False)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf(base, torch.float32), LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM",
                                                               **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)
    model.save_pretrained(str(out))
    return out


def continue_lora(base: Path, sft: Path, out: Path, seed: int) -> Path:
    """`dpo train --adapter SFT`: the SFT adapter loaded trainable and moved on (here: one random step on every
    LoRA weight), saved with the SFT adapter's own config (rank_pattern, alpha_pattern included)."""
    import_bitsandbytes(required=False)
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf(base, torch.float32), str(sft), is_trainable=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p), alpha=0.05)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen2, tmp_path_factory) -> dict:
    """arch -> precision -> model folder: the fp32 fixtures and bf16 copies of them (a bf16 base)."""
    root = tmp_path_factory.mktemp("merge_bases")
    out = {}
    for arch, folder in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        hf(folder, torch.bfloat16).save_pretrained(str(root / arch))
        out[arch] = {"fp32": folder, "bf16": root / arch}
    return out


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict:
    """arch -> name -> adapter: "sft" (rank_pattern + alpha_pattern), "run" (that SFT adapter continued by
    training), "rs" (rslora)."""
    root = tmp_path_factory.mktemp("merge_adapters")
    out = {}
    for i, arch in enumerate(("llama", "qwen2")):
        base = bases[arch]["fp32"]
        sft = random_lora(base, root / arch / "sft", 10 + i, 0.1, r=4, lora_alpha=8, rank_pattern={"q_proj": 8},
                          alpha_pattern={"down_proj": 3})
        out[arch] = {"sft": sft, "run": continue_lora(base, sft, root / arch / "run", 20 + i),
                     "rs": random_lora(base, root / arch / "rs", 30 + i, 0.1, r=8, lora_alpha=16, use_rslora=True)}
    return out


def with_config(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return out


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("which", ["run", "rs"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_equals_peft_in_the_same_precision(bases, adapters, arch, precision, which, tmp_path):
    base, adapter, dtype = bases[arch][precision], adapters[arch][which], DTYPES[precision]
    report = run_merge(base, adapter, tmp_path / "out", dtype)
    assert report.merged == 14 and report.tensors == len(load_file(str(tmp_path / "out" / "model.safetensors")))
    merged, peft = logits(hf(tmp_path / "out", dtype)), peft_logits(base, adapter, dtype)
    tol = merge_logit_tol(own_rounding(peft, peft_logits(base, adapter, torch.float64)))
    assert float((merged - peft).abs().max()) <= tol
    # the bound can fail: the adapter's own effect is far outside it ...
    assert float((peft_logits(base, None, dtype) - merged).abs().max()) > tol
    if which == "run":  # ... and so is merging the SFT adapter the run started from instead of the continued one
        assert float((peft_logits(base, adapters[arch]["sft"], dtype) - merged).abs().max()) > tol


@pytest.mark.parametrize("which, wrong", [("sft", {"alpha_pattern": {}}), ("rs", {"use_rslora": False})])
def test_the_bound_catches_a_wrong_scaling(bases, adapters, which, wrong, tmp_path):
    """bf16, the loosest bound: PEFT with alpha_pattern ignored (or lora_alpha / r for rslora) is outside it."""
    base, adapter = bases["qwen2"]["bf16"], adapters["qwen2"][which]
    run_merge(base, adapter, tmp_path / "out", torch.bfloat16)
    merged = logits(hf(tmp_path / "out", torch.bfloat16))
    tol = merge_logit_tol(own_rounding(peft_logits(base, adapter, torch.bfloat16),
                                       peft_logits(base, adapter, torch.float64)))
    bad = peft_logits(base, with_config(adapter, tmp_path / "wrong", **wrong), torch.bfloat16)
    assert float((bad - merged).abs().max()) > tol


def nf4_peft(base: Path, adapter: Path, dtype: torch.dtype):
    """The trained model: PEFT on the NF4 base, loaded as stage two loads it; and its dequantized weights."""
    from stages.model.loading import checkpoint_name
    from stages.model.models import ModelSpec, dtype_name, load_model

    bnb = import_bitsandbytes()
    model = load_model(ModelSpec(str(base), dtype=dtype_name(dtype), load_in_4bit=True, adapter=str(adapter)),
                       torch.device("cpu"))
    deq = {checkpoint_name(f"{n}.weight"): bnb.functional.dequantize_4bit(m.weight.data, m.quant_state)
           for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return logits(model), deq


def exact_nf4(base: Path, adapter: Path, deq: dict) -> torch.Tensor:
    """float64 PeftModel on the NF4 model's own dequantized weights: the exact function the trained model
    computes."""
    from peft import PeftModel

    model = hf(base, torch.float64)
    state = model.state_dict()
    assert deq.keys() <= state.keys() and len(deq) == 14
    model.load_state_dict({**state, **{k: v.double() for k, v in deq.items()}})
    return logits(PeftModel.from_pretrained(model, str(adapter)))


@pytest.mark.parametrize("arch, precision", [("llama", "fp32"), ("qwen2", "fp32"), ("qwen2", "bf16")])
def test_dequantized_equals_peft_on_the_nf4_base(bases, adapters, arch, precision, tmp_path):
    """merge_into dequantized == the trained PeftModel on its NF4 base (compute dtype fp32 as on CPU, bf16 as on
    GPU); merge_into original is outside the same bound (the NF4 error is what tells them apart)."""
    base, adapter, dtype = bases[arch]["fp32"], adapters[arch]["run"], DTYPES[precision]
    trained, deq = nf4_peft(base, adapter, dtype)
    tol = merge_logit_tol(own_rounding(trained, exact_nf4(base, adapter, deq)))
    report = run_merge(base, adapter, tmp_path / "deq", dtype, "dequantized", nf4_dtype=dtype)
    assert report.dequantized == 14 and report.merged == 14
    assert float((logits(hf(tmp_path / "deq", dtype)) - trained).abs().max()) <= tol
    run_merge(base, adapter, tmp_path / "orig", dtype, "original")
    assert float((logits(hf(tmp_path / "orig", dtype)) - trained).abs().max()) > tol


# ------------------------------------------------------------------------------------------------ layout
def test_shards_index_and_the_base_layout(bases, adapters, tmp_path):
    base, adapter = bases["qwen2"]["fp32"], adapters["qwen2"]["run"]
    run_merge(base, adapter, tmp_path / "one")
    report = run_merge(base, adapter, tmp_path / "many", max_shard_bytes=60_000)
    n = len(report.shards)
    assert n > 3 and report.shards == tuple(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))
    index = json.loads((tmp_path / "many" / M.INDEX).read_text())
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {k: v for f in report.shards for k, v in load_file(str(tmp_path / "many" / f)).items()}
    assert index["weight_map"].keys() == one.keys() == many.keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in one.values())
    for f in report.shards:  # each within max_shard_bytes, or one tensor alone (the 131 kB embedding, the head)
        part = load_file(str(tmp_path / "many" / f))
        assert sum(v.nbytes for v in part.values()) <= 60_000 or len(part) == 1
        assert all(index["weight_map"][k] == f for k in part)
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert torch.equal(logits(hf(tmp_path / "many", torch.float32)), logits(hf(tmp_path / "one", torch.float32)))
    # the base's own names: the tied Llama stores no head, and none is written
    run_merge(bases["llama"]["fp32"], adapters["llama"]["run"], tmp_path / "tied")
    written = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert written.keys() == load_file(str(bases["llama"]["fp32"] / "model.safetensors")).keys()
    assert "lm_head.weight" not in written


def test_no_adapter_casts_only(bases, tmp_path):
    report = run_merge(bases["qwen2"]["fp32"], None, tmp_path / "out", torch.bfloat16)
    assert report.merged == 0
    want = load_file(str(bases["qwen2"]["fp32"] / "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k].to(torch.bfloat16), got[k]) for k in want)


def test_refuses_a_folder_with_weights(bases, tmp_path):
    run_merge(bases["qwen2"]["fp32"], None, tmp_path / "out")
    with pytest.raises(UserError, match="holds safetensors already"):
        merge(MergeJob(bases["qwen2"]["fp32"], None, torch.float32, "original", torch.float32, 10**9), tmp_path / "out")


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("merge_into", ["original", "dequantized"])
def test_streamed_in_chunks_one_at_a_time(bases, adapters, merge_into, tmp_path, monkeypatch):
    """Never more than one chunk of base rows alive at once (StorageWeakRef of everything read and written), and
    chunking changes no bit of the output."""
    base, adapter = bases["qwen2"]["fp32"], adapters["qwen2"]["run"]
    run_merge(base, adapter, tmp_path / "whole", merge_into=merge_into)
    monkeypatch.setattr(M, "CHUNK_BYTES", 4096)  # 16 rows of 64 fp32, 8 of 128: every tensor in several chunks
    seen, read, write = [], M._read, M._write

    def tracked_read(t, start, stop):
        assert all(ref.expired() for ref in seen), "a chunk read before the last one was let go"
        out = read(t, start, stop)
        assert out.nbytes <= 4096
        seen.append(StorageWeakRef(out.untyped_storage()))
        return out

    def tracked_write(f, x):
        seen.append(StorageWeakRef(x.untyped_storage()))
        write(f, x)

    monkeypatch.setattr(M, "_read", tracked_read)
    monkeypatch.setattr(M, "_write", tracked_write)
    run_merge(base, adapter, tmp_path / "chunks", merge_into=merge_into)
    assert len(seen) > 200
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    chunks = load_file(str(tmp_path / "chunks" / "model.safetensors"))
    assert all(torch.equal(whole[k], chunks[k]) for k in whole)


@pytest.mark.parametrize("row", [48, 64, 100])
def test_nf4_chunks_are_whole_blocks(row, monkeypatch):
    """The NF4 round trip of block-aligned row chunks equals the whole tensor's (blocks run over the flattened
    matrix: a chunk that started inside a block would quantize it differently)."""
    w = torch.randn(97, row, generator=torch.Generator().manual_seed(0))
    t = M.StoredTensor(Path("unused"), torch.float32, (97, row), 0)
    monkeypatch.setattr(M, "CHUNK_BYTES", 4 * row * 5)  # 5 rows: not block-aligned for 48 or 100
    step = M._step(t, nf4=True)
    assert step * row % 64 == 0
    parts = [M.nf4_round_trip(w[r:r + step], torch.float32) for r in range(0, 97, step)]
    assert torch.equal(torch.cat(parts), M.nf4_round_trip(w, torch.float32))


# ------------------------------------------------------------------------------------------------ errors
def test_an_unused_or_misfit_lora_pair_is_an_error(bases, adapters, tmp_path):
    base, adapter = bases["llama"]["fp32"], adapters["llama"]["run"]
    bad = shutil.copytree(adapter, tmp_path / "extra")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    extra = {k.replace("layers.0.", "layers.7."): v.clone() for k, v in weights.items() if k.startswith(stem)}
    save_file({**weights, **extra}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"LoRA pair base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight "
                                        r"is unused: the base has no tensor model.layers.7.self_attn.q_proj.weight"):
        run_merge(base, bad, tmp_path / "out1")
    assert not any((tmp_path / "out1").iterdir())  # nothing written
    misfit = shutil.copytree(adapter, tmp_path / "misfit")
    weights[f"{stem}.lora_A.weight"] = weights[f"{stem}.lora_A.weight"][:, :32].contiguous()
    save_file(weights, str(misfit / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"q_proj has lora_A \[8, 32\], lora_B \[64, 8\] but base .* is \[64, 64\]"):
        run_merge(base, misfit, tmp_path / "out2")


PROBLEMS = [
    ({"use_dora": True}, "DoRA (use_dora) is set"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out is set"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is set"),
    ({"bias": "all"}, "bias='all' trains base biases"),
    ({"peft_type": "IA3"}, "peft_type 'IA3', not LORA"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changed the base weights"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices is set"),
]


@pytest.mark.parametrize("change, words", PROBLEMS)
def test_adapter_problems_one_line_each(adapters, bases, change, words, tmp_path):
    bad = with_config(adapters["llama"]["run"], tmp_path / "bad", **change)
    line = adapter_problem(bad)
    assert words in line and str(bad) in line and "\n" not in line and len(line) <= MAX_CHARS + len(str(bad))
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run_merge(bases["llama"]["fp32"], bad, tmp_path / "out")


def test_adapter_problems_of_the_files(adapters, tmp_path):
    good = adapters["llama"]["run"]
    assert adapter_problem(good) is None
    assert "no such folder" in adapter_problem(tmp_path / "nowhere")
    assert "no adapter_config.json" in adapter_problem(shutil.copytree(good, tmp_path / "a", ignore=_only("config")))
    bin_only = shutil.copytree(good, tmp_path / "b", ignore=_only("model"))
    (bin_only / "adapter_model.bin").write_bytes(b"")
    assert "only adapter_model.bin: re-save it with safetensors" in adapter_problem(bin_only)
    weights = load_file(str(good / "adapter_model.safetensors"))
    half = shutil.copytree(good, tmp_path / "c")
    save_file({k: v for k, v in weights.items() if not k.endswith("q_proj.lora_B.weight")},
              str(half / "adapter_model.safetensors"))
    assert "q_proj.lora_A.weight has no lora_B.weight partner" in adapter_problem(half)
    emb = shutil.copytree(good, tmp_path / "d")
    save_file({**weights, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)},
              str(emb / "adapter_model.safetensors"))
    assert "embed_tokens.lora_embedding_A is not a LoRA A/B weight" in adapter_problem(emb)


def _only(which: str):
    return lambda folder, names: [n for n in names if n.startswith(f"adapter_{which}")]
