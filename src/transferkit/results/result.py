"""`FitResult`: what a fit produced, and how to keep it."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.errors import ConfigError, SaveError

__all__ = ["FitResult", "atomic_save_model", "best_of"]


def best_of(history: dict[str, list[float]], monitor: str) -> tuple[int, float]:
    """1-based best epoch and value of `monitor` (lowest for losses, highest for accuracies)."""
    values = history.get(monitor, [])
    finite = [(i, v) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return 0, float("nan")
    higher = "acc" in monitor or "auc" in monitor or "precision" in monitor or "recall" in monitor
    i, v = (max if higher else min)(finite, key=lambda item: item[1])
    return i + 1, float(v)


def _plain_loadable(model: keras.Model, suffix: str) -> dict[str, Any]:
    # An .h5 written with the training config fails to reload when the loss or a metric was a
    # string alias ("mse"): Keras 3 cannot deserialize `keras.metrics.mse`. Without it the file
    # reloads with plain `keras.models.load_model` (uncompiled, as transferkit loads anyway).
    return {"include_optimizer": False} if suffix in (".h5", ".hdf5") else {}


def atomic_save_model(model: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Saves `model` to `path` through a temporary file in the same directory and a rename.

    An error mid-save leaves any file that was already at `path` intact.

    Raises:
        ConfigError: unsupported suffix.
        SaveError: the directory is missing or not writable, or Keras failed to save.
    """
    target = Path(os.fspath(path))
    suffix = target.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ConfigError(
            f"cannot save to {str(target)!r}: the file name must end in .keras or .h5."
        )
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise SaveError(
            f"cannot save to {str(target)!r}: directory {str(directory)!r} does not exist."
        )
    if target.is_dir():
        raise SaveError(f"cannot save to {str(target)!r}: it is a directory.")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=directory)
    except OSError as exc:
        raise SaveError(f"cannot save to {str(target)!r}: {exc.strerror or exc}.") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp, **_plain_loadable(model, suffix))
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise SaveError(f"saving to {str(target)!r} failed: {exc}") from exc
        raise
    return target


