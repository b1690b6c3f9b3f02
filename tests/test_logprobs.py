"""stages.model.logprobs: the one sequence log-prob function (issue 2) and its memory-lean head tap (issue 8).

Every check compares against something independent of the tap: values worked out by hand from the model's full
logits, a naive full-logits reference (log_softmax -> gather -> mask -> sum), and autograd through that reference
for LoRA gradients. The tiny models are random, so their logits are near zero and every token's log-prob is near
-log(V); `_load` scales the output head by HEAD_SCALE so log-probs spread out and an off-by-one in positions or
targets cannot hide inside the tolerance.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stages.data.encode import Encoded, TokenizeSettings, encode_examples
from stages.data.rows import Example
from stages.model.logprobs import (
    PairBatch,
    _chunk_logps,
    collate_pairs,
    output_head,
    sequence_logps,
    shared_prompt_logps,
    supports_prompt_sharing,
)
from stages.model.models import ModelSpec, load_model, load_tokenizer
from tests.bounds import EPS32, ULPS, leaky_triple_mask, logit_scale, pair_sequences, sum_tol, token_tol

torch.set_num_threads(1)  # 2 shared cores

CPU = torch.device("cpu")
HEAD_SCALE = 20.0  # logits std ~0.15 -> ~3 on the random tiny models
LM_BODY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ex(i: int, prompt, chosen, rejected, is_chat: bool = False) -> Example:
    return Example(f"{i:032x}", prompt, chosen, rejected, is_chat, "test.jsonl", i + 1)


def _chat(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# Prompts of different lengths; chosen longer than rejected in some rows, shorter in others; one chat row.
EXAMPLES = [
    _ex(0, "Human: What is the capital of France?\n\nAssistant:", " Paris.", " I do not know, it may be Lyon or Nice."),
    _ex(1, "Hi", " The quick brown fox jumps over the lazy dog.", " No."),
    _ex(
        2,
        (_chat("user", "How do I bake bread at home?"),),
        (_chat("assistant", "You need flour, water, yeast and salt."),),
        (_chat("assistant", "No."),),
        is_chat=True,
    ),
    _ex(3, "Water boils at one hundred degrees at sea level. Is that so?", " Yes.", " It was the age of wisdom."),
]
EMPTY_PROMPT = _ex(9, "", " The sun rises in the east.", " It sets in the west, I think.")


# ----------------------------------------------------------------------------------------------------- helpers
def _load(path, scale: bool = True, **spec):
    model = load_model(ModelSpec(str(path), **spec), CPU)
    head = output_head(model)
    if scale and type(head) is torch.nn.Linear:  # tied llama: scales the embeddings too, harmless
        with torch.no_grad():
            head.weight.mul_(HEAD_SCALE)
    return model.eval()


def _encode(path, examples=EXAMPLES):
    tok = load_tokenizer(str(path))
    encoded, skipped = encode_examples(tok, examples, TokenizeSettings(max_length=None, max_prompt_length=None))
    assert skipped == 0
    return encoded, tok.pad_token_id


def _lora(model, targets, seed: int = 0):
    """Random A AND B (init_lora_weights=False): with B = 0 every lora_A gradient would be 0 and prove nothing."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):  # deterministic adapters, caller's RNG untouched
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def naive_logps(model, batch: PairBatch) -> dict:
    """Reference: full [2B, T, V] logits -> fp32 log_softmax -> gather target -> mask -> sum (float64)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()                       # [2B, T-1, V]; position t predicts token t+1
    logp = logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [2B, T-1]
    mask = batch.score_mask[:, 1:]                            # [2B, T-1] completion targets
    b = batch.input_ids.shape[0] // 2
    sums = torch.where(mask, logp, 0.0).double().sum(-1)
    counts = mask.sum(-1)
    means = torch.where(mask, logits.detach().mean(-1), 0.0).double().sum(-1) / counts  # mean over tokens and V
    return {
        "chosen": sums[:b], "rejected": sums[b:], "chosen_tokens": counts[:b], "rejected_tokens": counts[b:],
        "chosen_mean": means[:b], "rejected_mean": means[b:],
        "per_token": [logp[i][mask[i]].detach() for i in range(2 * b)],
        "scale": float(logits.detach().abs().max()),  # logit scale Z of tests/bounds.py
    }


def _objective(chosen, rejected):
    return chosen.sum() - 0.5 * rejected.sum()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    model.zero_grad(set_to_none=True)
    return grads


def _grad_rel(n_tokens: int) -> float:
    """A LoRA gradient is a sum over the n scored tokens of each token's gradient; rounding moves each token's
    share by ULPS ulps (tests/bounds.py), so the sum by <= ULPS * EPS32 * n * (largest share), taken here as
    max |gradient| (no token's share is expected to exceed the total by much: the tokens pull the same weights)."""
    return ULPS * EPS32 * n_tokens


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""):
    """max |a - e| <= rel * max |e|: relative to the tensor's scale (elementwise relative fails on ~0 entries)."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel} x {scale:.3e}"


def _assert_sums_close(actual, expected, n_tokens, z, what=""):
    """Sums of n_tokens fp32 log-probs: |a - e| <= sum_tol(n, Z) each (tests/bounds.py)."""
    err, tol = (actual.detach().double() - expected.detach().double()).abs(), sum_tol(n_tokens.double(), z)
    assert bool((err <= tol).all()), f"{what}: |diff| {err.tolist()} > bound {tol.tolist()}"


def _assert_matches_naive(out, ref):
    z = ref["scale"]
    assert torch.equal(out.chosen_tokens, ref["chosen_tokens"])
    assert torch.equal(out.rejected_tokens, ref["rejected_tokens"])
    _assert_sums_close(out.chosen_logps, ref["chosen"], out.chosen_tokens, z, "chosen")
    _assert_sums_close(out.rejected_logps, ref["rejected"], out.rejected_tokens, z, "rejected")
    # mean logit per token: each logit moves by <= token_tol(Z), so their mean (over V, then over tokens) too
    torch.testing.assert_close(out.chosen_logits_sum / out.chosen_tokens, ref["chosen_mean"], rtol=0, atol=token_tol(z))
    torch.testing.assert_close(out.rejected_logits_sum / out.rejected_tokens, ref["rejected_mean"], rtol=0,
                               atol=token_tol(z))


@pytest.fixture(scope="module")
def tiny_paths(tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}


# ------------------------------------------------------------------------------------- 1. by hand
def test_chunk_logps_by_hand_identity_head():
    """2 positions x 3-word vocabulary, identity head: log p = x[t] - log sum exp(x)."""
    hidden = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    targets = torch.tensor([2, 0])
    logps, means = _chunk_logps(lambda h: h, hidden, targets, None)
    expected = [3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)), 0.0 - math.log(1 + 1 + 2)]
    assert logps.dtype == torch.float32 and logps.shape == (2,)
    assert logps.tolist() == pytest.approx(expected, rel=1e-6)
    assert means.tolist() == pytest.approx([2.0, math.log(2.0) / 3], rel=1e-6)
    assert not means.requires_grad


def test_chunk_logps_by_hand_softcap():
    """Gemma-style final_logit_softcapping: logits -> c * tanh(logits / c) before the softmax and the mean."""
    hidden = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    cap = 2.0
    logps, means = _chunk_logps(lambda h: h, hidden, torch.tensor([1, 2]), cap)
    capped = [[cap * math.tanh(x / cap) for x in row] for row in hidden.tolist()]
    lse = [math.log(sum(math.exp(x) for x in row)) for row in capped]
    assert logps.tolist() == pytest.approx([capped[0][1] - lse[0], capped[1][2] - lse[1]], rel=1e-6)
    assert means.tolist() == pytest.approx([sum(r) / 3 for r in capped], rel=1e-6)


def test_chunk_logps_gradient_by_hand():
    """d/dx [x_t - lse(x)] = onehot(t) - softmax(x)."""
    hidden = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    lp, _ = _chunk_logps(lambda h: h, hidden, torch.tensor([0]), None)
    lp.sum().backward()
    z = sum(math.exp(x) for x in (1.0, 2.0, 3.0))
    expected = [1 - math.exp(1) / z, -math.exp(2) / z, -math.exp(3) / z]
    assert hidden.grad[0].tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequence_logps_by_hand_one_pair(tiny_paths, arch):
    """One pair. Prompt length p, completion length c: positions p-1 .. p+c-2 predict tokens p .. p+c-1.
    The log-softmax is done here in Python floats from the model's own full logits of the unpadded sequence."""
    path = tiny_paths[arch]
    (enc,), pad = _encode(path, [EXAMPLES[0]])
    model = _load(path)
    batch = collate_pairs([enc], pad)
    with torch.no_grad():
        out = sequence_logps(model, batch, chunk_size=2, token_logps=True)
    for row, completion in enumerate((enc.chosen_ids, enc.rejected_ids)):
        ids = list(enc.prompt_ids) + list(completion)
        p, c = len(enc.prompt_ids), len(completion)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().tolist()  # [p+c, V]
        by_hand = []
        for j in range(c):
            position, target = p - 1 + j, p + j
            row_logits = logits[position]
            top = max(row_logits)
            lse = top + math.log(sum(math.exp(x - top) for x in row_logits))
            by_hand.append(row_logits[ids[target]] - lse)
        total = (out.chosen_logps if row == 0 else out.rejected_logps)[0].item()
        tokens = (out.chosen_tokens if row == 0 else out.rejected_tokens)[0].item()
        assert tokens == c
        z = max(max(map(abs, logits[p - 1 + j])) for j in range(c))  # logit scale Z of tests/bounds.py
        assert out.token_logps[row].tolist() == pytest.approx(by_hand, rel=0, abs=token_tol(z))  # tests/bounds.py
        assert total == pytest.approx(sum(by_hand), rel=0, abs=sum_tol(c, z))
        assert min(by_hand) < max(by_hand) - 1.0  # the head scaling makes tokens differ (test is discriminative)


