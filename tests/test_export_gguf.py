"""GGUF export (issue 25 item 5, stages/model/ggufwrite.py): a written file read back by the project's own GGUF
reader (stages.model.smollm.load_gguf, i.e. transformers' GGUF loader, which undoes llama.cpp's Q/K permutation)
gives the same weights and tokenizer, and gguf.GGUFReader lists the expected tensors and metadata."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from stages.base.errors import UserError
from stages.model.ggufwrite import GGUF_ARCHS, GGUF_TYPES, gguf_bytes, gguf_problem, write_gguf
from stages.model.smollm import load_gguf
from tests.tiny import IM_END, IM_START, build_tokenizer

TEXTS = (
    "Hello, world 2024!",
    f"{IM_START}user\nHi there{IM_END}\n{IM_START}assistant\n",
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "  leading spaces,\ttabs and ünïcödé ✅",
)
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
CAST = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _expected(state: dict, tensor_type: str) -> dict:
    """What the GGUF holds: matrices cast to tensor_type, 1-D tensors (norms, biases) kept in f32, as llama.cpp."""
    return {k: v.to(CAST[tensor_type]).float() if v.ndim > 1 else v for k, v in state.items()}


def _assert_round_trip(model_dir: Path, out: Path, tensor_type: str) -> None:
    """Weights of load_gguf(out) equal model_dir's (cast to the type), and so do the tokenizer's ids and template."""
    model, tok = load_gguf(out)
    ref_model, ref_tok = _hf(model_dir)
    got, want = model.state_dict(), _expected(ref_model.state_dict(), tensor_type)
    assert got.keys() == want.keys()
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"tensors differ after the round trip: {unequal}"
    assert model.config.tie_word_embeddings == ref_model.config.tie_word_embeddings
    for text in TEXTS:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
    assert (tok.eos_token, tok.eos_token_id) == (ref_tok.eos_token, ref_tok.eos_token_id)
    assert tok.chat_template == ref_tok.chat_template
    assert tok.apply_chat_template(CHAT, tokenize=False) == ref_tok.apply_chat_template(CHAT, tokenize=False)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
def test_round_trip_through_project_reader(fixture, tensor_type, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "model.gguf"
    said = []
    report = write_gguf(model_dir, out, tensor_type, say=said.append)
    assert report.path == out and report.n_bytes == out.stat().st_size == gguf_bytes(model_dir, tensor_type)
    assert (report.arch, report.tensor_type, report.tokenizer_pre) == (fixture.split("_")[1], tensor_type, "qwen2")
    assert report.vocab_size == 512 and len(said) == 1 and out.name in said[0]
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # the given path only
    _assert_round_trip(model_dir, out, tensor_type)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_gguf_reader_lists_tensors_and_metadata(fixture, request, tmp_path):
    from gguf import GGMLQuantizationType as Q, GGUFReader, TokenType

    model_dir = request.getfixturevalue(fixture)
    write_gguf(model_dir, tmp_path / "m.gguf", "f16", say=lambda _: None)
    reader = GGUFReader(tmp_path / "m.gguf")
    arch = fixture.split("_")[1]
    tensors = {t.name: (list(reversed(t.shape.tolist())), t.tensor_type) for t in reader.tensors}  # ggml order
    layer = {"attn_norm": ([64], Q.F32), "attn_q": ([64, 64], Q.F16), "attn_k": ([32, 64], Q.F16),
             "attn_v": ([32, 64], Q.F16), "attn_output": ([64, 64], Q.F16), "ffn_norm": ([64], Q.F32),
             "ffn_gate": ([128, 64], Q.F16), "ffn_up": ([128, 64], Q.F16), "ffn_down": ([64, 128], Q.F16)}
    if arch == "qwen2":  # qkv biases; untied head
        layer |= {"attn_q.bias": ([64], Q.F32), "attn_k.bias": ([32], Q.F32), "attn_v.bias": ([32], Q.F32)}
    expected = {f"blk.{i}.{n}" + ("" if n.endswith(".bias") else ".weight"): v
                for i in (0, 1) for n, v in layer.items()}
    expected |= {"token_embd.weight": ([512, 64], Q.F16), "output_norm.weight": ([64], Q.F32)}
    if arch == "qwen2":
        expected["output.weight"] = ([512, 64], Q.F16)  # tied llama: no output.weight, llama.cpp reuses token_embd
    assert tensors == expected

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == arch and field(f"{arch}.block_count") == 2
    assert (field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")) == (4, 2)
    assert (field(f"{arch}.embedding_length"), field(f"{arch}.feed_forward_length")) == (64, 128)
    assert field(f"{arch}.context_length") == 1024 and field("general.file_type") == 1  # MOSTLY_F16
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    tok = build_tokenizer()
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field("tokenizer.ggml.add_bos_token") is False and "tokenizer.ggml.bos_token_id" not in reader.fields
    vocab = {i: t for t, i in tok.get_vocab().items()}
    assert field("tokenizer.ggml.tokens") == [vocab[i] for i in range(512)]
    types = field("tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == TokenType.CONTROL] == [0, 1, 2]  # the three ChatML specials
    assert set(types[3:]) == {TokenType.NORMAL}
    assert len(field("tokenizer.ggml.merges")) == len(json.loads((model_dir / "tokenizer.json").read_text())
                                                      ["model"]["merges"])


def test_sharded_folder(tiny_qwen2, tmp_path):
    """A folder saved in several safetensors shards (as `dpo export --max-shard-size` writes) is read file by file."""
    model, tok = _hf(tiny_qwen2)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    tok.save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    write_gguf(sharded, tmp_path / "m.gguf", "f32", say=lambda _: None)
    _assert_round_trip(sharded, tmp_path / "m.gguf", "f32")


def test_mistral_written_as_llama(tmp_path):
    """model_type mistral is written as GGUF architecture llama (as llama.cpp does), Q/K permuted like llama."""
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path / "tiny-mistral"  # not "mistral": transformers' reader treats general.name "mistral" specially
    tok = build_tokenizer(folder)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                           tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    report = write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda _: None)
    assert report.arch == "llama"
    _assert_round_trip(folder, tmp_path / "m.gguf", "f32")


def test_llama3_rope_scaling_as_rope_freqs(tiny_llama, tmp_path):
    """Llama 3.1's rope scaling becomes llama.cpp's rope_freqs factors: base inv_freq / transformers' scaled one."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "llama3"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config.pop("rope_theta", None)
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda _: None)
    freqs = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"]
    scaled = AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb.inv_freq
    base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = torch.from_numpy(freqs.data.copy())
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the schedule are exercised
    torch.testing.assert_close(factors, base / scaled, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def _variant(tiny_llama: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(tiny_llama, folder)
    edit(folder)
    return folder


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, words", [
    (lambda d: _set_json(d / "config.json", model_type="gpt2"), ["'gpt2'", ", ".join(GGUF_ARCHS)]),
    (lambda d: (d / "tokenizer.json").unlink(), ["no tokenizer.json", "byte-level BPE"]),
    (lambda d: _set_json(d / "tokenizer.json", pre_tokenizer={"type": "Metaspace", "replacement": "▁"}),
     ["SentencePiece-style", "byte-level BPE"]),
    (lambda d: [p.unlink() for p in d.glob("*.safetensors")], ["lacks safetensors"]),
    (lambda d: _set_json(d / "config.json", vocab_size=100), ["token id 511 >= the model's vocab_size 100"]),
    (lambda d: _set_json(d / "config.json", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     ["rope type 'dynamic'", "linear, yarn"]),
], ids=["arch", "no-tokenizer-json", "sentencepiece", "no-weights", "vocab-too-small", "rope"])
def test_problems_are_one_line(tiny_llama, tmp_path, edit, words):
    folder = _variant(tiny_llama, tmp_path, edit)
    problem = gguf_problem(folder)
    assert problem and "\n" not in problem and all(w in problem for w in words), problem
    with pytest.raises(UserError, match="^" + re.escape(problem) + "$"):
        write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda _: None)
    assert not (tmp_path / "m.gguf").exists()


