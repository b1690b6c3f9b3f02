"""What stage one scores, for each cache layout: pair rows (one [prompt|chosen|rejected] row per example, keyed by
example id) or reply sets (rows [prompt | reply_1 | ... | reply_k], keyed by reply id: each (prompt, reply) once).

Both give precompute.py the same few operations: the keys the cache must hold, the forward units still to do
(`todo`), what a batch of units costs, one forward, and the cache rows of a batch.
"""

from __future__ import annotations

import torch

from stages.cache import replycache
from stages.cache.refcache import PAIRS
from stages.data.encode import Encoded
from stages.data.replyset import EncodedSet, Row, split_rows
from stages.model.logprobs import pair_logps
from stages.model.rowlayout import pair_output, pair_rows, reply_logps


class PairUnits:
    """Pair rows: a unit is one Encoded example."""

    layout, noun = PAIRS, "examples"

    def __init__(self, encoded: list[Encoded]):
        self.items = encoded

    def keys(self) -> list[str]:
        return [e.example_id for e in self.items]

    def todo(self, have: set[str], budget: int) -> list[Encoded]:
        return [e for e in self.items if e.example_id not in have]

    @staticmethod
    def count(batch: list[Encoded]) -> int:
        return len(batch)

    @staticmethod
    def cost(batch: list[Encoded], shared: bool) -> int:
        """Padded tokens a forward pays: [prompt|chosen|rejected] rows when shared, else 2B rows of prompt+reply."""
        if shared:
            return len(batch) * max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in batch)
        return 2 * len(batch) * max(e.length for e in batch)

    @staticmethod
    def real(batch: list[Encoded], shared: bool) -> int:
        prompts = (1 if shared else 2) * sum(len(e.prompt_ids) for e in batch)
        return prompts + sum(len(e.chosen_ids) + len(e.rejected_ids) for e in batch)

    @staticmethod
    def dummy(pad_id: int) -> Encoded:
        return Encoded("dummy", (pad_id,), (pad_id,), (pad_id,))

    @staticmethod
    def forward(model, batch, pad_id: int, chunk_size, share: bool, token_logps: bool, budget=None,
                attention: str = "dense"):
        """One forward; `budget` (--pack: the batch is one packed sequence) or segments attention: rows of two."""
        if budget is None and attention == "dense":
            return pair_logps(model, batch, pad_id, chunk_size, share=share, token_logps=token_logps)
        out = reply_logps(model, pair_rows(batch), pad_id, chunk_size, share, budget, attention, token_logps)
        return pair_output(out)

    @staticmethod
    def rows(batch: list[Encoded], out, store_token_logps: bool) -> list[dict]:
        """The batch's cache rows from ONE device->host copy (float64 holds fp32 values and counts exactly)."""
        n = len(batch)
        tokens = list(out.token_logps) if store_token_logps else []  # 2B [tokens] vectors: chosen, then rejected
        columns = [out.chosen_logps, out.rejected_logps, out.chosen_tokens, out.rejected_tokens, *tokens]
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in columns]).cpu().tolist()
        chosen, rejected, chosen_tokens, rejected_tokens = (flat[k * n:(k + 1) * n] for k in range(4))
        per_token, at = [], 4 * n
        for t in tokens:
            per_token.append(flat[at:at + t.shape[0]])
            at += t.shape[0]
        rows = []
        for i, e in enumerate(batch):
            row = {"example_id": e.example_id, "ref_chosen_logps": chosen[i], "ref_rejected_logps": rejected[i],
                   "chosen_tokens": int(chosen_tokens[i]), "rejected_tokens": int(rejected_tokens[i]),
                   "prompt_tokens": len(e.prompt_ids)}
            if store_token_logps:
                row["ref_chosen_token_logps"] = per_token[i]
                row["ref_rejected_token_logps"] = per_token[n + i]
            rows.append(row)
        return rows


class ReplyUnits:
    """Reply sets: a unit is one Row of a prompt and some of its replies still to score; every reply id once (sets
    sharing a prompt are merged for scoring, so a reply two rows share is scored once)."""

    layout, noun = replycache.LAYOUT, "replies"

    def __init__(self, sets: list[EncodedSet]):
        self.items = merge_prompts(sets)

    def keys(self) -> list[str]:
        return [k for s in self.items for k in s.reply_ids]

    def todo(self, have: set[str], budget: int) -> list[Row]:
        """Rows of the replies not in `have`, each under `budget` tokens (a prompt's replies over it: several rows)."""
        return [row for s in self.items if set(s.reply_ids) - have
                for row in split_rows(s, budget, keep=set(s.reply_ids) - have)]

    @staticmethod
    def count(batch: list[Row]) -> int:
        return sum(len(r.replies) for r in batch)

    @staticmethod
    def cost(batch: list[Row], shared: bool) -> int:
        if shared:
            return len(batch) * max(r.length for r in batch)
        return sum(len(r.replies) for r in batch) * max(len(r.prompt_ids) + len(x) for r in batch for x in r.replies)

    @staticmethod
    def real(batch: list[Row], shared: bool) -> int:
        if shared:
            return sum(r.length for r in batch)
        return sum(len(r.prompt_ids) + len(x) for r in batch for x in r.replies)

    @staticmethod
    def dummy(pad_id: int) -> Row:
        return Row((pad_id,), ((pad_id,),), ("dummy",))

    @staticmethod
    def forward(model, batch, pad_id: int, chunk_size, share: bool, token_logps: bool, budget=None,
                attention: str = "dense"):
        return reply_logps(model, batch, pad_id, chunk_size, share, budget, attention, token_logps)

    @staticmethod
    def rows(batch: list[Row], out, store_token_logps: bool) -> list[dict]:
        """One cache row per reply, from ONE device->host copy."""
        columns = [out.logps, out.tokens, *(out.token_logps if store_token_logps else [])]
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in columns]).cpu().tolist()
        n = out.logps.shape[0]
        at, rows, k = 2 * n, [], 0
        for r in batch:
            for key in r.keys:
                row = {"reply_id": key, "prompt_id": r.prompt_id, "ref_logps": flat[k],
                       "reply_tokens": int(flat[n + k]), "prompt_tokens": len(r.prompt_ids)}
                if store_token_logps:
                    size = int(flat[n + k])
                    row["ref_token_logps"], at = flat[at:at + size], at + size
                rows.append(row)
                k += 1
        return rows


def merge_prompts(sets: list[EncodedSet]) -> list[EncodedSet]:
    """One EncodedSet per prompt id holding each of its reply ids once (scores dropped: stage one does not need
    them), in first-seen order."""
    merged: dict[str, tuple[EncodedSet, dict]] = {}
    for s in sets:
        first, replies = merged.setdefault(s.prompt_id, (s, {}))
        for key, ids in zip(s.reply_ids, s.replies):
            replies.setdefault(key, ids)
    return [EncodedSet(pid, tuple(r), first.prompt_ids, tuple(r.values()), ())
            for pid, (first, r) in merged.items()]