# ----------------------------------------------------------------------- 2. against the naive reference
def test_collate_pairs_layout(tiny_llama):
    encoded, pad = _encode(tiny_llama)
    batch = collate_pairs(encoded, pad)
    b = len(encoded)
    assert batch.input_ids.shape[0] == 2 * b and batch.encoded == list(encoded)
    for i, e in enumerate(encoded):
        for row, comp in ((i, e.chosen_ids), (b + i, e.rejected_ids)):
            p, n = len(e.prompt_ids), len(e.prompt_ids) + len(comp)
            assert batch.input_ids[row, :n].tolist() == list(e.prompt_ids) + list(comp)
            assert batch.input_ids[row, n:].eq(pad).all() and batch.attention_mask[row, n:].eq(0).all()
            assert batch.attention_mask[row, :n].eq(1).all()
            assert batch.score_mask[row].nonzero().flatten().tolist() == list(range(p, n))
    assert int((batch.attention_mask == 0).sum()) > 0  # rows really are of different lengths


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_naive_reference(tiny_paths, arch, chunk):
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    model = _load(path)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        ref = naive_logps(model, batch)
        out = sequence_logps(model, batch, chunk_size=chunk)
    _assert_matches_naive(out, ref)
    assert out.chosen_logps.dtype == torch.float64 and out.token_logps is None
    assert len(set(len(e.prompt_ids) for e in encoded)) == len(encoded)  # prompts of different lengths


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_naive_per_example_batch_independent(tiny_paths, arch):
    """An example's numbers do not depend on what it is batched with (padding is masked)."""
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    model = _load(path)
    z = logit_scale(model, pair_sequences(encoded))
    with torch.no_grad():
        full = sequence_logps(model, collate_pairs(encoded, pad), chunk_size=3)
        for i, e in enumerate(encoded):
            one = sequence_logps(model, collate_pairs([e], pad), chunk_size=3)
            _assert_sums_close(one.chosen_logps, full.chosen_logps[i:i + 1], one.chosen_tokens, z, "chosen")
            _assert_sums_close(one.rejected_logps, full.rejected_logps[i:i + 1], one.rejected_tokens, z, "rejected")


