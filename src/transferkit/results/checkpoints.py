"""Resumable `checkpoint_dir`: the per-epoch state of each phase of a run, written atomically.

Layout of a checkpoint directory:

```
PATH/manifest.json        the phases in the order they started, each with the fingerprint and
                          plan it was started with
PATH/<phase>/state.npz    the last finished epoch of that phase: every model variable (weights and
                          random-seed state), every optimizer variable and a JSON record (next
                          epoch, joined history, finished, diverged)
PATH/<phase>/best.npz     the model variables of the best epoch so far (`restore_best` only)
```

Every file is written to a temporary file in the same directory and renamed into place, so a
process killed at any instant leaves either the previous or the next epoch, never half of one.

Keras' `BackupAndRestore` does not fit this job: it writes with `save_weights` in place (a kill
mid-write loses the backup), deletes its directory when training ends, knows nothing of phases or
history, and resumes through the private `model._initial_epoch`, which it leaves set. transferkit
resumes through `fit(initial_epoch=...)` instead.

A directory belongs to one run: a phase can only be resumed by the same model and plan, compared
by fingerprint (architecture, trainable flags, frozen weights, plan), never by the auto-generated
layer names, which change between rebuilds in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.errors import CheckpointError
from transferkit.model.layers import leaf_layers

__all__ = [
    "CheckpointStore",
    "PhaseState",
    "atomic_write_bytes",
    "fingerprint",
]

_FORMAT = "transferkit.checkpoint"
_VERSION = 1
_MANIFEST = "manifest.json"
_STATE = "state.npz"
_BEST = "best.npz"
_PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARTS = {
    "architecture": "the architecture",
    "trainable": "the trainable flags",
    "frozen_weights": "the frozen weights",
    "plan": "the plan (fit arguments, data, optimizer or loss)",
}


# ---------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Writes a file through a temporary file in the same directory and an `os.replace`.

    Args:
        path: the final path.
        write: a callable taking the open binary file object.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=_json_default)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return f"<{type(obj).__name__}>"


# ---------------------------------------------------------------- fingerprint


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _strip_names(obj: Any) -> Any:
    # Auto-generated names ("dense_7") differ between rebuilds of one model in one process.
    if isinstance(obj, Mapping):
        if "DTypePolicy" in str(obj.get("class_name", "")):
            return dict(obj)
        return {k: _strip_names(v) for k, v in obj.items() if k not in ("name", "trainable")}
    if isinstance(obj, (list, tuple)):
        return [_strip_names(v) for v in obj]
    return obj


def _layer_config(layer: keras.layers.Layer) -> Any:
    try:
        return _strip_names(layer.get_config())
    except Exception:  # A custom layer without get_config: its class and weights must do.
        return None


def _architecture(model: keras.Model) -> list[Any]:
    rows: list[Any] = [
        ["inputs", [list(t.shape) for t in model.inputs]],
        ["outputs", [list(t.shape) for t in model.outputs]],
    ]
    for layer in leaf_layers(model):
        rows.append(
            [type(layer).__name__, _layer_config(layer), [list(w.shape) for w in layer.weights]]
        )
    return rows


def hash_arrays(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 over the shapes, dtypes and bytes of `arrays`."""
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.data)
    return h.hexdigest()


def fingerprint(model: keras.Model, plan: Mapping[str, Any]) -> dict[str, str]:
    """What makes a checkpoint belong to a model and plan.

    Args:
        model: the working model at the start of the phase.
        plan: a JSON-friendly description of the fit (arguments, data, optimizer, loss).

    Returns:
        A digest for each of "architecture", "trainable", "frozen_weights" and "plan".
    """
    return {
        "architecture": _digest(_architecture(model)),
        "trainable": _digest([bool(layer.trainable) for layer in leaf_layers(model)]),
        "frozen_weights": hash_arrays(v.numpy() for v in model.non_trainable_weights),
        "plan": _digest(plan),
    }


# ---------------------------------------------------------------- state


@dataclass
class PhaseState:
    """The stored state of one phase.

    Attributes:
        next_epoch: the absolute index of the next epoch to run.
        history: the joined history of the finished epochs of this phase.
        model_values: the values of `model.variables`.
        optimizer_values: the values of the optimizer's variables.
        finished: the phase ran to its end (or stopped early); nothing is left to run.
        diverged: the phase stopped on a non-finite loss.
        cached: the finished phase trained on cached features.
        cache_layer: where the feature cache cut the model, when `cached`.
    """

    next_epoch: int
    history: dict[str, list[float]]
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]
    finished: bool = False
    diverged: bool = False
    cached: bool = False
    cache_layer: str | None = None


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    savez: Any = np.savez
    atomic_write_bytes(path, lambda fh: savez(fh, **arrays))


