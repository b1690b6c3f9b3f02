"""stages.model.segattn: attention from segment boundaries ("dpo_segments") equals the dense-mask layout.

Reference: the same tiny random model under transformers' "sdpa" attention with a dense [B, 1, T, T] bool mask built
here from the Layout (causal; a reply sees its prompt and itself; nothing sees another block; pads see pads) -- the
mask replylogps._reply_mask builds for one block per row (checked below) -- and position ids restarting per block,
every reply continuing its prompt's. Compared: the logits at every non-pad position and the gradients of a random
weighted sum of them w.r.t. every parameter. Tolerances come from tests/bounds.py (token_tol of the logit scale Z;
sum_tol for a gradient summed over the N scored positions); float64 scales them by its own epsilon. The bound is
shown to fail when a reply may also see the reply before it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from stages.model import replylogps, segattn
from stages.model.segattn import LAYOUT_KWARG, NAME, Block, Layout, segment_attention, segments
from tests.bounds import EPS32, logit_scale, sum_tol, token_tol

torch.set_num_threads(1)  # 2 shared cores

EPS = {torch.float32: 1.0, torch.float64: float(torch.finfo(torch.float64).eps) / EPS32,
       torch.bfloat16: float(torch.finfo(torch.bfloat16).eps) / EPS32}  # bounds.py's fp32 tolerances, rescaled
ONE_BLOCK = [[(5, [3])], [(4, [2, 6])], [(7, [3, 1, 4])], [(2, [5, 2, 3, 4])]]  # K = 1..4, rows of 8..16 + pads
PACKED = [[(5, [3, 4]), (2, [6]), (3, [1, 2, 2])], [(6, [2, 2, 2, 2]), (1, [1])], [(4, [5])]]
TINY = [[(1, [1])], [(1, [1]), (1, [1, 1])]]  # 1-token prompts and replies
CASES = {"one_block": ONE_BLOCK, "packed": PACKED, "tiny": TINY}


class Stub(torch.nn.Module):
    """What segment_attention reads of the attention module: training and is_causal."""
    is_causal = True


# ----------------------------------------------------------------------------------------------- references
def _parts(layout: Layout, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] each: block number (-1 pad), part (0 prompt, j reply j), position id (each reply continues its
    prompt; 0 on pads)."""
    b = len(layout.rows)
    block, part, pos = torch.full((b, t), -1), torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)
    for i, blocks in enumerate(layout.rows):
        for n, blk in enumerate(blocks):
            ps, pl = blk.prompt
            block[i, ps:ps + pl], pos[i, ps:ps + pl] = n, torch.arange(pl)
            for j, (rs, rl) in enumerate(blk.replies, start=1):
                block[i, rs:rs + rl], part[i, rs:rs + rl], pos[i, rs:rs + rl] = n, j, torch.arange(pl, pl + rl)
    return block, part, pos


def dense_mask(layout: Layout, t: int, leak: bool = False) -> torch.Tensor:
    """[B, 1, T, T] bool, the layout as a dense mask; `leak`: reply j also sees reply j-1 of its block (wrong)."""
    block, part, _ = _parts(layout, t)
    bq, bk, pq, pk = block[:, :, None], block[:, None, :], part[:, :, None], part[:, None, :]
    seen = (pk == 0) | (pq == pk) | (leak & (pk >= 1) & (pq == pk + 1))
    allowed = ((bq == bk) & (bq >= 0) & seen) | ((bq < 0) & (bk < 0))  # pads see pads: no fully masked row
    return (allowed & torch.ones(t, t, dtype=torch.bool).tril())[:, None]


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2):
    """model(arch, dtype): the tiny random model in eval mode under "sdpa" (cached)."""
    segattn.register()
    paths, cache = {"llama": tiny_llama, "qwen2": tiny_qwen2}, {}

    def get(arch: str, dtype=torch.float32):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = AutoModelForCausalLM.from_pretrained(str(paths[arch]), dtype=dtype,
                                                                      attn_implementation="sdpa").eval()
        return cache[arch, dtype]

    return get


