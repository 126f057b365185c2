"""Argument checks shared by the modules: one wording for one mistake."""

from __future__ import annotations

import math

from transferkit.errors import ConfigError

__all__ = ["check_positive_number"]


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
