"""The demo's preference data, generated (deterministically) by this file and shipped in stages/demo_data/.

Each row is a conversation: a short factual question, a CHOSEN reply that answers it in one sentence, and a
REJECTED reply that gives the same answer buried in rambling filler. The preference (concise over rambling)
is clear and learnable, and it generalises: train and eval use DISJOINT questions, so held-out reward
accuracy measures whether the policy learned the preference rather than the rows.
Regenerate with `python -m stages.data.demodata` (the files are committed; a test checks they match).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parents[1] / "demo_data"

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
            ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
            ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"), ("Australia", "Canberra"),
            ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Mexico", "Mexico City")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("light", "dark"), ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("old", "new"),
             ("strong", "weak"), ("loud", "quiet"), ("rich", "poor"), ("wet", "dry"), ("high", "low")]
COLOURS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a flamingo", "pink")]
FILLER = [
    "Well, that is a really interesting question.",
    "Let me think about it for a little while.",
    "People have many opinions on this, so bear with me.",
    "Honestly, I could talk about this for hours.",
    "Anyway, it is good to think before answering.",
    "Some people find this confusing at first.",
    "I read something about this a long time ago.",
    "I hope this rambling answer was useful.",
    "Let me add a few more thoughts on this.",
    "To be perfectly clear, the answer is well known.",
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}  # replaces SmolLM2's longer default


def _facts(rng: random.Random) -> list[tuple[str, str]]:
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in CAPITALS]
    qa += [(f"What is the opposite of \"{a}\"?", f"The opposite of \"{a}\" is \"{b}\".") for a, b in OPPOSITES]
    qa += [(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {col}.") for thing, col in COLOURS]
    for _ in range(260):
        x, y = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-", "*"])
        value = {"+": x + y, "-": x - y, "*": x * y}[op]
        qa.append((f"What is {x} {op} {y}?", f"{x} {op} {y} = {value}."))
    return list(dict.fromkeys(qa))


def _row(rng: random.Random, question: str, answer: str) -> dict:
    before, after = rng.sample(FILLER, 2)
    rambling = " ".join([before, answer, after])
    prompt = [SYSTEM, {"role": "user", "content": question}]
    return {"chosen": prompt + [{"role": "assistant", "content": answer}],
            "rejected": prompt + [{"role": "assistant", "content": rambling}]}


def generate(seed: int = 0, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    qa = _facts(rng)
    rng.shuffle(qa)
    rows = [_row(rng, q, a) for q, a in qa]
    return rows[n_eval:], rows[:n_eval]


def main() -> None:
    train, evaluation = generate()
    OUT.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(evaluation)} eval rows to {OUT}")


if __name__ == "__main__":
    main()
