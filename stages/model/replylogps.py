"""Per-reply log-probs of many replies per prompt (issue 23), each prompt run ONCE per forward row.

A `Row` (stages/data/replyset.py) becomes one padded row [prompt | reply_1 | ... | reply_k]: the prompt at positions
0..p-1, every reply continuing from p (p..p+len-1) as if it followed the prompt alone; attention is causal and a
reply sees the prompt and itself only, never another reply, so each reply's numbers are those of the plain sequence
prompt + reply (logprobs.pack_triples generalised from 2 replies to k). The prompt's last state predicts each reply's
first token. Without prompt sharing (asked off, an attention that takes no custom 4D mask, or an empty prompt) each
(prompt, reply) is its own right-padded row, scored as logprobs.collate_pairs/sequence_logps score a completion.
Both layouts go through logprobs.tapped_forward: the chunked head, its checkpointing in training, softcap and WPO.
Replies are numbered row by row, in each row's order: reply r of the result is the r-th (row, reply) of `rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stages.data.replyset import Row
from stages.model.logprobs import _per_sequence, pad_sequences, supports_prompt_sharing, tapped_forward

PAD_SEGMENT = -1  # segment of pad positions; 0 is the prompt, 1..k the row's replies


@dataclass
class ReplyLogps:
    logps: Tensor         # [R] float64 sums over each reply's tokens (graph-connected when grad is on)
    tokens: Tensor        # [R] long, scored tokens
    logits_sum: Tensor    # [R] detached: sum over the reply's tokens of the vocabulary-mean logit
    token_logps: list[Tensor] | None = None  # R detached per-token vectors, when asked
    wpo_logps: Tensor | None = None          # [R] detached: sum of log p(token) - log sum_v p(v)^2, with wpo
    cumulative: Tensor | None = None         # [N] float64 graph-connected running sum of token log-probs, reply by
    #                                          reply (each reply's tokens contiguous, in order), with cumulative=True
    starts: Tensor | None = None             # [R] each reply's first index in `cumulative`


# --------------------------------------------------------------------------------------------------- layouts
def _reply_mask(seg: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """seg [B, W]: 0 prompt, j >= 1 reply j, PAD_SEGMENT pad -> [B, 1, W, W] mask (bool for sdpa, additive
    min-float for eager). Causal; a reply sees the prompt and itself, never another reply; pads see pads only
    (the diagonal at least, so no row is fully masked and no NaN appears)."""
    w = seg.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool, device=seg.device).tril()
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((sq == sk) | ((sk == 0) & (sq > 0)))
    if implementation == "sdpa":
        return allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _pack_shared(rows: list[Row], pad_id: int):
    """One row per Row: [prompt | reply_1 | ... | reply_k | pads]. Returns ids, positions, segments [B, W] and the
    scored (row, column, target, reply number) index tensors, reply by reply, each reply's tokens in order."""
    b, w = len(rows), max(r.length for r in rows)
    ids = torch.full((b, w), pad_id, dtype=torch.long)
    pos = torch.zeros((b, w), dtype=torch.long)
    seg = torch.full((b, w), PAD_SEGMENT, dtype=torch.long)
    brow, cols, targets, seqs = [], [], [], []
    reply_no = 0
    for i, row in enumerate(rows):
        p = len(row.prompt_ids)
        ids[i, :row.length] = torch.tensor([t for part in (row.prompt_ids, *row.replies) for t in part])
        pos[i, :p], seg[i, :p] = torch.arange(p), 0
        start = p
        for j, reply in enumerate(row.replies, start=1):
            n = len(reply)
            pos[i, start:start + n], seg[i, start:start + n] = torch.arange(p, p + n), j
            if n:  # the prompt's last state predicts the first token; each later token comes from its predecessor
                cols += [p - 1] + list(range(start, start + n - 1))
                brow += [i] * n
                targets += list(reply)
                seqs += [reply_no] * n
            start += n
            reply_no += 1
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ids, pos, seg, as_long(brow), as_long(cols), as_long(targets), as_long(seqs)


def _collate_plain(rows: list[Row], pad_id: int):
    """One right-padded row per (prompt, reply), replies numbered as rows: ids, attention mask [R, T] long and the
    score mask [R, T] bool (True on reply tokens), as logprobs.collate_pairs lays out a pair's sequences."""
    return pad_sequences([(row.prompt_ids, reply) for row in rows for reply in row.replies], pad_id)


