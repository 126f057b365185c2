"""Running transferkit under `keras.distribution`: the JAX engine for data and model parallelism.

On JAX, Keras scales out through `keras.distribution` (Keras 3.15.1 implements it for JAX only;
its TensorFlow module is marked "DO NOT USE" and PyTorch has none): `DataParallel` replicates
the variables on every device of a mesh and splits each batch along its first axis;
`ModelParallel` lays variables out by a `LayoutMap` (for instance a Dense kernel split across
devices along its output axis) and still splits the batch along the mesh's batch axis. A
distribution has one rule, like a `tf.distribute` strategy: variables get their layout when they
are created, inside `distribution.scope()`; Keras' JAX trainer fails later, in the first step,
with "Received incompatible devices for jitted computation" when local and distributed
variables meet. `FineTuner(distribution=...)` therefore loads, copies, builds its head, enables
LoRA, compiles and fits inside the scope (`distribution_scope`), and refuses a model used in
place (`copy=False`) whose variables were created outside it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import TypeAlias, Union

import keras

from transferkit import backend
from transferkit.errors import ConfigError

__all__ = [
    "Distribution",
    "check_distribution",
    "distribution_scope",
    "resolve_distribution",
    "undistributed_variables",
    "unmatched_layouts",
    "warn_unmatched_layouts",
]

# Keras 3.15.1 exports its two distributions but not their base class.
Distribution: TypeAlias = Union[
    "keras.distribution.DataParallel", "keras.distribution.ModelParallel"
]


def _is_distribution(value: object) -> bool:
    return any(
        c.__name__ == "Distribution" and c.__module__.startswith("keras.")
        for c in type(value).__mro__
    )


def check_distribution(distribution: object, strategy: object = None) -> Distribution | None:
    """Validates the `distribution=` argument of `FineTuner` against the backend in use.

    Args:
        distribution: None or a `keras.distribution.Distribution` (`DataParallel`,
            `ModelParallel`).
        strategy: the `strategy=` argument passed with it.

    Returns:
        The distribution, or None.

    Raises:
        ConfigError: not a `Distribution`; both `distribution=` and `strategy=`; or a
            distribution on a backend other than JAX (the message names what to use there).

    Example:

    ```python
    check_distribution(keras.distribution.DataParallel())  # on JAX: returned as is
    ```
    """
    if distribution is None:
        return None
    if not _is_distribution(distribution):
        raise ConfigError(
            "distribution must be a keras.distribution.Distribution (DataParallel, "
            f"ModelParallel) or None, got {type(distribution).__name__}."
        )
    if strategy is not None:
        raise ConfigError(
            "pass either distribution= (keras.distribution, JAX) or strategy= "
            "(tf.distribute, TensorFlow), not both."
        )
    if backend.name() != "jax":
        fix = (
            "on TensorFlow pass strategy=tf.distribute.MirroredStrategy() (several GPUs) or "
            "MultiWorkerMirroredStrategy() instead"
            if backend.name() == "tensorflow"
            else "run with KERAS_BACKEND=jax to use it"
        )
        raise ConfigError(
            f"distribution= needs the JAX backend (keras.distribution is implemented for JAX "
            f"only in Keras {keras.__version__}), but Keras runs on {backend.name()!r}: {fix}."
        )
    return distribution


def undistributed_variables(model: keras.Model, distribution: Distribution) -> list[str]:
    """The paths of the model's variables that were created outside `distribution.scope()`.

    A variable created outside the scope lives on one device; under a distribution whose mesh
    spans several devices it cannot meet the distributed ones in one compiled step.
    """
    if len(distribution.device_mesh.devices.flatten()) < 2:
        return []
    return backend.current().local_variables(model.variables)


def resolve_distribution(
    distribution: object, model: object, *, copy: bool, strategy: object = None
) -> Distribution | None:
    """The distribution a `FineTuner` works under, checked before anything is loaded or copied.

    Args:
        distribution: the `distribution=` argument.
        model: the model argument of `FineTuner` (a `keras.Model` or a path).
        copy: the `copy=` argument.
        strategy: the `strategy=` argument.

    Returns:
        The distribution, or None.

    Raises:
        ConfigError: see `check_distribution`; or `copy=False` with a model whose variables
            were created outside the distribution's scope.
    """
    checked = check_distribution(distribution, strategy)
    if checked is None or copy or not isinstance(model, keras.Model):
        return checked
    local = undistributed_variables(model, checked)
    if local:
        shown = ", ".join(local[:3]) + (f" and {len(local) - 3} more" if len(local) > 3 else "")
        raise ConfigError(
            f"model {model.name!r} was built outside the scope of the "
            f"{type(checked).__name__} passed as distribution= ({len(local)} of "
            f"{len(model.variables)} variables live on one device, e.g. {shown}), so it cannot "
            "be trained in place: Keras would fail in the first step with 'Received "
            "incompatible devices'. Leave copy=True (the default) to let transferkit copy it "
            "into the scope, or build or load the model inside `with distribution.scope():`."
        )
    return checked


def unmatched_layouts(model: keras.Model, distribution: Distribution) -> list[str]:
    """The keys of a `ModelParallel`'s `LayoutMap` that match no variable path of `model`.

    Keras matches a key against a variable's whole path (`re.fullmatch`), and paths start with
    the model's name (`mobilenet/conv1/kernel`): a key written as `"conv1/kernel"` matches
    nothing, and the variable is silently replicated instead of sharded.
    """
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None:
        return []
    paths = [str(v.path) for v in model.variables]
    return [key for key in layout_map if not any(key == p or re.fullmatch(key, p) for p in paths)]


def warn_unmatched_layouts(model: keras.Model, distribution: Distribution | None) -> None:
    """Warns about `LayoutMap` keys that lay out none of the model's variables."""
    if distribution is None:
        return
    unmatched = unmatched_layouts(model, distribution)
    if unmatched:
        example = next(iter(model.variables), None)
        hint = f" (e.g. {example.path!r})" if example is not None else ""
        warnings.warn(
            f"the LayoutMap of distribution= matches no variable for {unmatched}: those "
            f"variables are replicated, not sharded. Keys must match a variable's whole path"
            f"{hint}; write them as regular expressions such as '.*dense/kernel'.",
            stacklevel=3,
        )


@contextlib.contextmanager
def distribution_scope(distribution: Distribution | None) -> Iterator[None]:
    """`distribution.scope()`, or nothing at all when `distribution` is None.

    Example:

    ```python
    with distribution_scope(keras.distribution.DataParallel()):
        model = keras.models.load_model("pretrained.keras", compile=False)
    ```
    """
    if distribution is None:
        yield
        return
    with distribution.scope():
        yield
