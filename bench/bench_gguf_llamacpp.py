"""`dpo export --gguf` checked by llama.cpp itself: the exported GGUF loaded by llama-cpp-python (llama.cpp's own
loader, tokenizer and CPU kernels) against transformers on the exported safetensors -- the same token ids, and the
logits of one chat-rendered prompt + reply. Not part of `make test` (llama.cpp is not a dependency): it runs in a
separate venv, e.g.

    python3 -m venv /tmp/llvenv && CMAKE_ARGS="-DGGML_NATIVE=OFF" /tmp/llvenv/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/python bench/bench_gguf_llamacpp.py --llama-python /tmp/llvenv/bin/python

Models: SmolLM2-135M-Instruct (llama, tied) and a random Qwen2 (untied, qkv biases; tests/tiny.py), each with a
random non-zero LoRA r8 on every linear layer, exported by `dpo export --gguf` in f32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = '''
import json, sys
import numpy as np
from llama_cpp import Llama
gguf, inp, out = sys.argv[1:4]
data = json.load(open(inp))
llm = Llama(model_path=gguf, logits_all=True, n_ctx=1024, verbose=False, n_threads=1)
res = {"ids": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in data["texts"]]}
llm.eval(data["ids"])
res["logits"] = np.array(llm.scores[: len(data["ids"])]).tolist()
res["has_template"] = bool(llm.metadata.get("tokenizer.chat_template"))
json.dump(res, open(out, "w"))
'''


def adapter_on(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # B = 0 would make the merge a no-op
    model.save_pretrained(str(out))
    return out


def check(name: str, base: Path, work: Path, llama_python: str, gguf_type: str) -> dict:
    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.cli import main

    adapter = adapter_on(base, work / f"{name}-adapter")
    out = work / f"{name}-{gguf_type}"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["export", str(adapter), "--output", str(out), "--base", str(base), "--gguf",
                                    "--gguf-type", gguf_type], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    seconds = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(out))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    texts = ["The quick brown fox jumps over the lazy dog.", chat, "Numbers 1, 22, 333 and 4444; émigré café."]
    ids = tok(chat + "The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    (work / "in.json").write_text(json.dumps({"texts": texts, "ids": ids}))
    (work / "child.py").write_text(CHILD)
    gguf = next(out.glob("*.gguf"))
    proc = subprocess.run([llama_python, str(work / "child.py"), str(gguf), str(work / "in.json"),
                           str(work / "out.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((work / "out.json").read_text())
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[gguf_type]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    ll = torch.tensor(got["logits"])
    return {"model": name, "gguf": f"{gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)", "export_s": seconds,
            "tokens": len(ids), "same_ids": all(a == tok(t, add_special_tokens=False)["input_ids"]
                                                for a, t in zip(got["ids"], texts)),
            "max_diff": float((ll - ref).abs().max()), "max_logit": float(ref.abs().max()),
            "argmax_agree": float((ll.argmax(-1) == ref.argmax(-1)).float().mean()),
            "template": got["has_template"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", required=True, help="a python with llama-cpp-python installed")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from stages.model.smollm import ensure_smollm2
    from tests.tiny import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        qwen = build_tiny_model(work / "qwen2", arch="qwen2", tie=False, seed=0)
        for name, base in (("SmolLM2-135M-Instruct", ensure_smollm2(ROOT / "cache" / "models")), ("tiny Qwen2", qwen)):
            for t in ("f32", "bf16"):
                rows.append(check(name, base, work / f"{name.split()[0]}-{t}", args.llama_python, t))
                print(rows[-1], flush=True)
    llama_version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    lines = ["## `dpo export --gguf` loaded by llama.cpp (issue 25; section `export-gguf-llamacpp`)", "",
             C.provenance(1).rstrip(),
             f"- llama-cpp-python {llama_version}, built from source in its own venv (the script's docstring)",
             "- each model + a random non-zero LoRA r8 on every linear layer, `dpo export ADAPTER --base BASE --gguf "
             "--gguf-type T`; llama.cpp tokenizes three texts (plain, the chat-rendered prompt with ChatML specials, "
             "digits and accents) and evaluates one chat prompt + reply; transformers runs the exported safetensors "
             "in the GGUF's type on the same ids", "",
             "| model | GGUF | export s | same token ids (3 texts) | chat template in GGUF | tokens | max abs logit "
             "diff | max abs logit | argmax agrees |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['gguf']} | {r['export_s']:.1f} | {r['same_ids']} | {r['template']} | "
              f"{r['tokens']} | {r['max_diff']:.3g} | {r['max_logit']:.3g} | {r['argmax_agree']:.0%} |" for r in rows]
    lines += ["", "Reading: llama.cpp reads the architecture, the Q/K permutation, tied/untied heads, qwen2 biases and "
              "the BPE tokenizer as transformers does. f32: the logits differ by the two libraries' kernels "
              "(accumulation order) only; bf16: transformers also runs its activations in bf16, llama.cpp its "
              "activations in f32 over bf16 weights, so their roundings differ (a near tie may flip the argmax)."]
    C.update_results("export-gguf-llamacpp", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
