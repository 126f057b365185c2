"""The learning-rate range test (Smith 2017; fastai's `lr_find`).

Train for a few batches while the learning rate grows exponentially from `start_lr` to `end_lr`,
record the loss, and read a good learning rate off the curve. The sweep runs in its own small
training loop with a fresh optimizer, never through `model.fit`, so the compiled optimizer, its
slots and step count, the compiled loss and the traced train function are left as they were; every
model variable (weights, BatchNormalization statistics, random-seed state) is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from transferkit import backend
from transferkit._utils.batches import iter_batches
from transferkit._utils.figures import new_figure, save_figure
from transferkit.compile.spec import check_learning_rate
from transferkit.data.checks import is_array_like
from transferkit.errors import ConfigError, DataError

__all__ = ["LRFinder", "run_lr_finder", "suggest"]

SMOOTHING = 0.98
DIVERGENCE = 4.0


def _steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    # Only the descent that leads to the minimum counts: past it, a fall is a recovery from a
    # spike (common on small, noisy data), not a learning rate that trains well.
    end = int(np.argmin(losses)) + 1
    if end >= 2:
        lrs, losses = lrs[:end], losses[:end]
    slopes = np.diff(losses) / np.diff(np.log10(lrs))
    return float(lrs[int(np.argmin(slopes))])


def _valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    # fastai's "valley": the longest run of (not necessarily adjacent) decreasing losses.
    n = len(losses)
    lds = [1] * n
    max_start, max_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def suggest(lrs: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """Learning rates suggested by a smoothed loss curve (fastai's definitions).

    - "steep": the learning rate at which the smoothed loss falls fastest per decade of learning
      rate on its way down to its minimum, i.e. the left point of the most negative finite
      difference `(loss[i+1] - loss[i]) / (log10 lr[i+1] - log10 lr[i])` among the points up to
      the lowest smoothed loss.
    - "valley": take the longest decreasing subsequence of the smoothed losses (the "valley"),
      from index `s` to `e`; the suggestion is the learning rate at index
      `s + int((e - s) / 3) + int((e - s) / 6)`, about half-way down the valley.
    - "minimum": the learning rate of the lowest smoothed loss divided by 10 (one decade before
      the minimum, where training is still stable).

    As fastai does, the first 10% of the points (where the moving average is still settling)
    and the last 5 (closest to divergence) are left out when at least two points remain. Fewer
    than two points give NaN for all three.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    lo, hi = len(lrs) // 10, len(lrs) - 5
    if hi - lo >= 2:
        lrs, losses = lrs[lo:hi], losses[lo:hi]
    if len(lrs) < 2:
        nan = float("nan")
        return {"steep": nan, "valley": nan, "minimum": nan}
    return {
        "steep": _steep(lrs, losses),
        "valley": _valley(lrs, losses),
        "minimum": float(lrs[int(np.argmin(losses))] / 10.0),
    }


@dataclass
class LRFinder:
    """The outcome of `FineTuner.find_lr`.

    Attributes:
        lrs: the learning rate of each step run.
        losses: the smoothed loss after each step: an exponential moving average with factor
            0.98, bias-corrected as in Adam (`avg / (1 - 0.98**(i + 1))`), as fastai smooths.
        raw_losses: the training loss of each batch, before the step was applied.
        diverged: the sweep stopped early because the smoothed loss exceeded 4x its best value,
            or a loss was NaN or infinite. The last point is then the diverging one.
        suggestions: "steep", "valley" and "minimum" (see `transferkit.recipes.lr_finder.suggest`),
            computed on the points before a divergence.
    """

    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    diverged: bool = False
    suggestions: dict[str, float] = field(default_factory=dict)

    @property
    def suggestion(self) -> float:
        """The "steep" suggestion: where the smoothed loss falls fastest."""
        return self.suggestions["steep"]

    def plot(self, path: str | Path | None = None) -> Any:
        """Plots smoothed (and raw) loss against the learning rate on a log axis.

        Args:
            path: when given, the figure is also saved there as a PNG.

        Returns:
            The `matplotlib.figure.Figure`.

        Raises:
            MissingExtraError: matplotlib is not installed.
            SaveError: `path` cannot be written.
        """
        fig = new_figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.raw_losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", label="smoothed loss")
        markers = {"steep": "C1", "valley": "C2", "minimum": "C3"}
        for name, color in markers.items():
            lr = self.suggestions.get(name, float("nan"))
            if math.isfinite(lr):
                ax.axvline(lr, color=color, linestyle="--", label=f"{name}: {lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        finite = self.losses[np.isfinite(self.losses)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            ax.set_ylim(low - 0.05 * (high - low + 1e-12), min(high, DIVERGENCE * low) * 1.05)
        ax.legend(fontsize="small")
        fig.tight_layout()
        save_figure(fig, path)
        return fig


def check_sweep(start_lr: object, end_lr: object, steps: object, batch_size: object) -> None:
    """Validates the arguments of a sweep.

    Raises:
        ConfigError: a learning rate <= 0, `end_lr <= start_lr`, `steps < 2` or `batch_size < 1`.
    """
    lo = check_learning_rate(start_lr, "start_lr")
    hi = check_learning_rate(end_lr, "end_lr")
    if hi <= lo:
        raise ConfigError(f"end_lr ({hi:g}) must be greater than start_lr ({lo:g}).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"steps must be an int >= 2, got {steps!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}.")


def with_learning_rate(
    factory: Callable[[], keras.optimizers.Optimizer], lr: float
) -> keras.optimizers.Optimizer:
    """A fresh optimizer of the compiled configuration with a constant learning rate `lr`.

    Raises:
        ConfigError: the optimizer has no single learning rate to override.
    """
    opt = factory()
    config = opt.get_config()
    if "learning_rate" not in config:
        raise ConfigError(
            f"find_lr needs an optimizer with one learning rate; {type(opt).__name__} has none. "
            "Compile with a plain optimizer (SGD, Adam, ...) for the sweep."
        )
    config = dict(config, learning_rate=float(lr))
    try:
        return type(opt).from_config(config)
    except Exception as exc:
        raise ConfigError(
            f"cannot recreate {type(opt).__name__} with another learning rate: {exc}"
        ) from exc


def _batches(x: Any, y: Any, batch_size: int) -> Iterator[tuple[Any, Any, Any]]:
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise DataError("find_lr: pass labels inside the dataset, not as y.")
        while True:
            empty = True
            for element in x:
                empty = False
                if not isinstance(element, tuple) or len(element) < 2:
                    raise DataError(
                        "find_lr: the dataset must yield (x, y) or (x, y, sample_weight) batches."
                    )
                yield element[0], element[1], element[2] if len(element) > 2 else None
            if empty:
                raise DataError("find_lr: the dataset is empty.")
    if not is_array_like(x) or y is None:
        raise DataError(
            "find_lr needs NumPy arrays x and y, or a tf.data.Dataset of (x, y) batches."
        )
    # Several inputs or outputs (lists, tuples, dicts of arrays) are sliced leaf by leaf.
    xs = keras.tree.map_structure(np.asarray, x)
    ys = keras.tree.map_structure(np.asarray, y)
    n = len(keras.tree.flatten(xs)[0])
    if n == 0:
        raise DataError("find_lr: the data is empty; pass at least one sample.")
    rng = np.random.default_rng(0)
    while True:  # a new order in each pass over the data
        for xb, yb in iter_batches((xs, ys), batch_size, order=rng.permutation(n)):
            yield xb, yb, None


def run_lr_finder(
    model: keras.Model,
    x: Any,
    y: Any,
    *,
    optimizer_factory: Callable[[], keras.optimizers.Optimizer],
    loss: Any,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    batch_size: int = 32,
) -> LRFinder:
    """Runs the sweep on `model` and restores every model variable afterwards.

    See `FineTuner.find_lr`; `loss` is one loss (object, name or callable) for a single output.
    The sweep arguments must have passed `check_sweep` (`find_lr` checks them before the data).

    Raises:
        ConfigError: a multi-output model, or an optimizer without a learning rate.
        DataError: missing or empty data.
    """
    if len(model.outputs) != 1:
        raise ConfigError("find_lr supports single-output models.")
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    optimizer = with_learning_rate(optimizer_factory, start_lr)
    trainable = list(model.trainable_variables)
    if not trainable:
        raise ConfigError("find_lr: the model has no trainable weights; unfreeze some layers.")
    saved = [(v, v.numpy().copy()) for v in model.variables]
    optimizer.build(trainable)
    schedule = start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))

    weighted = isinstance(loss_fn, keras.losses.Loss)
    # Under a tf.distribute strategy (FineTuner enters its scope) Keras losses divide by the
    # number of replicas; the backend's step undoes it so `value` is the batch mean loss.
    replicas = backend.current().loss_replicas()

    def value_fn(yb: Any, pred: Any, sw: Any) -> Any:
        if weighted:
            return loss_fn(yb, pred, sample_weight=sw) * replicas
        per_sample = loss_fn(yb, pred)  # A plain loss function returns one value per sample.
        if sw is not None:
            per_sample = per_sample * keras.ops.cast(sw, per_sample.dtype)
        return keras.ops.mean(per_sample)

    step = backend.current().gradient_step(model, optimizer, value_fn)

    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    try:
        batches = _batches(x, y, batch_size)
        for i, lr in enumerate(schedule):
            xb, yb, sw = next(batches)
            optimizer.learning_rate = float(lr)
            value = step(xb, yb, sw)
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smoothed = avg / (1 - SMOOTHING ** (i + 1))
            lrs.append(float(lr))
            raw.append(value)
            smooth.append(smoothed)
            if not math.isfinite(smoothed) or smoothed > DIVERGENCE * best:
                diverged = True
                break
            best = min(best, smoothed)
    finally:
        for variable, value in saved:
            variable.assign(value)
    keep = len(lrs) - 1 if diverged else len(lrs)
    result = LRFinder(
        lrs=np.asarray(lrs),
        losses=np.asarray(smooth),
        raw_losses=np.asarray(raw),
        diverged=diverged,
    )
    result.suggestions = suggest(result.lrs[:keep], result.losses[:keep])
    return result
