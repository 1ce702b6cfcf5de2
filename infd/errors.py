"""The error users see: one sentence that says what was wrong and what to do."""


class InfdError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
