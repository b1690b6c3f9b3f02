"""Peak memory and step time of one DPO training step: chunked log-prob head vs full logits vs TRL 1.16.

Same model (SmolLM2-135M, fp32 LoRA r16 on all linear layers, gradient checkpointing on - the `dpo train`
defaults), same batch (the 4 longest HH-RLHF pairs after truncation), each variant in its own fresh process:

  chunked    - stage two as implemented: `stages.stage2.forward.policy_forward` -> `sequence_logps` (hidden states of
               completion positions only, projected through the LM head in checkpointed chunks); cached reference;
  full       - the plain path (written here): `model(...).logits` [2B, T, V] -> log_softmax -> gather -> masked sum,
               then the same `dpo_loss`; cached reference;
  trl        - TRL 1.16 `DPOTrainer.compute_loss` on the same token ids, collated by TRL's own collator, with the
               reference log-probs in the batch (what TRL does with `precompute_ref_log_probs=True`);
  trl-online - the same with TRL's default for a PEFT policy: reference recomputed with the adapter disabled.
Also accepted: online, two-model (bench_stage2's (b) and (c), chunked path on).

Memory: process peak RSS (whole life incl. loading) and the peak during the steps (VmHWM reset after loading);
workers run with a fixed glibc mmap threshold so RSS follows live tensors (--glibc-default to measure without).
Time: process CPU seconds per step (one torch thread), after one warm-up step.

  .venv/bin/python bench/bench_memory.py --quick     # < 2 min
  .venv/bin/python bench/bench_memory.py             # < 8 min, writes bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_stage2 as S  # noqa: E402

LABELS = {"chunked": "(i) chunked (ours)", "cache": "(i) chunked (ours)", "full": "(ii) full logits",
          "trl": "(iii) TRL 1.16, ref in batch", "trl-online": "(iii') TRL 1.16, online ref",
          "online": "(b) online ref, chunked", "two-model": "(c) two-model, chunked"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    S.add_common_args(p)
    p.add_argument("--variants", default=None,
                   help="default chunked,chunked:chunk=1024,full,trl (quick: chunked,full); "
                        "options after ':' joined by '+' (chunk=N, share=0)")
    p.add_argument("--max-length", type=int, default=400, help="truncation; the longest rows then have ~this")
    p.add_argument("--max-prompt-length", type=int, default=320)
    a = p.parse_args()
    a.steps = a.steps or 1
    a.warmup = 0 if a.warmup is None else a.warmup  # memory needs no warm-up; user-CPU time barely moves with one
    a.variants = a.variants or ("chunked,full" if a.quick else "chunked,chunked:chunk=1024,full,trl")
    if a.quick and a.max_length == 400:
        a.max_length, a.max_prompt_length = 160, 128
    return a


# ================================================================================================ variants
def full_logits_logps(model, batch):
    """The plain computation: every position through the head, [2B, T, V] logits, log_softmax, gather."""
    import torch

    ids, attn = batch.input_ids, batch.attention_mask
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]  # [2B, T-1, V]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [2B, T-1]
    mask = batch.score_mask[:, 1:]
    sums = (logp * mask).sum(-1).to(torch.float64)
    counts = mask.sum(-1)
    b = ids.shape[0] // 2
    return sums[:b], sums[b:], counts[:b], counts[b:]


def trl_trainer(policy, tokenizer_dir: str, cfg, pairs: int, online: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DPOConfig(
        output_dir=str(C.OUT / "trl"), per_device_train_batch_size=pairs, beta=cfg.loss.beta, loss_type=["sigmoid"],
        gradient_checkpointing=cfg.lora.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None, report_to="none", use_cpu=True, bf16=False, precompute_ref_log_probs=False,
        dataloader_num_workers=0, save_strategy="no",
    )
    # DPOTrainer wants a dataset; the batch below is collated from our own token ids instead (same tokens)
    data = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}])
    trainer = DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tok)
    trainer.precompute_ref_logps = not online  # read ref_chosen_logps/ref_rejected_logps from the batch
    return trainer


def factory(variant, policy, rows, cfg, spec, device, pad_id):
    """ref_fn/loss_fn for the variants of this bench; stage two's for the others."""
    import torch

    from stages.model.logprobs import collate_pairs
    from stages.objective.loss import dpo_loss

    if variant == "chunked":
        variant = "cache"
    if variant not in ("full", "trl", "trl-online"):
        return S.dpo_step_factory(variant, policy, rows, cfg, spec, device, pad_id)
    refs = ([-1.5 * len(e.chosen_ids) for e in rows], [-1.5 * len(e.rejected_ids) for e in rows])
    if variant == "full":
        batch = collate_pairs(rows, pad_id)

        def loss_fn(_):
            pc, pr, nc, nr = full_logits_logps(policy, batch)
            rc, rr = (torch.tensor(x, dtype=torch.float64) for x in refs)
            return dpo_loss(pc, pr, rc, rr, loss_type=cfg.loss.loss, beta=cfg.loss.beta, chosen_tokens=nc,
                            rejected_tokens=nr).losses.mean()

        return (lambda: refs), loss_fn
    trainer = trl_trainer(policy, spec.path, cfg, len(rows), online=variant == "trl-online")
    batch = trainer.data_collator([
        {"prompt_ids": list(e.prompt_ids), "chosen_ids": list(e.chosen_ids), "rejected_ids": list(e.rejected_ids),
         "ref_chosen_logps": c, "ref_rejected_logps": r} for e, c, r in zip(rows, *refs)])
    model = trainer.model
    model.train()

    def loss_fn(_):
        return trainer.compute_loss(model, batch)

    return (lambda: refs), loss_fn


