"""bench/bench_packing.py's shared part: its data (HH rows, reply sets, the GPU's synthetic rows), its planning
(padding waste and attention work, no model), the helpers its runs share, and its RESULTS.md section. See
bench_packing.py's docstring."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BEGIN, END = "<!-- packing start -->", "<!-- packing end -->"
SETS = C.OUT / "replies" / "sets-n16.jsonl"
MAXLEN = 1024
BUDGETS = (512, 2048)
VARIANTS = {"today": (False, "dense"), "pack": (True, "dense"), "pack-seg": (True, "segments")}  # (--pack, attention)
NAMES = {"today": "today (one padded row per prompt, [B,1,W,W] mask)", "pack": "--pack, dense block mask",
         "pack-seg": "--pack --attention segments"}
DATA = {"hh": "HH pair rows", "sets": "reply sets (file)", "hh_sets": "HH rows as 4-reply sets"}


def log(msg: str) -> None:
    print(f"[packing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ================================================================================================ data
def reply_sets_file() -> tuple[Path, str]:
    """The sampled reply sets of bench_replies.py, else sets built from HH rows as tests/test_many_replies does."""
    if SETS.is_file():
        return SETS, f"`{os.path.relpath(SETS, C.REPO)}` (bench_replies.py's sampled sets: 4 replies per prompt)"
    sys.path.insert(0, str(C.REPO))
    from tests.test_many_replies import reply_sets

    out = C.OUT / "packing"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sets-hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reply_sets(C.HH_PATH, out)))
    return path, f"`{os.path.relpath(path, C.REPO)}` (tests/test_many_replies.reply_sets of HH rows)"


def load_data(model_dir: Path) -> dict:
    """HH pair rows (all, encoded as both stages do), the reply sets (EncodedSet + their pairs) and every two
    consecutive HH rows as one 4-reply set (prompt i; chosen i, rejected i, chosen i+1, rejected i+1: token ids)."""
    from stages.data.encode import TokenizeSettings
    from stages.data.encodeset import encode_sets
    from stages.data.replyset import EncodedSet
    from stages.settings.commands import TrainConfig

    tok, hh = C.load_encoded(model_dir, MAXLEN, MAXLEN)
    path, described = reply_sets_file()
    loaded = TrainConfig.flat(model=str(model_dir), data=(str(path),), ref_cache="", output="").data.load()
    sets, _ = encode_sets(tok, loaded.sets, TokenizeSettings(MAXLEN, MAXLEN))
    assert len(sets) == len(loaded.sets), "a reply set was skipped"
    hh_sets = [EncodedSet(f"hh{i}", tuple(f"hh{i}-{k}" for k in range(4)), a.prompt_ids,
                          (a.chosen_ids, a.rejected_ids, b.chosen_ids, b.rejected_ids), (4, 1, 3, 2))
               for i, (a, b) in enumerate(zip(hh[0::2], hh[1::2]))]
    return {"tok": tok, "hh": hh, "sets": sets, "pairs": loaded.pairs, "hh_sets": hh_sets, "sets_file": described}


# ================================================================================================ planning
def as_rows(units: list) -> list:
    """Stage-one units (Encoded pair rows or Rows) as Rows."""
    from stages.model.rowlayout import pair_rows

    return units if not units or hasattr(units[0], "replies") else pair_rows(units)


def qk_elements(batches: list, budget: int | None, attention: str) -> int:
    """Attention q.k elements per layer and head the kernels are handed: a dense mask computes rows x width^2 per
    forward (packed: packs x longest pack^2); segments compute per block (prompt + first reply)^2 plus each further
    reply's n x (prompt + n)."""
    from stages.model.packing import blocks, pack

    total = 0
    for batch in batches:
        rows = as_rows(batch)
        if attention == "segments":
            for row in rows:
                for prompt, replies in blocks(row):
                    first = len(prompt) + (len(replies[0]) if replies else 0)
                    total += first * first + sum(len(r) * (len(prompt) + len(r)) for r in replies[1:])
            continue
        seqs = pack(rows, budget) if budget is not None else [[r] for r in rows]
        total += len(seqs) * max(sum(r.length for r in s) for s in seqs) ** 2
    return total


