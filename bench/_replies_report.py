"""bench/bench_replies.py's report: the RESULTS.md section from the measured numbers (also from a saved JSON)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import HH_PATH, REPO  # noqa: E402
from _replies_common import BEGIN, BUDGET, END, LORA, MAXLEN, SAMPLING, TRL_BS, K, log, rel  # noqa: E402


# ================================================================================================ report
def model_shape(model_dir: Path) -> dict:
    """FLOPs per token and layer of the linear layers, and per attention q.k element (QK^T and AV, all heads)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    params = h * q * 2 + h * kv * 2 + 3 * h * c["intermediate_size"]
    return {"layers": c["num_hidden_layers"], "linear_flops": 2 * params, "qk_flops": 4 * q, "vocab": c["vocab_size"]}


def attention_share(r: dict, m: dict) -> float:
    """Estimated share of attention in the decoder layers' FLOPs of a variant (sdpa computes every masked q.k)."""
    att = m["qk_flops"] * r["qk"]
    return att / (att + m["linear_flops"] * r["padded"])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def med(runs: list[dict], key: str) -> float:
    return C.median([r[key] for r in runs])


def stage_one_lines(res: dict) -> list[str]:
    s1, m = res["stage_one"], res["model_shape"]
    runs, eq = s1["runs"], s1["eq"]
    f = {v: runs[v][0] for v in runs}  # token counts are the same every repeat
    cpu = {v: med(runs[v], "cpu") for v in runs}
    wall = {v: med(runs[v], "wall") for v in runs}
    names = {"replies": "(a) ours, reply rows [prompt | 4 replies]", "pairs": "(b) ours, expanded pair rows "
             "[prompt|chosen|rejected]", "trl": f"(c) TRL 1.16 precompute, expanded pairs (batch size {TRL_BS})"}
    rows = []
    for v in ("replies", "pairs", "trl"):
        r = f[v]
        rows.append([names[v], r["rows"], r["batches"], r["real"], r["padded"],
                     f"{100 * (1 - r['real'] / r['padded']):.1f}%", r["qk"], C.fmt(cpu[v], 1), C.fmt(wall[v], 1),
                     C.fmt(1e3 * cpu[v] / r["padded"], 2),
                     C.fmt(med(runs[v], "head_cpu"), 1), C.fmt(med(runs[v], "total_cpu"), 1),
                     f"{med(runs[v], 'base'):.2f} → {med(runs[v], 'peak'):.2f}", C.fmt(med(runs[v], "whole_peak"), 2)])
    for v in ("pairs", "trl"):
        rows.append([f"**{names[v][:3]} / (a)**", f"{f[v]['rows'] / f['replies']['rows']:.2f}x", "",
                     f"{f[v]['real'] / f['replies']['real']:.2f}x",
                     f"**{f[v]['padded'] / f['replies']['padded']:.2f}x**",
                     "", f"{f[v]['qk'] / f['replies']['qk']:.2f}x", f"**{cpu[v] / cpu['replies']:.2f}x**",
                     f"{wall[v] / wall['replies']:.2f}x", "", "",
                     f"{med(runs[v], 'total_cpu') / med(runs['replies'], 'total_cpu'):.2f}x", "", ""])
    tok_ratio, cpu_ratio = f["pairs"]["padded"] / f["replies"]["padded"], cpu["pairs"] / cpu["replies"]
    table = C.table(["variant", "forward rows", "batches", "real tokens", "forwarded tokens (padded)",
                     "padding", "attention q·k (rows × width², per layer and head)", "scoring CPU s",
                     "scoring wall s", "CPU ms / forwarded token", "LM head CPU s", "end-to-end CPU s",
                     "RSS GiB at scoring start → scoring peak", "whole-run peak RSS GiB"], rows)
    eq_rows = [[label, e["n"], f"{e['max']:.2e}", f"{e['mean']:.2e}", f"{e['max_rel']:.1e}"] for label, e in
               (("reply cache vs pair cache (each pair's two replies)", eq["replies_vs_pairs"]),
                ("reply cache vs TRL", eq["replies_vs_trl"]), ("pair cache vs TRL", eq["pairs_vs_trl"]))]
    reps = (f"{len(runs['replies'])} timed run(s) of (a) and (b), {len(runs['trl'])} of (c), interleaved, medians"
            if len(runs["trl"]) else "")
    shares = ", ".join(f"{v} {100 * attention_share(f[v], m):.0f}%" for v in ("replies", "pairs", "trl"))
    return [
        "### Stage one: reference pass", "",
        f"{eq['pairs'] // 6} prompts, {eq['replies']} replies, {eq['pairs']} pairs; {reps}. Scoring = the forwards "
        "(`precompute.score_batches`; TRL: `DPOTrainer._precompute_ref_logps`); end-to-end = the whole command "
        "(load, tokenize, score, write) or TRL's load + DPOTrainer init. Tokens: ours from `units.real` / "
        "`units.cost` over the planned batches, TRL's from the `input_ids` / `attention_mask` of its batches.", "",
        table, "",
        f"- Target: stage one forwards ≥ 3x fewer tokens than our expanded pair rows: {verdict(tok_ratio >= 3)} "
        f"({tok_ratio:.2f}x forwarded, {f['pairs']['real'] / f['replies']['real']:.2f}x real).",
        f"- Target: ≥ 2.5x less CPU than our expanded pair rows: {verdict(cpu_ratio >= 2.5)} ({cpu_ratio:.2f}x "
        f"scoring CPU; end-to-end {med(runs['pairs'], 'total_cpu') / med(runs['replies'], 'total_cpu'):.2f}x).",
        f"- Estimated attention share of the decoder FLOPs (q·k elements × {m['qk_flops']} FLOPs against forwarded "
        f"tokens × {m['linear_flops'] / 1e6:.2f} MFLOPs per layer): {shares}.", "",
        "Values (summed reference log-probs per reply, nats):", "",
        C.table(["compared", "pairs", "max abs diff", "mean abs diff", "max rel diff"], eq_rows)]


