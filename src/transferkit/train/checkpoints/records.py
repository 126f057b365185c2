"""The JSON inside a checkpoint directory: how values are encoded, and what counts as a count.

Every JSON text of a checkpoint (the manifest, the record inside each state file, the digests of
a fingerprint) encodes with `json_default`, so NumPy scalars and arrays are stored as numbers
and lists, and anything else as a placeholder naming its type rather than failing the run.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import numpy as np

__all__ = ["is_int", "json_default"]


def json_default(obj: Any) -> Any:
    """The JSON form of what `json.dumps` cannot encode itself.

    Args:
        obj: a value `json.dumps` met and cannot encode.

    Returns:
        A NumPy scalar's Python value, a NumPy array's nested list, else `"<TypeName>"`.

    Example:

    >>> json.dumps({"lr": np.float32(0.5)}, default=json_default)
    '{"lr": 0.5}'
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return f"<{type(obj).__name__}>"


def is_int(value: Any, low: int, high: int) -> TypeGuard[int]:
    """Whether a value read from JSON is an integer in `[low, high]`.

    Args:
        value: the value as `json.loads` returned it.
        low: the smallest value allowed.
        high: the largest value allowed.

    Returns:
        True for an `int` in range; False for anything else, `True` and `1e999` included.

    Example:

    >>> is_int(3, 0, 10), is_int(True, 0, 10), is_int(3.0, 0, 10)
    (True, False, False)
    """
    # Not bool, not float: JSON's `true` and `1e999` are not counts.
    return type(value) is int and low <= value <= high
