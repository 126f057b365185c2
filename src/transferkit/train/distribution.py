"""Running transferkit on `tf.distribute`: one strategy scope for every step that makes variables.

On the TensorFlow backend Keras scales out through TensorFlow's own engine (`MirroredStrategy`
over the GPUs of one machine, `MultiWorkerMirroredStrategy` over machines, `TPUStrategy`);
`keras.distribution` is JAX/PyTorch only. A strategy has one rule: every variable a training step
touches (model weights, optimizer slots, metrics) must be created under `strategy.scope()`, and the
optimizer must be created there too (it remembers the strategy of its creation). A model built
outside the scope but compiled or fitted inside it dies late, in the first training step, with a
bare `AssertionError` from `keras/src/backend/tensorflow/optimizer.py` (Keras 3.15.1). This module
checks that rule up front and keeps the scope in one place.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from transferkit.errors import ConfigError

__all__ = [
    "check_strategy",
    "foreign_variables",
    "in_scope",
    "is_chief",
    "model_strategy",
    "prepare_model",
    "require_in_scope",
    "resolve_strategy",
    "worker_path",
]


def check_strategy(strategy: object) -> tf.distribute.Strategy | None:
    """Validates the `strategy=` argument of `FineTuner`.

    Args:
        strategy: None (train on the default device) or a `tf.distribute.Strategy`.

    Returns:
        The strategy, or None.

    Raises:
        ConfigError: anything else, e.g. a `keras.distribution.Distribution` (that is
            `distribution=`, on JAX), or a strategy on a backend other than TensorFlow.
    """
    if strategy is None:
        return None
    if isinstance(strategy, tf.distribute.Strategy):
        if keras.backend.backend() != "tensorflow":
            raise ConfigError(
                f"strategy= takes a tf.distribute strategy, TensorFlow's engine, but Keras runs "
                f"on {keras.backend.backend()!r}: on JAX pass "
                "distribution=keras.distribution.DataParallel() (or ModelParallel) instead."
            )
        return strategy
    hint = ""
    if isinstance(strategy, (keras.distribution.DataParallel, keras.distribution.ModelParallel)):
        hint = (
            " A keras.distribution goes to distribution= and needs the JAX backend; on "
            "TensorFlow use tf.distribute.MirroredStrategy() (several GPUs) or "
            "MultiWorkerMirroredStrategy()."
        )
    raise ConfigError(
        f"strategy must be a tf.distribute.Strategy or None, got {type(strategy).__name__}.{hint}"
    )


@contextlib.contextmanager
def in_scope(strategy: tf.distribute.Strategy | None) -> Iterator[None]:
    """`strategy.scope()`, or nothing at all when `strategy` is None.

    Entering the scope of the strategy that is already current is allowed (scopes nest), so
    callers wrap whatever creates variables without knowing whether an outer step already did.

    Example:

    ```python
    with in_scope(strategy):
        model = keras.models.load_model("pretrained.keras", compile=False)
        model.compile(keras.optimizers.SGD(1e-3), "mse")
    ```
    """
    if strategy is None:
        yield
        return
    with strategy.scope():
        yield


def _tf_variable(variable: Any) -> Any:
    # A Keras 3 TF-backend Variable wraps a tf.Variable (a MirroredVariable under a strategy) in
    # `.value`; checked against Keras 3.15.1.
    return getattr(variable, "value", variable)


def foreign_variables(
    model: keras.Model | keras.optimizers.Optimizer, strategy: tf.distribute.Strategy
) -> list[str]:
    """The paths of the variables of a model (or optimizer) not created under `strategy.scope()`.

    Uses `strategy.extended.variable_created_in_scope`, TensorFlow's public answer to exactly
    this question (it compares the strategy a variable was created under with `strategy`), so it
    holds for every strategy, including one whose variables are plain on a single device.
    """
    extended = strategy.extended
    return [
        str(getattr(v, "path", getattr(v, "name", "?")))
        for v in model.variables
        if not extended.variable_created_in_scope(_tf_variable(v))
    ]


def model_strategy(model: keras.Model) -> tf.distribute.Strategy | None:
    """The strategy the model's variables were created under, or None for plain variables.

    Reads the private `_distribute_strategy` of the first distributed variable (TensorFlow 2.21,
    Keras 3.15.1): a plain `tf.Variable` has none, a `DistributedVariable` names its strategy.
    """
    for v in model.variables:
        found = getattr(_tf_variable(v), "_distribute_strategy", None)
        if isinstance(found, tf.distribute.Strategy):
            return found
    return None


def require_in_scope(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Refuses, with the reason and the fix, a model whose variables the strategy cannot train.

    Raises:
        ConfigError: some variables were created outside `strategy.scope()` (Keras would fail
            at the first training step with a bare `AssertionError`).
    """
    foreign = foreign_variables(model, strategy)
    if not foreign:
        return
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise ConfigError(
        f"model {model.name!r} was built outside the scope of the {type(strategy).__name__} "
        f"passed as strategy= ({len(foreign)} of {len(model.variables)} variables, e.g. "
        f"{shown}), so it cannot be trained in place under that strategy: Keras would fail "
        "in the first training step with a bare AssertionError. Leave copy=True (the default) "
        "to let transferkit copy it into the scope, or build or load the model inside "
        "`with strategy.scope():`."
    )


