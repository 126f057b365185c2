"""Computing the features: the prefix run forward once over the training and validation data.

`compute_features` runs the plan's prefix over arrays (in `batch_size` slices) or over a
dataset's elements, into `store.Store`s, once per augmentation view, and adjusts the fit's
keywords to what the suffix then trains on (the batch size a dataset came in, its reshuffle, a
`validation_split` turned into validation features). Nothing trains here: when it fails, the
fit can still go the plain way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from transferkit import backend
from transferkit._utils.batches import iter_batches
from transferkit.train.cache.errors import CannotCache
from transferkit.train.cache.pipeline import dataset_shuffle, is_dataset
from transferkit.train.cache.plan import CachePlan
from transferkit.train.cache.store import (
    BatchFeatures,
    Budget,
    Features,
    ShapeChange,
    SpillDir,
    Store,
    is_spilled,
)

__all__ = ["compute_features"]


def _progbar(steps: int | None, verbose: Any) -> Any:
    if verbose == 0:
        return None
    return keras.utils.Progbar(steps, verbose=1 if verbose == "auto" else verbose)


def _prefix_function(prefix: keras.Model, training: bool = True) -> Any:
    # The backend compiles it (tf.function, jax.jit) and returns NumPy arrays. training=True is
    # exactly what the layers compute inside `fit` (a frozen BatchNormalization uses its moving
    # statistics either way); training=False for validation features when the prefix augments,
    # since Keras evaluates without augmentation.
    return backend.current().forward_function(prefix, training=training)


def _n_rows(x: Any) -> int:
    return len(keras.tree.flatten(x)[0])


def _slice(x: Any, lo: int, hi: int) -> Any:
    return None if x is None else keras.tree.map_structure(lambda a: a[lo:hi], x)


def _extract_arrays(fn: Any, x: Any, batch_size: int, stores: list[Store], verbose: Any) -> None:
    bar = _progbar(math.ceil(_n_rows(x) / batch_size), verbose)
    for step, batch in enumerate(iter_batches(x, batch_size)):
        for store, out in zip(stores, fn(batch), strict=True):
            store.add(out)
        if bar is not None:
            bar.update(step + 1)


def _array_features(
    fn: Any,
    n_cuts: int,
    x: Any,
    y: Any,
    sample_weight: Any,
    batch_size: int,
    budget: Budget,
    spill: SpillDir,
    verbose: Any,
) -> Features:
    stores = [Store(budget, spill, _n_rows(x)) for _ in range(n_cuts)]
    _extract_arrays(fn, x, batch_size, stores, verbose)
    return Features([s.finish() for s in stores], y, sample_weight)


def _dataset_features(
    fn: Any,
    n_cuts: int,
    dataset: Any,
    budget: Budget,
    spill: SpillDir,
    verbose: Any,
    what: str,
    batches_reorder: bool = False,
) -> Features | BatchFeatures:
    left = budget.left
    try:
        return _joined_features(fn, n_cuts, dataset, budget, spill, verbose, what, batches_reorder)
    except ShapeChange:
        # The cut tensors change shape between batches (text padded per batch): the features
        # cannot be one array, so they are computed again and kept batch by batch.
        budget.left = left
        return _batch_features(fn, dataset, budget, verbose, what)


def _elements(fn: Any, dataset: Any, verbose: Any, what: str) -> Iterator[tuple[Any, Any, Any]]:
    """The prefix's outputs (a list of arrays), targets and sample weights of each element."""
    card = int(dataset.cardinality())
    bar = _progbar(card if card > 0 else None, verbose)
    for step, element in enumerate(dataset):
        bx, by, bsw = keras.utils.unpack_x_y_sample_weight(element)
        if by is None:
            raise CannotCache(f"{what}: the dataset yields no targets")
        weights = None if bsw is None else np.asarray(bsw)
        yield list(fn(bx)), keras.tree.map_structure(np.asarray, by), weights
        if bar is not None:
            bar.update(step + 1)


