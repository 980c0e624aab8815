"""User-facing errors. A `UserError` ends the CLI with its message and exit code 2, a `RunFailure` with its message
and exit code 1, an `Interrupted` run with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM); never a
traceback."""

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


class RunFailure(Exception):
    """A run that cannot go on: non-finite loss or gradients, a full disk. The message names the step and what is
    kept."""

    exit_code = 1


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after writing a checkpoint; the exit code is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