def _run(model, ids, pos, weights, impl: str, **kwargs):
    """(logits, gradients of sum(weights * logits) w.r.t. every parameter) under attention `impl`."""
    model.set_attn_implementation(impl)
    try:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    finally:
        model.set_attn_implementation("sdpa")
    return logits.detach(), grads


def _both(model, layout: Layout, leak: bool = False, seed: int = 0):
    """Dense reference and segments run over the same random ids: (dense, segments, non-pad [B, T], Z)."""
    t = max(layout.lengths) + 3  # every row padded at the end
    gen = torch.Generator().manual_seed(seed)
    block, _, pos = _parts(layout, t)
    ids = torch.randint(3, 512, (len(layout.rows), t), generator=gen)
    keep = block >= 0
    dtype = model.dtype
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=gen).to(dtype) * keep[..., None]
    dense = _run(model, ids, pos, weights, "sdpa", attention_mask=dense_mask(layout, t, leak))
    with segments(layout):
        seg = _run(model, ids, pos, weights, NAME)
    seqs = [ids[i, blk.prompt[0]:sum(blk.prompt)].tolist() + ids[i, rs:rs + rl].tolist()
            for i, blocks in enumerate(layout.rows) for blk in blocks for rs, rl in blk.replies]
    return dense, seg, keep, logit_scale(model, seqs)


def _outside(dense, seg, keep, z: float, dtype) -> tuple[float, list[str]]:
    """(largest logit difference over its bound, names of parameters whose gradient is outside its bound).
    Logits: token_tol(Z) each. Gradients: each a sum over the N scored positions of terms of at most the
    parameter's largest gradient, each off by token_tol-like rounding: sum_tol(N, max |grad|)."""
    diff = (dense[0] - seg[0])[keep].abs().max().item()
    n = int(keep.sum())
    bad = [str(i) for i, (g, h) in enumerate(zip(dense[1], seg[1]))
           if (g - h).abs().max().item() > sum_tol(n, g.abs().max().item()) * EPS[dtype]]
    return diff / (token_tol(z) * EPS[dtype]), bad


# --------------------------------------------------------------------------- 1. equal to the dense layout
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_segments_equal_dense_mask(models, arch, dtype, case):
    """Logits at every non-pad position and all parameter gradients equal the dense-mask run within the bounds:
    one block per row (K = 1..4 replies, rows of different lengths), packed blocks, 1-token prompts/replies."""
    layout = Layout.of_lengths(CASES[case])
    dense, seg, keep, z = _both(models(arch, dtype), layout)
    ratio, bad = _outside(dense, seg, keep, z, dtype)
    assert ratio <= 1.0, f"logits differ by {ratio:.2f} x token_tol(Z)"
    assert not bad, f"gradients of parameters {bad} outside sum_tol"


def test_bound_catches_a_reply_seeing_another(models):
    """The same bounds fail when the reference lets each reply also see the reply before it (a wrong layout):
    logits far beyond token_tol(Z), and the attention weights' gradients beyond theirs."""
    dense, seg, keep, z = _both(models("qwen2"), Layout.of_lengths(ONE_BLOCK), leak=True)
    ratio, bad = _outside(dense, seg, keep, z, torch.float32)
    assert ratio > 100
    assert bad


def test_mask_is_replylogps_mask():
    """For one block per row the reference mask here is replylogps._reply_mask (today's shared layout)."""
    layout = Layout.of_lengths(ONE_BLOCK)
    t = max(layout.lengths) + 3
    block, part, _ = _parts(layout, t)
    seg = torch.where(block >= 0, part, replylogps.PAD_SEGMENT)
    assert torch.equal(dense_mask(layout, t), replylogps._reply_mask(seg, "sdpa", torch.float32))


