"""Guarding a fit: checkpoints, interrupts, divergence and the best epoch, around any executor.

An executor is "a `model.fit` that takes the same keyword arguments, callbacks included, and
returns its history". `guarded_fit` wraps it:

- it resumes from (or returns the finished result stored in) a `checkpoint_dir`, and adds a
  callback that writes each finished epoch there atomically;
- it keeps the joined history itself (Keras' History only covers the resumed epochs);
- a KeyboardInterrupt rolls the model back to the last finished epoch and returns
  (`interrupted=True`) or re-raises (`raise_on_interrupt=True`);
- a NaN or infinite loss stops training and rolls back to the last finished epoch whose loss
  and weights were finite (`diverged=True`, with a warning);
- `restore_best` ends with the weights of the best epoch, whether or not training stopped early.

The callback captures the model it was created for (the full working model) to snapshot weights,
and uses `self.model` (whatever model the executor fits, a head model for the feature cache) only
for its optimizer and `stop_training`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import keras
import numpy as np

from transferkit.errors import CheckpointError, ConfigError
from transferkit.results.provenance import describe_value
from transferkit.results.result import best_of
from transferkit.train.checkpoints.fingerprint import fingerprint
from transferkit.train.checkpoints.state import PhaseState
from transferkit.train.checkpoints.store import CheckpointStore

__all__ = ["FitGuard", "GuardedFit", "fit_plan", "guarded_fit"]

R = TypeVar("R")

# Fit arguments that change how a run looks, not what it computes.
_NOT_PLAN = ("callbacks", "verbose")


@dataclass
class _Snapshot:
    epoch: int  # absolute index of the next epoch to run from this state
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]


def _values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


def _assign(variables: Sequence[Any], values: Sequence[np.ndarray], what: str) -> None:
    if len(variables) != len(values) or any(
        tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values, strict=False)
    ):
        raise CheckpointError(
            f"the stored {what} do not fit this model ({len(values)} arrays for "
            f"{len(variables)} variables, or different shapes). Use a new checkpoint_dir."
        )
    for var, arr in zip(variables, values, strict=True):
        var.assign(arr)


def _finite(values: Sequence[np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in values if np.issubdtype(a.dtype, np.inexact))


def _calling_callback_list() -> Any:
    # Private: Keras creates its CallbackList inside `fit`, out of our reach, and only its
    # `on_train_end` shuts down the thread pool for asynchronous batch callbacks. A
    # KeyboardInterrupt skips `on_train_end`, so the guard finds the list in its caller's frame
    # (`CallbackList.on_train_begin` calls `callback.on_train_begin(logs)`). Checked against
    # Keras 3.15.1 (keras/src/callbacks/callback_list.py).
    frame = sys._getframe(2)
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, keras.callbacks.CallbackList) else None


def _shutdown_async(owner: Any) -> None:
    # Private attributes of keras.callbacks.CallbackList, checked against Keras 3.15.1.
    executor = getattr(owner, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)
        owner._executor = None
        owner._futures = []
        owner._in_begin_end_block_count = 0


class FitGuard(keras.callbacks.Callback):  # type: ignore[misc]
    """Snapshots finished epochs, detects a non-finite loss, tracks the best epoch, checkpoints.

    The per-batch loss check runs asynchronously when Keras dispatches batch callbacks to its
    thread pool (`async_safe`): a divergence is then noticed one batch late, which the rollback
    to the last finished epoch makes harmless.

    Args:
        watched: the full working model whose variables are snapshotted and restored.
        history: the joined history so far (restored from a checkpoint, or empty).
        start_epoch: the absolute index of the first epoch this fit runs.
        keep_best: track the best epoch's weights (`restore_best`).
        best: (epoch, model values) of the best epoch restored from a checkpoint.
        store: where to write each finished epoch, or None.
        resume_optimizer: optimizer variable values to restore when training begins.
    """

    async_safe = True
    # The feature cache may run many steps per call: the loss its batch hook then sees is the
    # epoch's running mean, non-finite as soon as one step's loss was.
    checks_per_execution = True

    def __init__(
        self,
        watched: keras.Model,
        *,
        history: Mapping[str, list[float]],
        start_epoch: int,
        keep_best: bool,
        best: tuple[int, list[np.ndarray]] | None = None,
        store: CheckpointStore | None = None,
        resume_optimizer: list[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.watched = watched
        self.history: dict[str, list[float]] = {k: list(v) for k, v in history.items()}
        self.keep_best = keep_best
        self.best = best
        self.store = store
        self.diverged_at: tuple[int, int] | None = None
        self._epoch = start_epoch
        self._start_epoch = start_epoch
        self._resume_optimizer = resume_optimizer
        self._owner: Any = None
        self.good = _Snapshot(start_epoch, _values(watched.variables), [])

    # ------------------------------------------------------------ helpers

    def _optimizer(self) -> Any:
        model = self.model if self.model is not None else self.watched
        return getattr(model, "optimizer", None)

    def _optimizer_values(self) -> list[np.ndarray]:
        opt = self._optimizer()
        return _values(opt.variables) if opt is not None else []

    def rollback(self) -> None:
        """Restores the model (and optimizer) to the last finished epoch with finite state."""
        _assign(self.watched.variables, self.good.model_values, "weights")
        opt = self._optimizer()
        if opt is not None and self.good.optimizer_values:
            _assign(opt.variables, self.good.optimizer_values, "optimizer state")

    def shutdown_async(self) -> None:
        """Shuts down Keras' batch-callback thread pool after an exception skipped on_train_end."""
        if self._owner is not None:
            _shutdown_async(self._owner)
            self._owner = None

    def _phase_state(self, *, finished: bool, diverged: bool = False) -> PhaseState:
        return PhaseState(
            next_epoch=self.good.epoch,
            history=self.history,
            model_values=self.good.model_values,
            optimizer_values=self.good.optimizer_values,
            finished=finished,
            diverged=diverged,
        )

    # ------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._owner = _calling_callback_list()
        opt = self._optimizer()
        if opt is not None and not opt.built:
            # Keras builds the optimizer lazily on the first step, on the same variables. Building
            # it now lets a resume load its state and the rollback snapshot include it.
            opt.build(self.model.trainable_variables)
        if opt is not None and self._resume_optimizer is not None:
            _assign(opt.variables, self._resume_optimizer, "optimizer state")
            self._resume_optimizer = None
        self.good = _Snapshot(
            self._start_epoch, _values(self.watched.variables), self._optimizer_values()
        )

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if self.diverged_at is None and loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = (self._epoch, batch)
            # Private API (checked on Keras 3.15.1), not `self.model`: on JAX that property
            # writes the training state back into the variables, and this hook may run on
            # Keras' batch-callback thread while the next step already consumes that state.
            model = self._model if self._model is not None else self.watched
            model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        if self.diverged_at is not None:
            return
        loss = logs.get("loss")
        values = _values(self.watched.variables)
        if (loss is not None and not math.isfinite(float(loss))) or not _finite(values):
            # The epoch's mean loss can be finite while its last update already left
            # non-finite weights: such an epoch is not a state to roll back to.
            self.diverged_at = (epoch, -1)
            self.model.stop_training = True
            return
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        self.good = _Snapshot(epoch + 1, values, self._optimizer_values())
        new_best = None
        if self.keep_best:
            monitor = "val_loss" if "val_loss" in self.history else "loss"
            best_epoch, _ = best_of(self.history, monitor)
            if best_epoch == len(self.history.get(monitor, [])):
                self.best = new_best = (epoch + 1, values)
        if self.store is not None:
            # One commit: the state and the best weights it goes with.
            self.store.save(self._phase_state(finished=False), best=new_best)