def test_without_the_gguf_package(tiny_llama, monkeypatch):
    from stages.model import ggufwrite

    monkeypatch.setattr(ggufwrite, "gguf", None)  # the package is not a dependency: the demo installs it
    assert gguf_problem(tiny_llama) == ("GGUF export needs the `gguf` package, which is not installed; "
                                        "run `pip install gguf==0.19.0`")


def test_unknown_tensor_type(tiny_llama, tmp_path):
    assert gguf_problem(tiny_llama) is None
    with pytest.raises(UserError, match="'q8_0' is not one of f32, f16, bf16"):
        write_gguf(tiny_llama, tmp_path / "m.gguf", "q8_0", say=lambda _: None)


def test_failure_leaves_no_file(tiny_llama, tmp_path, monkeypatch):
    from stages.model import ggufwrite

    def broken(values, t):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ggufwrite, "_encode", broken)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(tiny_llama, tmp_path / "m.gguf", "f16", say=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_slice(smollm2_slice, tmp_path):
    """The real SmolLM2 (9 heads / 3 kv heads, 49152 tokens, 17 special tokens): bf16 GGUF whose tokenizer, read
    back by transformers, encodes like the folder's, and whose tensors are the folder's cast to bf16."""
    from gguf import GGUFReader, TokenType
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2.gguf"
    report = write_gguf(smollm2_slice, out, "bf16", say=lambda _: None)
    assert report.n_bytes == out.stat().st_size and report.tokenizer_pre == "gpt-2"
    ref_tok = AutoTokenizer.from_pretrained(smollm2_slice)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
    assert (tok.eos_token, tok.bos_token, tok.chat_template) == (ref_tok.eos_token, ref_tok.bos_token,
                                                                 ref_tok.chat_template)
    reader = GGUFReader(out)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert [i for i, t in enumerate(types) if t == TokenType.CONTROL] == list(range(17))
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied
    want = _expected(load_file(smollm2_slice / "model.safetensors"), "bf16")
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
             "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight"}
    heads = {"blk.0.attn_q.weight": 9, "blk.1.attn_k.weight": 3}  # llama.cpp's rope row order, undone here
    for t in reader.tensors:
        if t.name in names:
            data = torch.from_numpy(t.data.copy())
            got = data.view(torch.bfloat16).float() if data.dtype != torch.float32 else data
            got = got.reshape(want[names[t.name]].shape)
            if (n := heads.get(t.name)) is not None:
                got = got.reshape(n, -1, 2, got.shape[1]).transpose(1, 2).reshape(got.shape)
            assert torch.equal(got, want[names[t.name]]), t.name
