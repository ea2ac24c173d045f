"""The one exception type diffpress raises for bad input; its message says what to do next."""


class DiffpressError(Exception):
    """Bad input or an unsupported model: the message names the problem and the way out."""