def resolve_strategy(
    strategy: object, model: object, *, copy: bool
) -> tf.distribute.Strategy | None:
    """The strategy a `FineTuner` works under, checked before anything is loaded or copied.

    Args:
        strategy: the `strategy=` argument.
        model: the model argument of `FineTuner` (a `keras.Model` or a path).
        copy: the `copy=` argument.

    Returns:
        `strategy`; when it is None and `model` is used in place (`copy=False`), the strategy
        its variables were created under, if any (it must keep training there).

    Raises:
        ConfigError: not a strategy, or `copy=False` with a model built outside its scope.
    """
    checked = check_strategy(strategy)
    if copy or not isinstance(model, keras.Model):
        return checked
    if checked is None:
        return model_strategy(model)
    require_in_scope(model, checked)
    return checked


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process should write the run's files (models, results, plots).

    True without a strategy, on a single-machine strategy, and on the chief of a multi-worker
    cluster: the task `chief`, or `worker` 0 when the cluster has no chief (as in the Keras
    multi-worker guide).
    """
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None:
        return True
    task_id = getattr(resolver, "task_id", 0)
    return bool(task_type == "chief" or (task_type == "worker" and task_id == 0))


def worker_path(path: str | os.PathLike[str], strategy: tf.distribute.Strategy | None) -> str:
    """Where this process writes a file that the chief writes to `path`.

    Every worker of a multi-worker run executes the same program, and may have to (or simply
    does) write its files too; only the chief's copy is kept. Non-chief workers get a path with
    the same file name in a fresh temporary directory, which they may delete afterwards.

    Example:

    ```python
    result.save(worker_path("runs/model.keras", strategy))
    ```
    """
    p = os.fspath(path)
    if is_chief(strategy):
        return p
    return os.path.join(tempfile.mkdtemp(prefix="transferkit-worker-"), os.path.basename(p))


def _is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def prepare_model(model: keras.Model, strategy: tf.distribute.Strategy | None) -> keras.Model:
    """Makes a compiled model trainable under `strategy`; call it after every compile.

    Works around two Keras 3.15.1 bugs that make `fit` and `evaluate` fail under a
    `MultiWorkerMirroredStrategy` with several workers (keras-team/keras#20585); other
    strategies are untouched:

    - Before the first step, a model created under a strategy builds its metrics and optimizer
      from the first batch, which it averages across replicas with `strategy.reduce` on the whole
      `(x, y)` tuple; the multi-worker strategy cannot reduce a tuple ("Attempt to convert a
      value (PerReplica...) with an unsupported type"). The batch only gives shapes and dtypes:
      this model builds from this worker's own slice of it, with no communication.
    - After each step, the logs (scalar loss and metrics) are averaged across workers with
      `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar ("Invalid reduction
      dimension 0 for input with 0 dimensions"). This model's train and test steps return each
      log with a leading axis of length 1, so the same reduction averages it across workers and
      gives back its original shape.

    Returns:
        `model`, for chaining.
    """
    if _is_multi_worker(strategy):
        # Instance attributes shadow the methods of the same names; checked on Keras 3.15.1
        # (keras/src/backend/tensorflow/trainer.py: `_maybe_symbolic_build`, and
        # `make_train_function` / `make_test_function`, which read `self.train_step` /
        # `self.test_step`). Always wrapping the class's method keeps repeated calls idempotent.
        cls = type(model)
        model._maybe_symbolic_build = functools.partial(_local_symbolic_build, model, strategy)
        model.train_step = functools.partial(_with_worker_axis, cls.train_step, model)
        model.test_step = functools.partial(_with_worker_axis, cls.test_step, model)
    return model


def _with_worker_axis(step: Any, model: keras.Model, data: Any) -> Any:
    logs = step(model, data)
    return keras.tree.map_structure(lambda value: tf.expand_dims(value, 0), logs)


def _local_symbolic_build(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    iterator: Any = None,
    data_batch: Any = None,
) -> None:
    if iterator is not None:
        for _, _, batches in iterator:  # Keras' TFEpochIterator: (begin, end, iterator).
            data_batch = next(batches)
            break

    def local(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    data_batch = keras.tree.map_structure(local, data_batch)
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)
