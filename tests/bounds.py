"""The one place where tests get their tolerances for fp32 log-prob values (sums, per-token values, losses).

Why these numbers (issue 11): two fp32 computations of the same log-prob -- other batching or padding, the
shared-prompt layout, chunking, another CPU's kernels (AVX512 / AVX2 / scalar: ATEN_CPU_CAPABILITY) -- differ only
by rounding. A token's log-prob is l = z[t] - logsumexp(z) over logits z with |z| <= Z (the logit scale). Rounding
in the forward and in the head moves each logit, and logsumexp, by a few ulps of Z (fp32 ulp = EPS32 x magnitude),
amplified by the layers: |dl| <= ULPS * EPS32 * Z per token. ULPS = 16 covers that amplification with margin: the
largest per-token difference measured on the real SmolLM2 slice (Z ~ 81) is ~1.8 EPS32 * Z under the default, AVX2
and AVX512 kernels alike. A completion's sum is accumulated in float64 (its own rounding is ~1e-16 relative,
negligible), so over n tokens |d sum| <= n * ULPS * EPS32 * Z: the worst case, every token off in the same direction.

What such a bound catches: a change of more than n * ULPS * EPS32 * Z in a sum -- an extra or missing token whose
own |log-prob| exceeds it, a position off by one (every token changes), a mask that lets a reply see the other
reply or the padding. What it cannot catch: dropping or adding a token the model is nearly sure of (|log-prob|
below the bound), or errors that happen to cancel. Tests that rely on the bound show it fails on their own data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from stages.model.logprobs import _triple_mask as _TRIPLE_MASK  # the real one, even while a test patches it

EPS32 = float(torch.finfo(torch.float32).eps)  # 2**-23: relative spacing of fp32 numbers
ULPS = 16  # ulps of the logit scale one token's log-prob may move by (measured <= 2; see the module docstring)


def token_tol(logit_scale: float) -> float:
    """Largest rounding difference of ONE token's fp32 log-prob under logits of magnitude <= logit_scale."""
    return ULPS * EPS32 * logit_scale


def sum_tol(n_tokens, logit_scale: float):
    """... of a sum over n_tokens tokens (works on ints, numpy arrays, polars Series and tensors alike)."""
    return n_tokens * token_tol(logit_scale)


def loss_tol(n_tokens_per_pair: float, logit_scale: float, beta: float) -> float:
    """Sigmoid DPO loss -log sigmoid(beta * (dc - dr)) has slope <= beta in each of the 4 summed log-probs; with
    the reference fixed and policy chosen + rejected of n_tokens_per_pair tokens together, a batch mean moves by
    at most beta * sum_tol(n_tokens_per_pair)."""
    return beta * sum_tol(n_tokens_per_pair, logit_scale)


def logit_scale(model, sequences: Iterable[Sequence[int]]) -> float:
    """max |logit| of `model` over every position of the given token sequences (one unpadded forward each)."""
    scale = 0.0
    with torch.no_grad():
        for ids in sequences:
            out = model(input_ids=torch.tensor([list(ids)]), use_cache=False)
            scale = max(scale, float(out.logits.float().abs().max()))
    assert scale > 0, "no sequences: the bound would be zero"
    return scale


def pair_sequences(encoded) -> list[list[int]]:
    """prompt + chosen and prompt + rejected of each Encoded example: what `logit_scale` should look at."""
    return [list(e.prompt_ids) + list(c) for e in encoded for c in (e.chosen_ids, e.rejected_ids)]


def logit_scale_of_files(model_dir, data, max_length=None, max_prompt_length=None, adapter=None,
                         load_in_4bit=False) -> float:
    """logit_scale of the fp32 model folder (+ adapter; NF4-quantized as stage one/two load it if load_in_4bit)
    over the encoded pairs of the data files."""
    from pathlib import Path

    from stages.data.encode import TokenizeSettings, encode_examples
    from stages.data.rows import load_examples
    from stages.model.models import ModelSpec, load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    examples, _ = load_examples([Path(d) for d in data])
    encoded, _ = encode_examples(tok, examples, TokenizeSettings(max_length, max_prompt_length))
    spec = ModelSpec(str(model_dir), load_in_4bit=load_in_4bit, adapter=adapter)
    model = load_model(spec, torch.device("cpu")).eval()
    return logit_scale(model, pair_sequences(encoded))


