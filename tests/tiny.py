"""Tiny local fixtures: a byte-level BPE tokenizer and random Llama/Qwen2 models, built in seconds, no hub.

The tokenizer mimics SmolLM2's conventions (ChatML turns, eos `<|im_end|>`, no bos) so code written against
the tiny models behaves the same on the real SmolLM2 folder; the models are random, so only shapes, masking
and plumbing can be tested with them, never output quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (IM_START, IM_END, ENDOFTEXT)  # ids 0, 1, 2 (trainer puts specials first, in this order)
VOCAB_SIZE = 512

# ChatML exactly as SmolLM2 renders a turn, but with no default system prompt (SmolLM2's own template
# inserts "You are a helpful AI assistant named SmolLM..." when the first message is not a system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small built-in corpus: plain English plus HH-RLHF style "Human:"/"Assistant:" turns, so common words and
# the dialogue markers get their own merges. Fixed text => the trained vocab is the same on every run.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
All happy families are alike; each unhappy family is unhappy in its own way.
Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.
The sun rises in the east and sets in the west. Water boils at one hundred degrees at sea level.
Please answer the question as helpfully and honestly as you can, and say so when you do not know.
I am sorry, but I cannot help with that request because it could cause harm to other people.
Here is a recipe: mix two cups of flour, one cup of water and a pinch of salt, then bake for an hour.
The weather today is sunny with a light breeze, and tomorrow there may be some rain in the afternoon.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do symbols such as $, %, & and #.
Human: What is the capital of France?
Assistant: The capital of France is Paris.
Human: How do I bake bread at home?
Assistant: You need flour, water, yeast and salt. Knead the dough, let it rise, then bake it.
Human: Can you tell me how to pick a lock?
Assistant: I would rather not help with that. If you are locked out, a locksmith can help you.
Human: Thanks, that was helpful!
Assistant: You are welcome. Is there anything else I can help you with?
"""


def _corpus_lines() -> list[str]:
    # Repeat so the frequent pairs clearly outrank the rare ones (fewer ties in the merge order).
    return _CORPUS.splitlines() * 4


# Qwen2's split regex. transformers 5 loads any folder whose config says model_type "qwen2" with Qwen2Tokenizer,
# which REBUILDS the pipeline (NFC + this regex + ByteLevel) and keeps only vocab/merges from tokenizer.json.
# Training with the same pipeline makes the tiny tokenizer encode identically whether it comes from
# build_tokenizer(), the tiny llama folder (generic TokenizersBackend) or the tiny qwen2 folder.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_bpe() -> Tokenizer:
    """Byte-level BPE, vocab VOCAB_SIZE incl. the 256 bytes and 3 specials (Qwen2-style pre-tokenisation)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: NFC text round-trips
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def build_tokenizer(dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer (well under a second); save it into `dir` when given.

    eos = `<|im_end|>` (ends a ChatML turn, as in SmolLM2), pad = `<|endoftext|>` (distinct from eos so tests
    can tell padding from a real end of turn), unk = `<|endoftext|>` (as SmolLM2; byte-level BPE never
    needs it), no bos (nothing is prepended on encode).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
    )
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(dir))
    return tokenizer


def _config(arch: str, vocab_size: int, tie: bool, tokenizer: PreTrainedTokenizerFast):
    """Tiny config: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads (GQA), intermediate 128."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common), LlamaForCausalLM
    if arch == "qwen2":
        return Qwen2Config(**common), Qwen2ForCausalLM  # qkv projections carry biases, as in real Qwen2
    raise ValueError(f"unknown arch {arch!r}: expected 'llama' or 'qwen2'")


def build_tiny_model(dir: str | Path, arch: str = "llama", tie: bool = True, seed: int = 0) -> Path:
    """Random-init a tiny `arch` model, save it (safetensors, fp32) with the tiny tokenizer into `dir`.

    Deterministic given `seed`: init runs under a forked RNG seeded with `seed`, so the caller's global
    torch RNG state is left untouched. Returns `dir` as a Path.
    """
    out = Path(dir)
    tokenizer = build_tokenizer(out)
    config, model_cls = _config(arch, len(tokenizer), tie, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = model_cls(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    return out


HEAD_SCALE = 20.0  # logits std ~0.15 -> ~3 on the random tiny models: realistic logit scales for the bounds


def scaled_models(paths: dict):
    """get(arch, impl="sdpa", fresh=False): the tiny fp32 model of `paths[arch]` with the given attention, its head
    scaled by HEAD_SCALE (tied llama: the embeddings too, harmless), in eval mode; cached unless `fresh`."""
    from stages.model.logprobs import output_head

    cache = {}

    def get(arch: str, impl: str = "sdpa", fresh: bool = False):
        if fresh or (arch, impl) not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(paths[arch]), dtype=torch.float32,
                                                         attn_implementation=impl)
            with torch.no_grad():
                output_head(model).weight.mul_(HEAD_SCALE)
            if fresh:
                return model.eval()
            cache[arch, impl] = model.eval()
        return cache[arch, impl]

    return get
