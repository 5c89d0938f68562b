"""The one exception type the CLI turns into a one-line message and exit status 2."""


class DigitsError(Exception):
    """A problem with the user's input or environment, stated in one line: what and where."""
