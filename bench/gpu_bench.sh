#!/usr/bin/env bash
# The first GPU run (issue 20, item 8): one prepared script, sized for ONE H200 inside the device tool's 10-minute
# limit, that leaves its results even when killed. Run from the repository root:  bash bench/gpu_bench.sh
#
# Sections, in order of value; each states its expected time on one H200 (estimated from the sizes: no GPU has run
# this script yet) and is skipped, saying so, when less time than that is left before DEADLINE (540 s after the
# start; every command also runs under `timeout` with what is left). Expected total ~7.5 min.
#   0. machine, wheels, NF4 check (`import bitsandbytes, accelerate`)                                         ~20 s
#      a random-init ~3.2B Llama-like model (hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192,
#      vocab 128256, tied embeddings: Llama-3.2-3B shaped) in bf16 -> $MODEL (/tmp/rand3b) + the tiny test
#      tokenizer (ids < 512: fine for any vocab); nothing is downloaded                                       ~40 s
#   1. CUDA-only tests: tests/test_gpu.py (NF4 + FSDP2 at world size 1 against the unsharded model)           ~20 s
#   2. loading and NF4 through the commands on the demo data: `dpo precompute-ref` bf16, then --load-in-4bit, then
#      `dpo train --load-in-4bit` 3 steps, each printing its per-phase memory; `dpo plan` for them beside     ~60 s
#   3. stage two NF4 (bench_stage2 --4bit): (a) cache vs (b) online reference, step wall s, tokens/s, MFU       ~40 s
#   4. side by side with TRL 1.16 (bench/gpu_vs_trl.py): stage one and stage-two steps, ours vs DPOTrainer      ~60 s
#   5. stage one throughput (bench_stage1 --synthetic): tokens/s, MFU, sorted shared vs plain                  ~30 s
#   6. stage two bf16 LoRA (bench_stage2): (a) cache, (b) online, (c) two-model                                ~60 s
#   7. stage one under FSDP2 fully_shard at world size 1 (the sharding overhead)                               ~30 s
#   8. stage one as 2 shard jobs (--shard-index auto) + `dpo cache merge` against one job (issue 13)           ~50 s
#   9. with 2+ GPUs only (skipped on one): HSDP (--replicas 2) stage one and 3 training steps (issue 13)
#  10. the attention paths (issue 24, bench/bench_packing.py --gpu): stage one bf16 and stage two NF4 (LoRA r16,
#      gradient checkpointing) at 2k and 8k tokens per forward, dense [T, T] mask vs segments (segattn), with and
#      without --pack, plus one [prompt | chosen | rejected] row of 2k / 8k tokens: tokens/s, peak memory, MFU  ~90 s
#      PACKING_ONLY=1 bash bench/gpu_bench.sh  runs the setup (section 0) and section 10 only (~2.5 min)
# Step times are wall seconds, CUDA synchronised (bench/_common.Timer); MFU = 2·N (stage one) or 6·N (stage two)
# x tokens/s / 989 TFLOP/s (bf16 dense, H100/H200), N = non-embedding parameters (bench/gpu_mfu.py).
#
# Results: everything is printed to $DEST/gpu_bench.log as it runs (a kill keeps what was printed); an EXIT trap
# (also on INT/TERM/HUP) packs the logs, JSON and run summaries under bench/out into $DEST/gpu_bench_files.tar.gz
# and copies bench/RESULTS.md (with the GPU sections the bench scripts wrote) to $DEST/RESULTS-gpu.md: three files,
# within the device tool's 8. DEST = $OUT under the device tool, else bench/out/gpu_results.
#
# Before calling the device tool, here in the repo root. The image has torch, transformers, peft, accelerate,
# pyarrow, pandas, xxhash, pytest; it lacks polars, bitsandbytes, trl and TRL's datasets, dill, multiprocess, and
# nothing can be fetched there. The wheels must stay under the 64 MiB the tree + carry may weigh, so bitsandbytes
# keeps only its CUDA 13 and CPU libraries (the image's torch is cu130; the full wheel is 43 MB, trimmed 7 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl polars==2.1.0 polars-runtime-32==2.1.0 bitsandbytes==0.50.2 \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   zip -qd .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
#     'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
#   du -cb .whl/*.whl | tail -1      # ~63.5 MB; with the ~1.5 MB tree under 64 MiB = 67,108,864 bytes
# then: run(command="bash bench/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# DRY_RUN=1 PY=.venv/bin/python bash bench/gpu_bench.sh  runs every section on CPU with a tiny model (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project itself: no install needed
PY=${PY:-python3}
DRY=${DRY_RUN:-0}
MODEL=${MODEL:-/tmp/rand3b}
DEST=${OUT:-bench/out/gpu_results}
WORK=bench/out/gpu_bench
DEADLINE=${DEADLINE:-540}  # seconds after the start; the device tool kills at 600
ROWS=512; BUDGET=32768; PAIRS=8; TARGET=400; STEPS=3; TRL_ROWS=256; TRL_STEPS=5; W=""; PLAN=(--gpu-memory 141GB)
THREADS=8; REPEATS=2; DT=bf16; VOCAB=128256; DATA=stages/demo_data/train.jsonl
if [ "$DRY" = 1 ]; then  # CPU: fp32 (bf16 matmuls are slow there), vocab 512, 24 demo rows
  MODEL=/tmp/rand-dry; ROWS=16; BUDGET=2048; PAIRS=2; TARGET=64; STEPS=1; TRL_ROWS=8; TRL_STEPS=2; W="--no-write"
  THREADS=1; REPEATS=1; DT=fp32; VOCAB=512
  DEST=${OUT:-bench/out/gpu_results-dry}; WORK=bench/out/gpu_bench-dry; DEADLINE=${DEADLINE_DRY:-3600}
  PLAN=(--cpu --gpu-memory 24GB)
