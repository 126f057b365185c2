"""Running a fit: the one place that calls an executor and turns its history into a result.

A fit is an *executor* (plain `model.fit`, or the frozen-prefix feature cache, which trains on
cached features) wrapped by the run-level concerns (checkpoints, interrupts, divergence).
This module sits above both executors, so the cache builds on `train.executor` without a circle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from os import PathLike
from typing import Any

import keras

from transferkit.compile.state import CompileArgs
from transferkit.data.checks import check_fit_arguments
from transferkit.errors import ConfigError
from transferkit.results.result import FitResult
from transferkit.results.summary import count_params
from transferkit.train.cache.executor import make_cached_executor
from transferkit.train.executor import Executor, ExecutorResult, plain_executor
from transferkit.train.guards import guarded_fit

__all__ = ["CacheMode", "FitOptions", "run_fit"]

CacheMode = bool | str


@dataclass(frozen=True)
class FitOptions:
    """The transferkit-specific options of one fit (everything else goes to `model.fit`).

    Attributes:
        cache: "auto", True or False: the frozen-prefix feature cache.
        cache_memory: bytes of features kept in memory before spilling to a memory-mapped file.
        augment_views: compute the frozen prefix's random augmentation for this many passes and
            train epoch `e` on pass `e mod augment_views` (None: the prefix must be exact).
        checkpoint_dir: where resumable per-epoch state is kept, or None.
        restore_best: end with the weights of the best epoch by the monitored value.
        raise_on_interrupt: re-raise a KeyboardInterrupt instead of returning a result.
        phase: the name of this phase ("fit", or "head"/"full" in `fine_tune`).
    """

    cache: CacheMode = "auto"
    cache_memory: int = 1 << 30
    augment_views: int | None = None
    checkpoint_dir: str | PathLike[str] | None = None
    restore_best: bool = False
    raise_on_interrupt: bool = False
    phase: str = "fit"


def _choose_executor(options: FitOptions, compile_args: CompileArgs) -> Executor:
    if options.cache is False:
        if options.augment_views is not None:
            raise ConfigError(
                f"augment_views={options.augment_views!r} needs the feature cache, but "
                "cache=False. Use cache='auto' or cache=True, or drop augment_views."
            )
        return plain_executor
    if options.cache is True or options.cache == "auto":
        return make_cached_executor(
            True if options.cache is True else "auto",
            options.cache_memory,
            options.augment_views,
            compile_args=compile_args,
        )
    raise ConfigError(f"cache must be 'auto', True or False, got {options.cache!r}.")


def run_fit(
    model: keras.Model,
    x: Any,
    y: Any,
    fit_kwargs: dict[str, Any],
    options: FitOptions | None = None,
    *,
    compile_args: CompileArgs,
) -> FitResult:
    """Runs one fit of `model` and wraps the outcome in a `FitResult`.

    Args:
        model: the compiled model.
        x, y, fit_kwargs: what `model.fit` gets.
        options: transferkit's own options of the fit (defaults: `FitOptions()`).
        compile_args: what `model` was compiled with (`CompileState.compiled.args`); the
            feature cache compiles its head model alike.

    Returns:
        The `FitResult`.
    """
    options = options or FitOptions()
    check_fit_arguments(fit_kwargs)
    executor = _choose_executor(options, compile_args)
    trainable, frozen = count_params(model)
    start = time.perf_counter()
    guarded = guarded_fit(
        model,
        x,
        y,
        fit_kwargs,
        executor,
        checkpoint_dir=options.checkpoint_dir,
        restore_best=options.restore_best,
        raise_on_interrupt=options.raise_on_interrupt,
        phase=options.phase,
    )
    outcome = guarded.outcome or ExecutorResult(
        history=guarded.history, cached=guarded.cached, cache_layer=guarded.cache_layer
    )
    seconds = time.perf_counter() - start
    epochs = max((len(v) for v in guarded.history.values()), default=0)
    return FitResult.from_history(
        model,
        guarded.history,
        seconds=seconds,
        trainable_params=trainable,
        non_trainable_params=frozen,
        phases=[(options.phase, epochs)],
        cached=outcome.cached,
        cache_layer=outcome.cache_layer,
        augment_views=outcome.augment_views,
        interrupted=guarded.interrupted,
        diverged=guarded.diverged,
    )