@dataclass
class GuardedFit(Generic[R]):
    """What `guarded_fit` returns.

    Attributes:
        history: the joined history of the finished epochs (a resumed run's earlier epochs too).
        outcome: what the executor returned, or None when it was interrupted or the stored
            result of a finished checkpoint was returned.
        interrupted: stopped by a KeyboardInterrupt.
        diverged: stopped by a non-finite loss (weights rolled back).
        restored: the finished result was read from the checkpoint; nothing was trained.
        cached: when `restored`, whether the stored run trained on cached features.
        cache_layer: when `restored`, where the stored run's feature cache cut the model.
    """

    history: dict[str, list[float]]
    outcome: R | None = None
    interrupted: bool = False
    diverged: bool = False
    restored: bool = False
    cached: bool = False
    cache_layer: str | None = None


def fit_plan(
    model: keras.Model,
    x: Any,
    y: Any,
    fit_kwargs: Mapping[str, Any],
    *,
    phase: str,
    restore_best: bool,
) -> dict[str, Any]:
    """The plan a checkpoint is bound to: fit arguments, data digests, optimizer and loss."""
    optimizer = getattr(model, "optimizer", None)
    opt_config = optimizer.get_config() if optimizer is not None else None
    if isinstance(opt_config, dict):
        opt_config = {k: v for k, v in opt_config.items() if k != "name"}
    loss: Any = getattr(model, "loss", None)
    get_config = getattr(loss, "get_config", None)
    loss_config = get_config() if callable(get_config) else loss
    if isinstance(loss_config, dict):
        loss_config = {k: v for k, v in loss_config.items() if k != "name"}
    plan: dict[str, Any] = {
        "phase": phase,
        "restore_best": bool(restore_best),
        "optimizer": [type(optimizer).__name__, describe_value(opt_config)],
        "loss": [type(loss).__name__, describe_value(loss_config)],
        "x": describe_value(x, digest=True),
        "y": describe_value(y, digest=True),
    }
    for key, value in fit_kwargs.items():
        if key not in _NOT_PLAN:
            plan[key] = describe_value(value, digest=True)
    return plan


