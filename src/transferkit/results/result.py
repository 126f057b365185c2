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

from transferkit._utils.files import fsync_dir, fsync_file, is_no_space, os_reason
from transferkit.errors import ConfigError, SaveError
from transferkit.recipes.lora.adapters import save_adapters
from transferkit.recipes.lora.apply import has_lora
from transferkit.recipes.lora.config import LoraConfig
from transferkit.recipes.lora.merge import merged_copy
from transferkit.results.provenance import FitContext, provenance_path, provenance_text

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


def _save_target(path: str | os.PathLike[str]) -> Path:
    target = Path(os.fspath(path))
    suffix = target.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ConfigError(
            f"cannot save to {str(target)!r}: the file name must end in .keras or .h5."
        )
    if not target.parent.is_dir():
        raise SaveError(
            f"cannot save to {str(target)!r}: directory {str(target.parent)!r} does not exist."
        )
    if target.is_dir():
        raise SaveError(f"cannot save to {str(target)!r}: it is a directory.")
    return target


def _save_failed(target: Path, exc: BaseException) -> SaveError:
    hint = " Free some space and save again." if is_no_space(exc) else ""
    return SaveError(
        f"cannot save to {str(target)!r}: {os_reason(exc)}. Any file that was at that path is "
        f"unchanged.{hint}"
    )


def _stage_model(model: keras.Model, target: Path) -> Path:
    """Saves `model` to a temporary file beside `target`, flushed to disk; removed on failure."""
    suffix = target.suffix.lower()
    try:
        # Keras checks the suffix of the name it writes to.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise _save_failed(target, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp, **_plain_loadable(model, suffix))
        fsync_file(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise _save_failed(target, exc) from exc
        raise
    return tmp


def _stage_bytes(target: Path, data: bytes) -> Path:
    """Writes `data` to a temporary file beside `target`, flushed to disk; removed on failure."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(renames: list[tuple[Path, Path]]) -> None:
    """Renames each staged file onto its final path; the staged files left are removed."""
    try:
        for tmp, final in renames:
            os.replace(tmp, final)
    finally:
        for tmp, _ in renames:
            tmp.unlink(missing_ok=True)
    fsync_dir(renames[0][1].parent)


def atomic_save_model(model: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Saves `model` to `path` through a temporary file in the same directory and a rename.

    The temporary file is flushed to disk before the rename. An error mid-save (a full disk
    included) leaves any file that was already at `path` intact, and no temporary file behind.

    Raises:
        ConfigError: unsupported suffix.
        SaveError: the directory is missing or not writable, the disk is full, or Keras failed
            to save; the message names the path and the operating system's error.
    """
    target = _save_target(path)
    tmp = _stage_model(model, target)
    try:
        _commit([(tmp, target)])
    except OSError as exc:
        raise _save_failed(target, exc) from exc
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
        augment_views: when the cache trained on augmentation views (`fit(augment_views=K)`),
            K: epoch `e` saw the prefix's augmentation of pass `e mod K`. None otherwise.
        interrupted: the fit stopped on a KeyboardInterrupt.
        diverged: the fit stopped on a NaN or infinite loss (weights rolled back).
        provenance: what `save` records beside the model about the run (base model, frozen
            layers, head, optimizer, fit arguments); None for a result no FineTuner made,
            whose record then holds only the outcome and the versions.
        lora: the LoRA configuration of the fit (what `save_adapters` writes), None without
            `FineTuner.lora`.
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
    augment_views: int | None = None
    interrupted: bool = False
    diverged: bool = False
    provenance: FitContext | None = field(default=None, repr=False)
    lora: LoraConfig | None = field(default=None, repr=False)

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
        augment_views: int | None = None,
        interrupted: bool = False,
        diverged: bool = False,
        provenance: FitContext | None = None,
        lora: LoraConfig | None = None,
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
            augment_views=augment_views,
            interrupted=interrupted,
            diverged=diverged,
            provenance=provenance,
            lora=lora,
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
            SaveError: the file could not be written (the message names the path and the
                operating system's error, "No space left on device" on a full disk); an existing
                file at `path` and its record are kept, and no temporary file is left.
        """
        # A LoRA model saves as a plain one with the adapters merged (Keras cannot reload an
        # .h5 of a LoRA model; a .keras one reloads with zeroed adapters). The live model keeps
        # its adapters.
        model = merged_copy(self.model) if has_lora(self.model) else self.model
        target = _save_target(path)
        outcome = {
            "history": self.history,
            "epochs": self.epochs,
            "monitor": self.monitor,
            "best_epoch": self.best_epoch,
            "phases": self.phases,
            "interrupted": self.interrupted,
            "diverged": self.diverged,
            "augment_views": self.augment_views,
        }
        # Both files are staged before either is renamed: a disk that fills up while writing
        # the record leaves the old model and its old record in place.
        tmp = _stage_model(model, target)
        record = provenance_path(target)
        try:
            text = provenance_text(tmp, self.provenance or {}, outcome, name=target.name)
            tmp_record = _stage_bytes(record, text.encode("utf-8"))
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _save_failed(target, exc) from exc
            raise
        try:
            _commit([(tmp, target), (tmp_record, record)])
        except OSError as exc:
            raise _save_failed(target, exc) from exc
        return target

    def save_adapters(self, path: str | os.PathLike[str]) -> Path:
        """Writes only the LoRA matrices and the head's weights to an `.npz` file.

        Load them with `FineTuner(<same pre-trained model>).replace_head(<same args>)
        .load_adapters(path)`.

        Raises:
            ConfigError: the fit did not use LoRA, or `path` does not end in `.npz`.
            SaveError: the file could not be written.
        """
        config = self.lora
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
