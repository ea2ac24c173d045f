"""The one exception type diffpress raises for bad input, and the checks the config dataclasses share."""
from __future__ import annotations

from typing import Any, Iterable


class DiffpressError(Exception):
    """Bad input or an unsupported model: the message names the problem and the way out."""


def check_allowed(key: str, value: Any, allowed: Iterable) -> None:
    """Raise ``DiffpressError("key: value is not allowed; allowed: ...")`` unless ``value`` is in ``allowed``.

    >>> check_allowed("weights", "int3", ("int8", "int4", None))
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: weights: 'int3' is not allowed; allowed: int8, int4, null
    """
    allowed = tuple(allowed)
    if value not in allowed:
        names = ", ".join("null" if a is None else str(a) for a in allowed)
        raise DiffpressError(f"{key}: {value!r} is not allowed; allowed: {names}")


def check_at_least(obj: Any, minimum: int, *keys: str, prefix: str = "") -> None:
    """Raise ``DiffpressError("<prefix>key: must be >= minimum, got ...")`` for the first field below ``minimum``."""
    for key in keys:
        if getattr(obj, key) < minimum:
            raise DiffpressError(f"{prefix}{key}: must be >= {minimum}, got {getattr(obj, key)}")
