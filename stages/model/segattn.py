"""Attention over segment boundaries, no [T, T] mask (issue 24, route (a)): registered as "dpo_segments".

A row holds blocks [prompt | reply_1 | ... | reply_k], one after another (packed rows), padding after the last block.
Inside a block attention is causal, a reply sees its prompt and itself, never another reply; nothing sees another
block. Instead of a dense [B, 1, T, T] mask, `segment_attention` runs scaled_dot_product_attention per segment:
- the prompt's queries causally over the prompt's keys (is_causal=True); a first reply that starts right after its
  prompt joins that run, since [prompt | reply_1] under plain causal attention is exactly the block's rule for both;
- every other reply's queries over [prompt keys; own keys] with `causal_lower_right(len_reply, len_prompt +
  len_reply)`: query i of the reply sees the whole prompt and the reply's keys 0..i.
Padding positions (and any gap between segments) get zeros; they are never scored.

Memory by construction: every tensor this module creates is linear in T (the output, the kv heads repeated for GQA,
a run's concatenated [prompt; reply] queries/keys/values) except what one SDPA call makes for one segment: the math
kernel's q.k scores [1, H, n_q, n_kv] and, off CUDA, the [n_q, n_kv] bool mask a lower-right bias is materialised
as; the CUDA flash / memory-efficient kernels make neither. So the largest tensor is one segment's q.k, never
[T, T] (tests/test_segattn.py records every aten op's output shape, forward and backward, to show it). Each row is
cut with torch.split, never sliced per segment: a slice's backward fills a zero tensor of the whole row, once per
segment. Segments of equal shape are not batched into one call: measured on CPU (8 rows of 512, one thread) it
gained ~10 % with every shape equal and lost ~5 % with real, unequal lengths.

The layout reaches the function through `segments(layout)` (a ContextVar): transformers hands a custom attention
implementation with no registered mask function attention_mask=None (masking_utils._preprocess_mask_arguments),
and the layout is data, not a mask. Under gradient checkpointing the recompute runs inside backward: keep backward
inside `with segments(...)` (CPU), or pass the layout as the forward keyword `segment_layout=` (model(...,
segment_layout=layout)): transformers forwards it to every attention call and checkpointing captures it with the
layer's other keyword arguments, also on CUDA, whose autograd threads do not see the caller's ContextVar.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

NAME = "dpo_segments"
LAYOUT_KWARG = "segment_layout"  # forward keyword that overrides the ContextVar (gradient checkpointing, threads)
_UNSUPPORTED = ("softcap", "position_bias")  # attention variants the segments do not implement: refused


# ---------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Block:
    """One prompt and its replies, as (start, length) offsets within a row: lengths >= 1, replies after the prompt,
    in order and non-overlapping."""
    prompt: tuple[int, int]
    replies: tuple[tuple[int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "replies", tuple(tuple(r) for r in self.replies))
        start, length = self.prompt
        if start < 0 or length < 1:
            raise ValueError(f"Block: prompt {self.prompt} needs start >= 0 and length >= 1")
        at = start + length
        for reply in self.replies:
            if len(reply) != 2 or reply[1] < 1 or reply[0] < at:
                raise ValueError(f"Block: reply {reply} must have length >= 1 and start at or after {at} "
                                 "(after the prompt and the replies before it)")
            at = reply[0] + reply[1]

    @property
    def end(self) -> int:
        """One past the block's last position."""
        start, length = self.replies[-1] if self.replies else self.prompt
        return start + length


@dataclass(frozen=True)
class Layout:
    """Per batch row, its blocks in order (non-overlapping); positions after the last block are padding."""
    rows: tuple[tuple[Block, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(tuple(blocks) for blocks in self.rows))
        for i, blocks in enumerate(self.rows):
            at = 0
            for block in blocks:
                if block.prompt[0] < at:
                    raise ValueError(f"Layout: row {i}: block at {block.prompt[0]} overlaps the one before "
                                     f"(ends at {at})")
                at = block.end

    @classmethod
    def of_lengths(cls, rows: list[list[tuple[int, list[int]]]]) -> Layout:
        """Per row [(prompt length, [reply lengths]), ...], laid out back to back from position 0."""
        out = []
        for row in rows:
            blocks, at = [], 0
            for prompt, replies in row:
                prompt_at, at = at, at + prompt
                spans = []
                for n in replies:
                    spans.append((at, n))
                    at += n
                blocks.append(Block((prompt_at, prompt), tuple(spans)))
            out.append(tuple(blocks))
        return cls(tuple(out))

    @property
    def lengths(self) -> tuple[int, ...]:
        """Per row, one past its last block's last position (0 for a row without blocks)."""
        return tuple(blocks[-1].end if blocks else 0 for blocks in self.rows)


_LAYOUT: ContextVar[Layout | None] = ContextVar("dpo_segment_layout", default=None)


@contextmanager
def segments(layout: Layout) -> Iterator[Layout]:
    """The layout the forwards inside the block use; on exit the outer one (or none) is back."""
    if not isinstance(layout, Layout):
        raise TypeError(f"segments: expected a Layout, got {type(layout).__name__}")
    token = _LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _LAYOUT.reset(token)


def register() -> None:
    """Register `segment_attention` with transformers' AttentionInterface under NAME (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)


# ------------------------------------------------------------------------------------------------- attention
def _checked_layout(module, query: Tensor, key: Tensor, attention_mask, dropout: float, kwargs: dict) -> Layout:
    """The layout in force, after refusing what the segment path cannot compute as asked."""
    if attention_mask is not None:
        raise ValueError(f"{NAME}: attention_mask must be None (the layout comes from segments(), not a mask); "
                         f"got {type(attention_mask).__name__}")
    layout = kwargs.get(LAYOUT_KWARG) or _LAYOUT.get()
    if layout is None:
        raise ValueError(f"{NAME}: no segment layout; run the forward inside `with segments(layout):`")
    if dropout > 0 and getattr(module, "training", True):
        raise ValueError(f"{NAME}: attention dropout {dropout} in training is not supported")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME}: {name} is not supported")
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"{NAME}: the segment layout is causal; this attention is not")
    b, h, t, _ = query.shape
    if key.shape[2] != t or h % key.shape[1]:
        raise ValueError(f"{NAME}: query {tuple(query.shape)} and key {tuple(key.shape)} do not match "
                         "(no KV cache: run with use_cache=False)")
    if len(layout.rows) != b or max(layout.lengths, default=0) > t:
        raise ValueError(f"{NAME}: the layout ({len(layout.rows)} rows, longest {max(layout.lengths, default=0)}) "
                         f"does not fit the batch ({b} rows of {t} positions)")
    window = kwargs.get("sliding_window")
    span = max((blk.end - blk.prompt[0] for row in layout.rows for blk in row), default=0)
    if window is not None and span > window:
        raise ValueError(f"{NAME}: a block spans {span} positions, more than the sliding window {window}")
    return layout


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D], each kv head repeated for its query group (transformers'
    repeat_kv); linear in T, and it keeps every SDPA call below a plain same-heads call on every backend."""
    if n_rep == 1:
        return x
    b, hkv, t, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)