def stage_two_lines(res: dict) -> list[str]:
    s2 = res["stage_two"]
    runs, sh, pairs = s2["runs"], s2["shapes"], s2["pairs"]
    per = {v: med(runs[v], "cpu") / pairs for v in runs}
    names = {"replies": f"(a) ours, {s2['prompts']} SetItems (one row per prompt)",
             "pairs": f"(b) ours, {pairs} Items (pair rows)", "trl": "(c) TRL 1.16 `training_step`, precomputed ref"}
    rows = [[names[v], sh[v]["rows"], sh[v]["padded"], sh[v]["real"], sh[v]["completion"], sh[v]["qk"],
             C.fmt(med(runs[v], "cpu"), 2), C.fmt(med(runs[v], "user"), 2), C.fmt(med(runs[v], "wall"), 2),
             C.fmt(per[v], 3),
             f"{per[v] / per['pairs']:.2f}x", f"{per[v] / per['trl']:.2f}x",
             f"{med(runs[v], 'base'):.2f} → {med(runs[v], 'peak'):.2f}", f"{runs[v][0]['loss']:.6f}"]
            for v in ("replies", "pairs", "trl")]
    ratio, user = per["replies"] / per["pairs"], {v: med(runs[v], "user") for v in runs}
    return [
        "### Stage two: one training step", "",
        f"{s2['prompts']} prompts (the reply sets whose rows are nearest the median row length; rows of "
        f"{s2['row_lengths']} tokens), their {pairs} pairs; forward + backward of the policy, LoRA r{LORA['r']} "
        f"α{LORA['alpha']} dropout 0 on all linear layers, {res['model_desc']}, sigmoid β 0.1, no gradient "
        f"checkpointing, no optimizer step; one untimed warm-up step per variant, then {len(runs['replies'])} timed "
        "round(s), the order rotating; medians. Ours: `stages.stage2.forward.policy_forward` + `objective.backward()`; "
        "TRL: `DPOTrainer(peft_config=LoraConfig(...), precompute_ref_log_probs=True).training_step` on its one "
        "batch of the same pairs.", "",
        C.table(["variant", "forward rows", "positions (padded)", "real", "completion positions",
                 "attention q·k", "CPU s / step", "of which user s", "wall s / step", "CPU s per pair",
                 "per pair vs (b)",
                 "per pair vs (c)", "RSS GiB at start → step peak", "loss"], rows), "",
        f"- Target: a stage-two step costs ≤ 0.4x per pair (against our expanded pair rows): {verdict(ratio <= 0.4)} "
        f"({ratio:.2f}x; user CPU only {user['replies'] / user['pairs']:.2f}x; against TRL's step "
        f"{per['replies'] / per['trl']:.2f}x).",
        "- The loss is log 2 at the start (LoRA B = 0: the policy is the reference) in every variant: the three "
        "layouts compute the same objective."]


