"""The one exception type that the command line turns into a one-line message."""


class DgmError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    exit_code = 1
