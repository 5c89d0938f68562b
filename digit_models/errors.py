"""The one exception type the CLI turns into a one-line message and exit status 2."""


class DigitsError(Exception):
    """A problem with the user's input or environment, stated in one line: what and where."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for quoting inside ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
