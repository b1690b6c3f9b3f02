"""Tokenization: prompt and completion ids such that prompt_ids + completion_ids is exactly what the model sees.

Plain rows follow TRL's DPOTrainer convention: prompt text tokenized (with BOS when the tokenizer adds one), completion
text tokenized separately with EOS appended (once: a reply already ending with EOS keeps it). Chat rows use the
tokenizer's chat template: prompt rendered with the generation prompt, the completion is what the full conversation adds
after it, cut after the last end-of-turn (EOS) token so trailing template whitespace is not scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

from stages.base.errors import UserError
from stages.data.rows import Example

TRUNCATION = "prompt_keep_end,completion_keep_start"


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int | None = 1024          # prompt + one completion, in tokens
    max_prompt_length: int | None = 512    # prompts longer than this keep their END


@dataclass(frozen=True)
class Encoded:
    example_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        """Tokens in the longer of the two sequences (what a padded batch pays for)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tokenizer, messages, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(ids)


def _chat_completion(tokenizer, prompt_ids: list[int], ex: Example, completion) -> list[int]:
    full = _chat_ids(tokenizer, list(ex.prompt) + list(completion), generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"{ex.source}: row {ex.row}: the chat template renders the prompt differently with and without the "
            "reply, so prompt and completion cannot be split; use a template whose generation prompt is a prefix"
        )
    completion_ids = full[len(prompt_ids):]
    eos = tokenizer.eos_token_id
    if eos in completion_ids:  # keep up to and including the last end-of-turn token
        last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
        completion_ids = completion_ids[: last + 1]
    return completion_ids


def chat_tails(tokenizer, ex: Example, enc: Encoded, max_length: int | None) -> tuple[list[int], list[int]]:
    """(chosen, rejected) ids TRL 1.16 also scores on a conversational row: what the chat template writes after our
    reply's last end-of-turn token (ChatML: "\n"), cut where TRL's keep-start truncation to max_length would cut.
    Empty when our reply was itself cut (TRL cuts it at the same place) or the row is plain text."""
    if not ex.is_chat:
        return [], []
    tails = []
    for completion, ours in ((ex.chosen, enc.chosen_ids), (ex.rejected, enc.rejected_ids)):
        full = _chat_ids(tokenizer, list(ex.prompt) + list(completion), generation_prompt=False)
        start = len(enc.prompt_ids) + len(ours)
        if tuple(full[:start]) != enc.prompt_ids + ours:  # cut prompt or reply: TRL scores other ids anyway
            tails.append([])
            continue
        tail = full[start:]
        tails.append(tail if max_length is None else tail[:max(0, max_length - start)])
    return tails[0], tails[1]


def tokenize_example(tokenizer, ex: Example) -> tuple[list[int], list[int], list[int]]:
    """Untruncated (prompt, chosen, rejected) ids."""
    if ex.is_chat:
        if tokenizer.chat_template is None:
            raise UserError(
                f"{ex.source}: row {ex.row}: conversational data needs a tokenizer with a chat template; "
                "use an instruct model's tokenizer or convert the rows to prompt/chosen/rejected text"
            )
        prompt = _chat_ids(tokenizer, ex.prompt, generation_prompt=True)
        return (prompt, _chat_completion(tokenizer, prompt, ex, ex.chosen),
                _chat_completion(tokenizer, prompt, ex, ex.rejected))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; set one in tokenizer_config.json")
    return _bos(tokenizer) + _ids(tokenizer, ex.prompt), _with_eos(_ids(tokenizer, ex.chosen), eos), \
        _with_eos(_ids(tokenizer, ex.rejected), eos)


def _bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds one to plain text (Llama-3 style), as TRL's prompt tokenization does."""
    bos = tokenizer.bos_token_id
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and added[:1] == [bos] else []


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]  # a reply that already ends with EOS keeps one


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], settings: TokenizeSettings):
    """Prompt cut from the left (keep its end), then completions from the right. None if nothing can be scored."""
    if settings.max_prompt_length is not None:
        prompt = prompt[-settings.max_prompt_length:] if settings.max_prompt_length > 0 else []
    if settings.max_length is not None:
        room = settings.max_length - len(prompt)
        if room < 1:
            return None
        chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return None
    return prompt, chosen, rejected


def encode_examples(tokenizer, examples: Sequence[Example], settings: TokenizeSettings) -> tuple[list[Encoded], int]:
    """Encode every example; returns (encoded, number skipped because they cannot fit max_length)."""
    out, skipped = [], 0
    for ex in examples:
        cut = truncate(*tokenize_example(tokenizer, ex), settings)
        if cut is None:
            skipped += 1
            continue
        p, c, r = cut
        out.append(Encoded(ex.example_id, tuple(p), tuple(c), tuple(r)))
    return out, skipped


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer, settings: TokenizeSettings) -> dict:
    """What decides the token ids: vocabulary/merges/normaliser, special tokens, chat template and truncation.

    Hashes content, not paths, so the same tokenizer copied elsewhere gives the same fingerprint.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps(
        {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token,
         "class": type(tokenizer).__name__, "added": sorted(map(str, tokenizer.get_added_vocab()))},
        sort_keys=True,
    )
    template = tokenizer.chat_template or ""
    return {
        "tokenizer_hash": _sha(spec + specials)[:32],
        "chat_template_hash": _sha(template)[:32] if template else None,
        **asdict(settings),
        "truncation": TRUNCATION,
        "plain_text_convention": "prompt:bos_if_tokenizer_adds_one,completion:+eos_once",
    }
