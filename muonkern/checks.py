"""Argument checks shared across the package's modules."""
from __future__ import annotations


def check_positive_int(value, name: str) -> None:
    """ValueError unless value is an int >= 1 (bool, float and numpy scalars are not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
