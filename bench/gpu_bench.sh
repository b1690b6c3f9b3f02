#!/usr/bin/env bash
# One prepared GPU benchmark for issues 3 and 4 (stage one throughput, stage two cache vs online vs two-model),
# sized to finish in about 6-8 minutes on one H100/H200. Run from the repository root:  bash bench/gpu_bench.sh
#
# What it does
#   1. installs this project with --no-deps (the image has torch, transformers, peft, pyarrow, click, tqdm, yaml);
#      packages the image lacks (polars + polars-runtime-32 always; bitsandbytes for the NF4 run) come from .whl/
#      if it was carried;
#   2. builds a random-init Llama-like model from a config (hidden 3072, 28 layers, 24 heads, 8 KV heads,
#      intermediate 8192, vocab 128256, tied embeddings: ~3.2B parameters, Llama-3.2-3B shaped) in bf16 on the
#      GPU and saves it as safetensors to /tmp/rand3b (no download, no tokenizer: rows are random token ids
#      with HH-RLHF-like lengths);
#   3. stage one (bench_stage1.py --synthetic): single GPU, then FSDP2 fully_shard at world size 1;
#      tokens/s and achieved TFLOP/s (2 x parameters x tokens/s), sorted batches, prompt shared vs plain;
#   4. stage two (bench_stage2.py --synthetic --dtype bf16): (a) cache, (b) online reference, (c) two-model,
#      each in its own process; step time and torch.cuda.max_memory_allocated; then the same with the NF4 base
#      if bitsandbytes imports;
#   5. issue 13: stage one as 2 shard jobs (--shard-index auto via SLURM_ARRAY_TASK_ID) + `dpo cache merge`,
#      compared with one job; with 2+ GPUs, HSDP (--replicas 2) stage one and 3 training steps vs one GPU;
#   6. copies logs, JSON and the GPU sections of bench/RESULTS.md to $OUT (or bench/out/gpu).
#
# Before calling the device tool, here in the repo root (the image has no polars; nothing can be fetched there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl polars==2.1.0 polars-runtime-32==2.1.0
#   (optionally bitsandbytes==0.50.2 too, if the wheels stay under the 64 MiB carry limit)
# then: run(command="bash bench/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# DRY_RUN=1 PY=.venv/bin/python bash bench/gpu_bench.sh  checks the whole flow on CPU with a tiny model (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEST=${OUT:-bench/out/gpu}
DRY=${DRY_RUN:-0}
MODEL=${MODEL:-/tmp/rand3b}
ROWS=1024; BUDGET=32768; PAIRS=8; TARGET=400; STEPS=5; W=""
if [ "$DRY" = 1 ]; then
  MODEL=/tmp/rand-dry; ROWS=16; BUDGET=2048; PAIRS=2; TARGET=64; STEPS=1; DEST=bench/out/gpu-dry; W="--no-write"
fi
mkdir -p "$DEST"
LOG="$DEST/gpu_bench.log"
exec > >(tee "$LOG") 2>&1
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"

stamp "install"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DRY" != 1 ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "peft", "pyarrow", "polars", "click", "tqdm", "yaml", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing on this machine: {missing}; carry wheels in .whl (see the header of bench/gpu_bench.sh)")
import stages.precompute, stages.train  # noqa: F401  (imports everything both stages need)
for m in ("transformers", "peft", "polars"):
    print(m, importlib.import_module(m).__version__)
EOF

