"""The cached executor: decide, fall back or refuse, compute the features, train the suffix.

`make_cached_executor` returns the executor `train.fit.run_fit` uses for `cache="auto"` and
`cache=True`. When a fit cannot be cached (`errors.CannotCache`, raised by the checks, the split
or the feature computation), it trains plainly under "auto" (with a `RuntimeWarning` only when
something failed unexpectedly) and raises `ConfigError` under True.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras

from transferkit.compile.state import CompileArgs
from transferkit.errors import ConfigError
from transferkit.train.cache.eligibility import (
    Mode,
    augmenting_data,
    check_augment_views,
    check_fit,
    check_views,
    fit_callbacks,
)
from transferkit.train.cache.errors import CannotCache
from transferkit.train.cache.extract import compute_features
from transferkit.train.cache.plan import CachePlan, plan_cache
from transferkit.train.cache.store import Budget, SpillDir, spill_dir
from transferkit.train.cache.suffix import train_suffix
from transferkit.train.executor import Executor, ExecutorResult, plain_executor

__all__ = ["cached_executor", "make_cached_executor"]


def cached_executor(
    model: keras.Model,
    x: Any,
    y: Any,
    fit_kwargs: dict[str, Any],
    *,
    compile_args: CompileArgs,
    mode: Mode = "auto",
    memory: int = 1 << 30,
    views: int | None = None,
) -> ExecutorResult:
    """Fits `model` on cached prefix features when exact, else (under "auto") plainly.

    Args:
        model: a compiled model.
        x, y, fit_kwargs: what `model.fit` would get.
        compile_args: what `model` was compiled with (the suffix is compiled alike).
        mode: "auto" (fall back to plain fit when caching is not exact or not worthwhile) or
            True (raise instead).
        memory: bytes of features kept in memory; beyond it they go to a temporary memory-mapped
            file, removed when the fit ends, however it ends.
        views: augmentation views: random augmentation in the prefix (layers, or random maps
            in a dataset) is computed for this many passes, and epoch `e` trains on pass
            `e mod views`. None: the prefix must be deterministic.

    Returns:
        The `ExecutorResult`, with `cached`, `cache_layer` and `augment_views` telling what
        happened.

    Raises:
        ConfigError: `mode` is True and the fit cannot be cached; the message says why. Or
            `views` is given and nothing in the model or the data augments.
    """
    if views is not None:
        check_views(model, x, views)
    kw = dict(fit_kwargs)
    try:
        callbacks = fit_callbacks(kw)
        check_fit(
            model,
            x,
            y,
            kw,
            callbacks,
            mode=mode,
            views=views is not None,
            compile_args=compile_args,
        )
        plan = plan_cache(model, augment=views is not None)
    except CannotCache as exc:
        refusal: str | None = exc.reason
    else:
        refusal = None
    if refusal is not None:
        if mode is True:
            raise ConfigError(
                f"cache=True, but this fit cannot use the feature cache: {refusal}. Use "
                "cache='auto' to fall back to plain fit silently, or cache=False."
            )
        return plain_executor(model, x, y, fit_kwargs)
    if views is not None and not plan.augmentation and not augmenting_data(x):
        raise ConfigError(
            f"augment_views={views}, but the cached prefix (up to {plan.cut_layer!r}) "
            "does not augment: the random layers come after a trainable one. Drop "
            "augment_views, or move the augmentation before the frozen base."
        )
    passes = None if views is None else _passes(views, kw)
    with spill_dir() as spill:
        try:
            history = _fit_cached(
                model, plan, x, y, kw, callbacks, Budget(memory), spill, passes, compile_args
            )
        except CannotCache as exc:  # seen only while computing the features
            refusal, warn = exc.reason, exc.warn
        else:
            return ExecutorResult(
                history=history, cached=True, cache_layer=plan.cut_layer, augment_views=views
            )
    # Outside the spill directory's block: whatever was spilled is gone before plain fit runs.
    if mode is True:
        raise ConfigError(
            f"cache=True, but this fit cannot use the feature cache: "
            f"{refusal}. Use cache='auto' or cache=False."
        )
    if warn:
        warnings.warn(
            f"the feature cache stepped aside: {refusal}. Training without it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return plain_executor(model, x, y, fit_kwargs)


def _passes(views: int, kw: dict[str, Any]) -> int:
    # Epoch e trains on view e mod K: epochs 0 .. epochs-1 need min(K, epochs) views.
    return max(1, min(views, int(kw.get("epochs", 1))))


def _fit_cached(
    model: keras.Model,
    plan: CachePlan,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    callbacks: list[Any],
    budget: Budget,
    spill: SpillDir,
    passes: int | None,
    compile_args: CompileArgs,
) -> dict[str, list[float]]:
    # A function of its own so that the features are released when it returns, before the
    # spill directory is removed.
    views, val_feats = compute_features(plan, x, y, kw, budget, spill, passes or 1)
    return train_suffix(model, plan, views, val_feats, kw, callbacks, compile_args)


def make_cached_executor(
    mode: Mode, memory: int, views: int | None = None, *, compile_args: CompileArgs
) -> Executor:
    """The executor `run_fit` uses for `cache="auto"` or `cache=True`.

    Args:
        mode: "auto" or True (see `cached_executor`).
        memory: bytes of features kept in memory before spilling to a file.
        views: the number of augmentation views, or None.
        compile_args: what the model the executor will fit was compiled with.

    Returns:
        An `Executor`.

    Raises:
        ConfigError: `memory` is not a non-negative int, or `views` not None or an int >= 1.
    """
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ConfigError(f"cache_memory must be a number of bytes >= 0, got {memory!r}.")
    views = check_augment_views(views)

    def run(model: keras.Model, x: Any, y: Any, fit_kwargs: dict[str, Any]) -> ExecutorResult:
        return cached_executor(
            model,
            x,
            y,
            fit_kwargs,
            compile_args=compile_args,
            mode=mode,
            memory=memory,
            views=views,
        )

    return run
