"""Checks of plain arguments shared by the public API: a value it cannot take is an InputError that
names the argument and what it must be."""

from __future__ import annotations

import operator

from .errors import InputError

__all__ = ["positive_int"]


def positive_int(value: object, name: str, expected: str = "an integer >= 1") -> int:
    """`value` as an int >= 1 (NumPy integers too, not bools); anything else is an InputError naming
    `name` and what it must be, not the bare TypeError that `range()` or `<` would raise."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise InputError(f"{name} must be {expected}, got {value!r}")
    return number