def _shape(seq_batches: list[list[list]]) -> dict:
    """Forwards, real tokens and positions of forwards, each a list of sequences (lists of Rows) padded to the
    longest."""
    real = positions = 0
    for seqs in seq_batches:
        widths = [sum(r.length for r in s) for s in seqs]
        real, positions = real + sum(widths), positions + len(widths) * max(widths)
    return {"forwards": len(seq_batches), "real": real, "positions": positions}


def rows_of(batch: list) -> list:
    """The forward rows of a stage-two micro-batch (Items: pair rows; SetItems: one row per prompt)."""
    from stages.data.replyset import split_rows
    from stages.model.rowlayout import pair_rows
    from stages.stage2.forward import NO_ROW_LIMIT

    return [r for i in batch for r in (split_rows(i.enc, NO_ROW_LIMIT) if hasattr(i, "pairs") else pair_rows([i.enc]))]


def typical_batch(items: list, size: int, budget: int | None) -> list:
    """Of the micro-batches `dpo train --batch-size size [--max-tokens-per-batch budget]` builds (seed 0, epoch 0),
    one whose padding (today's layout) is the median; of those, the median in real tokens."""
    from stages.stage2.trainutil import batches_for_epoch

    batches = batches_for_epoch(items, size, 0, 0, budget)
    shape = [_shape([[[r] for r in rows_of(b)]]) for b in batches]
    mid = sorted(pad(s) for s in shape)[len(shape) // 2]
    ties = sorted((s["real"], i) for i, s in enumerate(shape) if pad(s) == mid)
    return batches[ties[len(ties) // 2][1]]


def pick_batches(data: dict, pairs: int, sets: int, scored: int) -> dict:
    """Stage two's micro-batches (typical_batch) over every HH row (--batch-size `pairs`) and the first `scored`
    reply sets (`sets`), without and with each token budget: name -> (items, budget, size); references later."""
    from stages.stage2.prepare import Item, SetItem

    pool = {"hh": ([Item(e, 0.0, 0.0) for e in data["hh"]], pairs),
            "sets": ([SetItem(s, (), tuple(p), ()) for s, p in zip(data["sets"][:scored], data["pairs"])], sets)}
    return {f"{n}-{b or 'bs'}": (typical_batch(items, size, b), b, size) for n, (items, size) in pool.items()
            for b in (None, *BUDGETS)}


def stage_two_items(data: dict, refs: dict) -> dict:
    """The picked micro-batches, stage one's values as their reference (loss log 2 at the start: LoRA B = 0)."""
    from stages.stage2.prepare import Item, SetItem

    def with_ref(i):
        if not hasattr(i, "pairs"):
            return Item(i.enc, *refs["hh"][i.enc.example_id])
        ref = tuple(refs["sets"][k] for k in i.enc.reply_ids)
        return SetItem(i.enc, ref, i.pairs, tuple((ref[c], ref[r]) for c, r in i.pairs))

    return {k: ([with_ref(i) for i in items], budget, size) for k, (items, budget, size) in data["picks"].items()}


def waste_cells(units, items: list, budget: int) -> dict:
    """One data set at one budget: every layout of the table (planning only)."""
    from stages.model.packing import pack
    from stages.stage1.precompute import plan_batches
    from stages.stage2.forward import NO_ROW_LIMIT
    from stages.stage2.trainutil import batches_for_epoch, token_batches

    todo = units.todo(set(), budget)
    s1_today = plan_batches(todo, budget, True, True, units.cost)
    s1_pack = plan_batches(todo, budget, True, True, units.real)
    by_size = {bs: [rows_of(b) for b in batches_for_epoch(items, bs, 0, 0)] for bs in (4, 8)}
    by_budget = [rows_of(b) for b in token_batches(items, 8, budget)]
    return {
        "s1-today": _shape([[[r] for r in as_rows(b)] for b in s1_today]),
        "s1-pack": _shape([pack(as_rows(b), budget) for b in s1_pack]),
        "s2-bs4": _shape([[[r] for r in b] for b in by_size[4]]),
        "s2-bs8": _shape([[[r] for r in b] for b in by_size[8]]),
        "s2-bs8-budget": _shape([[[r] for r in b] for b in by_budget]),
        "s2-pack-bs8": _shape([pack(b, NO_ROW_LIMIT) for b in by_size[8]]),
        "s2-pack-bs8-budget": _shape([pack(b, budget) for b in by_budget]),
    }


def fill(rows: list, t: int) -> list:
    """HH rows in data order, each taken while it fits: one packed row of at most `t` tokens."""
    out: list = []
    for r in rows:
        out += [r] if sum(x.length for x in out) + r.length <= t else []
    return out


def waste_table(data: dict) -> dict:
    """(a): every data set x budget x layout."""
    from stages.stage1.units import PairUnits, ReplyUnits
    from stages.stage2.prepare import Item, SetItem

    units = {"hh": PairUnits(data["hh"]), "sets": ReplyUnits(data["sets"]), "hh_sets": ReplyUnits(data["hh_sets"])}
    items = {"hh": [Item(e, 0.0, 0.0) for e in data["hh"]],
             **{n: [SetItem(s, (0.0,) * len(s.replies), (), ()) for s in data[n]] for n in ("sets", "hh_sets")}}
    return {f"{name}-{b}": waste_cells(units[name], items[name], b) for name in DATA for b in BUDGETS}


# ================================================================================================ run helpers
def set_attention(model, attention: str, dense_impl: str) -> None:
    """As the stages prepare a model (rowlayout.prepare_model): segments switches the attention to segattn; dense
    puts the model's own implementation back (one model serves every variant, interleaved)."""
    from stages.model.rowlayout import prepare_model

    if attention == "segments":
        prepare_model(model, "segments")
    else:
        model.config._attn_implementation = dense_impl


class Peaks:
    """One VmHWM window: peak RSS over the run and RSS at its start (GiB)."""

    def __enter__(self):
        C.reset_peak()
        self.base = C.current_rss_gib()
        return self

    def __exit__(self, *exc):
        self.peak = C.hwm_gib()
        self.added = self.peak - self.base
        return False


def max_diff(a: dict, b: dict) -> float:
    flat = lambda v: v if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    return max(abs(x - y) for k in a for x, y in zip(flat(a[k]), flat(b[k])))


def stage_two_shapes(items: list, budget: int | None) -> dict:
    """Per variant: sequences, positions (padded), real tokens and attention q.k elements of the forward."""
    from stages.model.packing import pack
    from stages.stage2.forward import NO_ROW_LIMIT

    rows, out, budget = rows_of(items), {}, budget or NO_ROW_LIMIT
    for v, (p, attention) in VARIANTS.items():
        seqs = pack(rows, budget) if p else [[r] for r in rows]
        widths = [sum(r.length for r in s) for s in seqs]
        out[v] = {"sequences": len(seqs), "positions": len(seqs) * max(widths), "real": sum(widths),
                  "qk": qk_elements([rows], budget if p else None, attention)}
    return out


# ================================================================================================ report
LAYOUTS = {
    "s1-today": "stage one, today: `plan_batches` (padded tokens ≤ budget, length-sorted)",
    "s1-pack": "stage one, --pack: `plan_batches` (real tokens ≤ budget) → `pack` (one sequence a batch)",
    "s2-bs4": "stage two, today: --batch-size 4, length grouping (no token budget)",
    "s2-bs8": "stage two, today: --batch-size 8, length grouping (no token budget)",
    "s2-bs8-budget": "stage two, today: --batch-size 8 --max-tokens-per-batch budget (`token_batches`)",
    "s2-pack-bs8": "stage two, --pack --batch-size 8 (no token budget: one sequence a micro-batch)",
    "s2-pack-bs8-budget": "stage two, --pack --batch-size 8 --max-tokens-per-batch budget (`pack` at the budget)",
}
PACKED = ("s1-pack", "s2-pack-bs8", "s2-pack-bs8-budget")


def pad(s: dict) -> float:
    return 1 - s["real"] / s["positions"] if s["positions"] else 0.0


def med(runs: list[dict], key: str) -> float:
    return C.median([r[key] for r in runs])


def waste_lines(res: dict) -> list[str]:
    w, d, keys = res["waste"], res["data"], list(res["waste"])
    head = ["layout"] + [f"{DATA[k.rsplit('-', 1)[0]]}, budget {k.rsplit('-', 1)[1]}" for k in keys]
    rows = [[label] + [f"{100 * pad(w[k][lay]):.1f}% · {w[k][lay]['forwards']} fwd · "
                       f"{w[k][lay]['positions'] // max(w[k][lay]['forwards'], 1)} tok/fwd" for k in keys]
            for lay, label in LAYOUTS.items()]
    worst = max(pad(w[k][lay]) for k in keys for lay in PACKED)
    today = [pad(w[k][lay]) for k in keys for lay in ("s1-today", "s2-bs4", "s2-bs8")]
    return ["### (a) Padding waste (planning only, no model)", "",
            f"Padding = 1 − real tokens / forwarded positions; cell = padding · forwards · positions per forward. "
            f"Data: all {d['hh']} HH pair rows (encoded as both stages do, --max-length {MAXLEN}); the {d['sets']} "
            f"reply sets of {d['sets_file']}, {d['replies']} replies; {d['hh_sets']} sets of every two consecutive HH "
            "rows (prompt i; chosen i, rejected i, chosen i+1, rejected i+1: tests/test_many_replies.reply_sets' "
            "pairing). Stage two's micro-batches: `trainutil.batches_for_epoch` (seed 0), as `dpo train` builds.", "",
            C.table(head, rows), "",
            f"- Target: padding ≤ 1 % with --pack: {'PASS' if worst <= 0.01 else '**MISS**'} (worst of the --pack "
            f"rows {100 * worst:.2f} %; today's layout {100 * min(today):.1f}–{100 * max(today):.1f} %): a packed "
            "forward is one sequence in both stages, as the stages form their batches; what the budget does not fill "
            "is a shorter sequence (tokens per forward), not padding."]


def stage_one_lines(res: dict) -> list[str]:
    s1, rows = res["stage_one"], []
    for key, r in s1["results"].items():
        runs, name, budget = r["runs"], *key.rsplit("-", 1)
        for v in VARIANTS:
            f, cpu = runs[v][0], med(runs[v], "cpu")
            rows.append([f"{DATA[name]}, {budget}", NAMES[v], f["forwards"], f["positions"], f["real"],
                         f"{100 * (1 - f['real'] / f['positions']):.1f}%", f["qk"], C.fmt(cpu, 2),
                         C.fmt(med(runs[v], "wall"), 2), C.fmt(1e3 * cpu / f["real"], 3),
                         f"{cpu / med(runs['today'], 'cpu'):.2f}x", f"+{med(runs[v], 'added'):.3f}",
                         f"{r['diff'][v]:.1e}"])
    plan = res["meta"]["plan"]
    return ["### (b) Stage one: `precompute.score_batches` (the command's loop), no grad", "",
            f"{plan['hh_rows']} HH pair rows (stage two's micro-batch + a fixed random sample, {s1['tokens']['hh']} "
            "tokens) and the first "
            f"{plan['sets']} reply sets ({s1['tokens']['sets']} tokens); batches planned as the command plans them "
            f"at each budget (`--max-tokens-per-batch`); {plan['repeats']} timed run(s) per variant, interleaved, "
            "medians; one untimed warm-up per variant before.", "",
            C.table(["data, budget", "variant", "forwards", "positions", "real", "padding", "attention q·k",
                     "CPU s", "wall s", "CPU ms / real token", "CPU vs today", "peak RSS added GiB",
                     "max |diff| vs today (nats)"], rows)]


def stage_two_lines(res: dict) -> list[str]:
    rows = []
    for name, r in res["stage_two"].items():
        runs, sh, b = r["runs"], r["shapes"], r["budget"]
        for v in runs:
            rows.append([f"{DATA[name.split('-')[0]]}: {r['n']} ({r['pairs']} pairs), --batch-size {r['size']}"
                         + (f" --max-tokens-per-batch {b}" if b else ""), NAMES[v], sh[v]["sequences"],
                         sh[v]["positions"], sh[v]["real"],
                         f"{100 * (1 - sh[v]['real'] / sh[v]['positions']):.1f}%", sh[v]["qk"],
                         C.fmt(med(runs[v], "cpu"), 2), C.fmt(med(runs[v], "user"), 2), C.fmt(med(runs[v], "wall"), 2),
                         f"{med(runs[v], 'cpu') / med(runs['today'], 'cpu'):.2f}x", f"+{med(runs[v], 'added'):.3f}",
                         f"{runs[v][0]['loss']:.6f}"])
    return ["### (b) Stage two: one training step (`stage2.forward.policy_forward` + backward)", "",
            "Micro-batch: of those `dpo train` builds with these options (seed 0) over all HH rows / the scored sets, "
            "one of median padding (today's layout; of those, the median in real tokens); only the layout changes "
            "between its variants. LoRA r16 α32 dropout 0 on all linear layers, fp32, sigmoid β 0.1, no gradient "
            "checkpointing, no optimizer step; reference = stage one's values (loss log 2: LoRA B = 0); one untimed "
            f"warm-up step a variant, then {res['meta']['plan']['steps']} timed round(s), order rotating, medians.", "",
            C.table(["micro-batch", "variant", "sequences", "positions", "real", "padding", "attention q·k",
                     "CPU s / step", "of which user s", "wall s", "CPU vs today", "peak RSS added GiB", "loss"],
                    rows)]


def attention_lines(res: dict) -> list[str]:
    a, rows = res["attention"], []
    h, hkv, d = a["heads"]
    for key, runs in a["runs"].items():
        m, (kind, t) = a["meta"][key], key.split("-")
        what = (f"[prompt {int(t) // 2} | chosen {int(t) // 4} | rejected {int(t) - int(t) // 2 - int(t) // 4}]"
                if kind == "pair" else f"{m['blocks']} HH pair rows packed in data order ({m['real']} tokens)")
        for path in ("dense", "segments"):
            qk = m["qk_dense"] if path == "dense" else m["qk_segments"]
            mask = f"{int(t) ** 2 / 2**20:g} MiB bool" if path == "dense" else "none"
            rows.append([t, what, path, qk, mask, C.fmt(med(runs[path], "cpu"), 3),
                         f"{med(runs[path], 'cpu') / med(runs['dense'], 'cpu'):.2f}x",
                         f"+{med(runs[path], 'added'):.3f}"])
    sizes = " and ".join(map(str, sorted({int(k.split("-")[1]) for k in a["runs"]})))
    return [f"### (c) Item 3 on CPU: one attention layer at {sizes} tokens per row", "",
            f"q [1, {h}, T, {d}], k, v [1, {hkv}, T, {d}] (SmolLM2's layer 0 module and shapes), fp32, forward + "
            "backward of sum(out²); dense = the [1, 1, T, T] block mask as packing.py builds it (its build counted) "
            "through transformers' sdpa (torch's CPU kernel), segments = segattn.segment_attention with the layout "
            f"(no mask); {res['meta']['plan']['attn_repeats']} timed run(s) each, alternating, medians; peak RSS added "
            "= VmHWM over the call minus RSS at its start (the inputs exist before).", "",
            C.table(["T", "row", "path", "q·k elements handed", "mask", "CPU s (fwd + bwd)", "vs dense",
                     "peak RSS added GiB"], rows)]


def reading_lines(res: dict) -> list[str]:
    """What the tables say, in numbers: CPU ratios against today (or dense), the repeats' spread."""
    s1, s2, a = res["stage_one"]["results"], res["stage_two"], res["attention"]["runs"]
    ratio = lambda rs, v: f"{med(rs[v], 'cpu') / med(rs.get('today', rs.get('dense')), 'cpu'):.2f}x"  # noqa: E731
    spread = max((max(r["cpu"] for r in rs) - min(r["cpu"] for r in rs)) / med(rs, "cpu")
                 for x in s1.values() for rs in x["runs"].values())
    one = ", ".join(f"{DATA[k.rsplit('-', 1)[0]]} {k.rsplit('-', 1)[1]}: {ratio(x['runs'], 'pack')} / "
                    f"{ratio(x['runs'], 'pack-seg')}" for k, x in s1.items())
    two = ", ".join(f"{n}: {ratio(x['runs'], 'pack')} / {ratio(x['runs'], 'pack-seg')}" for n, x in s2.items())
    size = max(int(k.split("-")[1]) for k in a)
    att = "; ".join(f"{k}: time {ratio(a[k], 'segments')}, peak RSS added {med(a[k]['segments'], 'added'):.3f} "
                    f"against {med(a[k]['dense'], 'added'):.3f} GiB" for k in a if k.endswith(f"-{size}"))
    return ["### Reading", "",
            f"- Stage one, CPU against today (--pack dense / --pack segments): {one}. The slice's forward is mostly "
            f"its LM head and MLPs, not attention; the repeats of one variant spread by up to {100 * spread:.0f} %.",
            f"- Stage two step, CPU against today (--pack dense / --pack segments; micro-batch: data-budget, bs = "
            f"no token budget): {two}.",
            f"- Item 3, segments against the dense mask at {size} tokens: {att}. Segments build no [T, T] tensor; a "
            "row packed with short blocks costs them far less than T² (q·k elements handed).", ""]


def gpu_lines() -> list[str]:
    return ["### GPU: written, not run", "", "`bench/gpu_bench.sh` section 10 (alone after the setup: `PACKING_ONLY=1 "
            "bash bench/gpu_bench.sh`) runs `bench/bench_packing.py --gpu` on the random-init ~3.2B model: stage one "
            "bf16 (`units.forward`, no grad), stage two NF4 (`policy_forward` + backward, LoRA r16, gradient "
            "checkpointing), at 2k and 8k tokens per forward, dense vs segments, with and without --pack, and one "
            "[prompt | chosen | rejected] row of 2k / 8k tokens: real tokens/s, `torch.cuda.max_memory_allocated`, "
            "MFU (bench/gpu_mfu.py's `mfu`: 2·N / 6·N FLOP per token, attention not counted) into "
            "bench/out/gpu_bench/packing.{json,md}. Checked: `bash -n`; `DRY_RUN=1 PACKING_ONLY=1 PY=.venv/bin/python "
            "bash bench/gpu_bench.sh` ran it end to end on CPU with the tiny model (2 min). No GPU here: no numbers."]


def render(res: dict) -> str:
    meta = res["meta"]
    lines = [f"## Packed rows and segment attention (issue 24): today's layout vs --pack, dense vs segments "
             f"(`bench/bench_packing.py`{' --quick' if meta['quick'] else ''})", "",
             f"- command: `{meta['command']}` (whole run {meta['wall_total'] / 60:.1f} min)",
             f"- date: {meta['started']}", f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             "- measures: process CPU seconds (user + system, getrusage), wall seconds, one torch thread; peak RSS = "
             "VmHWM over each run (reset through /proc/self/clear_refs), with glibc trimming (bench/_common.MALLOC_ENV"
             ": MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072) so each run's peak follows its own tensors",
             f"- model: SmolLM2-135M-Instruct's 2-layer slice (`{meta['model']}`, `ensure_smollm2(n_layers=2)`: real "
             "embeddings, tokenizer and LM head; the full model did not fit the 10 minutes), fp32, sdpa for dense", ""]
    lines += waste_lines(res) + [""] + stage_one_lines(res) + [""] + stage_two_lines(res) + [""]
    lines += attention_lines(res) + [""] + reading_lines(res) + gpu_lines()
    return "\n".join(lines) + "\n"


def publish(res: dict, write: bool) -> None:
    body = render(res)
    print("\n" + body)
    if write:
        C.replace_section(BEGIN, END, body)
        log(f"wrote the packing section of {os.path.relpath(C.RESULTS, C.REPO)}")
