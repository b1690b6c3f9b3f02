"""stages.model.replylogps: many replies per prompt in one forward row [prompt | reply_1 | ... | reply_k] (issue 23).

References independent of the code under test: each (prompt, reply) scored ALONE from the model's full logits of
the unpadded sequence (log_softmax -> gather), and logprobs.pair_logps for rows of two replies. Tolerances come
from tests/bounds.py only (sum_tol / token_tol of the logit scale Z); tests that rely on them show that the same
bound fails when a reply may see another. The random tiny models get their head scaled by HEAD_SCALE (as in
tests/test_logprobs.py) so log-probs spread out and a wrong position or mask cannot hide inside the bound.
"""

from __future__ import annotations

import pytest
import torch

from stages.data.encode import Encoded
from stages.data.replyset import EncodedSet, Row, split_rows
from stages.model import replylogps
from stages.model.logprobs import ld_sums, pair_logps
from stages.model.replylogps import ld_pair_sums, prefix_sums, rows_logps
from tests.bounds import EPS32, ULPS, logit_scale, sum_tol, token_tol
from tests.tiny import scaled_models

torch.set_num_threads(1)  # 2 shared cores

PAD = 2            # the tiny tokenizer's <|endoftext|>
REAL_MASK = replylogps._reply_mask  # kept before any test patches it
PAIRS = [(6, 3, 8), (2, 9, 2), (11, 5, 5), (4, 1, 7)]  # (prompt, chosen, rejected) lengths: longer, shorter, equal
MIXED = [(5, (3, 7, 2, 4)), (2, (6, 1)), (9, (4, 4, 8)), (1, (2, 5, 3, 1))]  # K = 4, 2, 3, 4; prompts of 1..9


# ----------------------------------------------------------------------------------------------------- helpers
def _ids(gen: torch.Generator, n: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, 512, (n,), generator=gen).tolist())


def _rows(shape, seed: int = 0) -> list[Row]:
    """Rows of random tokens: shape = [(prompt length, (reply lengths...)), ...]; keys "b.j"."""
    gen = torch.Generator().manual_seed(seed)
    return [Row(_ids(gen, p), tuple(_ids(gen, n) for n in lens), tuple(f"{b}.{j}" for j in range(len(lens))))
            for b, (p, lens) in enumerate(shape)]


def _pairs(seed: int = 1) -> tuple[list[Encoded], list[Row]]:
    rows = _rows([(p, (c, r)) for p, c, r in PAIRS], seed)
    return [Encoded(f"{i:032x}", r.prompt_ids, *r.replies) for i, r in enumerate(rows)], rows


def _flat(rows: list[Row]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(row.prompt_ids, reply) for row in rows for reply in row.replies]


def _layouts(rows: list[Row]) -> tuple[tuple, tuple]:
    """What the spy below records for the shared layout (one row per Row, 4D mask) and the plain one (one row per
    reply, 2D mask)."""
    flat = _flat(rows)
    return ((len(rows), max(r.length for r in rows)), 4), ((len(flat), max(len(p) + len(r) for p, r in flat)), 2)


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2):
    """model(arch, impl): the tiny fp32 model with the given attention, head scaled, eval mode (cached)."""
    return scaled_models({"llama": tiny_llama, "qwen2": tiny_qwen2})