def _cuts(blocks: tuple[Block, ...], t: int) -> list[int]:
    """Sorted boundaries (0 and t included) of every prompt, reply and gap of one row."""
    cuts = {0, t}
    for block in blocks:
        for start, length in (block.prompt, *block.replies):
            cuts.update((start, start + length))
    return sorted(cuts)


def _row(q: Tensor, k: Tensor, v: Tensor, blocks: tuple[Block, ...], scale: float | None) -> list[Tensor]:
    """One row: q, k, v [H, T, D] -> the pieces [H, n, Dv] of its output, in position order, covering 0..T (zeros
    for padding and gaps). The row is cut once with torch.split: its backward is one cat, where slicing each
    segment would make every segment's backward fill a zero tensor of the whole row (quadratic in the segments)."""
    t = q.shape[1]
    cuts = _cuts(blocks, t)
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    at = {a: i for i, a in enumerate(cuts[:-1])}
    qs, ks, vs = (torch.split(x, sizes, dim=1) for x in (q, k, v))
    pieces: list[Tensor | None] = [None] * len(sizes)  # None: padding or a gap
    for block in blocks:
        p = at[block.prompt[0]]
        replies = [at[start] for start, _ in block.replies]
        first = replies[0] if replies and block.replies[0][0] == block.prompt[0] + block.prompt[1] else None
        if first is not None:  # [prompt | reply_1] under plain causal attention is the block's rule for both
            replies.pop(0)
            out = _sdpa(torch.cat([qs[p], qs[first]], 1), torch.cat([ks[p], ks[first]], 1),
                        torch.cat([vs[p], vs[first]], 1), None, scale)
            pieces[p], pieces[first] = torch.split(out, [sizes[p], sizes[first]], dim=1)
        else:
            pieces[p] = _sdpa(qs[p], ks[p], vs[p], None, scale)
        for r in replies:
            # A CausalBias is not a tensor: sdpa hands it to CausalBias._dispatch, which on CUDA calls the flash
            # kernel with is_causal=True (flash aligns causality to the lower right when n_q < n_kv) or the
            # memory-efficient kernel with its lower-right mask type, neither of which reads a mask tensor; a
            # materialised [n_q, n_kv] mask would rule out flash and make the memory-efficient kernel read a bias.
            # Only the CPU / math path materialises it, for this one segment.
            bias = causal_lower_right(sizes[r], sizes[p] + sizes[r])
            pieces[r] = _sdpa(qs[r], torch.cat([ks[p], ks[r]], 1), torch.cat([vs[p], vs[r]], 1), bias, scale)
    return [q.new_zeros(q.shape[0], n, v.shape[-1]) if x is None else x for n, x in zip(sizes, pieces)]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias, scale: float | None) -> Tensor:
    """[H, n, D] queries over [H, m, D] keys/values -> [H, n, Dv]: causal (bias None) or under `bias`."""
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias, is_causal=bias is None,
                                         scale=scale)
    return out[0]


def segment_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function (AttentionInterface), the layout from `segments()`: query [B, H, T, D],
    key/value [B, Hkv, T, D] (GQA: H a multiple of Hkv) -> ([B, T, H, Dv], None), as sdpa_attention_forward
    returns it. Per row and block: the prompt causal over itself, each reply over [prompt; itself] (module
    docstring); padding positions are zeros. Refuses (ValueError) an attention mask, a missing layout, dropout in
    training, softcap / position bias, non-causal attention, a KV cache and a layout the batch does not cover."""
    layout = _checked_layout(module, query, key, attention_mask, dropout, kwargs)
    h = query.shape[1]
    n_rep = h // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    rows = [torch.cat(_row(q, k, v, blocks, scaling), dim=1)
            for q, k, v, blocks in zip(query.unbind(0), key.unbind(0), value.unbind(0), layout.rows)]
    return torch.stack(rows).transpose(1, 2).contiguous(), None
