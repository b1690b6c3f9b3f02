"""The one exception users see: a single clear line, no traceback (the CLI prints it and exits 2)."""


class UserError(Exception):
    """Bad input or settings: say what, where (file/row/field) and how to fix it, in one line."""