# ================================================================================================ parent
def main() -> None:
    a = parse()
    if a.worker:
        return S.worker(a, factory)
    mdir = S.model_dir(a)
    _, pool = C.load_encoded(mdir, a.max_length, a.max_prompt_length)
    rows = C.longest_rows(pool, a.pairs)
    rows_file = S.write_rows(rows, "memory")
    variants = a.variants.split(",")
    print(f"batch: {S.describe_batch(rows)}; variants {variants}", flush=True)
    results = S.run_variants(Path(__file__).resolve(), a, variants, rows_file)
    base = variants[0]
    labels = S.labels_for(variants, LABELS)
    text, m = S.results_table(results, labels, base)
    lines = []
    ours = m.get(base)
    for other in variants[1:]:
        r = m.get(other)
        if not (ours and r):
            continue
        mem = ours["peak_gib"] / r["peak_gib"]
        work = (ours["peak_steps_gib"] - ours["loaded_gib"]) / (r["peak_steps_gib"] - r["loaded_gib"])
        t = C.median(ours["step_cpu"]) / C.median(r["step_cpu"])
        target = other.startswith(("full", "trl"))
        lines.append(f"{labels[base]} vs {labels[other]}: peak RSS {mem:.2f}x, step working set {work:.2f}x"
                     + (f" (target <= 0.4x: {'met' if mem <= 0.4 else 'MISSED'} on peak, "
                        f"{'met' if work <= 0.4 else 'MISSED'} on working set)" if target else "")
                     + f"; step time {t:.2f}x"
                     + (f" (target <= 1.1x: {'met' if t <= 1.1 else 'MISSED'})" if target else ""))
    first = next((r for r in m.values() if r), None)
    body = (f"## Log-prob memory: chunked head vs full logits vs TRL (section `{S.section_key('memory', a)}`)\n\n"
            f"{C.provenance(a.threads)}"
            f"- workload: the {a.pairs} longest HH-RLHF harmless-test pairs after truncation (max_length "
            f"{a.max_length}, max_prompt_length {a.max_prompt_length}): {S.describe_batch(rows)}; "
            f"{S.device_desc(first, a) if first else ''}; model {mdir.name}; {a.steps} timed step(s) per process "
            f"after {a.warmup} warm-up, {a.rounds} round(s); ratio columns are {labels[base]} / this\n\n"
            f"{text}\n\n" + "".join(f"- {x}\n" for x in lines) + f"\n{S.TABLE_NOTES}\n")
    print("\n" + body)
    if not a.no_write:
        C.update_results(S.section_key("memory", a), body)


if __name__ == "__main__":
    main()
