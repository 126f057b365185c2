"""Executors: the functions that run one `model.fit` and report how it trained.

An executor takes `(model, x, y, fit_kwargs)` and returns an `ExecutorResult`. `plain_executor`
calls `model.fit`; the frozen-prefix feature cache (`train.cache.executor.make_cached_executor`) builds
another on top of it. `train.fit.run_fit` picks one and wraps it in the run-level guards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

__all__ = ["Executor", "ExecutorResult", "plain_executor"]


@dataclass
class ExecutorResult:
    """What an executor returns: the Keras history and how it trained.

    Attributes:
        history: the Keras history.
        cached: trained on cached prefix features.
        cache_layer: the last layer of the cached prefix, when `cached`.
        augment_views: the number of augmentation views trained on, when the cache computed
            the prefix's random augmentation for several passes; else None.
    """

    history: dict[str, list[float]]
    cached: bool = False
    cache_layer: str | None = None
    augment_views: int | None = None


Executor = Callable[[keras.Model, Any, Any, dict[str, Any]], ExecutorResult]


def plain_executor(
    model: keras.Model, x: Any, y: Any, fit_kwargs: dict[str, Any]
) -> ExecutorResult:
    """Plain `model.fit`."""
    history = model.fit(x, y, **fit_kwargs)
    return ExecutorResult(history=dict(history.history))
