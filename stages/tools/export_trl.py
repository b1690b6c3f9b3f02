"""`dpo cache export-trl`: a reference cache as TRL's `ref_chosen_logps` / `ref_rejected_logps` dataset columns.

  read the cache -> read + validate the data rows (same ids as stage one) -> join by example id (every row must be
  cached, else nothing is written) -> one row per example in TRL's format -> Parquet or JSON lines, atomically.
Data with several replies per prompt (and its reply cache): one row per pair the rule (--pairs) derives, each value
its reply's (stages/cache/replycache.py), the same rows and values the pairs would give as pair rows.

Row format (what TRL's DPOTrainer takes): `prompt`, `chosen`, `rejected` as plain strings for text rows, or as lists
of `{"role", "content"}` messages for conversational rows (the prompt and completions exactly as stage one scored
them: implicit HH-RLHF prompts split off, repeated prompts stripped), `ref_chosen_logps`, `ref_rejected_logps`
(float64 sums over completion tokens) and `example_id`.

Conventions (checked against TRL 1.16 in tests/test_trl.py): on text rows our numbers are TRL's - prompt tokenized alone
(with BOS if the tokenizer adds one), completion + EOS, summed over completion tokens - as long as no token merges
across the prompt/completion boundary, and prompts were not cut (TRL 1.16 has no max_prompt_length: it keeps the start
of prompt + completion up to `max_length`). On conversational rows TRL also scores what the chat template writes after
the end-of-turn token (ChatML: one "\\n"); our values stop at the end-of-turn token. `notes` says which apply. With
`--trl-chat-convention` the export loads the cache's reference model (fingerprint checked) and adds the log-prob of
exactly those trailing tokens, so conversational values equal TRL's own precompute.

TRL 1.16's DPOTrainer with `precompute_ref_log_probs=True` always runs its own reference pass, even over a dataset
that already has these columns, and then fails on the duplicated columns. `dpo_trainer_class()` returns a DPOTrainer
that keeps columns already present instead: no reference pass at all, and no reference model in memory.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.base.errors import UserError
from stages.cache import refcache, replycache
from stages.data.rows import Example
from stages.settings.commands import TrlExport
from stages.settings.groups import DataSpec, Lengths, ModelSettings

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
FORMATS = (".parquet", ".jsonl", ".jsonl.gz")


@dataclass
class ExportReport:
    out: Path
    rows: int
    is_chat: bool
    unused_cache_rows: int          # cached examples not in these data (harmless: other files, other splits)
    notes: list[str] = field(default_factory=list)
    unused_what: str = "examples are not in these data"  # reply caches: replies in no exported pair

    def summary(self) -> str:
        kind = "conversational" if self.is_chat else "text"
        extra = f"; {self.unused_cache_rows} cached {self.unused_what}" if self.unused_cache_rows else ""
        return f"wrote {self.rows} {kind} rows with ref_chosen_logps/ref_rejected_logps to {self.out}{extra}"


def _out_format(out: Path) -> str:
    name = out.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):  # ".jsonl.gz" before ".jsonl"
        if name.endswith(suffix):
            return suffix
    raise UserError(f"--output {out}: unknown format; name it *.parquet, *.jsonl or *.jsonl.gz")


def _as_trl(value) -> str | list[dict]:
    """Text stays a string; a message tuple becomes the list of {role, content} dicts TRL expects."""
    return value if isinstance(value, str) else [{"role": m["role"], "content": m["content"]} for m in value]


def trl_row(ex: Example, ref_chosen: float, ref_rejected: float) -> dict:
    return {"prompt": _as_trl(ex.prompt), "chosen": _as_trl(ex.chosen), "rejected": _as_trl(ex.rejected),
            "ref_chosen_logps": float(ref_chosen), "ref_rejected_logps": float(ref_rejected),
            "example_id": ex.example_id}


def _too_long_hint(meta: dict) -> str:
    too_long = meta.get("data", {}).get("too_long", 0)
    tok = meta.get("tokenization", {})
    return (f"; the cache skipped {too_long} rows that could not fit --max-length {tok.get('max_length')} / "
            f"--max-prompt-length {tok.get('max_prompt_length')}: drop them from the data" if too_long else "")


def _missing_error(cache_path, missing: list[Example], total: int, meta: dict) -> UserError:
    first = missing[0]
    return UserError(f"{cache_path}: {len(missing)} of {total} rows are not in the cache (first: {first.source} row "
                     f"{first.row}, id {first.example_id}); run `dpo precompute-ref` over these files "
                     f"first{_too_long_hint(meta)}")


def _one_kind(examples: Sequence[Example]) -> None:
    """One TRL dataset holds text rows or conversational rows, not both."""
    if any(e.is_chat for e in examples) and not all(e.is_chat for e in examples):
        chat = next(e for e in examples if e.is_chat)
        text = next(e for e in examples if not e.is_chat)
        raise UserError(f"the data mix text rows ({text.source} row {text.row}) and conversational rows ({chat.source} "
                        f"row {chat.row}); one TRL dataset holds one kind: export them to separate files")


def join_rows(cache_path: str, df, meta: dict, examples: Sequence[Example]) -> list[dict]:
    """TRL rows in data order; UserError if any example is not cached or the rows mix text and conversations."""
    values = zip(df["ref_chosen_logps"].to_list(), df["ref_rejected_logps"].to_list())
    ref = dict(zip(df["example_id"].to_list(), values))
    missing = [e for e in examples if e.example_id not in ref]
    if missing:
        raise _missing_error(cache_path, missing, len(examples), meta)
    _one_kind(examples)
    return [trl_row(e, *ref[e.example_id]) for e in examples]


def join_reply_rows(cache_path: str, df, meta: dict, examples: Sequence[Example]) -> tuple[list[dict], set[str]]:
    """The pairs derived from reply sets as TRL rows in data order, each value its reply's in the reply cache, and
    the reply ids used; UserError if a reply is not cached or the rows mix text and conversations."""
    values, missing, used = replycache.pair_values(df, examples)
    if missing:
        first = next(e for e, v in zip(examples, values) if v is None)
        raise UserError(f"{cache_path}: {len(missing)} of {len(missing) + len(used)} replies are not in the cache "
                        f"(first: {first.source} row {first.row}, reply id {missing[0]}); run `dpo precompute-ref` "
                        f"over these files first{_too_long_hint(meta)}")
    _one_kind(examples)
    return [trl_row(e, *v) for e, v in zip(examples, values)], used


def convention_notes(meta: dict, df_prompt_tokens: list[int], is_chat: bool) -> list[str]:
    """What a TRL user must set, and where the exported numbers are not what TRL itself would compute."""
    tok = meta.get("tokenization", {})
    max_length, max_prompt = tok.get("max_length"), tok.get("max_prompt_length")
    notes = [f"note: train with DPOConfig(precompute_ref_log_probs=True, max_length={max_length}) and "
             "stages.tools.export_trl.dpo_trainer_class() (TRL 1.16 itself would recompute these columns)"]
    counted = meta.get("truncation")  # stage one's counts (caches made since they are recorded)
    if counted and counted.get("prompts_cut"):
        notes.append(f"note: the cache cut {counted['prompts_cut']} prompts of its rows (by at most "
                     f"{counted['max_prompt_tokens_cut']} tokens) to its --max-prompt-length {max_prompt}, which TRL "
                     "1.16 never does; for TRL's exact convention cache with --max-prompt-length equal to --max-length")
    elif not counted and max_prompt is not None and (max_length is None or max_prompt < max_length):
        cut = sum(1 for n in df_prompt_tokens if n >= max_prompt)
        if cut:
            notes.append(f"note: {cut} prompts reached the cache's --max-prompt-length {max_prompt} and may have been "
                         "cut from the left, which TRL 1.16 never does; for TRL's exact convention cache with "
                         "--max-prompt-length equal to --max-length")
    if is_chat:
        notes.append("note: conversational rows: TRL 1.16 also scores the chat template's text after the end-of-turn "
                     "token (ChatML: one newline); these values stop at the end-of-turn token, so TRL's own numbers "
                     "differ by that token's log-prob (rewards start near, not exactly at, 0)")
    if meta.get("quantization") not in (None, "none") or meta.get("adapter"):
        notes.append(f"note: the cache was made with quantization={meta.get('quantization')}, adapter="
                     f"{(meta.get('adapter') or {}).get('path')}; TRL's model must be loaded the same way")
    return notes


def write_rows(rows: list[dict], out: Path) -> None:
    """Parquet (list<struct<role, content>> for messages) or JSON lines; temporary name, then rename."""
    fmt = _out_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            opener = gzip.open if fmt == ".jsonl.gz" else open
            with opener(tmp, "wt", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _reference_spec(meta: dict, model: str | None):
    """The cache's reference model as stage one loaded it; `model` overrides its path (same weights required)."""
    from stages.cache.fingerprint import folder_fingerprint

    path = model or meta["model"]["path"]
    full = bool(meta["model"].get("weights", {}).get("full_hash"))
    if not Path(path).is_dir() or folder_fingerprint(path, full)["hash"] != meta["manifest"]["model"]:
        raise UserError(f"--trl-chat-convention: {path} is not the cache's reference model (weights fingerprint "
                        "differs or folder missing); pass the model the cache was made from with --model")
    adapter = (meta.get("adapter") or {}).get("path")
    quantized = meta.get("quantization") not in (None, "none")
    return ModelSettings(path, adapter, meta.get("dtype") or "auto", quantized).spec()


