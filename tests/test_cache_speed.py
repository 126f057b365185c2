"""The cached head trains with one host round-trip per epoch unless a callback needs every batch,
and stays exact either way."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
from conftest import Digits, Pretrained

from transferkit import ConfigError, FineTuner

FIT = {"epochs": 3, "batch_size": 16, "verbose": 0, "shuffle": False}


def close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True)
    )


class _Calls(keras.callbacks.Callback):  # type: ignore[misc]
    """Records the batch indices its hook is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []


class _EveryBatch(_Calls):
    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches.append(batch)


class _EveryLegacyBatch(_Calls):
    def on_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.batches.append(batch)


class _PerExecution(_EveryBatch):
    checks_per_execution = True


def _tuner(pretrained: Pretrained) -> FineTuner:
    return FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)


def _twin(
    tuner: FineTuner, x: np.ndarray, y: np.ndarray, callbacks: list[Any], **kw: Any
) -> tuple[Any, Any, list[np.ndarray], list[np.ndarray]]:
    start = [w.copy() for w in tuner.model.get_weights()]
    tuner.compile_sgd(lr=0.05)
    plain = tuner.fit(x, y, cache=False, **FIT, **kw)
    plain_w = [w.copy() for w in tuner.model.get_weights()]
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=0.05)
    cached = tuner.fit(x, y, cache=True, callbacks=callbacks, **FIT, **kw)
    return plain, cached, plain_w, tuner.model.get_weights()


@pytest.mark.parametrize("samples", [96, 100])  # 6 full batches; 7 with a smaller last one
def test_one_execution_per_epoch_is_exact(
    pretrained: Pretrained, digits: Digits, samples: int
) -> None:
    x, y = digits.x_new[:samples], digits.y_new[:samples]
    val = (digits.x_new[200:240], digits.y_new[200:240])
    probe = _PerExecution()
    plain, cached, pw, cw = _twin(_tuner(pretrained), x, y, [probe], validation_data=val)
    assert cached.cached and close(pw, cw)
    for key in plain.history:
        assert np.allclose(plain.history[key], cached.history[key], rtol=1e-4, atol=1e-5), key
    steps = -(-samples // 16)
    assert probe.batches == [steps - 1] * 3  # one call per epoch, at the epoch's last step


@pytest.mark.parametrize("probe_cls", [_EveryBatch, _EveryLegacyBatch])
def test_a_per_batch_callback_sees_every_batch(
    pretrained: Pretrained, digits: Digits, probe_cls: type[_Calls]
) -> None:
    x, y = digits.x_new[:100], digits.y_new[:100]
    probe = probe_cls()
    _, cached, pw, cw = _twin(_tuner(pretrained), x, y, [probe])
    assert cached.cached and close(pw, cw)
    assert probe.batches == list(range(7)) * 3


def test_a_compiled_steps_per_execution_is_kept(pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:96], digits.y_new[:96]
    tuner = _tuner(pretrained)
    tuner.compile_sgd(lr=0.05, steps_per_execution=2)
    probe = _PerExecution()
    result = tuner.fit(x, y, cache=True, callbacks=[probe], **FIT)
    assert result.cached and probe.batches == [1, 3, 5] * 3


def test_a_compile_by_hand_makes_the_cache_step_aside(
    pretrained: Pretrained, digits: Digits
) -> None:
    # The cache compiles its head like the FineTuner's compile, which it is told; one behind
    # the FineTuner's back is noticed, and the fit trains plainly, as that compile asks.
    x, y = digits.x_new[:96], digits.y_new[:96]
    tuner = _tuner(pretrained)
    tuner.compile_sgd(lr=0.05)
    tuner.model.compile(
        optimizer=tuner.model.optimizer, loss=tuner.model.loss, steps_per_execution=2
    )
    with pytest.raises(ConfigError, match="compiled outside FineTuner"):
        tuner.fit(x, y, cache=True, **FIT)
    probe = _PerExecution()
    result = tuner.fit(x, y, callbacks=[probe], **FIT)
    assert not result.cached and probe.batches == [1, 3, 5] * 3


def test_divergence_inside_an_execution_rolls_back(pretrained: Pretrained, digits: Digits) -> None:
    # The guard checks the running mean loss once per execution: a NaN in any step shows.
    x, y = digits.x_new[:96], digits.y_new[:96]
    tuner = _tuner(pretrained)
    tuner.compile_sgd(lr=0.05)
    blow_up = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 1e30 if epoch == 2 else lr)
    with pytest.warns(RuntimeWarning, match="loss diverged .* in epoch 3"):
        result = tuner.fit(x, y, cache=True, callbacks=[blow_up], **{**FIT, "epochs": 4})
    assert result.cached and result.diverged and result.epochs == 2
    assert all(np.isfinite(w).all() for w in tuner.model.get_weights())
