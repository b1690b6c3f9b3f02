"""Rank-0 output: one-line messages and a tqdm bar with examples, tokens/s and ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def say(env, message: str) -> None:
    if env is None or env.is_main:
        print(message, flush=True)


class Progress:
    def __init__(self, env, total: int, unit: str, desc: str):
        self.enabled = env is None or env.is_main
        self.start, self.tokens = time.perf_counter(), 0
        self.bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        disable=not self.enabled, mininterval=1.0)

    def update(self, n: int, tokens: int = 0, **postfix) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", **postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
