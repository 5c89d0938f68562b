"""The exception types the CLI turns into a one-line message: exit status 2 for bad input, 1
for a run that cannot go on."""


class DigitsError(Exception):
    """A problem with the user's input or environment, stated in one line: what and where."""


class WorkersUnavailable(Exception):
    """A run that waited its limit for the workers it needs; says in one line how to go on."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for quoting inside ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
