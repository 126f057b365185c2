"""The callback glue: user callbacks watch the full model while the suffix trains.

`Bridge` carries what callbacks set on the full model (a stop, a resumed initial epoch) over to
the suffix. `steps_per_execution` decides how many steps the suffix runs per call into its
compiled graph: a whole epoch, unless a callback needs to see every batch. A callback whose batch
hooks are content with one call per execution (the logs then hold the epoch's running means)
declares `checks_per_execution = True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from transferkit import backend

__all__ = ["BatchBridge", "Bridge", "overrides_batch_end", "steps_per_execution"]


class Bridge(keras.callbacks.Callback):  # type: ignore[misc]
    """Carries what user callbacks set on the full model over to the suffix being fitted.

    Args:
        full: the model the user callbacks see.
        suffix: the model that trains.
    """

    async_safe = True

    def __init__(self, full: keras.Model, suffix: keras.Model) -> None:
        super().__init__()
        self._full = full
        self._suffix = suffix

    def on_train_begin(self, logs: Any = None) -> None:
        # Private API (checked on Keras 3.15.1): BackupAndRestore sets `_initial_epoch` on the
        # model it sees in on_train_begin, and fit reads it from the model it runs on.
        initial = getattr(self._full, "_initial_epoch", None)
        if initial:
            self._suffix._initial_epoch = initial
        self._forward_stop()

    def _forward_stop(self) -> None:
        if getattr(self._full, "stop_training", False):
            self._suffix.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._forward_stop()


class BatchBridge(Bridge):
    """`Bridge` that also forwards a stop requested at the end of a batch (TerminateOnNaN)."""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._forward_stop()


def steps_per_execution(
    asked: int, steps: int, callbacks: Sequence[Any], *, distributed: bool
) -> int:
    """How many steps the suffix runs per call into the compiled graph.

    The cached features need no per-step work from the host, so an epoch is one call (one host
    round-trip instead of one per batch) unless the user compiled with their own value, a
    callback needs to see every batch, the backend runs one step per call (PyTorch: Keras 3.15.1
    refuses `steps_per_execution > 1` there), or a `tf.distribute` strategy runs the fit: Keras 3.15.1's
    multi-step loop under MirroredStrategy fails with "You must feed a value for placeholder
    tensor 'while/cond/Placeholder'". Each step is the same train step either way, so the
    weights are those of one step per call.

    Args:
        asked: the `steps_per_execution` the model was compiled with.
        steps: the number of steps in an epoch.
        callbacks: the fit's callbacks.
        distributed: a `tf.distribute` strategy runs the fit.

    Returns:
        `asked` when it is not 1 or must be kept, else `steps`.

    Example:

    >>> steps_per_execution(1, 40, [], distributed=False)
    40
    """
    asked = int(asked or 1)
    if asked != 1 or distributed or any(_needs_every_batch(cb) for cb in callbacks):
        return asked
    if not backend.current().runs_several_steps():
        return 1
    return max(1, steps)


# Keras callbacks whose batch hooks work on the logs of a whole execution: the loss in them is
# the epoch's running mean, non-finite as soon as one batch's loss was (checked on Keras 3.15.1).
_PER_EXECUTION_CALLBACKS: tuple[type[Any], ...] = (
    keras.callbacks.History,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.TerminateOnNaN,
)


def _needs_every_batch(cb: Any) -> bool:
    if getattr(cb, "checks_per_execution", False) is True:
        return False  # declares its batch hooks need one call per execution only (FitGuard)
    if isinstance(cb, _PER_EXECUTION_CALLBACKS):
        return False
    if isinstance(cb, keras.callbacks.ModelCheckpoint) and cb.save_freq == "epoch":
        return False  # its batch hook only saves for an integer save_freq
    base = keras.callbacks.Callback
    kind = type(cb)
    return any(
        getattr(kind, hook) is not getattr(base, hook)
        for hook in ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    )


def overrides_batch_end(cb: Any) -> bool:
    """Whether callback `cb` overrides a batch-end hook (and may stop the fit there)."""
    base = keras.callbacks.Callback
    return bool(
        type(cb).on_train_batch_end is not base.on_train_batch_end
        or type(cb).on_batch_end is not base.on_batch_end
    )
