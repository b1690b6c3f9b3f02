"""The one `sequence_logps`: summed log-probs of completion tokens, used by stage one and stage two alike.

The model runs its normal forward (so FSDP2, PEFT, gradient checkpointing and NF4 behave as usual), but a tap on
the LM head swaps the `[B, T, V]` logits for this: pick the hidden states that predict completion tokens, then
project them through the head in chunks of `chunk_size` positions (None: the device's default, declared in
stages.base.constants.CHUNK_BY_DEVICE), keeping only `logit[target] - logsumexp(logits)`.
In training each chunk is checkpointed, so backward recomputes its logits; no `[B, T, V]` tensor ever exists and
memory for this part grows with the chunk, not with batch x length. Prompt and pad positions never reach the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from stages.base.constants import chunk_size_for  # the per-device default chunk is declared there, once
from stages.base.errors import UserError
from stages.data.encode import Encoded
from stages.objective.loss import ld_token_weights


@dataclass
class PairBatch:
    """Chosen rows 0..B-1 then rejected rows B..2B-1, right-padded, so both go through ONE forward."""

    input_ids: torch.Tensor       # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long
    score_mask: torch.Tensor      # [2B, T] bool: True where the token is a completion token (scored)
    encoded: list[Encoded]


@dataclass
class LogpOutput:
    chosen_logps: torch.Tensor      # [B] float64 sums over completion tokens (graph-connected when training)
    rejected_logps: torch.Tensor    # [B]
    chosen_tokens: torch.Tensor     # [B] long, scored tokens
    rejected_tokens: torch.Tensor   # [B]
    chosen_logits_sum: torch.Tensor    # [B] detached: sum over tokens of the vocabulary-mean logit
    rejected_logits_sum: torch.Tensor  # [B]
    token_logps: list[torch.Tensor] | None = None  # 2B tensors (chosen then rejected), when asked for
    chosen_ld_logps: torch.Tensor | None = None    # [B] LD-DPO sums (graph-connected), with ld_alpha
    rejected_ld_logps: torch.Tensor | None = None  # [B]
    chosen_wpo_logps: torch.Tensor | None = None   # [B] detached: sum of log p(token) - log sum_v p(v)^2, with wpo
    rejected_wpo_logps: torch.Tensor | None = None  # [B]


def collate_pairs(encoded: list[Encoded], pad_id: int) -> PairBatch:
    seqs = [(e.prompt_ids, e.chosen_ids) for e in encoded] + [(e.prompt_ids, e.rejected_ids) for e in encoded]
    return PairBatch(*pad_sequences(seqs, pad_id), list(encoded))


def pad_sequences(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) sequences, right-padded: ids, attention mask [N, T] long and the score mask
    [N, T] bool (True on completion tokens)."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    score = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(tuple(p) + tuple(c), dtype=torch.long)
        attn[i, :n] = 1
        score[i, len(p):n] = True
    return ids, attn, score


# ----------------------------------------------------------------------------------------------- the head tap
def output_head(model) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def _softcap(model) -> float | None:
    """Gemma-style final logit softcapping (applied after the head by the model's own forward)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None


def _chunk_logps(project, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, wpo: bool = False):
    """hidden [c, H], targets [c] -> (log p(target) [c] fp32, vocabulary-mean logit [c] fp32 detached), plus with
    wpo the detached log sum_v p(v)^2 [c] = logsumexp(2 logits) - 2 logsumexp(logits) that WPO's weights need."""
    logits = project(hidden).float()  # [c, V], lives only inside this chunk
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    if not wpo:
        return picked - lse, logits.detach().mean(-1)
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * lse.detach()
    return picked - lse, logits.detach().mean(-1), log_sum_sq


class _HeadTap:
    """Pre-hook: keep the head's input [B, T, H] and hand the head an empty slice instead (no full logits).
    Post-hook (still inside the model's forward, so FSDP2 has the head's weights gathered): chunked log-probs."""

    def __init__(self, model, rows, positions, targets, chunk_size, wpo=False):
        self.model, self.rows, self.positions, self.targets = model, rows, positions, targets
        self.chunk_size, self.softcap, self.wpo = chunk_size, _softcap(model), wpo
        self.bypass, self.hidden, self.result = False, None, None

    def pre(self, module, args):
        if self.bypass:
            return None
        self.hidden = args[0]
        return (args[0][:, :0],) + tuple(args[1:])

    def post(self, module, args, output):
        if self.bypass or self.hidden is None:
            return None
        selected = self.hidden[self.rows, self.positions]  # [N, H]: only positions that predict completion tokens
        self.hidden = None
        project = lambda h: self._project(module, h)  # noqa: E731
        outs = []  # per chunk: (log p, mean logit[, log sum p^2])
        chunk = chunk_size_for(self.chunk_size, selected.device.type)  # None: the device's default
        for start in range(0, selected.shape[0], chunk):
            h, t = selected[start:start + chunk], self.targets[start:start + chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                outs.append(checkpoint(_chunk_logps, project, h, t, self.softcap, self.wpo, use_reentrant=False))
            else:
                outs.append(_chunk_logps(project, h, t, self.softcap, self.wpo))
        empty = selected.new_zeros(0, dtype=torch.float32)
        self.result = tuple(torch.cat(parts) for parts in zip(*outs)) if outs else (empty,) * (3 if self.wpo else 2)
        return output

    def _project(self, module, h):
        self.bypass = True
        try:
            return module(h)
        finally:
            self.bypass = False


def tapped_forward(model, rows, positions, targets, chunk_size=None, wpo=False, **forward_kwargs):
    """Run `model(**forward_kwargs)`; return (token log-probs [N], vocab-mean logits [N], model output, log sum_v
    p(v)^2 [N] detached or None without wpo) for the hidden states at (rows[i], positions[i]) predicting targets[i]."""
    head = output_head(model)
    tap = _HeadTap(model, rows, positions, targets, chunk_size, wpo)
    handles = [head.register_forward_pre_hook(tap.pre), head.register_forward_hook(tap.post)]
    try:
        out = model(**forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    if tap.result is None:
        raise UserError(f"{type(model).__name__}: its forward never calls the output head (get_output_embeddings), "
                        "so log-probs cannot be read from it; this architecture is not supported")
    return tap.result[0], tap.result[1], out, (tap.result[2] if wpo else None)


# ---------------------------------------------------------------------------------------------- public API
def _per_sequence(rows, values, n_seq):
    total = torch.zeros(n_seq, dtype=torch.float64, device=values.device)
    return total.index_add(0, rows, values.to(torch.float64))


def token_positions(rows: torch.Tensor, n_seq: int) -> torch.Tensor:
    """[N] index of each scored token within its sequence (a sequence's tokens come in order, as both layouts
    emit them)."""
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=n_seq)
    starts = torch.cumsum(counts, 0) - counts
    in_order = torch.arange(rows.shape[0], device=rows.device) - starts.repeat_interleave(counts)
    return torch.empty_like(in_order).index_copy_(0, order, in_order)


def ld_sums(rows: torch.Tensor, logps: torch.Tensor, n_seq: int, alpha: float) -> torch.Tensor:
    """LD-DPO sums [n_seq] float64 (graph-connected): token weight 1 up to the pair's shared length, alpha after
    (loss.ld_token_weights). Sequences i and n_seq/2 + i are the chosen and rejected reply of pair i."""
    counts = torch.bincount(rows, minlength=n_seq)
    b = n_seq // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)  # [n_seq]
    weights = ld_token_weights(token_positions(rows, n_seq), shared[rows], alpha).to(logps.device)
    return _per_sequence(rows, logps.to(torch.float64) * weights, n_seq)


def _split_pairs(rows, logps, means, n_seq, want_tokens, ld_alpha=None, log_sum_sq=None) -> LogpOutput:
    b = n_seq // 2
    sums = _per_sequence(rows, logps, n_seq)
    counts = torch.bincount(rows, minlength=n_seq)
    mean_sums = _per_sequence(rows, means.detach(), n_seq)
    tokens = None
    if want_tokens:
        order = torch.argsort(rows, stable=True)  # group by sequence; stable sort keeps token order
        tokens = list(torch.split(logps.detach()[order], counts.tolist()))
    out = LogpOutput(sums[:b], sums[b:], counts[:b], counts[b:], mean_sums[:b], mean_sums[b:], tokens)
    if ld_alpha is not None:
        ld = ld_sums(rows, logps, n_seq, ld_alpha)
        out.chosen_ld_logps, out.rejected_ld_logps = ld[:b], ld[b:]
    if log_sum_sq is not None:  # WPO: sum over the reply of log p(token) - log sum_v p(v)^2
        aligned = _per_sequence(rows, logps.detach() - log_sum_sq, n_seq)
        out.chosen_wpo_logps, out.rejected_wpo_logps = aligned[:b], aligned[b:]
    return out


def sequence_logps(model, batch: PairBatch, chunk_size: int | None = None, token_logps: bool = False,
                   ld_alpha: float | None = None, wpo: bool = False) -> LogpOutput:
    """Sum of log p(token) over completion tokens, chosen and rejected in one forward, padding masked; with
    ld_alpha also the LD-DPO sums, with wpo also the WPO sums (see LogpOutput).

    Position t predicts token t+1, so we score hidden states at t where score_mask[t+1] is True.
    """
    device = next(model.parameters()).device
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    rows, pos = batch.score_mask[:, 1:].nonzero(as_tuple=True)
    rows, pos = rows.to(device), pos.to(device)
    targets = ids[rows, pos + 1]
    logps, means, _, log_sum_sq = tapped_forward(
        model, rows, pos, targets, chunk_size, wpo, input_ids=ids, attention_mask=attn, use_cache=False
    )
    return _split_pairs(rows, logps, means, ids.shape[0], token_logps, ld_alpha, log_sum_sq)


# ------------------------------------------------------------------------------------------- prefix sharing
def supports_prompt_sharing(model) -> bool:
    """Prompt sharing needs a custom 4D attention mask, which HF's sdpa and eager attention accept."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", "eager")


def _triple_mask(seg: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """seg [B, W]: 0 prompt, 1 chosen, 2 rejected, 3 pad -> [B, 1, W, W] mask. Causal; a completion sees the
    prompt and itself, never the other completion; pads see pads (no fully masked row, so no NaN)."""
    b, w = seg.shape
    causal = torch.ones(w, w, dtype=torch.bool, device=seg.device).tril()
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((sq == sk) | ((sk == 0) & (sq != 3)))
    if implementation == "sdpa":
        return allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def pack_triples(encoded: list[Encoded], pad_id: int):
    """One row per example: prompt, chosen, rejected. Positions restart after the prompt for the rejected reply, so
    it is exactly the sequence prompt+rejected. Returns ids, positions, segments [B, W] and scored
    (row, position, target, sequence) index tensors, sequence in the PairBatch layout
    (chosen i -> i, rejected -> B+i)."""
    b, w = len(encoded), max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
    ids = torch.full((b, w), pad_id, dtype=torch.long)
    pos = torch.zeros((b, w), dtype=torch.long)
    seg = torch.full((b, w), 3, dtype=torch.long)
    rows, cols, targets, seqs = [], [], [], []
    for i, e in enumerate(encoded):
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        ids[i, :p + c + r] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
        pos[i, :p + c] = torch.arange(p + c)
        pos[i, p + c:p + c + r] = torch.arange(p, p + r)
        seg[i, :p], seg[i, p:p + c], seg[i, p + c:p + c + r] = 0, 1, 2
        # the prompt's last state predicts both first tokens; each later token comes from its predecessor
        for start, toks, seq in ((p, e.chosen_ids, i), (p + c, e.rejected_ids, b + i)):
            cols += [p - 1] + list(range(start, start + len(toks) - 1))
            rows += [i] * len(toks)
            targets += list(toks)
            seqs += [seq] * len(toks)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ids, pos, seg, as_long(rows), as_long(cols), as_long(targets), as_long(seqs)


def shared_prompt_logps(model, encoded: list[Encoded], pad_id: int, chunk_size: int | None = None,
                        token_logps: bool = False, ld_alpha: float | None = None, wpo: bool = False) -> LogpOutput:
    """Same numbers as `sequence_logps`, but each prompt runs ONCE: chosen and rejected both attend to the one
    copy of its keys/values in a single forward over [prompt | chosen | rejected] rows."""
    if any(len(e.prompt_ids) == 0 for e in encoded):  # nothing to share; the plain path handles it
        return sequence_logps(model, collate_pairs(encoded, pad_id), chunk_size, token_logps, ld_alpha, wpo)
    device = next(model.parameters()).device
    ids, pos, seg, rows, cols, targets, seqs = (t.to(device) for t in pack_triples(encoded, pad_id))
    impl = model.config._attn_implementation
    mask = _triple_mask(seg, impl, next(p for p in model.parameters() if p.is_floating_point()).dtype)
    logps, means, _, log_sum_sq = tapped_forward(
        model, rows, cols, targets, chunk_size, wpo, input_ids=ids, attention_mask=mask, position_ids=pos,
        use_cache=False)
    return _split_pairs(seqs, logps, means, 2 * len(encoded), token_logps, ld_alpha, log_sum_sq)


# ---------------------------------------------------------------------------------------- the one entry point
def pair_logps(model, encoded: list[Encoded], pad_id: int, chunk_size: int | None = None, share: bool = True,
               token_logps: bool = False, ld_alpha: float | None = None, wpo: bool = False) -> LogpOutput:
    """What both stages call: each prompt run once (`shared_prompt_logps`) when `share` is asked and the model's
    attention takes the custom mask (`supports_prompt_sharing`), else the plain 2B-row forward (`sequence_logps`).
    The numbers are the same either way (tests/test_logprobs.py)."""
    if share and supports_prompt_sharing(model):
        return shared_prompt_logps(model, encoded, pad_id, chunk_size, token_logps, ld_alpha, wpo)
    return sequence_logps(model, collate_pairs(encoded, pad_id), chunk_size, token_logps, ld_alpha, wpo)
