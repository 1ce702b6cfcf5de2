"""The error users see: one sentence that says what was wrong and what to do."""


class InfdError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type name when it has none), to quote
    a library's error inside one of ours."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__