def _check_elements(sws: list[Any], what: str) -> None:
    if not sws:
        raise CannotCache(f"{what}: the dataset is empty")
    if any(s is None for s in sws) and not all(s is None for s in sws):
        raise CannotCache(f"{what}: only some of its elements carry sample weights")


def _batch_features(
    fn: Any, dataset: Any, budget: Budget, verbose: Any, what: str
) -> BatchFeatures:
    xs: list[list[np.ndarray]] = []
    ys: list[Any] = []
    sws: list[Any] = []
    for outs, targets, weights in _elements(fn, dataset, verbose, what):
        nbytes = sum(a.nbytes for a in [*outs, *keras.tree.flatten(targets)])
        if not budget.take(nbytes):
            # Batches of different shapes cannot share one memory-mapped array.
            raise CannotCache(
                f"{what}: its cut tensors change shape between batches, so the features are "
                "kept in memory batch by batch, and they need more than cache_memory bytes"
            )
        xs.append(outs)
        ys.append(targets)
        sws.append(weights)
    _check_elements(sws, what)
    return BatchFeatures(xs, ys, None if sws[0] is None else sws)


def _joined_features(
    fn: Any,
    n_cuts: int,
    dataset: Any,
    budget: Budget,
    spill: SpillDir,
    verbose: Any,
    what: str,
    batches_reorder: bool,
) -> Features:
    stores = [Store(budget, spill, None) for _ in range(n_cuts)]
    ys: list[Any] = []
    sws: list[Any] = []
    sizes: list[int] = []
    for outs, targets, weights in _elements(fn, dataset, verbose, what):
        for store, out in zip(stores, outs, strict=True):
            store.add(out)
        ys.append(targets)
        sws.append(weights)
        sizes.append(len(outs[0]))
    _check_elements(sws, what)
    full = max(sizes)
    partial = [i for i, s in enumerate(sizes) if s != full]
    if len(partial) > 1 or (partial and partial[0] != len(sizes) - 1 and not batches_reorder):
        raise CannotCache(f"{what}: its batches have irregular sizes")
    y = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *ys)
    sw = None if sws[0] is None else np.concatenate(sws)
    x = [s.finish() for s in stores]
    if partial and partial[0] != len(sizes) - 1:
        # Its batches are reshuffled in every epoch, so their order here is one draw among
        # many: the smaller batch moves to the end, where the cached batching expects it.
        if is_spilled(x):
            raise CannotCache(
                f"{what}: its smaller batch came in the middle and the features were spilled "
                "to disk"
            )
        lo = partial[0] * full
        hi = lo + sizes[partial[0]]

        def last(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a[:lo], a[hi:], a[lo:hi]])

        x = [last(a) for a in x]
        y = keras.tree.map_structure(last, y)
        sw = None if sw is None else last(sw)
    return Features(x, y, sw, batch_size=full)


def compute_features(
    plan: CachePlan,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    budget: Budget,
    spill: SpillDir,
    passes: int = 1,
) -> tuple[list[Features] | list[BatchFeatures], Features | BatchFeatures | None]:
    """The prefix's outputs for the training data and for the validation data.

    Args:
        plan: the split; its prefix runs forward.
        x, y: the training data (arrays, or a dataset and None).
        kw: the fit's keywords; `validation_data`, `validation_split` and `sample_weight` are
            taken out of it, and `batch_size`, `shuffle` and `validation_batch_size` set to what
            the suffix trains with.
        budget: bytes of features that may stay in memory.
        spill: where features go beyond the budget.
        passes: the number of passes over the training data (augmentation views), >= 1.

    Returns:
        `(views, validation)`: one `Features` per pass, and the validation features or None.
        A dataset whose cut tensors change shape between batches gives `BatchFeatures`.

    Raises:
        CannotCache: the data cannot be cached as it came (a dataset without targets, batches
            of irregular sizes; cut tensors whose shape changes between batches of a dataset
            that reshuffles its elements, or with augmentation views), or computing the
            features failed (`warn=True`: something unexpected raised).
    """
    try:
        return _compute(plan, x, y, kw, budget, spill, passes)
    except CannotCache:
        raise
    except ShapeChange as exc:
        raise CannotCache(
            "the cut tensor has axes that are None in the graph and whose sizes change between "
            f"batches ({exc}); pad the data to one length to cache it"
        ) from None
    except Exception as exc:
        # Nothing has trained yet (the prefix only ran forward, frozen), so the fit can still
        # go the plain way, where Keras reports a genuine data error in its own words.
        raise CannotCache(
            f"computing the features failed ({type(exc).__name__}: {exc})", warn=True
        ) from None


