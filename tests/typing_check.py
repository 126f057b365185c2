"""Checked by `mypy --strict` (make typecheck), never run: the public API's types as a user's IDE
sees them. A chain method that loses its `Self` annotation (returns None, Any or the base class)
makes one of the `assert_type` lines below fail the type check."""

from __future__ import annotations

from typing import Any

import numpy as np
from typing_extensions import assert_type

from transferkit import FineTuner, FitResult, HeadSpec


class MyTuner(FineTuner):
    """A subclass: the chain must keep returning the subclass, not FineTuner."""

    def extra(self) -> str:
        return "subclass method still reachable after the chain"


def chain(x: np.ndarray, y: np.ndarray) -> None:
    tuner = FineTuner("pretrained.h5")
    assert_type(tuner.freeze_until(-5), FineTuner)
    assert_type(tuner.freeze("conv*"), FineTuner)
    assert_type(tuner.unfreeze(), FineTuner)
    assert_type(tuner.replace_head(num_classes=5), FineTuner)
    assert_type(tuner.compile_sgd(lr=1e-4), FineTuner)
    assert_type(tuner.compile("adam"), FineTuner)
    assert_type(FineTuner.load("pretrained.h5"), FineTuner)

    result = (
        MyTuner.load("pretrained.h5")
        .freeze_until("fc1")
        .freeze()
        .unfreeze("fc*")
        .replace_head(regression=True, outputs=2)
        .compile_sgd(lr=1e-3, momentum=0.9)
    )
    assert_type(result, MyTuner)
    assert_type(result.extra(), str)

    fit = result.fit(x, y, epochs=1)
    assert_type(fit, FitResult)
    assert_type(fit.history, dict[str, list[float]])
    assert_type(fit.best_epoch, int)
    assert_type(fit.evaluate(x, y), dict[str, float])
    assert_type(fit.predict(x), np.ndarray)
    assert_type(tuner.summary(), str)
    assert_type(tuner.head, HeadSpec | None)
    figure: Any = fit.plot()
    del figure