def test_checkpointing_takes_the_layout_keyword(models):
    """Under activation checkpointing the layers are recomputed in backward: given as the forward keyword
    LAYOUT_KWARG, the layout reaches that recompute (outside any `with segments`), same gradients; given only by
    `segments()`, a backward outside the block is refused (no layout), never computed wrong."""
    model = models("llama")
    layout = Layout.of_lengths(PACKED)
    t = max(layout.lengths)
    block, _, pos = _parts(layout, t)
    ids = torch.randint(3, 512, (len(layout.rows), t), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(2))
    weights *= (block >= 0)[..., None]
    dense = _run(model, ids, pos, weights, "sdpa", attention_mask=dense_mask(layout, t))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        seg = _run(model, ids, pos, weights, NAME, **{LAYOUT_KWARG: layout})
        model.set_attn_implementation(NAME)
        with segments(layout):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        with pytest.raises(ValueError, match="no segment layout"):
            (logits * weights).sum().backward()
    finally:
        model.set_attn_implementation("sdpa")
        model.activation_checkpointing_disable()
        model.eval()
        model.zero_grad(set_to_none=True)
    assert not _outside(dense, seg, block >= 0, 1.0, torch.float32)[1]


# ------------------------------------------------------------------- 2. the function alone: gaps, dtypes
def _qkv(b: int, t: int, dtype, h: int = 4, hkv: int = 2, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=gen).to(dtype).requires_grad_() for n in (h, hkv, hkv)]


GAPPED = Layout(((Block((0, 3), ((5, 2), (7, 4))), Block((12, 2), ((14, 1),))),
                 (Block((2, 4), ((6, 3), (10, 1))),)))  # gaps, a first reply apart from its prompt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("layout", [Layout.of_lengths(PACKED), GAPPED], ids=["packed", "gapped"])
def test_attention_equals_dense_sdpa(layout, dtype):
    """segment_attention = SDPA under the dense mask (kv heads repeated) at every non-pad position, forward and
    backward. The output is a convex mix of values, so rounding stays within ULPS ulps of max |v| (token_tol of
    the value scale); pads and gaps are zeros."""
    t = max(layout.lengths) + 2
    q, k, v = _qkv(len(layout.rows), t, dtype)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(len(layout.rows), t, q.shape[1], q.shape[-1], generator=gen).to(dtype)
    keep = _parts(layout, t)[0] >= 0
    with segments(layout):
        out, weights = segment_attention(Stub(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (q.shape[0], t, q.shape[1], q.shape[-1]) and out.dtype == dtype
    assert not out[~keep].any()
    kr, vr = (x.repeat_interleave(2, dim=1) for x in (k, v))
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=dense_mask(layout, t), scale=0.3).transpose(1, 2)
    tol = token_tol(v.abs().max().item()) * EPS[dtype]
    assert (out - ref)[keep].abs().max().item() <= tol
    grads = torch.autograd.grad((out * w * keep[..., None, None]).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * w * keep[..., None, None]).sum(), (q, k, v))
    for g, r in zip(grads, refs):
        assert (g - r).abs().max().item() <= sum_tol(int(keep.sum()), r.abs().max().item()) * EPS[dtype]


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.shapes.append(tuple(x.shape))
        return out