fi
rm -rf "$WORK"
mkdir -p "$DEST" "$WORK"
if [ "$DRY" = 1 ]; then head -n 24 "$DATA" > "$WORK/demo.jsonl"; DATA="$WORK/demo.jsonl"; fi
LOG="$DEST/gpu_bench.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1  # appends: finish() below may write to the log directly once tee is gone
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
stamp() { echo "== $(elapsed)s: $*"; }
section() {  # section SECONDS TITLE...: announce it, or skip it (status 1) when less than SECONDS are left
  local need=$1; shift
  if [ "$(left)" -lt "$need" ]; then stamp "SKIPPED, ~${need}s needed, $(left)s left: $*"; return 1; fi
  stamp "$* (expected ~${need}s on one H200)"
}
tmo() { local l; l=$(left); [ "$l" -gt 5 ] || { echo "no time left for: $*"; return 124; }; timeout -k 10 "$l" "$@"; }
ok() { "$@"; local rc=$?; [ $rc = 0 ] || echo "!! FAILED (exit $rc): $*"; return 0; }
mfu() { ok tmo $PY bench/gpu_mfu.py --model "$MODEL" "$1" "$2"; }
packing() {  # section 10 (issue 24): bench_packing.py --gpu prints its table (MFU too), writes $WORK/packing.*
  local tokens=2048,8192 nf4=()
  if [ "$DRY" = 1 ]; then tokens=256,1024; fi
  if [ "$NF4" = 1 ] && [ "$DRY" != 1 ]; then nf4=(--4bit); fi
  if section 90 "10. attention paths (issue 24): dense vs segments, with and without --pack, at $tokens tokens"; then
    ok tmo $PY bench/bench_packing.py --gpu --model "$MODEL" --tokens $tokens --dtype $DT "${nf4[@]}" \
      --repeats $REPEATS --json "$WORK/packing.json"
  fi
}

finish() {
  local rc=$?
  trap - EXIT INT TERM HUP
  trap '' PIPE
  exec >> "$LOG" 2>&1  # a kill of the whole group also ends tee: write to the log itself
  stamp "exit $rc: packing the results into $DEST"
  find bench/out -path "$DEST" -prune -o -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \
    -o -name '*.md' -o -name '*.txt' \) -size -4M -print 2>/dev/null | tar czf "$DEST/gpu_bench_files.tar.gz" -T - \
    2>/dev/null
  cp bench/RESULTS.md "$DEST/RESULTS-gpu.md" 2>/dev/null
  ls -la "$DEST"
  stamp "done"
}
trap finish EXIT
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP

# ------------------------------------------------------------------------------------------------ 0. setup
stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"

