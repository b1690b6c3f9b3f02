"""Tokens/s and MFU for bench/gpu_bench.sh: model FLOP utilisation against the dense bf16 peak of an H100/H200 SXM
(989 TFLOP/s), from the NON-embedding parameters N (stages/tools/plancount.py: total - embed - lm_head; the embedding
is a lookup, and the LM head runs on reply positions only):

  inference (stage one): 2·N FLOP per token;  training (stage two): 6·N FLOP per token (the usual convention:
  forward 2N + backward 4N; with a frozen base and gradient checkpointing the work is forward 2N + recompute 2N +
  input gradients 2N, also ~6N, the base's weight gradients being skipped).

Attention's sequence-squared FLOPs are not counted (small at these lengths), so MFU is a lower bound of the GPU's use.
Tokens are the ones the model forwards: with prompt sharing a pair's prompt once (prompt + chosen + rejected),
else twice. An online-reference step also runs one more forward (2N per token): its MFU here counts the 6N only.

  python3 bench/gpu_mfu.py --model /tmp/rand3b stage1 bench/out/gpu_bench/stage1.json
  python3 bench/gpu_mfu.py --model /tmp/rand3b stage2 bench/out/gpu_bench/stage2-nf4.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PEAK_FLOPS = 989e12  # bf16 dense, H100 SXM and H200 (the same tensor cores; the H200 has more memory, not FLOPs)


def non_embedding_params(model_dir: str | Path) -> int:
    from stages.tools.plancount import count_parameters, load_model_config

    c = count_parameters(load_model_config(model_dir))
    return c["total"] - c["embed"] - c["lm_head"]


def mfu(tokens_per_s: float, n: int, training: bool) -> float:
    """Fraction of PEAK_FLOPS: (6 if training else 2)·N·tokens/s."""
    return (6 if training else 2) * n * tokens_per_s / PEAK_FLOPS


def line(label: str, tokens_per_s: float, n: int, training: bool) -> str:
    return (f"MFU {label}: {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu(tokens_per_s, n, training):.1f}% "
            f"({6 if training else 2}·N·tokens/s / 989 TFLOP/s, N = {n / 1e6:,.1f}M non-embedding)")


def stage1_lines(data: dict, n: int) -> list[str]:
    """bench_stage1.py --json: real tokens/s per variant (wall seconds on GPU)."""
    return [line(f"stage one {v}", r["real_tokens_per_s"], n, training=False) for v, r in data["variants"].items()]


def stage2_lines(data: dict, n: int) -> list[str]:
    """bench_stage2.py --json: step seconds per variant and the tokens of the batch."""
    out = []
    for v, r in data["variants"].items():
        tokens = data["shared_tokens"] if r["share_prompt"] else data["pair_tokens"]
        out.append(line(f"stage two {v} ({r['step_s']:.3f} s per step, {r['timing']})", tokens / r["step_s"], n,
                        training=True))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model folder (config.json) the numbers were measured on")
    p.add_argument("kind", choices=("stage1", "stage2"))
    p.add_argument("json_file")
    a = p.parse_args()
    data = json.loads(Path(a.json_file).read_text())
    n = non_embedding_params(a.model)
    print("\n".join((stage1_lines if a.kind == "stage1" else stage2_lines)(data, n)), flush=True)


if __name__ == "__main__":
    main()