def _warn_diverged(guard: FitGuard) -> None:
    epoch, batch = guard.diverged_at or (0, -1)
    where = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch >= 0 else "")
    back = guard.good.epoch
    target = "the start of the fit" if back == 0 else f"the end of epoch {back}"
    warnings.warn(
        f"the loss diverged (NaN or infinite) in {where}: training stopped and the weights were "
        f"rolled back to {target}, the last state with a finite loss and finite weights. Lower "
        "the learning rate, or check the data and the loss.",
        RuntimeWarning,
        stacklevel=5,
    )


def guarded_fit(
    model: keras.Model,
    x: Any,
    y: Any,
    fit_kwargs: Mapping[str, Any],
    executor: Callable[[keras.Model, Any, Any, dict[str, Any]], R],
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    restore_best: bool = False,
    raise_on_interrupt: bool = False,
    phase: str = "fit",
) -> GuardedFit[R]:
    """Runs `executor(model, x, y, kwargs)` with checkpoints, interrupt and divergence handling.

    Args:
        model: the compiled working model.
        x: training inputs, as given to `fit`.
        y: training targets.
        fit_kwargs: `keras.Model.fit` keywords (`callbacks` are kept, the guard is appended).
        executor: the fit to run.
        checkpoint_dir: keep resumable per-epoch state here (see `transferkit.train.checkpoints`).
        restore_best: end with the weights of the best epoch by the monitored value.
        raise_on_interrupt: re-raise a KeyboardInterrupt (after the rollback).
        phase: the phase name; each phase has its own subdirectory of `checkpoint_dir`.

    Returns:
        A `GuardedFit`.

    Raises:
        CheckpointError: `checkpoint_dir` belongs to another model or plan, another process is
            writing it, no intact state is left in it, or a checkpoint cannot be written (a full
            disk); what was committed before stays loadable.
        ConfigError: `callbacks` is not a list of callbacks.
    """
    kwargs = dict(fit_kwargs)
    callbacks = kwargs.pop("callbacks", None)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = callbacks.callbacks
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise ConfigError(
            f"callbacks must be a list of keras.callbacks.Callback, got {type(callbacks).__name__}."
        )
    if checkpoint_dir is None:
        return _guarded(
            model, x, y, kwargs, callbacks, executor, None, restore_best, raise_on_interrupt
        )
    plan = fit_plan(model, x, y, kwargs, phase=phase, restore_best=restore_best)
    # The store holds the directory's lock until the fit is over, however it ends.
    with CheckpointStore.open(checkpoint_dir, phase, fingerprint(model, plan), plan) as store:
        return _guarded(
            model, x, y, kwargs, callbacks, executor, store, restore_best, raise_on_interrupt
        )


def _guarded(
    model: keras.Model,
    x: Any,
    y: Any,
    kwargs: dict[str, Any],
    callbacks: Sequence[Any] | None,
    executor: Callable[[keras.Model, Any, Any, dict[str, Any]], R],
    store: CheckpointStore | None,
    restore_best: bool,
    raise_on_interrupt: bool,
) -> GuardedFit[R]:
    start = int(kwargs.get("initial_epoch", 0) or 0)
    history: dict[str, list[float]] = {}
    resume_optimizer: list[np.ndarray] | None = None
    best: tuple[int, list[np.ndarray]] | None = None
    if store is not None:
        # Verified (checksums, two generations) before anything is assigned to the model.
        state = store.load(best=restore_best)
        if state is not None:
            _assign(model.variables, state.model_values, "weights")
            if state.finished:
                return GuardedFit(
                    history=state.history,
                    diverged=state.diverged,
                    restored=True,
                    cached=state.cached,
                    cache_layer=state.cache_layer,
                )
            best = state.best
            resume_optimizer = state.optimizer_values
            history = state.history
            start = state.next_epoch
    kwargs["initial_epoch"] = start
    guard = FitGuard(
        model,
        history=history,
        start_epoch=start,
        keep_best=restore_best,
        best=best,
        store=store,
        resume_optimizer=resume_optimizer,
    )
    kwargs["callbacks"] = [*(callbacks or []), guard]
    interrupted = False
    outcome: R | None = None
    try:
        outcome = executor(model, x, y, kwargs)
    except BaseException as exc:
        guard.shutdown_async()
        guard.rollback()
        if not isinstance(exc, KeyboardInterrupt) or raise_on_interrupt:
            raise
        interrupted = True
    diverged = guard.diverged_at is not None
    if diverged:
        guard.rollback()
        _warn_diverged(guard)
    if restore_best and guard.best is not None:
        _assign(model.variables, guard.best[1], "weights")
    if store is not None and not interrupted:
        state = guard._phase_state(finished=True, diverged=diverged)
        state.model_values = _values(model.variables)
        state.cached = bool(getattr(outcome, "cached", False))
        state.cache_layer = getattr(outcome, "cache_layer", None)
        store.save(state)
    return GuardedFit(
        history=guard.history, outcome=outcome, interrupted=interrupted, diverged=diverged
    )
