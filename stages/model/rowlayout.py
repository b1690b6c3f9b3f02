"""Which layout a forward over [prompt | replies] rows runs, as the settings say (--pack, --attention), with the
replies always numbered in ROW order (as replylogps.rows_logps numbers them), so callers never see the layout:

  unpacked, dense   one padded row per Row with a [B, 1, W, W] mask (replylogps.rows_logps; today's layout)
  packed            several Rows back to back in one sequence up to the token budget, padding only at the end of a
                    batch (stages/model/packing.py)
  segments          the attention computed per segment from the rows' boundaries, no [T, T] tensor
                    (stages/model/segattn.py), packed or one Row per sequence

Pair rows are rows of two replies (chosen, rejected): `pair_output` turns their values into logprobs.LogpOutput.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from stages.base.errors import UserError
from stages.data.replyset import Row
from stages.model.logprobs import LogpOutput
from stages.model.packing import pack, packed_logps, use_segments
from stages.model.replylogps import ReplyLogps, ld_pair_sums, rows_logps


def reply_logps(model, rows: list[Row], pad_id: int, chunk_size=None, share: bool = True, budget: int | None = None,
                attention: str = "dense", token_logps: bool = False, wpo: bool = False,
                cumulative: bool = False) -> ReplyLogps:
    """Every reply of `rows` in one forward, numbered row by row. `budget`: pack the rows into sequences of at most
    this many tokens (None: one row per sequence); `attention`: "dense" or "segments"."""
    if budget is None and attention == "dense":
        return rows_logps(model, rows, pad_id, chunk_size, share, token_logps, wpo, cumulative)
    packs = pack(rows, budget, share) if budget is not None else [[row] for row in rows]
    out = packed_logps(model, packs, pad_id, chunk_size, share, token_logps, wpo, cumulative, attention)
    return _in_row_order(out, rows, packs)


def _in_row_order(out: ReplyLogps, rows: list[Row], packs: list[list[Row]]) -> ReplyLogps:
    """`out` (replies numbered pack by pack) renumbered as `rows` lists them."""
    first, at = {}, 0
    for row in (r for p in packs for r in p):
        first[id(row)] = at
        at += len(row.replies)
    perm = torch.tensor([first[id(row)] + j for row in rows for j in range(len(row.replies))], dtype=torch.long,
                        device=out.logps.device)
    pick = lambda t: None if t is None else t[perm]  # noqa: E731
    tokens = None if out.token_logps is None else [out.token_logps[i] for i in perm.tolist()]
    return replace(out, logps=out.logps[perm], tokens=out.tokens[perm], logits_sum=out.logits_sum[perm],
                   token_logps=tokens, wpo_logps=pick(out.wpo_logps), starts=pick(out.starts))


def pair_rows(encoded) -> list[Row]:
    """Pair rows (data.encode.Encoded) as rows of two replies: chosen, rejected."""
    return [Row(e.prompt_ids, (e.chosen_ids, e.rejected_ids), ("chosen", "rejected")) for e in encoded]


def pair_output(out: ReplyLogps, ld_alpha: float | None = None) -> LogpOutput:
    """Rows of two replies -> the pair path's LogpOutput (chosen i = reply 2i, rejected i = reply 2i + 1), with the
    LD-DPO sums when `ld_alpha` is given (the forward asked for `cumulative`)."""
    n = out.logps.shape[0] // 2
    c = torch.arange(0, 2 * n, 2, device=out.logps.device)
    r = c + 1
    lp = LogpOutput(out.logps[c], out.logps[r], out.tokens[c], out.tokens[r], out.logits_sum[c], out.logits_sum[r])
    if out.token_logps is not None:
        lp.token_logps = out.token_logps[0::2] + out.token_logps[1::2]  # chosen 0..B-1, then rejected
    if out.wpo_logps is not None:
        lp.chosen_wpo_logps, lp.rejected_wpo_logps = out.wpo_logps[c], out.wpo_logps[r]
    if ld_alpha is not None:
        lp.chosen_ld_logps, lp.rejected_ld_logps = ld_pair_sums(out, c, r, ld_alpha)
    return lp


def prepare_model(model, attention: str) -> tuple[str, str]:
    """After loading: the attention the run uses, and the line that says which. "segments" switches the model's
    attention to segattn for good (training's activation checkpointing recomputes the layers in backward, after the
    forward's call has returned); "auto" takes segments where the model's attention goes through transformers'
    attention interface (no [T, T] mask; the fastest on CPU, flash-eligible on CUDA), else dense. `attention_of`
    reads the decision back from the model. An explicit "segments" the model cannot take is one line."""
    if attention == "dense":
        return "dense", "attention: dense ([T, T] mask per row)"
    try:
        use_segments(model)
    except (ValueError, RuntimeError) as e:
        if attention == "segments":
            raise UserError(f"--attention segments: {e}; use --attention dense") from None
        return "dense", f"attention: dense (--attention auto: {e})"
    how = "--attention auto: " if attention == "auto" else ""
    return "segments", f"attention: segments ({how}per segment from the rows' boundaries, no [T, T] mask)"


def attention_of(model) -> str:
    """"segments" when prepare_model switched the model's attention to segattn, else "dense"."""
    from stages.model.segattn import NAME

    return "segments" if getattr(model.config, "_attn_implementation", None) == NAME else "dense"
