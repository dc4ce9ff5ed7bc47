"""Argument checks shared across the package's modules."""
from __future__ import annotations


def check_int_at_least(value, name: str, minimum: int, why: str = "") -> None:
    """ValueError unless value is an int >= minimum (bool, float and numpy scalars are not);
    `why`, if given, says in the message what the minimum is for."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an int >= {minimum}{reason}, got {value!r}")


def check_positive_int(value, name: str) -> None:
    check_int_at_least(value, name, 1)


def check_window(batch_size: int, context: int) -> None:
    """Batch sizes and contexts of the data loaders: ints >= 1 (a zero or negative one gave empty
    batches)."""
    check_positive_int(batch_size, "batch_size")
    check_positive_int(context, "context")
