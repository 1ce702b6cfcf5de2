"""The error users see: one sentence that says what was wrong and what to do."""

import json


class InfdError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def quote_error(error: BaseException) -> str:
    """A library's error, quoted inside one of ours: the OS's reason for an OSError ("No space
    left on device"), the reason and line of a JSON error, else the first line of its message
    (its type name when it has none)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def check_choice(value, choices, what: str, hint: str = "") -> None:
    """Refuse a value that is not one of `choices`, naming them: "unknown sampler 'x'; choose one of ddim, dpm++, ddpm."

    `what` names the kind of value; `hint` (", or ...") adds what else the user may do.
    """
    if value not in choices:
        raise InfdError(f"unknown {what} '{value}'; choose one of {', '.join(map(str, choices))}{hint}.")