def why_lines(res: dict) -> list[str]:
    s1, s2, m = res["stage_one"], res["stage_two"], res["model_shape"]
    f = {v: s1["runs"][v][0] for v in s1["runs"]}
    cpu = {v: med(s1["runs"][v], "cpu") for v in s1["runs"]}
    tok = f["replies"]["tokens"]
    P, R = sum(tok["prompt"]) / len(tok["prompt"]), sum(tok["reply"]) / len(tok["reply"])
    per_tok = {v: cpu[v] / f[v]["padded"] for v in cpu}
    lengths = sorted(f["replies"]["lengths"])
    head = {v: med(s1["runs"][v], "head_cpu") for v in s1["runs"]}
    body = {v: (cpu[v] - head[v]) / f[v]["padded"] for v in ("replies", "pairs")}
    runs2, sh = s2["runs"], s2["shapes"]
    lines = [
        "### Why (numbers)", "",
        f"- Token arithmetic: a prompt of P tokens with K = 4 replies of R tokens is one row of P + 4R tokens; its "
        f"6 pairs as shared-prompt pair rows are 6P + 12R (each reply in 3 pairs, the prompt in 6), as TRL's "
        f"unshared rows 12P + 12R + padding. Here P = {P:.1f}, R = {R:.1f} tokens on average (EOS included): "
        f"(6P + 12R) / (P + 4R) = {(6 * P + 12 * R) / (P + 4 * R):.2f}x, the bound for stage one's token ratio "
        f"(3x at P = 0, 6x when prompts dominate). Reply rows {lengths[0]}–{lengths[-1]} tokens "
        f"(median {lengths[len(lengths) // 2]}); none split (`--max-row-tokens` unset, batch budget {BUDGET}).",
        f"- CPU per forwarded token: (a) {1e3 * per_tok['replies']:.2f} ms, (b) {1e3 * per_tok['pairs']:.2f} ms, "
        f"(c) {1e3 * per_tok['trl']:.2f} ms; without the LM head (a) {1e3 * body['replies']:.2f}, (b) "
        f"{1e3 * body['pairs']:.2f} ms. A reply row is ~{(P + 4 * R) / (P + 2 * R):.1f}x as wide as a pair row, so "
        f"its attention costs more per token (estimated share of the decoder FLOPs: (a) "
        f"{100 * attention_share(f['replies'], m):.0f}%, (b) {100 * attention_share(f['pairs'], m):.0f}%), and our "
        "LM head runs on completion positions only, which are a larger share of a reply row's tokens (4R of P + 4R "
        "against 2R of P + 2R): the CPU ratio stays below the token ratio by that much.",
        f"- Stage two: positions per forward (a) {sh['replies']['padded']}, (b) {sh['pairs']['padded']}, (c) "
        f"{sh['trl']['padded']} ({sh['pairs']['padded'] / sh['replies']['padded']:.2f}x and "
        f"{sh['trl']['padded'] / sh['replies']['padded']:.2f}x (a)'s); completion positions the LM head projects and "
        f"backpropagates: (a) {sh['replies']['completion']}, (b) {sh['pairs']['completion']}, (c) every position "
        f"({sh['trl']['padded']}: TRL 1.16's head on CPU, see the vs_trl notes). CPU per position: (a) "
        f"{1e3 * med(runs2['replies'], 'cpu') / sh['replies']['padded']:.2f} ms, (b) "
        f"{1e3 * med(runs2['pairs'], 'cpu') / sh['pairs']['padded']:.2f} ms, (c) "
        f"{1e3 * med(runs2['trl'], 'cpu') / sh['trl']['padded']:.2f} ms.",
        "- Peak memory: RSS at the start of a phase holds the model (in stage two, two policies: ours and TRL's); the "
        "phase peak minus it is what the variant's activations, logits and gradients add: stage one (a) "
        f"{added(s1['runs']['replies'])}, (b) {added(s1['runs']['pairs'])}, (c) {added(s1['runs']['trl'])} GiB; "
        f"stage two (a) {added(runs2['replies'])}, (b) {added(runs2['pairs'])}, (c) {added(runs2['trl'])} GiB "
        f"(TRL's step projects all {sh['trl']['padded']} positions through the LM head: "
        f"{sh['trl']['padded'] * m['vocab'] * 4 / 2**30:.2f} GiB per float32 copy of its logits; ours "
        f"{sh['pairs']['completion']} positions in (b), in chunks)."]
    return lines


