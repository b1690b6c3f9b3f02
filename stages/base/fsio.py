"""Files that are never half-written, outputs held against a second writer, and temporaries of dead runs removed.

Every output is written as `.<name>.tmp-<pid>` in the same folder, flushed and renamed into place: a reader (or a
rerun) sees the old file or the new one, never a torn one. An output's writer holds an advisory `fcntl.flock` on
`.<name>.lock` next to a file output (`<folder>/.lock` for a run folder) for the whole run, and removes it at the
end; the kernel drops the lock when the process dies, so the stale lock of a killed run is simply taken over.
Whoever holds the lock owns every temporary of that output, so it removes what a killed writer left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

from stages.base.errors import UserError

TMP_MARK = ".tmp-"


def tmp_path(path: Path) -> Path:
    """The temporary name of `path` for this process, in the same folder (so the rename is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file; it is fsynced and renamed to `path`. On any failure the temporary goes."""
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def remove_stale_temporaries(folder: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete `.NAME.tmp-*` files/folders in `folder` (only for these NAMEs when given). Call it while holding the
    output's lock: then no live writer owns them, they are what a killed run left."""
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not (p.name.startswith(".") and TMP_MARK in p.name):
            continue
        if names is not None and p.name[1:].split(TMP_MARK)[0] not in names:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class OutputLock:
    """`with OutputLock(lock_file, option="--out"):` — exclusive for the whole block, refused at once if taken."""

    def __init__(self, lock_file: Path, what: Path, option: str):
        self.lock_file, self.what, self.option = Path(lock_file), what, option
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> "OutputLock":
        missing = [d for d in [self.lock_file.parent, *self.lock_file.parent.parents] if not d.exists()]
        first = ([self.lock_file.parent, *self.lock_file.parent.parents])[len(missing)]
        if not first.is_dir():  # an output path under a regular file: say so, not mkdir's "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(first))
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing  # folders made only to hold the lock: removed again if the run leaves them empty
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = (os.pread(fd, 200, 0).decode(errors="replace").split() + ["?", "?"])[:2]
                os.close(fd)
                raise UserError(f"{self.what} is being written by process {holder[0]} on {holder[1]}; wait for it "
                                f"to finish or use another {self.option}") from None
            if _same_file(fd, self.lock_file):  # not unlinked by a finishing holder between our open and flock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:  # unlink while still holding it: the output is left with no lock file
            self.lock_file.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            for d in self.created:  # innermost first; a folder the run wrote into is not empty and stays
                try:
                    d.rmdir()
                except OSError:
                    break


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
