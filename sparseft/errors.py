"""User-facing errors. A `UserError` ends the CLI with its message and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a recipe key, a data row, a model path, an adapter file.

    The message names what is wrong (key path, file, row) and, where there is one, the fix.
    Several problems can be reported at once through `problems`.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)
