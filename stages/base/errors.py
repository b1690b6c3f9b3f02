"""The one exception users see: a single clear line, no traceback (the CLI prints it and exits 2).

`one_line` is the CLI's formatting rule for every user-facing failure (a UserError or an OSError): one line,
paths under the working directory made relative, long hex digests cut to 12 characters, at most 200 characters.
"""

from __future__ import annotations

import errno
import os
import re

MAX_CHARS = 200
_HEX = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{4,}\b")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^/\s:;,'\"()]+/){3,}[^/\s:;,'\"()]*")


class UserError(Exception):
    """Bad input or settings: say what, where (file/row/field) and how to fix it, in one line."""

    exit_code = 2


class Interrupted(UserError):
    """A run stopped by SIGINT/SIGTERM after saving its work; the message says what is safe and how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_OS_HINTS = {
    errno.ENOSPC: "free space (finished work is kept) and rerun the same command",
    errno.EDQUOT: "free space (finished work is kept) and rerun the same command",
    errno.EROFS: "write somewhere writable",
    errno.EACCES: "fix the permissions or write somewhere else",
    errno.EPERM: "fix the permissions or write somewhere else",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "that path is a folder; give a file name",
    errno.ENOENT: "check the path",
}


def os_error_line(e: OSError) -> str:
    """'<path>: <OS reason>; <fix>' for any OSError (disk full, read-only, permission, not a directory...)."""
    where = e.filename if e.filename is not None else ""
    reason = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno, "")
    return f"{where}: {reason}" + (f"; {hint}" if hint else "") if where else reason + (f"; {hint}" if hint else "")


def one_line(message: str) -> str:
    """Flatten, shorten paths and digests, cap the length: the shape of every error the CLI prints."""
    text = " ".join("".join(c for c in str(message) if c.isprintable() or c.isspace()).split())
    cwd = os.getcwd().rstrip("/") + "/"
    if cwd != "/":
        text = text.replace(cwd, "")
    text = _HEX.sub(r"\1", text)
    if len(text) > MAX_CHARS:  # still long: absolute paths keep their last two parts
        text = _ABS_PATH.sub(lambda m: "…/" + "/".join(m.group(0).rstrip("/").split("/")[-2:]), text)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"