def _compute(
    plan: CachePlan,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    budget: Budget,
    spill: SpillDir,
    passes: int,
) -> tuple[list[Features] | list[BatchFeatures], Features | BatchFeatures | None]:
    verbose = kw.get("verbose", "auto")
    fn = _prefix_function(plan.prefix)
    # Keras validates in inference mode: without augmentation.
    val_fn = _prefix_function(plan.prefix, training=False) if plan.augmentation else fn
    n_cuts = len(plan.prefix.outputs)
    val = kw.pop("validation_data", None)
    split = float(kw.pop("validation_split", 0.0) or 0.0)
    sw = kw.pop("sample_weight", None)
    val_feats: Features | BatchFeatures | None = None
    views: list[Features] | list[BatchFeatures]
    if is_dataset(x):
        # Keras ignores `shuffle` with a dataset; the cached features reshuffle as it would.
        shuffle = dataset_shuffle(x)[0]
        what = "the training dataset"
        first = _dataset_features(fn, n_cuts, x, budget, spill, verbose, what, shuffle == "batch")
        if isinstance(first, BatchFeatures):
            _check_batch_features(shuffle, passes)
            kw["batch_size"] = max(len(batch[0]) for batch in first.x)
            kw["shuffle"] = shuffle  # False, or "batch": the same batches in a new order
            views = [first]
        else:
            joined = [first]
            for _ in range(passes - 1):
                view = _dataset_features(
                    fn, n_cuts, x, budget, spill, verbose, what, shuffle == "batch"
                )
                if not isinstance(view, Features):
                    raise CannotCache(f"{what}: its cut tensors change shape in another pass")
                joined.append(view)
            if len({(len(v.x[0]), v.batch_size) for v in joined}) > 1:
                raise CannotCache(
                    "the training dataset yields other numbers of samples in different passes"
                )
            kw["batch_size"] = joined[0].batch_size
            kw["shuffle"] = True if shuffle == "elements" else shuffle
            views = joined
    else:
        batch_size = int(kw.get("batch_size") or 32)
        kw["batch_size"] = batch_size
        if split and val is None:
            # Keras' rule: the last fraction of the samples, before any shuffling.
            n = _n_rows(x)
            at = math.floor(n * (1.0 - split))
            if at in (0, n):
                raise CannotCache(f"validation_split={split} leaves an empty split of {n} samples")
            val = (_slice(x, at, n), _slice(y, at, n), _slice(sw, at, n))
            x, y, sw = _slice(x, 0, at), _slice(y, 0, at), _slice(sw, 0, at)
        views = [
            _array_features(fn, n_cuts, x, y, sw, batch_size, budget, spill, verbose)
            for _ in range(passes)
        ]
    if val is not None:
        if is_dataset(val):
            what = "the validation dataset"
            val_feats = _dataset_features(val_fn, n_cuts, val, budget, spill, verbose, what, True)
            if isinstance(val_feats, Features):
                kw["validation_batch_size"] = val_feats.batch_size
        else:
            vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(val))
            vbs = int(kw.get("validation_batch_size") or kw["batch_size"])
            val_feats = _array_features(val_fn, n_cuts, vx, vy, vsw, vbs, budget, spill, verbose)
    return views, val_feats


def _check_batch_features(shuffle: Any, passes: int) -> None:
    if shuffle == "elements":
        raise CannotCache(
            "the training dataset reshuffles its elements in every epoch and its cut tensors "
            "change shape between batches: every epoch pads other batches, which features "
            "computed once cannot reproduce"
        )
    if passes > 1:
        raise CannotCache(
            "augmentation views need cut tensors of one shape, and the training dataset's "
            "change shape between batches"
        )
