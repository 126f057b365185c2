"""Argument checks shared by the modules: one wording for one mistake.

Each check returns the value in its canonical type (an `int`, a `float`) or raises
`ConfigError` with the same message wherever the mistake is made: "`name` must be an int >= 1,
got 0." A bool is never a number here, though Python counts `True` as 1.
"""

from __future__ import annotations

import math

import numpy as np

from transferkit.errors import ConfigError

__all__ = [
    "check_fraction",
    "check_int",
    "check_optional_int",
    "check_positive_number",
    "is_int",
]


def is_int(value: object, *, minimum: int | None = None) -> bool:
    """Whether `value` is an integer (a Python or NumPy one, not a bool), `>= minimum` if given."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or int(value) >= minimum


def check_int(value: object, name: str, *, minimum: int) -> int:
    """`value` as an int, when it is an integer >= `minimum` (see `is_int`).

    Args:
        value: the argument to check.
        name: its name, for the message.
        minimum: the smallest value allowed.

    Returns:
        `int(value)`.

    Raises:
        ConfigError: anything else.

    Example:

    ```python
    epochs = check_int(epochs, "epochs", minimum=1)
    ```
    """
    if isinstance(value, (int, np.integer)) and is_int(value, minimum=minimum):
        return int(value)
    raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")


def check_optional_int(value: object, name: str, *, minimum: int) -> int | None:
    """`check_int`, where None (the argument's "no limit") is allowed too.

    Raises:
        ConfigError: neither None nor an integer >= `minimum`.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and is_int(value, minimum=minimum):
        return int(value)
    raise ConfigError(f"{name} must be None or an int >= {minimum}, got {value!r}.")


def check_positive_number(value: object, name: str, *, extra: str = "") -> float:
    """`value` as a float, when it is a finite number > 0 (not a bool).

    Args:
        value: the argument to check.
        name: its name, for the message.
        extra: appended to the message's "a finite number > 0" (e.g. " or None").

    Raises:
        ConfigError: anything else.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a finite number > 0{extra}, got {value!r}.")
    return float(value)


def check_fraction(value: object, name: str) -> float:
    """`value` as a float, when it is a number in [0, 1) (a rate, a momentum; not a bool).

    Raises:
        ConfigError: anything else (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)