def _tail_batch(encoded, tails, pad_id: int):
    """PairBatch whose rows are prompt + reply + tail (chosen rows, then rejected) scoring only the tail tokens."""
    from stages.model.logprobs import PairBatch

    seqs = [(e.prompt_ids + e.chosen_ids, t[0]) for e, t in zip(encoded, tails)]
    seqs += [(e.prompt_ids + e.rejected_ids, t[1]) for e, t in zip(encoded, tails)]
    width = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn, score = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (head, tail) in enumerate(seqs):
        n = len(head) + len(tail)
        ids[i, :n] = torch.tensor(list(head) + list(tail), dtype=torch.long)
        attn[i, :n] = 1
        score[i, len(head):n] = True
    return PairBatch(ids, attn, score, list(encoded))


def chat_tail_logps(meta: dict, examples, model: str | None, batch_size: int = 8) -> tuple[dict, int]:
    """example id -> (chosen, rejected) log-prob of the tokens TRL scores after ours (encode.chat_tails), from the
    cache's reference model; and how many such tokens there were."""
    from stages.data.encode import chat_tails, encode_examples
    from stages.model.logprobs import sequence_logps
    from stages.model.models import load_model, load_tokenizer

    spec = _reference_spec(meta, model)
    tok = meta["tokenization"]
    tokenizer = load_tokenizer(spec.path)
    encoded, _ = encode_examples(tokenizer, examples, Lengths(None, None).tokenize(meta))  # the cache's lengths
    by_id = {e.example_id: e for e in examples}
    tails = [chat_tails(tokenizer, by_id[e.example_id], e, tok["max_length"]) for e in encoded]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_model(spec, device).eval()
    out = {}
    with torch.inference_mode():
        for k in range(0, len(encoded), batch_size):
            part = encoded[k:k + batch_size]
            lp = sequence_logps(net, _tail_batch(part, tails[k:k + batch_size], tokenizer.pad_token_id))
            out.update({e.example_id: (float(c), float(r)) for e, c, r in
                        zip(part, lp.chosen_logps.tolist(), lp.rejected_logps.tolist())})
    return out, sum(len(a) + len(b) for a, b in tails)


