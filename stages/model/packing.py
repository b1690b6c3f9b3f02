"""Packed rows (issue 24): several prompts, each with its replies, in ONE sequence filled up to a token budget.

A pack is a list of `Row`s (stages/data/replyset.py) laid out back to back in one sequence; a batch of packs is
right-padded to its longest pack, so padding sits only at the end of each sequence. Each Row is a BLOCK
[prompt | reply_1 | ... | reply_k] (`share`) or, in the plain layout (`--no-share-prompt`), each (prompt, reply)
is a block [prompt | reply] of its own (the prompt repeated):

    [p1 | r11 | r12 | p2 | r21 | p3 | r31 | r32 | r33 | pads]

Position ids restart at 0 at each prompt and every reply continues its own prompt's positions (len(p)..), so each
reply is numbered as in the plain sequence prompt + reply. Attention: a prompt sees itself causally, a reply sees
its prompt and itself (causally), nothing sees another block, pads see pads only (so no query row is fully masked).
The prompt's last state predicts each of its replies' first token (as replylogps._pack_shared); a reply of an
empty prompt has no predecessor for its first token, which is not scored (as in the plain layout).

`packed_logps` returns the same `ReplyLogps` as `replylogps.rows_logps` over the packs' rows in order (replies
numbered pack by pack, row by row, reply by reply), through `logprobs.tapped_forward` (the chunked head). The
attention comes from either
  "dense":    a block-diagonal [B, 1, T, T] mask (bool for sdpa, additive for eager): the reference;
  "segments": stages.model.segattn's attention function, which reads the block boundaries (segattn.Layout) and
              takes no mask (attention_mask None), so nothing of size T^2 is built here.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
from torch import Tensor

from stages.data.replyset import Row
from stages.model.logprobs import supports_prompt_sharing, tapped_forward
from stages.model.replylogps import ReplyLogps, _assemble, rows_logps

ATTENTIONS = ("dense", "segments")
PAD_BLOCK = -1  # block (and segment) of pad positions; blocks are 0.. within a pack, segment 0 prompt, j reply j

BlockIds = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # (prompt ids, (reply ids, ...))


# ------------------------------------------------------------------------------------------------ packing
def blocks(row: Row, share: bool = True) -> list[BlockIds]:
    """The blocks a Row becomes: itself (`share`), else one (prompt, (reply,)) block per reply."""
    if share:
        return [(row.prompt_ids, row.replies)]
    return [(row.prompt_ids, (reply,)) for reply in row.replies]


def span(row: Row, share: bool = True) -> int:
    """Positions a Row takes in a pack: row.length shared, len(prompt) + len(reply) per reply plain."""
    return sum(len(p) + sum(len(r) for r in rs) for p, rs in blocks(row, share))


def pack(rows: list[Row], budget: int, share: bool = True) -> list[list[Row]]:
    """First-fit decreasing: rows by span (`share`: shared or plain layout) longest first (ties in input order),
    each into the first pack it fits in (total span <= budget), else into a new pack; a row over the budget gets a
    pack of its own that takes nothing else. Packs in the order they were opened, rows in the order they went in.
    Deterministic; O(n log n) (a max-tree over the packs' room finds the first fit)."""
    if budget < 1:
        raise ValueError(f"pack: budget must be >= 1, got {budget}")
    spans = [span(r, share) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -spans[i])  # stable: ties keep input order
    size = 1
    while size < max(len(rows), 1):
        size *= 2
    room = [budget] * (2 * size)  # leaf size + k: room left in pack k (unopened packs: the whole budget)
    packs: list[list[Row]] = []
    for i in order:
        k = _first_fit(room, size, spans[i]) if spans[i] <= budget else len(packs)
        if k == len(packs):
            packs.append([])
        packs[k].append(rows[i])
        _set_room(room, size, k, room[size + k] - spans[i] if spans[i] <= budget else 0)
    return packs


def _first_fit(room: list[int], size: int, need: int) -> int:
    """Leftmost leaf of the max-tree `room` with room >= need (one exists: unopened packs have the budget)."""
    node = 1
    while node < size:
        node = 2 * node if room[2 * node] >= need else 2 * node + 1
    return node - size


def _set_room(room: list[int], size: int, k: int, value: int) -> None:
    node = size + k
    room[node] = value
    while node > 1:
        node //= 2
        room[node] = max(room[2 * node], room[2 * node + 1])


def packing_waste(packs: list[list[Row]], share: bool = True, batch_size: int | None = None) -> float:
    """Padding share of batches of packs: padded positions / all positions, each batch of `batch_size`
    consecutive packs (None: all of them) right-padded to its longest pack. Today's unpacked layout is
    `packing_waste([[row] for row in rows], share, batch_size)`."""
    lengths = [sum(span(r, share) for r in p) for p in packs]
    step = batch_size or max(len(lengths), 1)
    total = sum(max(lengths[s:s + step]) * len(lengths[s:s + step]) for s in range(0, len(lengths), step))
    return (total - sum(lengths)) / total if total else 0.0


# ------------------------------------------------------------------------------------------------- layout
def _layout(packs: list[list[Row]], pad_id: int, share: bool):
    """One sequence per pack, right-padded. Returns ids, positions, blocks, segments [B, T]; the scored
    (row, column, target, reply number) index tensors, reply by reply in each reply's token order; and each
    pack's block lengths [(prompt length, [reply lengths...]), ...] (segattn.Layout.of_lengths)."""
    packed = [[b for row in p for b in blocks(row, share)] for p in packs]
    width = max(max(sum(len(pr) + sum(len(r) for r in rs) for pr, rs in bl) for bl in packed), 1)
    b = len(packs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    blk = torch.full((b, width), PAD_BLOCK, dtype=torch.long)
    seg = torch.full((b, width), PAD_BLOCK, dtype=torch.long)
    brow, cols, targets, seqs, lengths = [], [], [], [], []
    reply_no = 0
    for i, pack_blocks in enumerate(packed):
        start = 0
        for k, (prompt, replies) in enumerate(pack_blocks):
            p = len(prompt)
            _put(ids, pos, blk, seg, i, start, prompt, 0, k, 0)
            cur = start + p
            for j, reply in enumerate(replies, start=1):
                n = len(reply)
                _put(ids, pos, blk, seg, i, cur, reply, p, k, j)
                first = 0 if p else 1  # the prompt's last state predicts the first token; none without a prompt
                cols += [start + p - 1 if t == 0 else cur + t - 1 for t in range(first, n)]
                targets += list(reply[first:])
                brow += [i] * len(reply[first:])
                seqs += [reply_no] * len(reply[first:])
                cur += n
                reply_no += 1
            start = cur
        lengths.append([part for pr, rs in pack_blocks for part in _segments(len(pr), [len(r) for r in rs])])
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ids, pos, blk, seg, as_long(brow), as_long(cols), as_long(targets), as_long(seqs), lengths


def _segments(prompt: int, replies: list[int]) -> list[tuple[int, list[int]]]:
    """A block's (prompt length, [reply lengths]) as segattn.Layout.of_lengths takes them (every length >= 1):
    empty replies take no positions and go; without a prompt each reply is causal over itself alone, which is a
    prompt-only block of its own."""
    replies = [n for n in replies if n]
    if prompt:
        return [(prompt, replies)]
    return [(n, []) for n in replies]


def _put(ids, pos, blk, seg, i, start, tokens, first_pos, block, segment) -> None:
    n = len(tokens)
    if n:
        ids[i, start:start + n] = torch.tensor(tokens, dtype=torch.long)
        pos[i, start:start + n] = torch.arange(first_pos, first_pos + n)
        blk[i, start:start + n], seg[i, start:start + n] = block, segment


def _block_mask(blk: Tensor, seg: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """blk, seg [B, T] -> [B, 1, T, T] mask (bool for sdpa, additive min-float for eager): causal, within a block
    only; a reply (segment j >= 1) sees its prompt (segment 0) and itself, a prompt itself; pads (PAD_BLOCK) see
    pads only (the diagonal at least, so no query row is fully masked and no NaN appears)."""
    w = blk.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool, device=blk.device).tril()
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = causal & (blk[:, :, None] == blk[:, None, :]) & ((sq == sk) | ((sk == 0) & (sq > 0)))
    if implementation == "sdpa":
        return allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=blk.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# ------------------------------------------------------------------------------------------------ public API
def segments_available() -> bool:
    """Whether stages.model.segattn (the "segments" attention) is importable."""
    return importlib.util.find_spec("stages.model.segattn") is not None


def packed_logps(model, packs: list[list[Row]], pad_id: int, chunk_size: int | None = None, share: bool = True,
                 token_logps: bool = False, wpo: bool = False, cumulative: bool = False,
                 attention: str = "dense") -> ReplyLogps:
    """Log-prob sums of every reply of `packs` in ONE forward over one packed sequence per pack (the layout of the
    module docstring): the same numbers as `rows_logps(model, [row for p in packs for row in p], ...)`, replies
    numbered pack by pack, row by row, reply by reply. `attention`: "dense" (a [B, 1, T, T] mask) or "segments"
    (segattn, no mask). A model whose attention takes no custom 4-D mask (logprobs.supports_prompt_sharing False)
    cannot take the dense layout: with "dense" it falls back to `rows_logps` (its plain layout, one padded row per
    (prompt, reply)), same numbers, no packing. "segments" needs stages.model.segattn and a model that dispatches
    its attention through transformers' attention interface (_supports_attention_backend); it switches the
    model's attention to segattn for this forward only, so training under activation checkpointing (the layers
    recomputed in backward) needs `use_segments(model)` first, and is refused without it."""
    rows = [row for p in packs for row in p]
    if not rows:
        raise ValueError("packed_logps: no rows")
    if attention not in ATTENTIONS:
        raise ValueError(f"packed_logps: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "dense" and not supports_prompt_sharing(model):
        return rows_logps(model, rows, pad_id, chunk_size, share, token_logps, wpo, cumulative)
    device = next(model.parameters()).device
    *tensors, lengths = _layout(packs, pad_id, share)
    ids, pos, blk, seg, brow, cols, targets, seqs = (t.to(device) for t in tensors)
    kwargs = dict(input_ids=ids, position_ids=pos, use_cache=False)
    if attention == "dense":
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        mask = _block_mask(blk, seg, model.config._attn_implementation, dtype)
        logps, means, _, log_sum_sq = tapped_forward(model, brow, cols, targets, chunk_size, wpo,
                                                     attention_mask=mask, **kwargs)
    else:
        with _segment_attention(model) as segattn:
            layout = segattn.Layout.of_lengths(lengths)
            logps, means, _, log_sum_sq = tapped_forward(model, brow, cols, targets, chunk_size, wpo,
                                                         attention_mask=None, **{segattn.LAYOUT_KWARG: layout},
                                                         **kwargs)
    n_replies = sum(len(r.replies) for r in rows)
    return _assemble(seqs, logps, means, n_replies, token_logps, log_sum_sq, cumulative)


def use_segments(model) -> None:
    """Switch `model`'s attention to segattn for good (config._attn_implementation = segattn.NAME): what training
    with activation checkpointing needs, since the layers' recompute runs in backward, after packed_logps has
    returned. The model then takes packed_logps(..., attention="segments") only (segattn refuses a mask)."""
    segattn = _segattn(model)
    if model.config._attn_implementation != segattn.NAME:
        model.config.dpo_attention_before = model.config._attn_implementation  # what unuse_segments puts back
    model.config._attn_implementation = segattn.NAME


def unuse_segments(model) -> None:
    """Undo use_segments: the model's own attention again (plain forwards, generation, a dense mask)."""
    before = getattr(model.config, "dpo_attention_before", None)
    if before is not None:
        model.config._attn_implementation = before
        del model.config.dpo_attention_before


def _segattn(model):
    """stages.model.segattn, registered, after checking that it exists and that `model` can use it."""
    if not segments_available():
        raise RuntimeError('attention="segments" needs stages.model.segattn, which is not installed')
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f'{type(model).__name__}: attention="segments" needs a model whose attention goes through '
                         "transformers' attention interface (_supports_attention_backend)")
    from stages.model import segattn

    segattn.register()
    return segattn


@contextlib.contextmanager
def _segment_attention(model) -> Iterator:
    """segattn (the module) while the model's attention is segattn's: config._attn_implementation is segattn.NAME
    inside and put back after. The layout goes to the forward as the keyword segattn.LAYOUT_KWARG, which
    checkpointing keeps with each layer's arguments. Refused when activation checkpointing would recompute the
    layers in backward under the attention put back: use_segments(model) first."""
    segattn = _segattn(model)
    config = model.config
    before = config._attn_implementation
    if before != segattn.NAME and torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False):
        raise ValueError('packed_logps: attention="segments" under activation checkpointing needs the model switched '
                         "for good (packing.use_segments(model)): backward recomputes the layers after this call")
    config._attn_implementation = segattn.NAME
    try:
        yield segattn
    finally:
        config._attn_implementation = before
