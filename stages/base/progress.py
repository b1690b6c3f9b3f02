"""Rank-0 output: one-line messages and progress with examples, tokens/s and ETA.

Where stderr is a terminal, progress is a redrawn tqdm bar and messages are written above it (tqdm.write), so a
message never lands on the bar's line. Where it is not (Slurm, Kubernetes, `2> log`: a log that keeps every byte),
nothing is redrawn: progress is a plain line every LOG_SECONDS and one at the end, each a whole line of its own.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_SECONDS = 30.0  # a plain progress line at most this often (logs), besides the one at the end
_LIVE: list[tqdm] = []  # redrawn bars now on screen: messages go above them


def say(env, message: str) -> None:
    """`message` as a line of its own on stdout, on rank 0 only (above a redrawn bar when one is on screen)."""
    if env is not None and not env.is_main:
        return
    if _LIVE:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(message, flush=True)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LineBar:
    """tqdm's update/set_postfix/close for logs: `desc: n/total unit (p%), elapsed, eta, postfix` as whole lines
    on stderr, at most every LOG_SECONDS while running, and once more at the end for what no line has shown yet."""

    def __init__(self, total: int, unit: str, desc: str, disable: bool = False):
        self.total, self.unit, self.desc, self.disable = total, unit, desc, disable
        self.n, self.shown_n, self.postfix, self.closed = 0, 0, {}, False
        self.start = self.last = time.perf_counter()
        self.base: int | None = None  # n before the first measured update: a resumed run's steps are not timed

    def set_postfix(self, refresh: bool = False, **postfix) -> None:
        if self.base is None:
            self.base = self.n
        self.postfix = {k: str(v) for k, v in postfix.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self.total or now - self.last >= LOG_SECONDS:
            self._line(now)

    def close(self) -> None:
        if not self.closed and self.n != self.shown_n:
            self._line(time.perf_counter())
        self.closed = True

    def _line(self, now: float) -> None:
        self.last, self.shown_n = now, self.n
        if self.disable:
            return
        elapsed, done = now - self.start, self.n - (self.base or 0)
        eta = (self.total - self.n) * elapsed / done if done > 0 and self.total > self.n else 0.0
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in sorted(self.postfix.items()))
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent}, {tqdm.format_interval(elapsed)} elapsed, "
              f"eta {tqdm.format_interval(eta)}{extra}", file=sys.stderr, flush=True)


class Progress:
    """Progress of `total` units on rank 0: a redrawn bar on a terminal, plain lines in a log (see the module)."""

    def __init__(self, env, total: int, unit: str, desc: str):
        self.enabled = env is None or env.is_main
        self.start, self.tokens = time.perf_counter(), 0
        if is_terminal(sys.stderr):
            self.bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                            disable=not self.enabled, mininterval=1.0)
            if self.enabled:
                _LIVE.append(self.bar)
        else:
            self.bar = LineBar(total, unit, desc, disable=not self.enabled)

    def update(self, n: int, tokens: int = 0, **postfix) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", **postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar in _LIVE:
            _LIVE.remove(self.bar)
        self.bar.close()