def _join(cache_path: str, df, meta: dict, loaded) -> tuple[list[dict], list[int], int, str]:
    """(TRL rows, the prompt lengths of the cache rows used, how many cache rows went unused, what those are)."""
    wrong = replycache.layout_problem(refcache.layout_of(meta), loaded.sets is not None)
    if wrong:
        raise UserError(f"{cache_path}: {wrong}")
    if loaded.sets is None:
        rows = join_rows(cache_path, df, meta, loaded.examples)
        wanted = {r["example_id"] for r in rows}
        prompt_tokens = [n for i, n in zip(df["example_id"].to_list(), df["prompt_tokens"].to_list()) if i in wanted]
        return rows, prompt_tokens, df.height - len(rows), ExportReport.unused_what
    rows, used = join_reply_rows(cache_path, df, meta, loaded.examples)
    by_prompt = df.filter(df[replycache.KEY].is_in(list(used))).unique("prompt_id")  # each prompt once
    return rows, by_prompt["prompt_tokens"].to_list(), df.height - len(used), "replies are in no exported pair"


def export_trl(cache_path: str, data: DataSpec, export: TrlExport) -> ExportReport:
    """`data`'s rows (pair rows, or the pairs derived from reply sets) with the cache's values, written to
    `export.output` in TRL's formats."""
    out_path, trl_chat_convention = Path(export.output), export.trl_chat_convention
    _out_format(out_path)  # a bad name fails before anything is read
    loaded = data.load()
    examples, report = loaded.examples, loaded.report
    if not examples:
        found = report.summary() + (f"; pairs: {loaded.pair_report.summary()}" if loaded.pair_report else "")
        raise UserError(f"{', '.join(map(str, data.data))}: no usable rows ({found})")
    df, meta = refcache.read_cache(cache_path)
    rows, prompt_tokens, unused, unused_what = _join(cache_path, df, meta, loaded)
    is_chat = examples[0].is_chat
    added = None
    if trl_chat_convention and is_chat:  # + the template's text after the end-of-turn token, as TRL scores it
        tails, added = chat_tail_logps(meta, examples, export.model)
        for r in rows:
            r["ref_chosen_logps"] += tails[r["example_id"]][0]
            r["ref_rejected_logps"] += tails[r["example_id"]][1]
    write_rows(rows, out_path)
    notes = loaded.lines() + convention_notes(meta, prompt_tokens, is_chat and added is None)  # data (and pairs)
    if added is not None:
        notes.append(f"note: --trl-chat-convention: added the reference log-prob of {added} tokens the chat template "
                     "writes after the end-of-turn token (TRL 1.16's convention); values now equal TRL's precompute")
    elif trl_chat_convention:
        notes.append("note: --trl-chat-convention changes nothing on text rows (TRL scores the same tokens as we do)")
    return ExportReport(out_path, len(rows), is_chat, unused, notes, unused_what)


@functools.cache
def dpo_trainer_class():
    """`trl.DPOTrainer` that, with `precompute_ref_log_probs=True`, keeps `ref_chosen_logps` / `ref_rejected_logps`
    columns a dataset already has (e.g. from `dpo cache export-trl`) instead of running its reference pass.

    Datasets without the columns are precomputed by TRL as usual. trl is an optional extra (`.[bench]`), imported here.
    """
    try:
        from trl import DPOTrainer
    except ImportError:
        raise UserError("TRL is not installed; pip install 'trl==1.16.0' datasets "
                        "(or the project's [bench] extra)") from None

    class CachedRefDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if set(REF_COLUMNS) <= set(getattr(dataset, "column_names", None) or ()):
                return dataset  # the cached reference values travel with the rows into the collator and the loss
            return super()._precompute_ref_logps(dataset, name, batch_size)

    CachedRefDPOTrainer.__module__ = __name__
    return CachedRefDPOTrainer