# ------------------------------------------------------------------------------ 3. LoRA gradients
def _grads_ours_vs_naive(model, batch, chunk, gradient_checkpointing=False):
    """LoRA grads of chosen.sum() - 0.5 rejected.sum(): naive (no checkpointing) first, then ours."""
    model.train()
    ref = naive_logps(model, batch)
    _objective(ref["chosen"], ref["rejected"]).backward()
    expected = _lora_grads(model)
    layer_calls = []
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers checkpoints the layer's `forward` (the layer's own hooks do not rerun) and the recompute
        # stops early once the last saved tensor is rebuilt, so count entries (pre-hook) into a submodule
        mlp = model.get_base_model().model.layers[0].mlp
        handle = mlp.register_forward_pre_hook(lambda *a: layer_calls.append(1))
    out = sequence_logps(model, batch, chunk_size=chunk)
    assert out.chosen_logps.requires_grad and out.rejected_logps.requires_grad
    forward_calls = len(layer_calls)
    _objective(out.chosen_logps, out.rejected_logps).backward()
    if gradient_checkpointing:
        handle.remove()
        assert forward_calls == 1 and len(layer_calls) == 2, "checkpointing did not recompute the layer in backward"
    actual = _lora_grads(model)
    _assert_matches_naive(out, ref)
    assert actual.keys() == expected.keys()
    n_tokens = int(out.chosen_tokens.sum() + out.rejected_tokens.sum())
    for name in expected:
        _assert_rel(actual[name], expected[name], _grad_rel(n_tokens), what=name)
    return actual


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "gc"])
@pytest.mark.parametrize("head", ["with_lm_head", "no_lm_head"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_gradients_match_naive(tiny_paths, arch, head, gradient_checkpointing):
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    targets = LM_BODY + (["lm_head"] if head == "with_lm_head" else [])
    model = _lora(_load(path), targets)
    grads = _grads_ours_vs_naive(model, collate_pairs(encoded, pad), chunk=3,
                                 gradient_checkpointing=gradient_checkpointing)
    on_head = [n for n in grads if "lm_head" in n]
    assert bool(on_head) == (head == "with_lm_head")
    assert all(g.abs().max() > 0 for g in grads.values())


def test_lora_gradients_match_naive_nf4(tiny_llama):
    """NF4 base (bitsandbytes on CPU) + LoRA: our path vs the naive path on the same quantised model."""
    bnb = pytest.importorskip("bitsandbytes")
    encoded, pad = _encode(tiny_llama)
    base = _load(tiny_llama, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = _lora(base, LM_BODY + ["lm_head"])
    grads = _grads_ours_vs_naive(model, collate_pairs(encoded, pad), chunk=3)
    assert any("q_proj" in n for n in grads) and any("lm_head" in n for n in grads)


def test_lora_gradients_match_naive_nf4_gradient_checkpointing(tiny_qwen2):
    pytest.importorskip("bitsandbytes")
    encoded, pad = _encode(tiny_qwen2)
    model = _lora(_load(tiny_qwen2, load_in_4bit=True), LM_BODY)
    _grads_ours_vs_naive(model, collate_pairs(encoded, pad), chunk=1024, gradient_checkpointing=True)


def test_eval_mode_inference_equals_training_values(tiny_llama):
    """Stage one (no_grad, eval) and stage two (grad, train) go through the same code: same numbers."""
    encoded, pad = _encode(tiny_llama)
    model = _lora(_load(tiny_llama), LM_BODY + ["lm_head"])
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        inference = sequence_logps(model.eval(), batch, chunk_size=5)
    training = sequence_logps(model.train(), batch, chunk_size=5)
    assert not inference.chosen_logps.requires_grad and training.chosen_logps.requires_grad
    z = logit_scale(model, pair_sequences(encoded))
    _assert_sums_close(training.chosen_logps, inference.chosen_logps, inference.chosen_tokens, z, "chosen")
    _assert_sums_close(training.rejected_logps, inference.rejected_logps, inference.rejected_tokens, z, "rejected")


# ------------------------------------------------------------------------------ 4. prompt sharing
def _assert_same(shared, plain, z):
    """Two attention layouts of the same model: sums within sum_tol(tokens, Z) (tests/bounds.py); the summed
    vocabulary-mean logits too (each token's mean logit moves by <= token_tol(Z))."""
    assert torch.equal(shared.chosen_tokens, plain.chosen_tokens)
    assert torch.equal(shared.rejected_tokens, plain.rejected_tokens)
    _assert_sums_close(shared.chosen_logps, plain.chosen_logps, plain.chosen_tokens, z, "chosen")
    _assert_sums_close(shared.rejected_logps, plain.rejected_logps, plain.rejected_tokens, z, "rejected")
    _assert_sums_close(shared.chosen_logits_sum, plain.chosen_logits_sum, plain.chosen_tokens, z, "chosen logits")
    _assert_sums_close(shared.rejected_logits_sum, plain.rejected_logits_sum, plain.rejected_tokens, z,
                       "rejected logits")


@pytest.mark.parametrize("chunk", [2, 1024])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_equals_sequence_logps(tiny_paths, arch, chunk):
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    model = _load(path)
    assert supports_prompt_sharing(model)
    with torch.no_grad():
        plain = sequence_logps(model, collate_pairs(encoded, pad), chunk_size=chunk)
        shared = shared_prompt_logps(model, encoded, pad, chunk_size=chunk)
    _assert_same(shared, plain, logit_scale(model, pair_sequences(encoded)))
    assert any(len(e.chosen_ids) > len(e.rejected_ids) for e in encoded)
    assert any(len(e.chosen_ids) < len(e.rejected_ids) for e in encoded)


@pytest.mark.parametrize("impl, share, path", [("sdpa", True, "shared"), ("eager", True, "shared"),
                                               ("sdpa", False, "plain"), ("flash_attention_2", True, "plain")])
def test_pair_logps_shares_the_prompt_only_when_asked_and_supported(monkeypatch, impl, share, path):
    """The one entry point of both stages: the shared path needs --share-prompt AND an attention taking a 4D mask."""
    import types

    from stages.model import logprobs

    taken = []
    monkeypatch.setattr(logprobs, "shared_prompt_logps", lambda *a, **k: taken.append("shared"))
    monkeypatch.setattr(logprobs, "sequence_logps", lambda model, batch, *a, **k: taken.append("plain"))
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=impl))
    logprobs.pair_logps(model, [Encoded("a", (1, 2), (3,), (4, 5))], 0, 8, share=share)
    assert taken == [path]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_eager_attention(tiny_paths, arch):
    """The float (additive) mask variant used with eager attention gives the same numbers."""
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    model = _load(path)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager" and supports_prompt_sharing(model)
    with torch.no_grad():
        plain = sequence_logps(model, collate_pairs(encoded, pad))
        shared = shared_prompt_logps(model, encoded, pad)
    _assert_same(shared, plain, logit_scale(model, pair_sequences(encoded)))


@pytest.mark.parametrize("variant", ["nf4", "peft_adapter"])
def test_shared_prompt_stage_one_models(tiny_llama, variant):
    """Stage one runs prompt sharing under inference_mode on an NF4 base or a PeftModel (--adapter) too."""
    encoded, pad = _encode(tiny_llama)
    if variant == "nf4":
        model = _load(tiny_llama, load_in_4bit=True)
    else:
        model = _lora(_load(tiny_llama), LM_BODY + ["lm_head"]).eval()
    assert supports_prompt_sharing(model)
    with torch.inference_mode():
        plain = sequence_logps(model, collate_pairs(encoded, pad))
        shared = shared_prompt_logps(model, encoded, pad)
    _assert_same(shared, plain, logit_scale(model, pair_sequences(encoded)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_empty_prompt_falls_back(tiny_paths, arch):
    path = tiny_paths[arch]
    encoded, pad = _encode(path, EXAMPLES[:2] + [EMPTY_PROMPT])
    assert len(encoded[-1].prompt_ids) == 0
    model = _load(path)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        plain = sequence_logps(model, batch)
        shared = shared_prompt_logps(model, encoded, pad)
        ref = naive_logps(model, batch)
    _assert_same(shared, plain, ref["scale"])
    _assert_matches_naive(plain, ref)
    # With no prompt (and no BOS) the first completion token has no predecessor and is not scored, as in TRL.
    e = encoded[-1]
    assert plain.chosen_tokens[-1].item() == len(e.chosen_ids) - 1
    assert plain.rejected_tokens[-1].item() == len(e.rejected_ids) - 1


# ----------------------------------------------------------------------------------------- 5. per token
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_logps_sum_to_totals(tiny_qwen2, chunk):
    encoded, pad = _encode(tiny_qwen2)
    model = _load(tiny_qwen2)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        out = sequence_logps(model, batch, chunk_size=chunk, token_logps=True)
        ref = naive_logps(model, batch)
    b = len(encoded)
    assert len(out.token_logps) == 2 * b
    totals = torch.cat([out.chosen_logps, out.rejected_logps])
    counts = torch.cat([out.chosen_tokens, out.rejected_tokens])
    for i, toks in enumerate(out.token_logps):
        assert toks.shape == (counts[i].item(),)
        assert toks.double().sum().item() == pytest.approx(totals[i].item(), rel=1e-12, abs=1e-9)
        torch.testing.assert_close(toks, ref["per_token"][i], rtol=0, atol=token_tol(ref["scale"]))
    e = encoded[0]  # token order: first list entry is the first completion token of chosen 0
    assert counts[0].item() == len(e.chosen_ids)


# --------------------------------------------------------------------------- final logit soft-capping
def test_final_logit_softcapping_matches_naive():
    """Gemma-2/3 cap their logits (config.final_logit_softcapping) after the head; the tap must apply the same
    cap to its chunks, or every log-prob differs from what the model computes. Tiny random Gemma2, built here."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, final_logit_softcapping=1.0,
        pad_token_id=2, eos_token_id=1, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(cfg).eval()
        ids = [tuple(torch.randint(3, 512, (n,)).tolist()) for n in (5, 4, 7, 9, 3, 2)]
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)  # logits well beyond the cap, so capping matters
    encoded = [Encoded("a" * 32, *ids[:3]), Encoded("b" * 32, *ids[3:])]
    batch = collate_pairs(encoded, 2)
    with torch.no_grad():
        ref = naive_logps(model, batch)
        out = sequence_logps(model, batch, chunk_size=3)
    _assert_matches_naive(out, ref)


# ------------------------------------------------------------------------------------------- 6. memory
class _VocabTensors(TorchDispatchMode):
    """Records the largest freshly allocated tensor whose last dimension is the vocabulary (logits-like),
    over every op in forward AND backward; views and in-place results (sharing an input's storage) are skipped."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.ops = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and t.numel():
                if t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.numel())
        return out


@contextlib.contextmanager
def _saved_vocab_tensors(model, vocab: int):
    """Shapes of [.., V] activations that autograd keeps for backward outside checkpointed regions (a checkpoint's
    own hooks take precedence inside it); chunks that are not recomputed would keep N x V in total. Weights and
    their transposed views (e.g. the head's [H, V] weight.T saved by its linear) are not activations: skipped."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        if t.dim() and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield shapes


def _record_head(head):
    """Wrap the head's forward (inside hooks) to record what it actually computes."""
    calls = []
    original = head.forward

    def forward(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        calls.append((tuple(x.shape), tuple(y.shape), torch.is_grad_enabled()))
        return y

    head.forward = forward
    return calls


@pytest.mark.parametrize("head_lora", [True, False], ids=["lora_on_head", "frozen_head"])
def test_memory_logits_never_exceed_chunk(tiny_llama, head_lora):
    chunk = 8
    encoded, pad = _encode(tiny_llama)
    model = _lora(_load(tiny_llama), LM_BODY + (["lm_head"] if head_lora else [])).train()
    batch = collate_pairs(encoded, pad)
    vocab = model.config.vocab_size
    n_scored = int(batch.score_mask[:, 1:].sum())
    assert n_scored > 4 * chunk and batch.input_ids.numel() > 4 * chunk

    # the detectors do fire on the naive path (full logits, log-softmax and their grads; kept for backward)
    with _VocabTensors(vocab) as naive_mode, _saved_vocab_tensors(model, vocab) as naive_saved:
        ref = naive_logps(model, batch)
    _objective(ref["chosen"], ref["rejected"]).backward()
    assert naive_mode.largest >= batch.input_ids.numel() * vocab and naive_saved
    model.zero_grad(set_to_none=True)

    calls = _record_head(output_head(model))
    with _VocabTensors(vocab) as mode:
        with _saved_vocab_tensors(model, vocab) as saved:
            out = sequence_logps(model, batch, chunk_size=chunk)
        forward_calls = len(calls)
        _objective(out.chosen_logps, out.rejected_logps).backward()
    assert mode.largest <= chunk * vocab, f"a [.., V] tensor of {mode.largest} elements > chunk x V"
    assert not saved, f"[.., V] tensors kept for backward across chunks (not recomputed): {saved[:4]}"

    chunks = math.ceil(n_scored / chunk)
    own = [c for c in calls if len(c[0]) == 3]  # the model's own call on [2B, T, H] hidden states ...
    assert len(own) == 1 and own[0][0][0] == batch.input_ids.shape[0]
    assert own[0][0][1] == 0 and own[0][1][1] == 0, "the head computed logits for the full [B, T, H] input"
    assert forward_calls == 1 + chunks  # ... emptied by the tap; then one call per chunk
    real = [c for c in calls if len(c[0]) != 3]
    assert all(len(x) == 2 and x[0] <= chunk and y == (x[0], vocab) for x, y, _ in real)
    assert len(real) == 2 * chunks  # each chunk recomputed once in backward
    assert sum(x[0] for x, _, _ in real[:chunks]) == n_scored  # only scored positions reach the head
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().max() > 0 for g in grads)


# --------------------------------------------------------------------------------- slow: SmolLM2 slice
SMOL_EXAMPLES = [
    _ex(20, "Human: What is the capital of France?\n\nAssistant:", " The capital of France is Paris.", " Lyon."),
    _ex(21, ((_chat("user", "Say hi")),), (_chat("assistant", "Hi!"),), (_chat("assistant", "Hello there, friend."),),
        True),
]


@pytest.fixture(scope="module")
def smol(smollm2_slice):
    encoded, pad = _encode(smollm2_slice, SMOL_EXAMPLES)
    return smollm2_slice, encoded, pad


@pytest.mark.slow
def test_smollm2_slice_matches_naive_and_shared(smol):
    path, encoded, pad = smol
    model = _load(path, scale=False)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        ref = naive_logps(model, batch)
        out = sequence_logps(model, batch, chunk_size=7, token_logps=True)
        shared = shared_prompt_logps(model, encoded, pad, chunk_size=7)
    _assert_matches_naive(out, ref)
    _assert_same(shared, out, ref["scale"])
    for i, toks in enumerate(out.token_logps):
        torch.testing.assert_close(toks, ref["per_token"][i], rtol=0, atol=token_tol(ref["scale"]))


@pytest.mark.slow
def test_smollm2_slice_lora_gradients_match_naive(smol):
    path, encoded, pad = smol
    model = _lora(_load(path, scale=False), LM_BODY + ["lm_head"])
    grads = _grads_ours_vs_naive(model, collate_pairs(encoded, pad), chunk=16, gradient_checkpointing=True)
    assert any("lm_head" in n for n in grads)


def test_shared_prompt_gradients_equal_plain_path(tiny_llama):
    """Stage two trains through the shared-prompt layout by default: its LoRA gradients must equal the plain
    layout's (with and without gradient checkpointing)."""
    from stages.model.models import LoraSettings, ModelSpec, load_policy, load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    exs = [Example(f"g{i}", "Human: question number %d?" % i * (i + 1) + "\n\nAssistant:", " yes" * (i + 2),
                   " no, never" * (3 - i) + " x", False, "t", i) for i in range(3)]
    enc, _ = encode_examples(tok, exs, TokenizeSettings())
    for ckpt in (False, True):
        model = load_policy(ModelSpec(str(tiny_llama)), LoraSettings(dropout=0.0), torch.device("cpu"), ckpt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)  # B = 0 at init would make every lora_A gradient zero
        model.train()
        grads = []
        for run in (lambda: sequence_logps(model, collate_pairs(enc, tok.pad_token_id)),
                    lambda: shared_prompt_logps(model, enc, tok.pad_token_id)):
            model.zero_grad()
            out = run()
            (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        rel = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
        n_tokens = int(out.chosen_tokens.sum() + out.rejected_tokens.sum())
        assert rel <= _grad_rel(n_tokens), f"gradient_checkpointing={ckpt}: relative difference {rel}"


# ------------------------------------------------------------------------- the bounds still catch real errors
def _outside(actual, expected, n_tokens, z) -> torch.Tensor:
    """[B] bool: which sums are outside sum_tol(n, Z) of the expected ones."""
    return (actual.detach().double() - expected.detach().double()).abs() > sum_tol(n_tokens.double(), z)


def _with_score_mask(batch: PairBatch, edit) -> PairBatch:
    score = batch.score_mask.clone()
    for row in range(score.shape[0]):
        edit(score[row], score[row].nonzero().flatten())
    return PairBatch(batch.input_ids, batch.attention_mask, score, batch.encoded)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bounds_catch_off_by_one_and_wrong_masks(tiny_paths, arch, monkeypatch):
    """The tolerances above (tests/bounds.py) are loose enough for rounding, yet on these rows every example
    fails them when a completion loses its last token or gains the prompt's last one, when the first key is
    masked away, or when the rejected reply may attend to the chosen one (shared layout); and a dropped token
    moves the LoRA gradients by far more than _grad_rel."""
    path = tiny_paths[arch]
    encoded, pad = _encode(path)
    model = _load(path)
    batch = collate_pairs(encoded, pad)
    with torch.no_grad():
        ref = naive_logps(model, batch)
        z, n = ref["scale"], torch.cat([ref["chosen_tokens"], ref["rejected_tokens"]])
        got = torch.cat([ref["chosen"], ref["rejected"]])
        dropped = naive_logps(model, _with_score_mask(batch, lambda s, idx: s.__setitem__(idx[-1], False)))
        added = naive_logps(model, _with_score_mask(batch, lambda s, idx: s.__setitem__(idx[0] - 1, True)))
        for wrong in (dropped, added):
            assert _outside(torch.cat([wrong["chosen"], wrong["rejected"]]), got, n, z).all()
        first_key_masked = batch.attention_mask.clone()
        first_key_masked[:, 0] = 0
        wrong = sequence_logps(model, PairBatch(batch.input_ids, first_key_masked, batch.score_mask, encoded))
        assert _outside(torch.cat([wrong.chosen_logps, wrong.rejected_logps]), got, n, z).all()
        monkeypatch.setattr("stages.model.logprobs._triple_mask", leaky_triple_mask)
        leaky = shared_prompt_logps(model, encoded, pad)
        assert _outside(leaky.rejected_logps, ref["rejected"], ref["rejected_tokens"], z).all()
        assert not _outside(leaky.chosen_logps, ref["chosen"], ref["chosen_tokens"], z).any()  # chosen unaffected
    lora = _lora(model, LM_BODY).train()
    grads = []
    for scored in (batch, _with_score_mask(batch, lambda s, idx: s.__setitem__(idx[-1], False))):
        r = naive_logps(lora, scored)
        _objective(r["chosen"], r["rejected"]).backward()
        grads.append(_lora_grads(lora))
    with pytest.raises(AssertionError):
        for name in grads[0]:
            _assert_rel(grads[1][name], grads[0][name], _grad_rel(int(n.sum())), what=name)