stamp "install the carried wheels (.whl)"
if [ "$DRY" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'EOF' || exit 1
import importlib, sys
missing = [m for m in ("torch", "transformers", "peft", "pyarrow", "polars", "click", "tqdm", "yaml", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing on this machine: {missing}; carry wheels in .whl (see the header of bench/gpu_bench.sh)")
import stages.stage1.precompute, stages.stage2.train  # noqa: F401  (imports everything both stages need)
for m in ("transformers", "peft", "polars", "accelerate"):
    print(m, importlib.import_module(m).__version__)
EOF
NF4=0
if $PY -c "import bitsandbytes, accelerate; print('NF4 ready: bitsandbytes', bitsandbytes.__version__)"; then
  NF4=1
else
  echo "!! NF4 sections skipped: bitsandbytes or accelerate does not import (carry bitsandbytes in .whl)"
fi
TRL=0
if $PY -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"; then TRL=1; fi

stamp "build a random-init ~3.2B Llama-like model in bf16 -> $MODEL (expected ~40s)"
if [ ! -f "$MODEL/config.json" ]; then
  tmo $PY - "$MODEL" "$DRY" "$VOCAB" <<'EOF' || exit 1
import sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
t = time.perf_counter()
dry = sys.argv[2] == "1"
shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128) if dry else dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                                     num_key_value_heads=8, intermediate_size=8192)
cfg = LlamaConfig(**shape, vocab_size=int(sys.argv[3]), max_position_embeddings=4096, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  attn_implementation="sdpa")
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(f"{n / 1e9:.3f}B parameters, built and saved in {time.perf_counter() - t:.0f}s")
EOF
fi
$PY -c "from tests.tiny import build_tokenizer; build_tokenizer('$MODEL')" || exit 1
if [ "${PACKING_ONLY:-0}" = 1 ]; then packing; exit 0; fi  # PACKING_ONLY=1: the setup above and section 10 only

# ------------------------------------------------------------------------------------------------ 1. CUDA-only tests
if section 20 "1. CUDA-only tests: NF4 + FSDP2 at world size 1 against the unsharded model (tests/test_gpu.py)"; then
  tmo $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py; rc=$?
  case $rc in
    0) ;; 5) echo "tests/test_gpu.py holds no test yet";; *) echo "!! FAILED: CUDA-only tests (exit $rc)";;
  esac
fi

# ------------------------------------------------------------------------------------------------ 2. loading, NF4
S1=(--model "$MODEL" --data "$DATA" --max-length 512 --max-prompt-length 256 --max-tokens-per-batch $BUDGET
    --dtype $DT --overwrite)
if section 60 "2. loading and NF4 through the commands (memory per phase next to dpo plan)"; then
  ok tmo $PY -m stages.cli plan --model "$MODEL" --gpus 1 "${PLAN[@]}" --seq-len 512 --max-tokens-per-batch $BUDGET \
    --batch 2 --lora-r 16
  ok tmo $PY -m stages.cli precompute-ref "${S1[@]}" --output "$WORK/ref-bf16.parquet"
  if [ "$NF4" = 1 ]; then
    ok tmo $PY -m stages.cli precompute-ref "${S1[@]}" --load-in-4bit --output "$WORK/ref-nf4.parquet"
    ok tmo $PY -m stages.cli train --model "$MODEL" --data "$DATA" \
      --ref-cache "$WORK/ref-nf4.parquet" --load-in-4bit --dtype $DT --max-length 512 --max-prompt-length 256 \
      --batch-size 2 --max-steps 3 --output "$WORK/run-nf4"
  fi
fi

# ------------------------------------------------------------------------------------------------ 3. stage two NF4
T2=(--model "$MODEL" --synthetic --dtype $DT --pairs $PAIRS --target-length $TARGET --max-length 1024
    --steps $STEPS --threads $THREADS $W)
if [ "$NF4" = 1 ] && section 40 "3. stage two, NF4 base (QLoRA default): (a) cache vs (b) online"; then
  ok tmo $PY bench/bench_stage2.py "${T2[@]}" --4bit --variants cache,online --json "$WORK/stage2-nf4.json"
  mfu stage2 "$WORK/stage2-nf4.json"
fi

# ------------------------------------------------------------------------------------------------ 4. TRL 1.16
if [ "$TRL" = 1 ] && section 60 "4. side by side with TRL 1.16's DPOTrainer: stage one and stage-two steps"; then
  ok tmo $PY bench/gpu_vs_trl.py --model "$MODEL" --output "$WORK/vs_trl" --rows $TRL_ROWS --batch $PAIRS \
    --steps $TRL_STEPS --budget $BUDGET
elif [ "$TRL" != 1 ]; then
  stamp "!! TRL section skipped: trl/datasets do not import (carry trl, datasets, dill, multiprocess in .whl)"
fi

