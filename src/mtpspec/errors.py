"""The one exception type a user is meant to see.

Anything raised as `MtpspecError` is a mistake the user can fix (a bad path, a bad option); the
CLI prints its message on one line and exits with status 2, the server answers 4xx with it.
"""


class MtpspecError(Exception):
    """A user-facing error: its message says what is wrong and, where possible, how to fix it."""
