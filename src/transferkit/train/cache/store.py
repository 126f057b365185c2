"""Where the features live: in memory while a budget lasts, then in memory-mapped files.

`Store` collects the rows of one cut tensor batch by batch (into one array when the number of
rows is known, else into chunks), and moves to a file in the `SpillDir` once the `Budget` of
bytes is spent; `spill_dir` removes the files however the fit ends. `Features` are the finished
arrays with their targets; `MemmapBatches` and `ViewBatches` feed spilled features and
augmentation views to `fit` batch by batch. `BatchFeatures` keeps a dataset's features batch
by batch instead, when the cut tensors change shape between batches (text padded per batch):
they cannot be one array, and the suffix trains on each batch as it came.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

__all__ = [
    "BatchFeatures",
    "Budget",
    "Features",
    "MemmapBatches",
    "ShapeChange",
    "SpillDir",
    "Store",
    "ViewBatches",
    "ViewSwitch",
    "is_spilled",
    "spill_dir",
]


class SpillDir:
    """A temporary directory for memory-mapped features, created on first use."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._count = 0

    def new_file(self) -> str:
        """The path of a new file in the directory (created now if need be)."""
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="transferkit-cache-")
        self._count += 1
        return os.path.join(self.path, f"features_{self._count}.npy")

    def remove(self) -> None:
        """Removes the directory and everything in it, if it was created."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@contextmanager
def spill_dir() -> Iterator[SpillDir]:
    """A `SpillDir` that is removed when the block ends, however it ends."""
    spill = SpillDir()
    try:
        yield spill
    finally:  # also on KeyboardInterrupt
        spill.remove()


class Budget:
    """Bytes of features that may still be kept in memory, shared by every `Store` of a fit."""

    def __init__(self, nbytes: int) -> None:
        self.left = nbytes

    def take(self, nbytes: int) -> bool:
        """Takes `nbytes` from the budget if they are left; says whether it did."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class ShapeChange(Exception):
    """A cut tensor with None axes took different shapes in different batches."""


class Store:
    """Rows of one feature tensor: in memory while the budget lasts, else a memmapped file.

    Args:
        budget: the fit's memory budget.
        spill: where files go once the budget is spent.
        rows: the number of rows to come, when known (arrays): one array is allocated up front.
    """

    def __init__(self, budget: Budget, spill: SpillDir, rows: int | None) -> None:
        self._budget = budget
        self._spill = spill
        self._rows = rows
        self._array: np.ndarray | None = None
        self._chunks: list[np.ndarray] = []
        self._file: Any = None
        self._path: str | None = None
        self._n = 0
        self._tail: tuple[int, ...] = ()
        self._dtype: Any = None

    def add(self, batch: np.ndarray) -> None:
        """Appends the rows of `batch`.

        Raises:
            ShapeChange: its shape past the first axis differs from the first batch's.
        """
        if self._dtype is None:
            self._tail, self._dtype = batch.shape[1:], batch.dtype
            if self._rows is not None:
                self._allocate(self._rows)
        elif batch.shape[1:] != self._tail:
            raise ShapeChange(f"{self._tail} then {batch.shape[1:]}")
        if self._array is not None:
            self._array[self._n : self._n + len(batch)] = batch
        elif self._file is not None:
            self._file.write(np.ascontiguousarray(batch).tobytes())
        elif self._budget.take(batch.nbytes):
            self._chunks.append(batch)
        else:
            self._path = self._spill.new_file()
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in finish()
            for chunk in self._chunks:
                self._file.write(np.ascontiguousarray(chunk).tobytes())
            self._file.write(np.ascontiguousarray(batch).tobytes())
            self._chunks = []
        self._n += len(batch)

    def _allocate(self, rows: int) -> None:
        shape = (rows, *self._tail)
        nbytes = int(np.prod(shape)) * np.dtype(self._dtype).itemsize
        if self._budget.take(nbytes):
            self._array = np.empty(shape, self._dtype)
        else:
            self._path = self._spill.new_file()
            self._array = np.lib.format.open_memmap(
                self._path, mode="w+", dtype=self._dtype, shape=shape
            )

    def finish(self) -> np.ndarray:
        """Every row added, as one array (a read-only `np.memmap` when spilled)."""
        if self._array is not None:
            if isinstance(self._array, np.memmap):
                self._array.flush()
            return self._array[: self._n] if self._n != len(self._array) else self._array
        if self._file is not None:
            self._file.close()
            assert self._path is not None
            return np.memmap(self._path, dtype=self._dtype, mode="r", shape=(self._n, *self._tail))
        return np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]