def _meta_array(meta: Mapping[str, Any]) -> np.ndarray:
    text = json.dumps(meta, sort_keys=True, default=_json_default)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class CheckpointStore:
    """One phase of a checkpoint directory: opened (and checked) once per fit.

    Use `CheckpointStore.open`; the constructor does not check anything.
    """

    def __init__(self, root: Path, phase: str) -> None:
        self.root = root
        self.phase = phase
        self.directory = root / phase

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        phase: str,
        prints: Mapping[str, str],
        plan: Mapping[str, Any],
    ) -> CheckpointStore:
        """Opens `root` for `phase`, creating it when new.

        Nothing on disk changes when this raises.

        Raises:
            CheckpointError: `root` is a file or a directory that is not a transferkit checkpoint,
                or it holds this phase (or an unfinished earlier one) of another model or plan.
        """
        path = Path(os.fspath(root))
        if not _PHASE_NAME.match(phase):
            raise CheckpointError(
                f"phase name {phase!r} cannot name a checkpoint subdirectory: use letters, digits, "
                "'_', '-' and '.'."
            )
        if path.exists() and not path.is_dir():
            raise CheckpointError(
                f"checkpoint_dir {str(path)!r} is a file, not a directory. Pass a new or existing "
                "checkpoint directory."
            )
        manifest = _read_manifest(path)
        phases: list[dict[str, Any]] = list(manifest.get("phases", []))
        store = cls(path, phase)
        entry = next((p for p in phases if p.get("name") == phase), None)
        if entry is not None:
            _compare(path, phase, entry, prints, plan)
            store._remove_stale_temporaries()
            return store
        for previous in phases:
            state = cls(path, str(previous.get("name"))).load(arrays=False)
            if state is None or not state.finished:
                raise CheckpointError(
                    f"checkpoint_dir {str(path)!r} holds the unfinished phase "
                    f"{previous.get('name')!r} of another run, so phase {phase!r} cannot start "
                    "there. Re-run that run to finish it, or use a new checkpoint_dir."
                )
        if phases and phases[-1].get("fingerprint", {}).get("architecture") != prints.get(
            "architecture"
        ):
            raise CheckpointError(
                f"checkpoint_dir {str(path)!r} was written by a model with a different "
                "architecture. Use a new checkpoint_dir for this model."
            )
        phases.append({"name": phase, "fingerprint": dict(prints), "plan": dict(plan)})
        try:
            path.mkdir(parents=True, exist_ok=True)
            store.directory.mkdir(exist_ok=True)
            _write_json(
                path / _MANIFEST, {"format": _FORMAT, "version": _VERSION, "phases": phases}
            )
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint_dir {str(path)!r}: {exc.strerror or exc}."
            ) from exc
        return store

    def _remove_stale_temporaries(self) -> None:
        # Left by a process killed mid-write; the files they were meant to replace are intact.
        if self.directory.is_dir():
            for tmp in self.directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------ reading

    def load(self, *, arrays: bool = True) -> PhaseState | None:
        """The stored state of this phase, or None when no epoch finished yet.

        Raises:
            CheckpointError: the state file is unreadable.
        """
        file = self.directory / _STATE
        if not file.exists():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                model_values = [data[f"m{i}"] for i in range(meta["model_count"])] if arrays else []
                opt_values = (
                    [data[f"o{i}"] for i in range(meta["optimizer_count"])] if arrays else []
                )
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint state {str(file)!r} is unreadable ({exc}). Delete the checkpoint_dir "
                "to start over."
            ) from exc
        return PhaseState(
            next_epoch=int(meta["next_epoch"]),
            history={k: [float(v) for v in vals] for k, vals in meta["history"].items()},
            model_values=model_values,
            optimizer_values=opt_values,
            finished=bool(meta["finished"]),
            diverged=bool(meta["diverged"]),
            cached=bool(meta.get("cached", False)),
            cache_layer=meta.get("cache_layer"),
        )

    def load_best(self) -> tuple[int, list[np.ndarray]] | None:
        """(epoch, model values) of the best epoch stored so far, or None."""
        file = self.directory / _BEST
        if not file.exists():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                return int(meta["epoch"]), [data[f"m{i}"] for i in range(meta["model_count"])]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint file {str(file)!r} is unreadable ({exc}).") from exc

    # ------------------------------------------------------------ writing

    def save(self, state: PhaseState) -> None:
        """Atomically replaces the stored state of this phase."""
        meta = {
            "phase": self.phase,
            "next_epoch": state.next_epoch,
            "history": state.history,
            "finished": state.finished,
            "diverged": state.diverged,
            "cached": state.cached,
            "cache_layer": state.cache_layer,
            "model_count": len(state.model_values),
            "optimizer_count": len(state.optimizer_values),
        }
        arrays = {f"m{i}": v for i, v in enumerate(state.model_values)}
        arrays.update({f"o{i}": v for i, v in enumerate(state.optimizer_values)})
        arrays["meta"] = _meta_array(meta)
        _save_npz(self.directory / _STATE, arrays)

    def save_best(self, epoch: int, model_values: Sequence[np.ndarray]) -> None:
        """Atomically replaces the stored best-epoch weights."""
        arrays = {f"m{i}": v for i, v in enumerate(model_values)}
        arrays["meta"] = _meta_array({"epoch": epoch, "model_count": len(model_values)})
        _save_npz(self.directory / _BEST, arrays)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / _MANIFEST
    if not path.is_dir():
        return {}
    if not file.exists():
        if any(path.iterdir()):
            raise CheckpointError(
                f"checkpoint_dir {str(path)!r} is not empty and is not a transferkit checkpoint "
                "directory (no manifest.json). Pass a new or empty directory."
            )
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}.") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a transferkit checkpoint manifest.")
    return data


def _compare(
    path: Path,
    phase: str,
    entry: Mapping[str, Any],
    prints: Mapping[str, str],
    plan: Mapping[str, Any],
) -> None:
    stored = entry.get("fingerprint", {})
    differ = [part for part in _PARTS if stored.get(part) != prints.get(part)]
    if not differ:
        return
    details = ""
    if "plan" in differ:
        old_plan = entry.get("plan", {})
        keys = sorted(set(old_plan) | set(plan))
        changed = [k for k in keys if _digest(old_plan.get(k)) != _digest(plan.get(k))]
        details = f" Plan entries that differ: {', '.join(changed)}." if changed else ""
    what = ", ".join(_PARTS[p] for p in differ)
    raise CheckpointError(
        f"checkpoint_dir {str(path)!r} holds phase {phase!r} of a different model or plan: "
        f"{what} differ(s).{details} Refusing to load its weights. Use a new checkpoint_dir, or "
        "delete this one to start over."
    )
