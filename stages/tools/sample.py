"""`dpo sample`: what the policy now writes, next to what the reference wrote, for held-out prompts.

  read the data (held-out rows) -> the first N distinct prompts, tokenized and cut as training does ->
  load the base once, the policy adapter on top -> generate with the adapter off (reference) and on (policy),
  greedy unless --seed -> score both replies under both models: implicit reward β·(log π(y|x) − log π_ref(y|x))
  -> samples.jsonl + samples.md (atomically) in the run folder, and a side-by-side print.
The reference is the base with adapters off (what stage one caches when it ran without --adapter); with
--ref-adapter it is the base plus that adapter (an SFT adapter the cache was made with).
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from stages.data.encode import Encoded, cut_chat_prompt, tokenize_example
from stages.model.logprobs import collate_pairs, sequence_logps
from stages.model.models import load_model, load_tokenizer
from stages.settings.commands import SampleConfig

DEFAULT_BETA = 0.1  # when neither --beta nor the run's config.yaml says


@dataclass
class Sample:
    example_id: str
    source: str
    row: int
    prompt: object          # text, or a list of messages
    prompt_text: str        # the prompt as the model saw it (decoded)
    reference: str
    policy: str | None
    reference_reward: float | None   # β·(log π − log π_ref) of the reference's reply
    policy_reward: float | None      # the same for the policy's reply
    reference_tokens: int
    policy_tokens: int | None


def run_folder(adapter: str | None) -> Path | None:
    """RUN for RUN/adapter written by `dpo train` (a config.yaml beside it), else None."""
    if adapter and (Path(adapter).parent / "config.yaml").is_file():
        return Path(adapter).parent
    return None


def resolve_beta(cfg: SampleConfig) -> float:
    if cfg.sampling.beta is not None:
        return cfg.sampling.beta
    run = run_folder(cfg.model.adapter)
    saved = yaml.safe_load((run / "config.yaml").read_text()) if run else None
    return float(saved.get("beta", DEFAULT_BETA)) if isinstance(saved, dict) else DEFAULT_BETA


def pick_prompts(cfg: SampleConfig, tokenizer) -> list[tuple[object, list[int]]]:
    """The first N examples with distinct prompts, in data order, as (example, prompt ids cut as training cuts them:
    text keeps its end, a conversation its system message and newest turns); prompts that cannot keep their last
    user turn are passed over. Prints what was cut. Data with several replies per prompt: the pairs the rule
    derives, so each prompt comes once (as its first pair), however many pairs it is in."""
    from stages.base.progress import say

    examples = cfg.data.load().examples  # pair rows, or the pairs derived from reply sets
    picked, seen, limit, cut, skipped = [], set(), cfg.sampling.max_prompt_length, 0, 0
    for ex in examples:
        key = json.dumps(ex.prompt, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        ids = tokenize_example(tokenizer, ex)[0]
        if limit and len(ids) > limit:
            chat = cut_chat_prompt(tokenizer, ex, limit) if ex.is_chat else None
            if ex.is_chat and chat is None:
                skipped += 1
                continue
            ids, cut = (chat.ids if chat else ids[-limit:]), cut + 1
        picked.append((ex, ids))
        if len(picked) == cfg.sampling.n:
            break
    if cut or skipped:
        say(None, f"sample: cut {cut} of {len(picked)} prompts to --max-prompt-length {limit}"
                  + (f"; passed over {skipped} that cannot keep their last user turn" if skipped else ""))
    return picked


def generate(model, prompt_ids: list[int], cfg: SampleConfig, tokenizer) -> list[int]:
    """Reply ids, ending with EOS when the model ended its turn within --max-new-tokens."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    s = cfg.sampling
    kwargs = dict(do_sample=False) if s.seed is None else dict(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    if cfg.sampling.seed is not None:
        torch.manual_seed(s.seed)  # the same seed for reference and policy: they differ only by the adapter
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
    reply = out[0, len(prompt_ids):].tolist()
    eos = tokenizer.eos_token_id
    return reply[: reply.index(eos) + 1] if eos in reply else reply


def reply_logps(model, prompt_ids: list[int], a: list[int], b: list[int]) -> tuple[float, float]:
    """log p(a | prompt), log p(b | prompt) under `model`, summed over reply tokens (the training log-probs)."""
    enc = Encoded("sample", tuple(prompt_ids), tuple(a), tuple(b))
    with torch.no_grad():
        lp = sequence_logps(model, collate_pairs([enc], pad_id=0))
    return float(lp.chosen_logps[0]), float(lp.rejected_logps[0])


def _reference_mode(model, cfg: SampleConfig):
    """A context in which `model` is the reference: adapters off, or the --ref-adapter active."""
    import contextlib

    if cfg.model.adapter is None:
        return contextlib.nullcontext()
    if cfg.sampling.ref_adapter is None:
        return model.disable_adapter()

    @contextlib.contextmanager
    def ref():
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("default")
    return ref()


def check_adapters(cfg: SampleConfig) -> None:
    """--adapter / --ref-adapter are PEFT adapter folders, refused before anything loads: a missing folder is named
    as missing; a run folder points to its adapter/ inside."""
    from stages.base.errors import UserError

    for flag, adapter in (("--adapter", cfg.model.adapter), ("--ref-adapter", cfg.sampling.ref_adapter)):
        if not adapter:
            continue
        p = Path(adapter)
        if not p.exists():
            raise UserError(f"{flag} {adapter}: no such folder; pass the adapter folder of a run (RUN/adapter, "
                            f"written by `dpo train`)")
        if (p / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{flag} {adapter}: a run folder; pass its adapter: {flag} {p / 'adapter'}")
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"{flag} {adapter}: not a PEFT adapter folder (no adapter_config.json); pass RUN/adapter")


def sample(cfg: SampleConfig) -> list[Sample]:
    check_adapters(cfg)
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    prompts = pick_prompts(cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model.spec(), device)
    if cfg.sampling.ref_adapter:  # SampleConfig.check: only with --adapter
        model.load_adapter(cfg.sampling.ref_adapter, adapter_name="reference")
    model.eval()
    beta, out = resolve_beta(cfg), []
    for ex, prompt_ids in prompts:
        with _reference_mode(model, cfg):
            ref_reply = generate(model, prompt_ids, cfg, tokenizer)
        policy_reply = generate(model, prompt_ids, cfg, tokenizer) if cfg.model.adapter else None
        rewards = (None, None)
        if policy_reply is not None:
            pol = reply_logps(model, prompt_ids, ref_reply, policy_reply)
            with _reference_mode(model, cfg):
                ref = reply_logps(model, prompt_ids, ref_reply, policy_reply)
            rewards = (beta * (pol[0] - ref[0]), beta * (pol[1] - ref[1]))
        text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        out.append(Sample(ex.example_id, ex.source, ex.row, list(ex.prompt) if ex.is_chat else ex.prompt,
                          tokenizer.decode(prompt_ids), text(ref_reply), text(policy_reply) if policy_reply else None,
                          rewards[0], rewards[1], len(ref_reply), len(policy_reply) if policy_reply else None))
    return out


# ------------------------------------------------------------------------------------------------ output
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def last_user_text(s: Sample | dict) -> str:
    """The prompt's last user turn (or the text prompt's end): what a reader needs to judge the replies."""
    prompt = s["prompt"] if isinstance(s, dict) else s.prompt
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return users[-1] if users else prompt[-1]["content"]
    cut = prompt.rfind("Human:")
    return (prompt[cut + len("Human:"):] if cut >= 0 else prompt).replace("\n\nAssistant:", "").strip()


def _cell(text: str | None, limit: int = 400) -> str:
    if text is None:
        return "-"
    one = " ".join(text.split()).replace("|", "\\|")
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _reward(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def markdown(samples: list[Sample | dict], heading: str = "Samples") -> str:
    rows = [s if isinstance(s, dict) else s.__dict__ for s in samples]
    lines = [f"## {heading}", "", "Implicit reward = β·(log π − log π_ref) of each generated reply.", "",
             "| # | prompt (last user turn) | reference | policy |", "|---|---|---|---|"]
    for i, s in enumerate(rows, start=1):
        lines.append(f"| {i} | {_cell(last_user_text(s), 200)} | {_cell(s['reference'])} "
                     f"(reward {_reward(s['reference_reward'])}) | {_cell(s['policy'])} "
                     f"(reward {_reward(s['policy_reward'])}) |")
    return "\n".join(lines) + "\n"


def side_by_side(s: Sample, index: int, width: int = 100) -> str:
    """One sample as two wrapped columns: reference | policy."""
    col = (width - 3) // 2
    left = textwrap.wrap(f"reference (reward {_reward(s.reference_reward)}): {s.reference}", col) or [""]
    right = textwrap.wrap(f"policy (reward {_reward(s.policy_reward)}): {s.policy}", col) if s.policy else []
    lines = [f"── {index}. {_cell(last_user_text(s), width - 8)}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{col}} │ {b}" if right else a)
    return "\n".join(lines)


def run(cfg: SampleConfig) -> tuple[list[Sample], Path]:
    """Generate, write samples.jsonl / samples.md, print them; returns the samples and the folder."""
    from stages.base.progress import say

    samples = sample(cfg)
    folder = Path(cfg.sampling.output) if cfg.sampling.output else (run_folder(cfg.model.adapter) or Path("samples"))
    _atomic_write(folder / "samples.jsonl", "".join(json.dumps(s.__dict__, ensure_ascii=False) + "\n" for s in samples))
    mode = "greedy" if cfg.sampling.seed is None else f"sampled, seed {cfg.sampling.seed}"
    _atomic_write(folder / "samples.md", markdown(samples, f"Samples ({mode}, β={resolve_beta(cfg):g})"))
    for i, s in enumerate(samples, start=1):
        say(None, side_by_side(s, i))
    say(None, f"samples: {folder / 'samples.md'} and {folder / 'samples.jsonl'}")
    return samples, folder