@pytest.fixture
def forwards(monkeypatch):
    """Records (input_ids shape, attention mask dims) of each forward rows_logps runs: 4 dims = shared layout."""
    calls, real = [], replylogps.tapped_forward

    def spy(model, *args, **kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"].dim()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(replylogps, "tapped_forward", spy)
    return calls


def _alone(model, prompt, reply) -> dict:
    """One (prompt, reply) as its own unpadded sequence, from the full logits: per-token log-probs, the summed
    vocabulary-mean logit and the WPO sum (log p - log sum_v p^2). Empty prompt: the first token is not scored."""
    ids = list(prompt) + list(reply)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()  # [T, V]
    first = max(len(prompt), 1)
    z = logits[first - 1:len(ids) - 1]  # positions predicting the scored tokens
    lse = z.logsumexp(-1)
    per_token = z.gather(-1, torch.tensor(ids[first:])[:, None]).squeeze(-1) - lse
    wpo = per_token - (torch.logsumexp(2 * z, -1) - 2 * lse)
    return {"per_token": per_token, "logp": per_token.double().sum(), "tokens": len(ids) - first,
            "logits_sum": z.mean(-1).double().sum(), "wpo": wpo.double().sum()}


def leaky_reply_mask(seg: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A wrong mask: like replylogps._reply_mask, but reply j also attends to reply j-1 before it (the bug the
    shared layout must never have; tests/bounds.leaky_triple_mask for k replies)."""
    allowed = REAL_MASK(seg, "sdpa", dtype)[:, 0]
    leak = (seg[:, None, :] >= 1) & (seg[:, :, None] == seg[:, None, :] + 1)
    allowed = (allowed | leak) & torch.ones_like(allowed[0]).tril()
    if implementation == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _references(model, rows):
    refs = [_alone(model, p, r) for p, r in _flat(rows)]
    return refs, logit_scale(model, [list(p) + list(r) for p, r in _flat(rows)])


def _outside(actual: torch.Tensor, expected: torch.Tensor, n_tokens: torch.Tensor, z: float) -> torch.Tensor:
    """[R] bool: which sums lie outside sum_tol(n, Z) of the expected ones."""
    return (actual.detach().double() - expected.detach().double()).abs() > sum_tol(n_tokens.double(), z)


def _assert_close_sums(actual, expected, n_tokens, z, what):
    bad = _outside(actual, expected, n_tokens, z)
    assert not bad.any(), f"{what}: replies {bad.nonzero().flatten().tolist()} outside sum_tol"


def _assert_matches_alone(out, refs, z, wpo: bool = True):
    """Each reply as scored alone: token counts exact; sums and summed mean logits within sum_tol(n, Z); each token
    within token_tol(Z). WPO: log sum_v p^2 = lse(2z) - 2 lse(z) adds two logsumexps of logits up to 2Z and Z,
    each rounded like a log-prob (token_tol), to the token's own log-prob: token_tol(Z + 2Z + 2Z) per token."""
    n = torch.tensor([r["tokens"] for r in refs])
    assert torch.equal(out.tokens.cpu(), n)
    assert out.logps.dtype == torch.float64 and out.logps.shape == (len(refs),)
    _assert_close_sums(out.logps, torch.stack([r["logp"] for r in refs]), n, z, "logps")
    _assert_close_sums(out.logits_sum, torch.stack([r["logits_sum"] for r in refs]), n, z, "logits_sum")
    for got, ref in zip(out.token_logps, refs):
        torch.testing.assert_close(got, ref["per_token"], rtol=0, atol=token_tol(z))
    if wpo:
        _assert_close_sums(out.wpo_logps, torch.stack([r["wpo"] for r in refs]), n, 5 * z, "wpo")


# ----------------------------------------------------------------------------- 1. rows of two = the pair path
@pytest.mark.parametrize("share", [True, False], ids=["shared", "plain"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_of_two_equal_pair_logps(models, forwards, arch, impl, share):
    """[prompt | chosen | rejected] rows give pair_logps' numbers (same share setting): reply 2i is chosen i,
    reply 2i+1 rejected i."""
    model = models(arch, impl)
    encoded, rows = _pairs()
    with torch.no_grad():
        pair = pair_logps(model, encoded, PAD, chunk_size=3, share=share, token_logps=True, wpo=True)
        out = rows_logps(model, rows, PAD, chunk_size=3, share=share, token_logps=True, wpo=True)
    assert forwards == [_layouts(rows)[0 if share else 1]]  # one forward, in the layout asked for
    z = logit_scale(model, [list(p) + list(r) for p, r in _flat(rows)])
    b = len(encoded)
    order = torch.arange(2 * b).view(b, 2).t().flatten()  # [chosen 0..B-1, rejected 0..B-1] as pair_logps lists
    n = torch.cat([pair.chosen_tokens, pair.rejected_tokens])
    assert torch.equal(out.tokens[order], n)
    _assert_close_sums(out.logps[order], torch.cat([pair.chosen_logps, pair.rejected_logps]), n, z, "logps")
    _assert_close_sums(out.logits_sum[order], torch.cat([pair.chosen_logits_sum, pair.rejected_logits_sum]), n, z,
                       "logits_sum")
    _assert_close_sums(out.wpo_logps[order], torch.cat([pair.chosen_wpo_logps, pair.rejected_wpo_logps]), n, 5 * z,
                       "wpo")  # bound: see _assert_matches_alone
    for i, j in enumerate(order.tolist()):
        torch.testing.assert_close(out.token_logps[j], pair.token_logps[i], rtol=0, atol=token_tol(z))
    assert out.cumulative is None and out.starts is None


# -------------------------------------------------------------------- 2. many replies = each reply alone
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_many_replies_equal_each_reply_alone(models, forwards, arch, impl):
    """Rows of K = 4, 2, 3, 4 replies, prompts of 1..9 tokens, padded: each reply's numbers are those of prompt +
    reply scored alone, in the shared layout (one row per prompt) and the plain one (one row per reply)."""
    model = models(arch, impl)
    rows = _rows(MIXED)
    refs, z = _references(model, rows)
    for share in (True, False):
        with torch.no_grad():
            out = rows_logps(model, rows, PAD, chunk_size=4, share=share, token_logps=True, wpo=True)
        _assert_matches_alone(out, refs, z)
    assert forwards == list(_layouts(rows))
    assert min(float(r["per_token"].min()) for r in refs) < max(float(r["per_token"].max()) for r in refs) - 1.0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bound_catches_a_reply_seeing_another(models, monkeypatch, impl):
    """The bound above is loose enough for rounding, yet it fails every reply after the first of its row when a
    reply may also attend to the reply before it; the first replies stay within it, and so do one-token replies
    (their one token is predicted by the prompt's last state, which the leak does not reach)."""
    model = models("qwen2", impl)
    rows = _rows(MIXED)
    refs, z = _references(model, rows)
    monkeypatch.setattr(replylogps, "_reply_mask", leaky_reply_mask)
    with torch.no_grad():
        out = rows_logps(model, rows, PAD, chunk_size=4)
    leaked = torch.tensor([j > 0 and len(reply) > 1 for row in rows for j, reply in enumerate(row.replies)])
    bad = _outside(out.logps, torch.stack([r["logp"] for r in refs]), out.tokens, z)
    assert torch.equal(bad, leaked) and leaked.sum() >= 6, bad.tolist()


def test_split_rows_same_values_as_one_row(models):
    """A set split under a small budget (several rows, each with its own copy of the prompt, some replies alone)
    gives each reply the numbers it gets in one row with all replies."""
    model = models("llama")
    gen = torch.Generator().manual_seed(5)
    replies = tuple(_ids(gen, n) for n in (4, 9, 2, 3, 12))
    s = EncodedSet("p" * 32, tuple(f"r{j}" for j in range(5)), _ids(gen, 6), replies, (1.0, 0.0, 3.0, 2.0, -1.0))
    split = split_rows(s, budget=6 + 8)
    assert len(split) >= 3 and any(len(r.replies) > 1 for r in split)
    whole = [Row(s.prompt_ids, s.replies, s.reply_ids)]
    with torch.no_grad():
        one = rows_logps(model, whole, PAD, chunk_size=5)
        parts = rows_logps(model, split, PAD, chunk_size=5)
    keys = [k for r in split for k in r.keys]
    by_key = torch.tensor([s.reply_ids.index(k) for k in keys])
    assert torch.equal(parts.tokens, one.tokens[by_key])
    z = logit_scale(model, [list(s.prompt_ids) + list(r) for r in replies])
    _assert_close_sums(parts.logps, one.logps[by_key], one.tokens[by_key], z, "logps")
    _assert_close_sums(parts.logits_sum, one.logits_sum[by_key], one.tokens[by_key], z, "logits_sum")


# -------------------------------------------------------------------------------------------- 3. gradients
def _grads(model, rows, share: bool, alpha: float = 0.4) -> tuple[torch.Tensor, int]:
    """All parameter gradients of a weighted sum of reply sums, prefix sums and LD-DPO pair sums."""
    model.zero_grad(set_to_none=True)
    out = rows_logps(model, rows, PAD, chunk_size=5, share=share, cumulative=True)
    assert out.logps.requires_grad and out.cumulative.requires_grad
    r = out.logps.shape[0]
    weights = torch.linspace(1.0, -0.5, r, dtype=torch.float64)
    reply = torch.arange(r)
    prefix = prefix_sums(out, reply, out.tokens // 2)
    chosen, rejected = ld_pair_sums(out, torch.tensor([0, 2, 7]), torch.tensor([3, 1, 5]), alpha)
    ((weights * out.logps).sum() + 0.3 * prefix.sum() + (chosen - 0.5 * rejected).sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, int(out.tokens.sum())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gc"])
def test_shared_gradients_equal_plain(models, monkeypatch, checkpointing):
    """d(objective)/d(every weight) in the shared layout equals the plain layout's (with and without the layers'
    activation checkpointing, as training runs). Bound (as test_logprobs' _grad_rel): a gradient is a sum over the
    n scored tokens of each token's share; rounding moves each share by ULPS ulps (tests/bounds.py), so the total
    by <= ULPS * EPS32 * n relative to max |gradient| (measured: ~1e-7 against ~1e-4 here). A reply seeing the
    reply before it moves the gradients far beyond that bound."""
    model = models("llama", fresh=True)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
        model.train()
    rows = _rows(MIXED, seed=3)
    plain, n = _grads(model, rows, share=False)
    shared, _ = _grads(model, rows, share=True)
    rel = ULPS * EPS32 * n
    assert plain.abs().max() > 0 and plain.numel() == sum(p.numel() for p in model.parameters())
    assert (shared - plain).abs().max() <= rel * plain.abs().max()
    monkeypatch.setattr(replylogps, "_reply_mask", leaky_reply_mask)
    wrong, _ = _grads(model, rows, share=True)
    assert (wrong - plain).abs().max() > rel * plain.abs().max()


# --------------------------------------------------------------------------------- 4. LD-DPO and prefixes
def test_ld_pair_sums_equal_ld_sums(models):
    """Rows of two: ld_pair_sums = pair_logps' LD-DPO sums. Any pairs of a K-reply batch (across rows, either
    order): = logprobs.ld_sums over the same token log-probs laid out as pairs."""
    model, alpha = models("qwen2"), 0.3
    encoded, rows = _pairs()
    z = logit_scale(model, [list(p) + list(r) for p, r in _flat(rows)])
    with torch.no_grad():
        pair = pair_logps(model, encoded, PAD, share=True, ld_alpha=alpha)
        out = rows_logps(model, rows, PAD, cumulative=True)
    ld_c, ld_r = ld_pair_sums(out, torch.arange(0, 8, 2), torch.arange(1, 8, 2), alpha)
    _assert_close_sums(ld_c, pair.chosen_ld_logps, pair.chosen_tokens, z, "chosen LD")
    _assert_close_sums(ld_r, pair.rejected_ld_logps, pair.rejected_tokens, z, "rejected LD")
    assert _outside(ld_c, pair.chosen_logps, pair.chosen_tokens, z).any()  # LD differs from the plain sums here

    rows = _rows(MIXED)
    z = logit_scale(model, [list(p) + list(r) for p, r in _flat(rows)])
    with torch.no_grad():
        out = rows_logps(model, rows, PAD, token_logps=True, cumulative=True)
    chosen, rejected = torch.tensor([0, 2, 3, 5, 12, 9]), torch.tensor([3, 1, 0, 4, 7, 10])
    ld_c, ld_r = ld_pair_sums(out, chosen, rejected, alpha)
    p = chosen.shape[0]
    seqs = torch.cat([torch.full((int(out.tokens[r]),), i) for i, r in enumerate(torch.cat([chosen, rejected]))])
    tokens = torch.cat([out.token_logps[r] for r in torch.cat([chosen, rejected])])
    ref = ld_sums(seqs, tokens, 2 * p, alpha)
    n = torch.cat([out.tokens[chosen], out.tokens[rejected]])
    _assert_close_sums(torch.cat([ld_c, ld_r]), ref, n, z, "LD across rows")
    full_c, _ = ld_pair_sums(out, chosen, rejected, 1.0)
    _assert_close_sums(full_c, out.logps[chosen], out.tokens[chosen], z, "alpha 1: the plain sums")


def test_prefix_sums_by_hand(models):
    model = models("llama", "eager")
    rows = _rows(MIXED)
    with torch.no_grad():
        out = rows_logps(model, rows, PAD, token_logps=True, cumulative=True)
    assert out.cumulative.dtype == torch.float64 and out.cumulative.shape == (int(out.tokens.sum()),)
    assert torch.equal(out.starts, torch.cumsum(out.tokens, 0) - out.tokens)
    for r, toks in enumerate(out.token_logps):  # each reply's tokens contiguous and in order in `cumulative`
        steps = out.cumulative[out.starts[r]:out.starts[r] + out.tokens[r]].diff()
        torch.testing.assert_close(steps, toks[1:].double(), rtol=0, atol=1e-9)
    reply = torch.tensor([0, 0, 3, 5, 12, 7, 8])
    length = torch.tensor([0, 3, 4, 1, 1, 0, 8])  # none, part or all of replies of 3 3 4 1 1 4 8 tokens
    got = prefix_sums(out, reply, length)
    by_hand = torch.stack([out.token_logps[r][:n].double().sum() for r, n in zip(reply.tolist(), length.tolist())])
    z = logit_scale(model, [list(p) + list(r) for p, r in _flat(rows)])
    _assert_close_sums(got, by_hand, length, z, "prefix")
    assert got[0] == 0 and got[5] == 0
    with pytest.raises(ValueError, match="longer than its reply"):
        prefix_sums(out, torch.tensor([1]), out.tokens[1:2] + 1)
    with torch.no_grad():
        plain = rows_logps(model, rows, PAD)
    with pytest.raises(ValueError, match="cumulative=True"):
        prefix_sums(plain, reply, length)
    with pytest.raises(ValueError, match="cumulative=True"):
        ld_pair_sums(plain, reply, reply, 0.5)


# ------------------------------------------------------------------------------------ 5. the plain layout
def test_no_prompt_sharing_support_takes_plain_layout(models, forwards, monkeypatch):
    """An attention that takes no 4D mask (supports_prompt_sharing False): one plain row per reply, same numbers."""
    model = models("qwen2")
    rows = _rows(MIXED)
    refs, z = _references(model, rows)
    monkeypatch.setattr(replylogps, "supports_prompt_sharing", lambda m: False)
    with torch.no_grad():
        out = rows_logps(model, rows, PAD, chunk_size=3, share=True, token_logps=True, wpo=True)
    assert forwards == [_layouts(rows)[1]]
    _assert_matches_alone(out, refs, z)


def test_empty_prompt_takes_plain_layout(models, forwards):
    """A row with no prompt has nothing to share: every row goes plain; its first reply token has no predecessor
    and is not scored (as for pairs)."""
    model = models("llama")
    rows = _rows(MIXED[:2]) + [Row((), ((7, 8, 9, 10), (11, 12)), ("e.0", "e.1"))]
    refs, z = _references(model, rows)
    with torch.no_grad():
        out = rows_logps(model, rows, PAD, token_logps=True, wpo=True)
    assert forwards == [_layouts(rows)[1]]
    assert out.tokens[-2:].tolist() == [3, 1]
    _assert_matches_alone(out, refs, z)
