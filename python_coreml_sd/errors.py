"""Errors that reach the user as one line and exit code 2 (bad input), never a traceback."""


class UserError(Exception):
    """Bad input: a missing file, an unsupported model, a bad flag value.

    The message names the problem and, where there is one, the fix.
    """

    exit_code = 2


class CheckFailed(Exception):
    """A verification ran and failed (for example PSNR under the threshold): exit code 1."""

    exit_code = 1


def first_line(exc: Exception, limit: int = 300) -> str:
    """An exception's first message line for a one-line error (its type's name when the message is empty)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
