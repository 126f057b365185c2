"""Checking training data against the model before any training step.

Keras reports a wrong input shape, a label out of range or an `x`/`y` length mismatch from deep
inside a traced train step, often after the weights were already touched, or not at all (an
out-of-range sparse label yields a NaN loss on some devices). transferkit checks first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from transferkit._utils.checks import check_int
from transferkit.errors import DataError
from transferkit.model.graph import input_paths

__all__ = [
    "LabelRule",
    "check_fit_arguments",
    "check_fit_data",
    "in_input_order",
    "is_array_like",
    "label_rule",
]


def is_array_like(x: object) -> bool:
    """NumPy arrays, lists/tuples of them and dicts of them (what Keras slices in memory)."""
    if isinstance(x, np.ndarray):
        return True
    if hasattr(x, "__array__") and hasattr(x, "shape") and not _is_dataset(x):
        return True
    if isinstance(x, Mapping):
        return all(is_array_like(v) for v in x.values())
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(v, np.ndarray) or hasattr(v, "shape") for v in x)
    return False


def _is_dataset(x: object) -> bool:
    return isinstance(x, tf.data.Dataset)


class LabelRule:
    """What labels the compiled loss accepts.

    Attributes:
        kind: "sparse" (integer class ids), "onehot", "binary" or "any".
        classes: number of classes for "sparse"/"onehot".
    """

    def __init__(self, kind: str, classes: int = 0) -> None:
        self.kind = kind
        self.classes = classes


def label_rule(loss: Any, model: keras.Model) -> LabelRule:
    """The label rule implied by a compiled loss on a single-output model."""
    name = loss if isinstance(loss, str) else type(loss).__name__
    name = str(name).lower().replace("_", "")
    units = int(model.outputs[0].shape[-1] or 0) if len(model.outputs) == 1 else 0
    if "sparsecategoricalcrossentropy" in name:
        return LabelRule("sparse", units)
    if "categoricalcrossentropy" in name:
        return LabelRule("onehot", units)
    if "binarycrossentropy" in name:
        return LabelRule("binary")
    return LabelRule("any")


def in_input_order(model: keras.Model, x: Any, what: str = "data") -> list[Any]:
    """The leaves of `x` in the order of `model.inputs`, matched the way Keras matches them.

    A dict goes by the keys of a model built on a dict of inputs, else by the input names; a
    list or tuple goes by position.

    Raises:
        DataError: a dict lacks one of the model's inputs.
    """
    if not isinstance(x, Mapping):
        return list(x) if isinstance(x, (list, tuple)) else [x]
    paths = input_paths(model)
    if paths is not None:
        keys = ["/".join(str(k) for k in path) for path in paths]
        leaves = []
        for path, key in zip(paths, keys, strict=True):
            node: Any = x
            for part in path:
                if not isinstance(node, Mapping) or part not in node:
                    raise DataError(
                        f"{what}: the model takes a dict with keys {keys}; {key!r} is missing "
                        f"(got keys {sorted(map(str, x))})."
                    )
                node = node[part]
            leaves.append(node)
        return leaves
    names = [str(t.name) for t in model.inputs]
    missing = [n for n in names if n not in x]
    if missing:
        raise DataError(
            f"{what}: a dict of inputs is matched to the model's input names {names}; "
            f"{missing} missing (got keys {sorted(map(str, x))}). Key the dict by those names, "
            "or pass a list in that order."
        )
    return [x[n] for n in names]


def _arrays(model: keras.Model, x: Any, what: str) -> list[np.ndarray]:
    return [np.asarray(v) for v in in_input_order(model, x, what)]


def _leaves(y: Any) -> list[np.ndarray]:
    if hasattr(y, "shape"):
        return [np.asarray(y)]
    return [np.asarray(v) for v in keras.tree.flatten(y)]


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _check_inputs(model: keras.Model, xs: list[np.ndarray], what: str) -> int:
    expected = [tuple(t.shape) for t in model.inputs]
    if len(xs) != len(expected):
        raise DataError(
            f"{what}: the model takes {len(expected)} input(s), got {len(xs)} array(s)."
        )
    n = -1
    for arr, shape in zip(xs, expected, strict=True):
        got = (None, *arr.shape[1:])
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise DataError(
                f"{what}: the data is empty (shape {arr.shape}); pass at least one sample."
            )
        if arr.ndim != len(shape) or any(
            e is not None and e != g for e, g in zip(shape[1:], arr.shape[1:], strict=False)
        ):
            hint = ""
            if arr.ndim + 1 == len(shape) and shape[-1] == 1:
                hint = " Add a channel axis, e.g. x[..., None]."
            raise DataError(
                f"{what}: input shape does not match the model: expected {_fmt(shape)}, "
                f"got {_fmt(got)} (array shape {arr.shape}).{hint}"
            )
        if arr.dtype == object:
            raise DataError(f"{what}: input array has dtype object; convert it to numbers.")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise DataError(
                f"{what}: the inputs contain {bad} NaN or infinite value(s); clean them first."
            )
        if n >= 0 and arr.shape[0] != n:
            raise DataError(
                f"{what}: the input arrays have different lengths ({n} and {arr.shape[0]})."
            )
        n = arr.shape[0]
    return n


def _check_labels(y: Any, n: int, rule: LabelRule, model: keras.Model, what: str) -> None:
    if isinstance(y, (list, tuple)) and y and all(np.ndim(v) == 0 for v in y):
        raise DataError(
            f"{what}: y is a Python {type(y).__name__} of {len(y)} numbers, which Keras reads as "
            "one target per model output; pass a NumPy array: np.asarray(y)."
        )
    ys = _leaves(y)
    for arr in ys:
        if arr.ndim == 0 or arr.shape[0] != n:
            got = arr.shape[0] if arr.ndim else 0
            raise DataError(f"{what}: x has {n} samples but y has {got}; they must match.")
        if arr.dtype == object:
            raise DataError(f"{what}: labels have dtype object; convert them to numbers.")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise DataError(f"{what}: the labels contain NaN or infinite values.")
    if len(ys) != 1 or len(model.outputs) != 1:
        return
    arr = ys[0]
    out_shape = tuple(model.outputs[0].shape)
    if rule.kind == "sparse" and rule.classes:
        flat = arr.reshape(-1) if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1) else None
        if flat is None:
            raise DataError(
                f"{what}: sparse class labels must be a 1-D array of class ids, got shape "
                f"{arr.shape}. For one-hot labels leave loss=None (inferred) or pass a "
                "CategoricalCrossentropy loss."
            )
        if np.issubdtype(flat.dtype, np.floating) and not np.all(np.equal(np.mod(flat, 1), 0)):
            raise DataError(f"{what}: class labels must be whole numbers 0..{rule.classes - 1}.")
        lo, hi = float(flat.min()), float(flat.max())
        if lo < 0 or hi > rule.classes - 1:
            raise DataError(
                f"{what}: class labels must lie in 0..{rule.classes - 1} (the head has "
                f"{rule.classes} classes), got values from {lo:g} to {hi:g}. Remap the labels or "
                "use replace_head(num_classes=...) with more classes."
            )
    elif rule.kind == "onehot" and arr.shape[1:] != out_shape[1:]:
        raise DataError(
            f"{what}: one-hot labels must have shape {_fmt(out_shape)}, got {_fmt((None, *arr.shape[1:]))}."
        )
    elif rule.kind == "any" and arr.ndim >= 1 and len(out_shape) >= 2:
        got_shape = arr.shape[1:] if arr.ndim > 1 else (1,)
        want = tuple(d for d in out_shape[1:])
        if int(np.prod(got_shape)) != int(np.prod([d or 1 for d in want])):
            raise DataError(
                f"{what}: targets of shape {_fmt((None, *got_shape))} do not fit the model's "
                f"output {_fmt(out_shape)}."
            )


def _check_dataset_spec(model: keras.Model, ds: Any, what: str) -> None:
    card = int(ds.cardinality())
    if card == 0:
        raise DataError(f"{what}: the dataset is empty.")
    spec = ds.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    if isinstance(x_spec, Mapping):
        specs = in_input_order(model, x_spec, what)
    else:
        specs = keras.tree.flatten(x_spec)
    expected = [tuple(t.shape) for t in model.inputs]
    if len(specs) != len(expected):
        return  # Nested structures: leave the details to Keras.
    for s, shape in zip(specs, expected, strict=True):
        if not isinstance(s, tf.TensorSpec):
            continue
        got = tuple(s.shape.as_list()) if s.shape.rank is not None else None
        if got is None:
            continue
        if len(got) != len(shape) or any(
            e is not None and g is not None and e != g
            for e, g in zip(shape[1:], got[1:], strict=False)
        ):
            raise DataError(
                f"{what}: dataset elements do not match the model input: expected "
                f"{_fmt(shape)}, got {_fmt(got)}. Batch the dataset (`ds.batch(32)`) if it is "
                "unbatched."
            )


def check_fit_data(
    model: keras.Model,
    x: Any,
    y: Any,
    *,
    rule: LabelRule,
    validation_data: Any = None,
    what: str = "training data",
) -> None:
    """Checks training (and validation) data against the model; see the module docstring.

    Raises:
        DataError: empty data, wrong input shape, NaN inputs, length mismatch, labels out of range.
    """
    if x is None:
        raise DataError(f"{what}: no data given; pass x (and y), or a dataset as x.")
    if is_array_like(x):
        n = _check_inputs(model, _arrays(model, x, what), what)
        if y is not None:
            _check_labels(y, n, rule, model, what)
    elif _is_dataset(x):
        _check_dataset_spec(model, x, what)
    elif isinstance(x, keras.utils.PyDataset):
        try:
            length = len(x)
        except Exception:
            length = None
        if length == 0:
            raise DataError(f"{what}: the PyDataset has no batches.")
    if validation_data is not None:
        if isinstance(validation_data, (tuple, list)) and 2 <= len(validation_data) <= 3:
            vx, vy = validation_data[0], validation_data[1]
            if is_array_like(vx):
                n = _check_inputs(model, _arrays(model, vx, "validation data"), "validation data")
                _check_labels(vy, n, rule, model, "validation data")
        elif _is_dataset(validation_data):
            _check_dataset_spec(model, validation_data, "validation data")


def check_fit_arguments(fit_kwargs: Mapping[str, Any]) -> None:
    """Checks the sizes among `model.fit` keywords that Keras would accept or crash on late.

    Raises:
        ConfigError: `epochs` below 1, or `batch_size` / `steps_per_epoch` / `validation_steps`
            below 1 (None allowed).
    """
    for key, minimum, allow_none in (
        ("epochs", 1, False),
        ("batch_size", 1, True),
        ("steps_per_epoch", 1, True),
        ("validation_steps", 1, True),
    ):
        if key not in fit_kwargs or (allow_none and fit_kwargs[key] is None):
            continue
        check_int(fit_kwargs[key], key, minimum=minimum)