def added(runs: list[dict]) -> str:
    return f"+{med(runs, 'peak') - med(runs, 'base'):.2f}"


def render(res: dict) -> str:
    meta, d = res["meta"], res["data"]
    quick = meta["quick"]
    lines = [f"## Many replies per prompt: K = 4 reply rows vs expanded pair rows vs TRL 1.16 "
             f"(`bench/bench_replies.py`{' --quick' if quick else ''})", "",
             f"- command: `{meta['command']}` (whole run {meta['wall_total'] / 60:.1f} min"
             + (", sampling included" if not d.get("reused", True) else ", replies read from the cached file")
             + ")",
             f"- date: {meta['started']}", f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             "- measures: process CPU seconds (user + system, getrusage, as `time.process_time`) and wall seconds; "
             "peak RSS = VmHWM over each phase of this one process (reset through /proc/self/clear_refs at its "
             "start), run with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072 (bench/_common.MALLOC_ENV; the "
             "script re-executes itself with them) so that freed tensor memory goes back to the OS and each "
             "phase's peak follows its own tensors; that also turns part of the CPU time into page faults "
             "(system seconds), alike for every variant",
             f"- model: {res['model_desc']} (`{meta['model']}`), sdpa, one torch thread for every variant",
             f"- data: {d['prompts']} HH-RLHF harmless-test prompts (`{os.path.relpath(HH_PATH, REPO)}`: the text up "
             "to the last \\n\\nAssistant:, as `rows.load_examples` splits it; distinct prompts of ≤ "
             f"{SAMPLING['max_prompt_tokens']} tokens, shuffled with seed 0), each with {K} replies sampled by "
             f"SmolLM2-135M-Instruct (full model; plain text, top-p {SAMPLING['top_p']}, temperature "
             f"{SAMPLING['temperature']}, no top-k, ≤ {SAMPLING['max_new_tokens']} new tokens, cut at EOS or "
             f"\\n\\nHuman:), reply k under torch seed k (k = 0..3, one batched generate per seed); {d['passed_over']} "
             "prompt(s) passed over whose four replies were not four distinct non-empty texts. Score of reply k = "
             "number of distinct lower-cased whitespace-separated words − k/4 (four distinct scores; a tie goes to "
             f"the lower seed), so `--pairs all` gives 6 pairs per prompt. Files: `{d['sets']}` (reply sets, generic "
             f"{{\"prompt\", \"completions\", \"scores\"}} shape) and `{d['pairs']}` (the same pairs as pair rows); "
             f"sampled on {d['date']} in {d['sampling_s']:.0f} s and cached there (reruns reuse them).",
             "- our commands: " + "; ".join(f"`{c}`" for c in res["cmds"]),
             f"- TRL: `DPOTrainer(model, args=DPOConfig(precompute_ref_log_probs=True, precompute_ref_batch_size="
             f"{TRL_BS}, max_length={MAXLEN}), train_dataset=Dataset.from_list(pair rows))` (bench/vs_trl.py's "
             "`trl_precompute`; batch size 1 and our budget 1024 were each side's fastest CPU setting in vs_trl's "
             "scan)", ""]
    lines += stage_one_lines(res) + [""] + stage_two_lines(res) + [""] + why_lines(res)
    return "\n".join(lines) + "\n"


def publish(res: dict, write: bool) -> None:
    body = render(res)
    print("\n" + body)
    if write:
        C.replace_section(BEGIN, END, body)
        log(f"wrote the replies section of {rel(C.RESULTS)}")


