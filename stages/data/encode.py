"""Tokenization: prompt and completion ids such that prompt_ids + completion_ids is exactly what the model sees.

Plain rows follow TRL's DPOTrainer convention: prompt text tokenized (with BOS when the tokenizer adds one), completion
text tokenized separately with EOS appended (once: a reply already ending with EOS keeps it). Chat rows use the
tokenizer's chat template: prompt rendered with the generation prompt, the completion is what the full conversation adds
after it, cut after the last end-of-turn (EOS) token so trailing template whitespace is not scored.

Truncation (TRUNCATION names the rule; it is part of the cache's fingerprint). Rows that fit are never touched.
A text prompt longer than max_prompt_length keeps its end. A conversation's prompt keeps its system message(s)
and drops the OLDEST whole turns (from the first message after the system message, so the kept history starts
with a user turn); when even the last user turn does not fit, that turn is cut inside, keeping the system
message, the template's framing and the END of its text; a prompt that cannot keep any of its last user turn is
skipped. Replies then keep their start within max_length. `TruncationReport` counts every cut and skip.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

from stages.base.errors import UserError
from stages.data.rows import Example

TRUNCATION = "text_prompt_keep_end,chat_prompt_keep_system_drop_oldest_turns_then_keep_end,completion_keep_start"


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


def _chat_completion(tokenizer, prompt_ids: list[int], ex: Example, completion, prompt=None) -> list[int]:
    """What rendering `prompt` (default: the row's) + `completion` adds after `prompt_ids`, up to the last EOS."""
    full = _chat_ids(tokenizer, list(ex.prompt if prompt is None else prompt) + list(completion),
                     generation_prompt=False)
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
    prompt, (chosen, rejected) = tokenize_replies(tokenizer, ex, (ex.chosen, ex.rejected))
    return prompt, chosen, rejected


def tokenize_replies(tokenizer, ex, replies) -> tuple[list[int], list[list[int]]]:
    """Untruncated (prompt, [reply ids]) of `ex`'s prompt (an Example or a ReplySet: .prompt, .is_chat, .source,
    .row) and each of `replies`: chat rows through the template, text as TRL (prompt with BOS, reply + EOS)."""
    if ex.is_chat:
        if tokenizer.chat_template is None:
            raise UserError(
                f"{ex.source}: row {ex.row}: conversational data needs a tokenizer with a chat template; "
                "use an instruct model's tokenizer or convert the rows to prompt/chosen/rejected text"
            )
        prompt = _chat_ids(tokenizer, ex.prompt, generation_prompt=True)
        return prompt, [_chat_completion(tokenizer, prompt, ex, r) for r in replies]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; set one in tokenizer_config.json")
    return _bos(tokenizer) + _ids(tokenizer, ex.prompt), [_with_eos(_ids(tokenizer, r), eos) for r in replies]


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


@dataclass
class TruncationReport:
    """What tokenization cut or dropped. Cuts are counted over the rows kept; `skipped` rows are not encoded."""

    rows: int = 0                   # rows tokenized
    prompts_cut: int = 0
    replies_cut: int = 0            # chosen and rejected count one each
    max_prompt_tokens_cut: int = 0
    max_reply_tokens_cut: int = 0
    skipped: int = 0                # rows that cannot fit (prompt without its last user turn, or no room for replies)
    replies: int = 0                # replies tokenized over the rows kept (pairs: 2 a row; reply sets: K); add() counts

    def as_meta(self) -> dict:
        """Stage one's meta["truncation"]."""
        keys = ("prompts_cut", "replies_cut", "max_prompt_tokens_cut", "max_reply_tokens_cut", "skipped")
        return {k: getattr(self, k) for k in keys}

    @property
    def anything(self) -> bool:
        return bool(self.prompts_cut or self.replies_cut or self.skipped)

    def summary(self) -> str:
        """E.g. "cut 15 of 20 prompts (by at most 37 tokens) and 8 of 40 replies (by at most 12 tokens)"."""
        kept = self.rows - self.skipped
        if not self.anything:
            return f"nothing cut: every prompt and reply of {kept} rows fits"

        def part(n: int, of: int, what: str, most: int) -> str:
            return f"{n} of {of} {what}" + (f" (by at most {most} tokens)" if n else "")

        line = (f"cut {part(self.prompts_cut, kept, 'prompts', self.max_prompt_tokens_cut)} and "
                f"{part(self.replies_cut, self.replies, 'replies', self.max_reply_tokens_cut)}")
        return line + (f"; skipped {self.skipped} rows that cannot fit" if self.skipped else "")

    def add(self, prompt_cut: int, replies_cut: tuple[int, ...]) -> None:
        """One kept row: its prompt's cut and each reply's cut (pairs: chosen, rejected; reply sets: K)."""
        self.replies += len(replies_cut)
        self.prompts_cut += prompt_cut > 0
        self.max_prompt_tokens_cut = max(self.max_prompt_tokens_cut, prompt_cut)
        self.replies_cut += sum(n > 0 for n in replies_cut)
        self.max_reply_tokens_cut = max(self.max_reply_tokens_cut, *replies_cut)


@dataclass(frozen=True)
class _ChatCut:
    messages: list      # the prompt messages kept (whole turns)
    rendered: list[int]  # their ids with the generation prompt: the replies are split off after these
    ids: list[int]      # what the model sees: `rendered`, or `rendered` cut inside the last user turn


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cut_inside(tokenizer, messages: list, rendered: list[int], index: int, limit: int) -> list[int] | None:
    """`rendered` within `limit` by dropping the START of message `index`'s text; what the template writes
    before and after that text (system message, role header, end of turn, generation prompt) stays. None when
    that alone fills `limit`."""
    framed = [dict(m, content="") if i == index else m for i, m in enumerate(messages)]
    frame = _chat_ids(tokenizer, framed, generation_prompt=True)
    pre = _common_prefix(frame, rendered)
    post = _common_prefix(frame[pre:][::-1], rendered[pre:][::-1])
    room = limit - pre - post
    if room < 1:
        return None
    end = len(rendered) - post
    return rendered[:pre] + rendered[pre:end][-room:] + rendered[end:]


def cut_chat_prompt(tokenizer, ex: Example, limit: int) -> _ChatCut | None:
    """A conversation's prompt within `limit` tokens: system message(s) kept, oldest whole turns dropped (the kept
    history starts at a user turn), the last user turn cut inside only when it alone does not fit; None when even
    that cannot keep any of its text."""
    messages = [dict(m) for m in ex.prompt]
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    system, history = messages[:head], messages[head:]
    users = [i for i, m in enumerate(history) if m["role"] == "user"] or [len(history) - 1]
    starts = [i for i in users if i > 0]
    lo, hi, found = 0, len(starts), None
    while lo < hi:  # the oldest start that fits: fewer messages never render longer
        mid = (lo + hi) // 2
        kept = system + history[starts[mid]:]
        ids = _chat_ids(tokenizer, kept, generation_prompt=True)
        if len(ids) <= limit:
            found, hi = _ChatCut(kept, ids, ids), mid
        else:
            lo = mid + 1
    if found is not None:
        return found
    if not history:  # system messages only: keep the end, as for text
        rendered = _chat_ids(tokenizer, messages, generation_prompt=True)
        return _ChatCut(messages, rendered, rendered[len(rendered) - limit:]) if limit > 0 else None
    kept = system + history[users[-1]:]
    rendered = _chat_ids(tokenizer, kept, generation_prompt=True)
    ids = _cut_inside(tokenizer, kept, rendered, len(system), limit)
    return None if ids is None else _ChatCut(kept, rendered, ids)


def _skip(ex: Example, strict: bool, problem: str, fix: str) -> None:
    if strict:
        raise UserError(f"{ex.source}: row {ex.row}: {problem}; {fix}")


def fit_prompt(tokenizer, ex, prompt: list[int], replies, settings: TokenizeSettings, report: TruncationReport,
               strict: bool) -> tuple[list[int], list[list[int]] | None] | None:
    """The prompt ids within max_prompt_length by the module's rule, and the replies' ids re-split against a chat
    prompt that dropped turns (None when they stay as tokenized); None (counted; an error with `strict`) when a
    conversation cannot keep any of its last user turn. `ex`: an Example or a ReplySet, `replies` its texts."""
    limit = settings.max_prompt_length
    if limit is None or len(prompt) <= limit:
        return prompt, None
    if not ex.is_chat:
        return (prompt[-limit:] if limit > 0 else []), None
    cut = cut_chat_prompt(tokenizer, ex, limit)
    if cut is None:
        report.skipped += 1
        _skip(ex, strict, f"no room for the last user turn within --max-prompt-length {limit}",
              "raise it or shorten the system message")
        return None
    if cut.messages == list(ex.prompt):
        return cut.ids, None
    return cut.ids, [_chat_completion(tokenizer, cut.rendered, ex, r, cut.messages) for r in replies]


def encode_example(tokenizer, ex: Example, settings: TokenizeSettings, report: TruncationReport,
                   strict: bool = False) -> Encoded | None:
    """One row tokenized and cut (module docstring), counted in `report`; None when it cannot fit (an error when
    `strict`). A row whose prompt fits gets exactly the ids of the rule before chat prompts dropped turns."""
    full, (chosen, rejected) = tokenize_replies(tokenizer, ex, (ex.chosen, ex.rejected))
    report.rows += 1
    full_prompt = len(full)
    fitted = fit_prompt(tokenizer, ex, full, (ex.chosen, ex.rejected), settings, report, strict)
    if fitted is None:
        return None
    prompt, resplit = fitted
    if resplit is not None:  # a conversation that dropped turns: the replies split off that rendering
        chosen, rejected = resplit
    result = truncate(prompt, chosen, rejected, TokenizeSettings(settings.max_length, None))
    if result is None:
        report.skipped += 1
        _skip(ex, strict, f"the prompt ({len(prompt)} tokens) leaves no room for a reply within --max-length "
              f"{settings.max_length}", "raise --max-length or lower --max-prompt-length")
        return None
    p, c, r = result
    report.add(full_prompt - len(p), (len(chosen) - len(c), len(rejected) - len(r)))
    return Encoded(ex.example_id, tuple(p), tuple(c), tuple(r))


def encode_with_report(tokenizer, examples: Sequence[Example], settings: TokenizeSettings,
                       strict: bool = False) -> tuple[list[Encoded], TruncationReport]:
    """Encode every example; returns (encoded, what was cut and skipped). `strict`: a skip is a one-line error."""
    report = TruncationReport()
    encoded = [encode_example(tokenizer, ex, settings, report, strict) for ex in examples]
    return [e for e in encoded if e is not None], report


def encode_examples(tokenizer, examples: Sequence[Example], settings: TokenizeSettings) -> tuple[list[Encoded], int]:
    """Encode every example; returns (encoded, number skipped because they cannot fit)."""
    encoded, report = encode_with_report(tokenizer, examples, settings)
    return encoded, report.skipped


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