def test_no_tensor_of_two_long_dims(monkeypatch):
    """Forward and backward over rows of T = 256 in blocks of <= 40 positions, on the math kernel (which makes the
    q.k scores as aten ops): no tensor has two dims longer than one block -- the largest is one segment's q.k,
    never [T, T]. The recorder does see a [T, T] tensor when one is made. (A CausalBias, an empty tensor subclass
    holding two lengths, cannot be constructed under a dispatch mode: it is made outside the recorder; the mask
    sdpa materialises from it on CPU is recorded.)"""
    real = segattn.causal_lower_right

    def outside_recorder(*size):
        with _disable_current_modes():
            return real(*size)

    monkeypatch.setattr(segattn, "causal_lower_right", outside_recorder)
    rows = [[(20, [10, 10]), (16, [8, 12, 4]), (30, [10])] * 2, [(12, [6, 6, 6, 6])] * 7]
    layout, t = Layout.of_lengths(rows), 256
    assert max(layout.lengths) <= t
    q, k, v = _qkv(2, t, torch.float32)
    with Shapes() as rec, sdpa_kernel(SDPBackend.MATH):
        with segments(layout):
            out, _ = segment_attention(Stub(), q, k, v, None)
        out.sum().backward()
    assert any(s[-2:] == (30, 30) for s in rec.shapes)  # the longest causal run's q.k scores
    assert all(sum(n > 40 for n in s) <= 1 for s in rec.shapes), max(rec.shapes, key=lambda s: sorted(s)[-2])
    with Shapes() as rec:
        dense_mask(layout, t)
    assert any(sum(n >= t for n in s) >= 2 for s in rec.shapes)


# ------------------------------------------------------------------------------- 3. refusals and the API
def test_refusals(models):
    layout = Layout.of_lengths([[(3, [2])]])
    q, k, v = _qkv(1, 6, torch.float32)
    with pytest.raises(ValueError, match="no segment layout"):
        segment_attention(Stub(), q, k, v, None)
    with segments(layout):
        with pytest.raises(ValueError, match="attention_mask must be None"):
            segment_attention(Stub(), q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="dropout"):
            segment_attention(Stub().train(), q, k, v, None, dropout=0.1)
        with pytest.raises(ValueError, match="does not fit"):
            segment_attention(Stub(), *(x[:, :, :4] for x in (q, k, v)), None)
        with pytest.raises(ValueError, match="does not fit"):
            segment_attention(Stub(), *(x.expand(2, -1, -1, -1) for x in (q, k, v)), None)
        with pytest.raises(ValueError, match="KV cache"):
            segment_attention(Stub(), q, k[:, :, :5], v[:, :, :5], None)
        with pytest.raises(ValueError, match="softcap"):
            segment_attention(Stub(), q, k, v, None, softcap=30.0)
        with pytest.raises(ValueError, match="sliding window"):
            segment_attention(Stub(), q, k, v, None, sliding_window=4)
        segment_attention(Stub(), q, k, v, None, sliding_window=5)
    model = models("llama")
    ids = torch.randint(3, 512, (1, 6))
    model.set_attn_implementation(NAME)
    try:
        with pytest.raises(ValueError, match="no segment layout"), torch.no_grad():
            model(input_ids=ids, use_cache=False)
        with segments(layout), pytest.raises(ValueError, match="attention_mask must be None"), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool), use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")


def test_register_and_context():
    segattn.register()
    segattn.register()
    assert ALL_ATTENTION_FUNCTIONS[NAME] is segment_attention
    outer, inner = Layout.of_lengths([[(2, [1])]]), Layout.of_lengths([[(3, [1, 1])]])
    assert segattn._LAYOUT.get() is None
    with segments(outer):
        with segments(inner):
            assert segattn._LAYOUT.get() is inner
        assert segattn._LAYOUT.get() is outer
    assert segattn._LAYOUT.get() is None


def test_layout():
    layout = Layout.of_lengths([[(3, [2, 1]), (1, [4])], []])
    assert layout.rows == ((Block((0, 3), ((3, 2), (5, 1))), Block((6, 1), ((7, 4),))), ())
    assert layout.lengths == (11, 0)
    assert Block([0, 1], [[1, 1]]) == Block((0, 1), ((1, 1),))  # lists become tuples
    for prompt, replies in [((0, 0), ()), ((0, 3), ((2, 1),)), ((0, 3), ((3, 0),)), ((0, 2), ((4, 2), (5, 1)))]:
        with pytest.raises(ValueError):
            Block(prompt, replies)
    with pytest.raises(ValueError, match="overlaps"):
        Layout(((Block((0, 3), ((3, 2),)), Block((4, 1), ())),))