# ------------------------------------------------------------------ errors the bounds must catch (see tests)
def leaky_triple_mask(seg: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A wrong shared-prompt mask: like stages.model.logprobs._triple_mask, but the rejected reply (segment 2) also
    attends to the chosen reply (segment 1) before it -- the bug prompt sharing must never have."""
    good = _TRIPLE_MASK(seg, "sdpa", dtype)  # [B, 1, W, W] bool
    leak = (seg[:, :, None] == 2) & (seg[:, None, :] == 1)
    allowed = good | leak[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)


def min_token_nats(vocab_size: int, logit_scale: float) -> float:
    """Every token's |log-prob| is at least this: logsumexp(z) >= log V + min z, so l = z[t] - logsumexp(z) <=
    2 Z - log V. Positive only for near-uniform models (the tiny random ones): there a dropped or added token
    provably moves a sum by more than any bound below this."""
    import math

    return math.log(vocab_size) - 2 * logit_scale


# ------------------------------------------------------------ the same training in another rank split (torchrun)
def grad_norm_tol(grad_norm: float, n_params: int) -> float:
    """|difference| of two fp32 gradient norms sqrt(sum of n_params squares) of gradients that differ by rounding
    only, the squares added in another order (one process, or FSDP2's per-shard partial sums + an all-reduce).
    torch sums by cascade (pairwise) summation: on non-negative terms its relative error is at most
    ceil(log2 n) * EPS32 <= ULPS * EPS32 (n <= 2**16); the sqrt halves that, two runs double it; the gradients'
    own rounding difference (ULPS ulps, as a token's log-prob) adds as much again."""
    assert n_params <= 2**16, "more squares than the cascade bound above covers"
    return 2 * ULPS * EPS32 * grad_norm


def weight_tol(max_weight: float, learning_rate: float, steps: int) -> float:
    """|difference| of a trained fp32 weight between two runs whose gradients differ by rounding only: each of
    `steps` optimizer steps (bias-corrected Adam moves a weight by <= learning_rate in its first steps) may round
    differently by ULPS ulps of the step and of the weight it is added to."""
    return steps * ULPS * EPS32 * (max_weight + learning_rate)


# ------------------------------------------------------------- a merged LoRA export against PeftModel (issue 25)
MERGE_ROUNDINGS = 6  # own roundings a merged model's logits may differ from PeftModel's by (see merge_logit_tol)


def own_rounding(logits, exact_logits) -> float:
    """max |logits - exact_logits|: how far a forward in some precision lies from the same function computed in
    float64 on the same weights and inputs -- that precision's own rounding on this model (its conditioning
    included: an adapter that makes the hidden states large makes every rounding larger)."""
    return float((logits.double() - exact_logits.double()).abs().max())


def merge_logit_tol(own: float) -> float:
    """|logits of the merged model - logits of PeftModel(base, adapter)|, both in one precision p, where `own` =
    own_rounding(PeftModel's logits in p, the exact function in float64).

    Derivation. Let f be the exact logits of the weights W + s B A (W as stored; for an NF4 base, its dequantized
    values). PeftModel in p computes W x and s B (A x) separately (LoRA in fp32 over a bf16 base) and rounds their
    sum: f + e_p, |e_p| = own. The merged model runs the same forward in p on weights rounded ONCE more
    (fl_p(W + s B A): relative error <= u = eps_p / 2 per weight, where PeftModel rounds the layer's output
    instead): per linear layer one rounding of relative size u, the size of the roundings the forward already makes
    on every activation, so its own error is at most the forward's plus as much again, |e_m| <= 2 own. Hence
    |merged - Peft| <= |e_m| + |e_p| <= 3 own. `own` is one forward's maximum over the logits and the merged
    forward's maximum is another draw of the same kind, so the bound takes twice that: MERGE_ROUNDINGS = 6.
    (Measured on the tiny Llama and Qwen2, fp32 and bf16, five adapters: |merged - Peft| <= 2.2 own.)

    What it catches: a LoRA delta scaled wrongly (alpha / r for rslora's alpha / sqrt(r), an alpha_pattern
    ignored), missing or applied twice, merged into the wrong weights (original vs NF4-dequantized), a wrong cast;
    tests show each case on their own data. What it cannot: an error below the precision's own rounding."""
    return MERGE_ROUNDINGS * own
