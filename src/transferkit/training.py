"""Running a fit: the one place that calls `model.fit` and turns its History into a result."""

from __future__ import annotations

import time
from typing import Any

import keras

from transferkit.result import FitResult
from transferkit.summary import count_params

__all__ = ["run_fit"]


def run_fit(model: keras.Model, x: Any, y: Any, fit_kwargs: dict[str, Any]) -> FitResult:
    """Calls `model.fit(x, y, **fit_kwargs)` and wraps the outcome in a `FitResult`."""
    trainable, frozen = count_params(model)
    start = time.perf_counter()
    history = model.fit(x, y, **fit_kwargs)
    seconds = time.perf_counter() - start
    return FitResult.from_history(
        model,
        dict(history.history),
        seconds=seconds,
        trainable_params=trainable,
        non_trainable_params=frozen,
    )