# ------------------------------------------------------------------------------------------------ public API
def rows_logps(model, rows: list[Row], pad_id: int, chunk_size: int | None = None, share: bool = True,
               token_logps: bool = False, wpo: bool = False, cumulative: bool = False) -> ReplyLogps:
    """Log-prob sums of every reply of `rows` (numbered row by row, in each row's order) in ONE forward: the shared
    layout [prompt | reply_1 | ... | reply_k] when `share` is asked, the model's attention takes a 4D mask
    (logprobs.supports_prompt_sharing) and no prompt is empty; else one plain row per (prompt, reply), which scores
    a reply's tokens from position 1 on (with an empty prompt the first token has no predecessor and is not
    scored, as for pairs). The numbers are the same either way (tests/test_reply_logps.py)."""
    if not rows:
        raise ValueError("rows_logps: no rows")
    n_replies = sum(len(r.replies) for r in rows)
    device = next(model.parameters()).device
    if share and supports_prompt_sharing(model) and all(len(r.prompt_ids) for r in rows):
        ids, pos, seg, brow, cols, targets, seqs = (t.to(device) for t in _pack_shared(rows, pad_id))
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        mask = _reply_mask(seg, model.config._attn_implementation, dtype)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    else:
        ids, attn, score = (t.to(device) for t in _collate_plain(rows, pad_id))
        brow, cols = score[:, 1:].nonzero(as_tuple=True)  # position t predicts token t+1
        targets, seqs = ids[brow, cols + 1], brow
        kwargs = dict(input_ids=ids, attention_mask=attn, use_cache=False)
    logps, means, _, log_sum_sq = tapped_forward(model, brow, cols, targets, chunk_size, wpo, **kwargs)
    return _assemble(seqs, logps, means, n_replies, token_logps, log_sum_sq, cumulative)


def _assemble(seqs, logps, means, n, want_tokens, log_sum_sq, want_cumulative) -> ReplyLogps:
    """Per-token values [N] with their reply numbers `seqs` -> the per-reply sums (float64) and what was asked."""
    counts = torch.bincount(seqs, minlength=n)
    out = ReplyLogps(_per_sequence(seqs, logps, n), counts, _per_sequence(seqs, means.detach(), n))
    order = torch.argsort(seqs, stable=True)  # reply by reply; the stable sort keeps each reply's token order
    if want_tokens:
        out.token_logps = list(torch.split(logps.detach()[order], counts.tolist()))
    if log_sum_sq is not None:  # WPO: sum over the reply of log p(token) - log sum_v p(v)^2
        out.wpo_logps = _per_sequence(seqs, logps.detach() - log_sum_sq, n)
    if want_cumulative:
        out.cumulative = torch.cumsum(logps[order].to(torch.float64), 0)
        out.starts = torch.cumsum(counts, 0) - counts
    return out


def prefix_sums(out: ReplyLogps, reply: Tensor, length: Tensor) -> Tensor:
    """[P] float64, graph-connected: the sum of reply[p]'s first length[p] token log-probs (0 <= length[p] <=
    tokens[reply[p]]), read from `out.cumulative` (rows_logps(..., cumulative=True))."""
    if out.cumulative is None or out.starts is None:
        raise ValueError("prefix_sums needs rows_logps(..., cumulative=True)")
    c = out.cumulative
    reply, length = reply.to(c.device, torch.long), length.to(c.device, torch.long)
    if bool(((length < 0) | (length > out.tokens.to(c.device)[reply])).any()):
        raise ValueError("prefix_sums: a length is negative or longer than its reply")
    padded = torch.cat([c.new_zeros(1), c])  # padded[k]: sum of the first k token log-probs of the batch
    start = out.starts.to(c.device)[reply]
    return padded[start + length] - padded[start]


def ld_pair_sums(out: ReplyLogps, chosen: Tensor, rejected: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO sums ([P] float64 each, graph-connected) of the pairs (chosen[p], rejected[p]), reply numbers of
    `out` (rows_logps(..., cumulative=True)): token weight 1 up to the pair's shared length min(n_c, n_r), alpha
    beyond it (loss.ld_token_weights' meaning; equal to logprobs.ld_sums for pairs)."""
    if out.cumulative is None:
        raise ValueError("ld_pair_sums needs rows_logps(..., cumulative=True)")
    tokens = out.tokens.to(out.cumulative.device)
    chosen = chosen.to(tokens.device, torch.long)
    rejected = rejected.to(tokens.device, torch.long)
    shared = torch.minimum(tokens[chosen], tokens[rejected])

    def weighted(reply: Tensor) -> Tensor:
        head = prefix_sums(out, reply, shared)
        return head + alpha * (prefix_sums(out, reply, tokens[reply]) - head)

    return weighted(chosen), weighted(rejected)