def is_spilled(arrays: Sequence[np.ndarray]) -> bool:
    """Whether any of `arrays` lives in a memory-mapped file."""
    return any(isinstance(a, np.memmap) for a in arrays)


@dataclass
class Features:
    """Cached prefix outputs with their targets and sample weights.

    Attributes:
        x: one array per cut tensor.
        y: the targets, structured as the model's outputs.
        sample_weight: per-sample weights, or None.
        batch_size: the batch size the data came in (a dataset's), or None (arrays).
    """

    x: list[np.ndarray]
    y: Any
    sample_weight: Any
    batch_size: int | None = None

    def model_x(self) -> Any:
        """`x` as the suffix takes it: one array, or a list for several cut tensors."""
        return self.x[0] if len(self.x) == 1 else list(self.x)


@dataclass
class BatchFeatures:
    """Cached prefix outputs of a dataset kept batch by batch, in the order they came.

    Attributes:
        x: per batch, one array per cut tensor.
        y: per batch, the targets, structured as the model's outputs.
        sample_weight: per batch, the sample weights; None when the dataset has none.
    """

    x: list[list[np.ndarray]]
    y: list[Any]
    sample_weight: list[Any] | None

    @property
    def rows(self) -> int:
        """The number of samples."""
        return sum(len(batch[0]) for batch in self.x)

    def batch(self, index: int) -> tuple[Any, ...]:
        """Batch `index` as `fit` takes it: `(x, y)` or `(x, y, sample_weight)`."""
        x = self.x[index]
        xs = x[0] if len(x) == 1 else tuple(x)
        if self.sample_weight is None:
            return xs, self.y[index]
        return xs, self.y[index], self.sample_weight[index]


class MemmapBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Streams batches of spilled features from their memory-mapped files.

    Args:
        feats: the features.
        batch_size: rows per batch.
        shuffle: False, True (new batches each epoch) or "batch" (the same batches in a new
            order each epoch).
    """

    def __init__(self, feats: Features, batch_size: int, shuffle: bool | str) -> None:
        super().__init__()
        self._f = feats
        self._bs = batch_size
        self._shuffle = shuffle
        self._n = len(feats.x[0])
        self._order = np.arange(self._n)
        self._reshuffle()

    def _reshuffle(self) -> None:
        if self._shuffle == "batch":
            starts = np.random.permutation(len(self)) * self._bs
            self._order = np.concatenate([np.arange(s, min(s + self._bs, self._n)) for s in starts])
        elif self._shuffle:
            self._order = np.random.permutation(self._n)

    def __len__(self) -> int:
        return math.ceil(self._n / self._bs)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        idx = np.sort(self._order[index * self._bs : (index + 1) * self._bs])
        rows = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == len(idx) else idx
        x = [np.asarray(a[rows]) for a in self._f.x]
        y = keras.tree.map_structure(lambda a: np.asarray(a[rows]), self._f.y)
        xs = x[0] if len(x) == 1 else x
        if self._f.sample_weight is None:
            return xs, y
        return xs, y, np.asarray(self._f.sample_weight[rows])

    def on_epoch_end(self) -> None:
        self._reshuffle()


class ViewBatches(MemmapBatches):
    """Batches of augmentation view `epoch mod K`, in memory or spilled; `ViewSwitch` picks.

    Args:
        views: the features of each view (the same rows, augmented differently).
        batch_size, shuffle: as for `MemmapBatches`.
        every: K, the number of views.
    """

    def __init__(
        self, views: list[Features], batch_size: int, shuffle: bool | str, every: int
    ) -> None:
        super().__init__(views[0], batch_size, shuffle)
        self._views = views
        self._every = every

    def select(self, epoch: int) -> None:
        """Serves the view of `epoch` from now on."""
        # Views are computed for 0 .. min(K, epochs) - 1, which covers every epoch's e mod K.
        self._f = self._views[epoch % self._every]


class ViewSwitch(keras.callbacks.Callback):  # type: ignore[misc]
    """Points `ViewBatches` at the epoch's view before Keras reads its first batch."""

    def __init__(self, batches: ViewBatches) -> None:
        super().__init__()
        self._batches = batches

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._batches.select(epoch)
