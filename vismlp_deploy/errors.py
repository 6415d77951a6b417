"""Exception types. The CLI maps ``UserError`` (and subclasses) to exit code 2."""
from __future__ import annotations


class VisMLPError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(VisMLPError):
    """Bad input or usage: a readable one-line message, exit code 2 in the CLI."""


class CheckpointError(UserError):
    """A checkpoint file or state_dict cannot be read, detected or loaded."""


class NotExactError(VisMLPError):
    """A transform was asked for a fold it cannot do exactly; the message says why.

    The model walker catches this, leaves the module as it was and records the reason.
    """


class VerificationError(VisMLPError):
    """A deploy form, an export or an engine did not reproduce the reference outputs."""


class VisMLPWarning(UserWarning):
    """Something a user should know that does not stop the work (the CLI prints these as ``warning:``)."""


def first_line(reason: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none) or of a text,
    at most ``limit`` characters (an ellipsis marks a cut): what goes after the colon of a one-line error."""
    text = str(reason)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line and isinstance(reason, BaseException):
        return type(reason).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"
