"""What keeps a run's output safe around the algorithm: one writer at a time, and a clean stop on a signal.

  with guarded_output(lock_file, what, "--out", env):    rank 0 holds the lock; every rank fails alike if taken
  with StopSignal() as stop: ... if stop.requested(env)  SIGINT/SIGTERM finish the current unit of work, then stop

Under torchrun only rank 0 locks (the output is rank 0's to write); across nodes that is as good as flock on the
shared filesystem (see the README). Ranks agree on stopping through an all-reduce, so all run the same forwards.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path

from stages.base.errors import UserError
from stages.base.fsio import OutputLock


@contextlib.contextmanager
def guarded_output(lock_file: Path, what: Path, option: str, env):
    """Hold `lock_file` on rank 0 for the block; if another process holds it, every rank raises the same error."""
    from stages.model.distributed import broadcast_object

    lock, error = None, None
    if env.is_main:
        try:
            lock = OutputLock(lock_file, what, option).__enter__()
        except (UserError, OSError) as e:  # OSError: cannot create the lock file (read-only, not a folder...)
            error = e
    error = broadcast_object(error, env)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


class StopSignal:
    """The first SIGINT or SIGTERM (what schedulers send before they kill a job) only sets a flag; a second SIGINT
    interrupts at once. Installed only in the main thread (signals cannot be caught elsewhere)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def requested(self, env) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per call under torchrun)."""
        if not env.enabled:
            return self.signum is not None

        from stages.model.distributed import all_reduce_max

        signum = all_reduce_max(self.signum or 0, env)
        self.signum = self.signum or (signum or None)
        return signum > 0


def rerun_hint() -> str:
    """'rerun `dpo train --config x.yaml`' when the command line is short enough to print, else the same words."""
    command = " ".join(["dpo", *map(shlex.quote, sys.argv[1:])])
    return f"rerun `{command}`" if Path(sys.argv[0]).name == "dpo" and len(command) <= 90 else "rerun the same command"