@dataclass
class FitResult:
    """The outcome of `FineTuner.fit` (and the recipes built on it).

    Attributes:
        model: the trained `keras.Model`.
        history: every logged value per epoch (`loss`, `val_loss`, metrics, ...).
        epochs: epochs run.
        monitor: "val_loss" when validation data was given, else "loss".
        best_epoch: 1-based epoch with the best `monitor` value (0 when none was finite).
        best: that value.
        metrics: the values of the last epoch.
        seconds: wall-clock time of the fit.
        trainable_params: trainable parameters during the fit.
        non_trainable_params: non-trainable parameters during the fit.
        phases: (phase name, epochs run) for each phase; one ("fit", epochs) for a plain fit.
        cached: whether the frozen-prefix feature cache was used.
        cache_layer: the last layer of the cached prefix, when `cached`.
        interrupted: the fit stopped on a KeyboardInterrupt.
        diverged: the fit stopped on a NaN or infinite loss (weights rolled back).
    """

    model: keras.Model
    history: dict[str, list[float]]
    epochs: int
    monitor: str
    best_epoch: int
    best: float
    metrics: dict[str, float]
    seconds: float
    trainable_params: int
    non_trainable_params: int
    phases: list[tuple[str, int]] = field(default_factory=list)
    cached: bool = False
    cache_layer: str | None = None
    interrupted: bool = False
    diverged: bool = False
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_history(
        cls,
        model: keras.Model,
        history: dict[str, list[float]],
        *,
        seconds: float,
        trainable_params: int,
        non_trainable_params: int,
        phases: list[tuple[str, int]] | None = None,
        cached: bool = False,
        cache_layer: str | None = None,
        interrupted: bool = False,
        diverged: bool = False,
        **extras: Any,
    ) -> FitResult:
        """Builds a result from a joined Keras history dictionary."""
        clean = {k: [float(v) for v in vals] for k, vals in history.items()}
        epochs = max((len(v) for v in clean.values()), default=0)
        monitor = "val_loss" if "val_loss" in clean else "loss"
        best_epoch, best = best_of(clean, monitor)
        metrics = {k: v[-1] for k, v in clean.items() if v}
        return cls(
            model=model,
            history=clean,
            epochs=epochs,
            monitor=monitor,
            best_epoch=best_epoch,
            best=best,
            metrics=metrics,
            seconds=float(seconds),
            trainable_params=int(trainable_params),
            non_trainable_params=int(non_trainable_params),
            phases=list(phases) if phases is not None else [("fit", epochs)],
            cached=cached,
            cache_layer=cache_layer,
            interrupted=interrupted,
            diverged=diverged,
            extras=dict(extras),
        )

    def evaluate(self, x: Any, y: Any = None, **kwargs: Any) -> dict[str, float]:
        """`model.evaluate(...)` as a `{name: value}` dictionary."""
        kwargs.setdefault("verbose", 0)
        out = self.model.evaluate(x, y, return_dict=True, **kwargs)
        return {k: float(v) for k, v in out.items()}

    def predict(self, x: Any, **kwargs: Any) -> np.ndarray:
        """`model.predict(...)` as a NumPy array."""
        kwargs.setdefault("verbose", 0)
        return np.asarray(self.model.predict(x, **kwargs))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Saves the trained model as `.keras` or `.h5`, atomically.

        The file loads with plain `keras.models.load_model(path)` and predicts the same. Beside it,
        `<path>.transferkit.json` records the base model, frozen layers, head, optimizer, fit
        arguments, history and library versions (read it back with `transferkit.load`).

        Returns:
            The path written.

        Raises:
            ConfigError: unsupported file suffix.
            SaveError: the file could not be written; an existing file at `path` is kept.
        """
        from transferkit.recipes.lora import has_lora, merged_copy
        from transferkit.results.provenance import write_provenance

        # A LoRA model saves as a plain one with the adapters merged (Keras cannot reload an
        # .h5 of a LoRA model; a .keras one reloads with zeroed adapters). The live model keeps
        # its adapters.
        model = merged_copy(self.model) if has_lora(self.model) else self.model
        target = atomic_save_model(model, path)
        outcome = {
            "history": self.history,
            "epochs": self.epochs,
            "monitor": self.monitor,
            "best_epoch": self.best_epoch,
            "phases": self.phases,
            "interrupted": self.interrupted,
            "diverged": self.diverged,
        }
        write_provenance(target, self.extras.get("provenance", {}), outcome)
        return target

    def save_adapters(self, path: str | os.PathLike[str]) -> Path:
        """Writes only the LoRA matrices and the head's weights to an `.npz` file.

        Load them with `FineTuner(<same pre-trained model>).replace_head(<same args>)
        .load_adapters(path)`.

        Raises:
            ConfigError: the fit did not use LoRA, or `path` does not end in `.npz`.
            SaveError: the file could not be written.
        """
        from transferkit.recipes.lora import save_adapters

        config = self.extras.get("lora")
        if config is None:
            raise ConfigError(
                "this result has no LoRA adapters: call FineTuner.lora(...) before fit()."
            )
        return save_adapters(self.model, config, path)

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Draws loss and each metric per epoch, training and validation, one panel each.

        With more than one phase, dashed lines mark where each phase begins. Needs the `plot`
        extra (matplotlib).

        Args:
            path: also save the figure there as a PNG.

        Returns:
            The `matplotlib.figure.Figure`.

        Raises:
            MissingExtraError: matplotlib is not installed (`pip install "transferkit[plot]"`).
            SaveError: `path` cannot be written.
        """
        from transferkit.results.plotting import plot_history

        return plot_history(
            self.history,
            phases=self.phases,
            best_epoch=self.best_epoch,
            monitor=self.monitor,
            path=path,
        )
