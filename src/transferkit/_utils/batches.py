"""The one batch iterator: batches of in-memory arrays, or the elements of a batched dataset.

The feature cache, the learning-rate finder and `adapt_batchnorm` all walk their data batch by
batch outside `model.fit`; arrays are sliced here, leaf by leaf when they come as a list, tuple
or dict, in order or in a given order, and a dataset yields its own batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

__all__ = ["iter_batches"]


def _is_arrays(data: Any) -> bool:
    return isinstance(data, (np.ndarray, list, tuple, dict))


def iter_batches(
    data: Any,
    batch_size: int,
    *,
    steps: int | None = None,
    order: np.ndarray | None = None,
) -> Iterator[Any]:
    """Yields the batches of `data`, at most `steps` of them.

    Args:
        data: a NumPy array, or a list, tuple or dict of arrays of one length (nested too), which
            are sliced leaf by leaf into batches structured like `data`; or anything else
            iterable (a batched `tf.data.Dataset`), whose elements are the batches, as they come.
        batch_size: rows per batch of arrays; the last batch may have fewer.
        steps: at most this many batches; None: all of `data`.
        order: for arrays, the rows to take, in order (a permutation of the row indices, or a
            subset); each batch is then gathered with these indices. None: consecutive slices.

    Yields:
        The batches: NumPy arrays (views for consecutive slices), or a dataset's elements.

    Example:

    >>> [b.tolist() for b in iter_batches(np.arange(5), 2)]
    [[0, 1], [2, 3], [4]]
    >>> [b["a"].tolist() for b in iter_batches({"a": np.arange(5)}, 2, steps=1)]
    [[0, 1]]
    """
    if not _is_arrays(data):
        yield from data if steps is None else itertools.islice(data, steps)
        return
    n = len(keras.tree.flatten(data)[0]) if order is None else len(order)
    limit = n if steps is None else min(n, steps * batch_size)
    for start in range(0, limit, batch_size):
        stop = min(start + batch_size, limit)
        rows: Any = slice(start, stop) if order is None else order[start:stop]
        yield keras.tree.map_structure(lambda a, rows=rows: np.asarray(a[rows]), data)
