"""The per-epoch state files of a phase: `PhaseState`, and the `.npz` files that hold it.

A state file (`<n>.state.npz`) holds every model variable (`m0`, `m1`, ...), every optimizer
variable (`o0`, ...) and a JSON record (`meta`: next epoch, joined history, finished, diverged,
cached); a best file (`<n>.best.npz`) holds the model variables of the best epoch and a record
naming it. Their bytes are read back with `allow_pickle=False` and every record is checked, since
a crafted file with a matching checksum gets this far too: what does not parse is `Damaged`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._utils.files import Written, atomic_write_bytes
from transferkit.train.checkpoints.records import is_int, json_default

__all__ = [
    "Damaged",
    "PhaseState",
    "best_arrays",
    "read_best",
    "read_state",
    "save_npz",
    "state_arrays",
]

_MAX_COUNT = 10_000_000
_MAX_EPOCH = 1_000_000_000


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
        best: (1-based epoch, model values) of the best epoch committed with this state, when
            loaded with `best=True` from an unfinished `restore_best` phase.
    """

    next_epoch: int
    history: dict[str, list[float]]
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]
    finished: bool = False
    diverged: bool = False
    cached: bool = False
    cache_layer: str | None = None
    best: tuple[int, list[np.ndarray]] | None = None


class Damaged(Exception):
    """A stored file that must not be loaded.

    Args:
        file: the file.
        reason: what is wrong with it ("missing", "unreadable: ...").

    Example:

    >>> str(Damaged(Path("ckpt/fit/2.state.npz"), "missing"))
    "'ckpt/fit/2.state.npz' (missing)"
    """

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{str(file)!r} ({reason})")
        self.file = file


# ---------------------------------------------------------------- writing


def state_arrays(phase: str, state: PhaseState) -> dict[str, np.ndarray]:
    """The arrays of the state file of `state` (its `best` is stored apart, see `best_arrays`).

    Args:
        phase: the phase's name, recorded in the file.
        state: the state to store.

    Returns:
        The arrays for `save_npz`: `m<i>`, `o<i>` and the record `meta`.
    """
    meta = {
        "phase": phase,
        "next_epoch": state.next_epoch,
        "history": state.history,
        "finished": state.finished,
        "diverged": state.diverged,
        "cached": state.cached,
        "cache_layer": state.cache_layer,
        "model_count": len(state.model_values),
        "optimizer_count": len(state.optimizer_values),
    }
    return _arrays(state.model_values, state.optimizer_values, meta)


def best_arrays(epoch: int, model_values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a best file.

    Args:
        epoch: the 1-based epoch the weights are from.
        model_values: the values of `model.variables` after that epoch.

    Returns:
        The arrays for `save_npz`: `m<i>` and the record `meta`.
    """
    return _arrays(model_values, [], {"epoch": int(epoch), "model_count": len(model_values)})


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Written:
    """Writes `arrays` to the `.npz` file `path` atomically (see `_utils.files`).

    Args:
        path: the file to write.
        arrays: the arrays by name.

    Returns:
        The size and SHA-256 of the bytes written.

    Raises:
        OSError: the file could not be written (its temporary file is removed).
    """
    savez: Any = np.savez
    return atomic_write_bytes(path, lambda fh: savez(fh, **arrays))


def _arrays(
    model_values: Sequence[np.ndarray], optimizer_values: Sequence[np.ndarray], meta: Any
) -> dict[str, np.ndarray]:
    arrays = {f"m{i}": np.asarray(v) for i, v in enumerate(model_values)}
    arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(optimizer_values)})
    arrays["meta"] = _meta_array(meta)
    return arrays


def _meta_array(meta: Mapping[str, Any]) -> np.ndarray:
    text = json.dumps(meta, sort_keys=True, default=json_default)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


# ---------------------------------------------------------------- reading


def read_state(file: Path, data: bytes, *, arrays: bool) -> PhaseState:
    """The state stored in the bytes `data` of the state file `file`.

    Args:
        file: where the bytes were read (for the message).
        data: the file's bytes, already checked against the manifest.
        arrays: read the weights and optimizer values (else only the record).

    Returns:
        The state, without `best`.

    Raises:
        Damaged: the bytes are not a state file with a well-formed record.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = _check_state_meta(json.loads(bytes(npz["meta"]).decode("utf-8")))
            model_values = [npz[f"m{i}"] for i in range(meta["model_count"])] if arrays else []
            opt_values = [npz[f"o{i}"] for i in range(meta["optimizer_count"])] if arrays else []
    except Exception as exc:  # Whatever the stored bytes make NumPy or JSON raise.
        raise Damaged(file, f"unreadable: {type(exc).__name__}: {exc}") from exc
    return PhaseState(
        next_epoch=meta["next_epoch"],
        history={k: [float(v) for v in vals] for k, vals in meta["history"].items()},
        model_values=model_values,
        optimizer_values=opt_values,
        finished=meta["finished"],
        diverged=meta["diverged"],
        cached=bool(meta.get("cached", False)),
        cache_layer=meta.get("cache_layer"),
    )


def read_best(file: Path, data: bytes) -> tuple[int, list[np.ndarray]]:
    """The best epoch stored in the bytes `data` of the best file `file`.

    Args:
        file: where the bytes were read (for the message).
        data: the file's bytes, already checked against the manifest.

    Returns:
        (1-based epoch, model values).

    Raises:
        Damaged: the bytes are not a best file with a well-formed record.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
            if not isinstance(meta, dict) or not (
                is_int(meta.get("epoch"), 0, _MAX_EPOCH)
                and is_int(meta.get("model_count"), 0, _MAX_COUNT)
            ):
                raise ValueError("its record is not an epoch and a count")
            values = [npz[f"m{i}"] for i in range(meta["model_count"])]
    except Exception as exc:  # Whatever the stored bytes make NumPy or JSON raise.
        raise Damaged(file, f"unreadable: {type(exc).__name__}: {exc}") from exc
    return int(meta["epoch"]), values


def _check_state_meta(meta: Any) -> dict[str, Any]:
    # The record inside a state file; a crafted file with a matching checksum gets here too.
    if not isinstance(meta, dict):
        raise ValueError("its record is not a JSON object")
    for key, high in (
        ("next_epoch", _MAX_EPOCH),
        ("model_count", _MAX_COUNT),
        ("optimizer_count", _MAX_COUNT),
    ):
        if not is_int(meta.get(key), 0, high):
            raise ValueError(f"its record's {key!r} is not an integer in [0, {high}]")
    for key in ("finished", "diverged"):
        if type(meta.get(key)) is not bool:
            raise ValueError(f"its record's {key!r} is not true or false")
    if type(meta.get("cached", False)) is not bool:
        raise ValueError("its record's 'cached' is not true or false")
    if not isinstance(meta.get("cache_layer"), (str, type(None))):
        raise ValueError("its record's 'cache_layer' is not a string")
    history = meta.get("history")
    if not isinstance(history, dict) or not all(
        isinstance(vals, list) and all(type(v) in (int, float) for v in vals)
        for vals in history.values()
    ):
        raise ValueError("its record's 'history' is not a mapping of lists of numbers")
    return meta