stamp "build a random-init ~3.2B Llama-like model in bf16 -> $MODEL"
if [ ! -f "$MODEL/config.json" ]; then
$PY - "$MODEL" "$DRY" <<'EOF'
import sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
t = time.perf_counter()
dry = sys.argv[2] == "1"
shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128) if dry else dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                                     num_key_value_heads=8, intermediate_size=8192)
cfg = LlamaConfig(**shape, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
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

stamp "stage one, single GPU"
$PY bench/bench_stage1.py --model "$MODEL" --synthetic --dtype bf16 --rows $ROWS --budget $BUDGET \
  --variants sorted-shared,sorted-plain --repeats 2 --threads 8 --json "$DEST/stage1.json" $W

stamp "stage one, FSDP2 world size 1"
$PY bench/bench_stage1.py --model "$MODEL" --synthetic --dtype bf16 --rows $ROWS --budget $BUDGET \
  --variants sorted-shared --repeats 2 --threads 8 --fsdp1 --json "$DEST/stage1_fsdp1.json" $W

stamp "stage two, bf16 LoRA: (a) cache, (b) online, (c) two-model"
$PY bench/bench_stage2.py --model "$MODEL" --synthetic --dtype bf16 --pairs $PAIRS --target-length $TARGET \
  --max-length 1024 --steps $STEPS --threads 8 $W

if [ "$DRY" != 1 ] && $PY -c "import bitsandbytes" 2>/dev/null && [ $(( $(date +%s) - start )) -lt 330 ]; then
  stamp "stage two, NF4 base (QLoRA default)"
  $PY bench/bench_stage2.py --model "$MODEL" --synthetic --dtype bf16 --4bit --pairs $PAIRS --target-length $TARGET \
    --max-length 1024 --steps $STEPS --threads 8 $W || echo "NF4 run failed"
else
  stamp "skipping the NF4 run (bitsandbytes not importable here, or too little time left)"
fi

stamp "stage one as 2 shard jobs (--shard-index auto) + dpo cache merge vs one job (issue 13)"
$PY -c "from tests.tiny import build_tokenizer; build_tokenizer('$MODEL')"  # ids < 512: fine for any vocab
SH="$DEST/shards"; rm -rf "$SH"; mkdir -p "$SH"
S1=(--model "$MODEL" --data stages/demo_data/train.jsonl --dtype bf16 --max-tokens-per-batch $BUDGET --max-length 512 --max-prompt-length 256)
$PY -m stages.cli precompute-ref "${S1[@]}" --out "$SH/single.parquet"
for i in 0 1; do
  SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=2 $PY -m stages.cli precompute-ref "${S1[@]}" --out "$SH/ref.parquet" \
    --num-shards 2 --shard-index auto
done
$PY -m stages.cli cache merge "$SH"/ref.shard-*-of-2.parquet --out "$SH/merged.parquet"
$PY -m stages.cli cache info "$SH/merged.parquet" | head -3
$PY - "$SH" <<'EOF2'
import sys, polars as pl
d = sys.argv[1]
a, b = pl.read_parquet(f"{d}/single.parquet"), pl.read_parquet(f"{d}/merged.parquet")
assert a["example_id"].to_list() == b["example_id"].to_list(), "merged ids differ from the single job"
diff = max(float((a[c] - b[c]).abs().max()) for c in ("ref_chosen_logps", "ref_rejected_logps"))
scale = float(a["ref_chosen_logps"].abs().max())
print(f"SHARDS merged vs single job: {a.height} ids equal, max |diff| {diff:.3e} (bf16 on GPU; sums up to {scale:.0f} nats)")
EOF2

NGPU=$( (nvidia-smi -L 2>/dev/null || true) | wc -l )
if [ "$NGPU" -ge 2 ]; then
  R=2; W=$(( NGPU >= 4 ? 4 : 2 ))
  stamp "HSDP: $W GPUs as $R x $(( W / R )) (--replicas $R), stage one and three training steps (issue 13)"
  $PY -m torch.distributed.run --nproc-per-node $W -m stages.cli precompute-ref "${S1[@]}" --out "$SH/hsdp.parquet" --replicas $R
  $PY - "$SH" <<'EOF2'
import sys, polars as pl
d = sys.argv[1]
a, b = pl.read_parquet(f"{d}/single.parquet"), pl.read_parquet(f"{d}/hsdp.parquet")
diff = max(float((a[c] - b[c]).abs().max()) for c in ("ref_chosen_logps", "ref_rejected_logps"))
print(f"HSDP stage one vs one GPU: ids equal {a['example_id'].to_list() == b['example_id'].to_list()}, max |diff| {diff:.3e}")
EOF2
  T2=(--model "$MODEL" --data stages/demo_data/train.jsonl --ref-cache "$SH/single.parquet" --dtype bf16 --no-load-in-4bit
      --max-steps 3 --batch-size 2 --lora-dropout 0 --seed 3 --learning-rate 1e-3)
  $PY -m torch.distributed.run --nproc-per-node $W -m stages.cli train "${T2[@]}" --output "$SH/run-hsdp" --replicas $R
  $PY -m stages.cli train "${T2[@]}" --output "$SH/run-one" --gradient-accumulation-steps $W
  grep -h '"loss"' "$SH/run-hsdp/metrics.jsonl" "$SH/run-one/metrics.jsonl" | cut -c1-160 || true
else
  stamp "skipping HSDP: $NGPU GPU(s) here; it needs 2+ (tests/test_hsdp_dist.py covers it on CPU)"
fi

stamp "collect"
cp bench/RESULTS.md "$DEST/RESULTS-gpu.md" 2>/dev/null || true
stamp "done"
