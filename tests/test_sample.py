"""`dpo sample` on the tiny random model: greedy replies, rewards β·(log π − log π_ref) checked against a plain
forward, files written, and `dpo compare --samples`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from stages.cli import main
from stages.tools.sample import SampleConfig, sample

ROWS = [
    {"prompt": "The quick brown fox", "chosen": " jumps.", "rejected": " sleeps."},
    {"chosen": [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Rome."}]},
    {"prompt": "The quick brown fox", "chosen": " runs.", "rejected": " naps."},  # same prompt: sampled once
    {"prompt": "Water boils at", "chosen": " 100 degrees.", "rejected": " 5 degrees."},
]


@pytest.fixture(scope="module")
def run_with_adapter(tiny_llama, tmp_path_factory):
    """A 'run folder' with a LoRA adapter whose B matrices are random (a zero B would equal the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sample")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    run = root / "run"
    peft.save_pretrained(str(run / "adapter"))
    (run / "config.yaml").write_text("beta: 0.25\nloss: sigmoid\n")
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return run, data


def plain_logp(model, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """Σ log p(reply | prompt) from one ordinary forward and log_softmax (independent of stages.model.logprobs)."""
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())


def test_sample_rewards_equal_beta_times_log_ratio(tiny_llama, run_with_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, data = run_with_adapter
    cfg = SampleConfig.flat(model=str(tiny_llama), data=(str(data),), adapter=str(run / "adapter"), n=8,
                            max_new_tokens=6, dtype="fp32")
    samples = sample(cfg)
    assert len(samples) == 3  # 4 rows, 3 distinct prompts
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(run / "adapter"))
    policy.eval()
    differ = 0
    for s in samples:
        prompt_ids = tok(s.prompt_text, add_special_tokens=False)["input_ids"]
        # greedy: the reference reply is the base's argmax continuation, the policy's the adapter's
        for model, text, n_tokens in ((base, s.reference, s.reference_tokens), (policy, s.policy, s.policy_tokens)):
            out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            reply = out[0, len(prompt_ids):].tolist()
            reply = reply[: reply.index(tok.eos_token_id) + 1] if tok.eos_token_id in reply else reply
            assert len(reply) == n_tokens and tok.decode(reply, skip_special_tokens=True).strip() == text
            ratio = plain_logp(policy, prompt_ids, reply) - plain_logp(base, prompt_ids, reply)
            reward = s.reference_reward if model is base else s.policy_reward
            # float32 forwards of a 2-layer model: sums of <= 6 log-probs agree to ~1e-5 relative
            assert reward == pytest.approx(0.25 * ratio, rel=1e-4, abs=1e-4)  # β from RUN/config.yaml
        differ += s.reference != s.policy
    assert differ >= 1  # the random adapter changes what is written


def test_sample_cli_writes_files_and_compare_shows_them(tiny_llama, run_with_adapter):
    run, data = run_with_adapter
    runner = CliRunner()
    args = ["sample", "--model", str(tiny_llama), "--adapter", str(run / "adapter"), "--data", str(data), "-n", "2",
            "--max-new-tokens", "4", "--seed", "3", "--dtype", "fp32"]
    res = runner.invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "reference (reward" in res.output and "│ policy (reward" in res.output
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"reference", "policy", "reference_reward", "policy_reward"} <= rows[0].keys()
    again = runner.invoke(main, args, catch_exceptions=False)  # a seed makes sampling repeatable
    assert [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()] == rows, again.output
    md = (run / "samples.md").read_text()
    assert "| # | prompt (last user turn) | reference | policy |" in md and "sampled, seed 3" in md
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    res = runner.invoke(main, ["compare", str(run), "--samples"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"## Samples: {run}" in res.output and res.output.count("(reward ") >= 4


def test_sample_without_adapter_and_errors(tiny_llama, run_with_adapter, tmp_path):
    _, data = run_with_adapter
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_llama), "--data", str(data), "-n", "1",
                                    "--max-new-tokens", "3", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert row["policy"] is None and row["policy_reward"] is None and row["reference"] is not None
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_llama), "--data", str(data), "-n", "0"])
    assert res.exit_code == 2 and "error: -n and --max-new-tokens must be >= 1" in res.output


def test_compare_plot_labels_and_coinciding_runs(tmp_path, monkeypatch):
    """compare.png: y-axis labels on every panel, '1 run' in the title, and a run whose lines coincide with
    another's drawn with larger hollow markers and dashes so both stay visible."""
    from matplotlib.figure import Figure

    from stages.tools import compare

    records = [{"step": s, "loss": 0.7 - s / 100, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": s / 10}
               for s in (1, 2, 3)]
    for name in ("a", "b"):  # two runs with identical metrics
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("beta: 0.1\nloss: sigmoid\n")
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    compare.compare([tmp_path / "a"], tmp_path / "one")
    compare.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "two")
    one, two = figures
    assert one._suptitle.get_text() == "dpo compare: 1 run" and two._suptitle.get_text() == "dpo compare: 2 runs"
    for ax in two.axes:
        assert ax.get_ylabel()
        first, second = ax.get_lines()
        assert second.get_marker() not in (None, "None", "") and second.get_markerfacecolor() == "none"
        assert second.get_markersize() > first.get_markersize() and second.get_linestyle() != first.get_linestyle()