# ------------------------------------------------------------------------------------------------ 5-7. throughput
B1=(--model "$MODEL" --synthetic --dtype $DT --rows $ROWS --budget $BUDGET --repeats $REPEATS --threads $THREADS $W)
if section 30 "5. stage one throughput, single GPU"; then
  ok tmo $PY bench/bench_stage1.py "${B1[@]}" --variants sorted-shared,sorted-plain --json "$WORK/stage1.json"
  mfu stage1 "$WORK/stage1.json"
fi
if section 60 "6. stage two, bf16 LoRA: (a) cache, (b) online, (c) two-model"; then
  ok tmo $PY bench/bench_stage2.py "${T2[@]}" --json "$WORK/stage2-bf16.json"
  mfu stage2 "$WORK/stage2-bf16.json"
fi
if section 30 "7. stage one, FSDP2 fully_shard at world size 1"; then
  ok tmo $PY bench/bench_stage1.py "${B1[@]}" --variants sorted-shared --fsdp1 --json "$WORK/stage1-fsdp1.json"
  mfu stage1 "$WORK/stage1-fsdp1.json"
fi

# ------------------------------------------------------------------------------------------------ 8-9. issue 13
SH="$WORK/shards"; mkdir -p "$SH"
if section 50 "8. stage one as 2 shard jobs (--shard-index auto) + dpo cache merge vs one job (issue 13)"; then
  ok tmo $PY -m stages.cli precompute-ref "${S1[@]}" --output "$SH/single.parquet"
  for i in 0 1; do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=2 ok tmo $PY -m stages.cli precompute-ref "${S1[@]}" \
      --output "$SH/ref.parquet" --num-shards 2 --shard-index auto
  done
  ok tmo $PY -m stages.cli cache merge "$SH"/ref.shard-*-of-2.parquet --output "$SH/merged.parquet"
  ok tmo $PY - "$SH" <<'EOF'
import sys, polars as pl
d = sys.argv[1]
a, b = pl.read_parquet(f"{d}/single.parquet"), pl.read_parquet(f"{d}/merged.parquet")
assert a["example_id"].to_list() == b["example_id"].to_list(), "merged ids differ from the single job"
diff = max(float((a[c] - b[c]).abs().max()) for c in ("ref_chosen_logps", "ref_rejected_logps"))
scale = float(a["ref_chosen_logps"].abs().max())
print(f"SHARDS merged vs single job: {a.height} ids equal, max |diff| {diff:.3e} (sums up to {scale:.0f} nats)")
EOF
fi

NGPU=$( (nvidia-smi -L 2>/dev/null || true) | wc -l )
if [ "$NGPU" -ge 2 ] || [ "$DRY" = 1 ]; then
  R=2; NP=$(( NGPU >= 4 ? 4 : 2 ))
  if section 60 "9. HSDP: $NP processes as $R x $(( NP / R )) (--replicas $R), stage one and three training steps"; then
    ok tmo $PY -m torch.distributed.run --nproc-per-node $NP -m stages.cli precompute-ref "${S1[@]}" \
      --output "$SH/hsdp.parquet" --replicas $R
    ok tmo $PY - "$SH" <<'EOF'
import sys, polars as pl
d = sys.argv[1]
a, b = pl.read_parquet(f"{d}/single.parquet"), pl.read_parquet(f"{d}/hsdp.parquet")
diff = max(float((a[c] - b[c]).abs().max()) for c in ("ref_chosen_logps", "ref_rejected_logps"))
print(f"HSDP stage one vs one process: ids equal {a['example_id'].to_list() == b['example_id'].to_list()}, "
      f"max |diff| {diff:.3e}")
EOF
    T3=(--model "$MODEL" --data "$DATA" --ref-cache "$SH/single.parquet" --dtype $DT
        --no-load-in-4bit --max-length 512 --max-prompt-length 256 --max-steps 3 --batch-size 2 --lora-dropout 0
        --seed 3 --learning-rate 1e-3)
    ok tmo $PY -m torch.distributed.run --nproc-per-node $NP -m stages.cli train "${T3[@]}" --output "$SH/run-hsdp" \
      --replicas $R
    ok tmo $PY -m stages.cli train "${T3[@]}" --output "$SH/run-one" --gradient-accumulation-steps $NP
    grep -h '"loss"' "$SH/run-hsdp/metrics.jsonl" "$SH/run-one/metrics.jsonl" | cut -c1-160
  fi
else
  stamp "9. HSDP skipped: $NGPU GPU(s) here, it needs 2+ (tests/test_hsdp_dist.py covers it on CPU)"
fi

# ------------------------------------------------------------------------------------------------ 10. issue 24
packing
stamp "all sections done"
