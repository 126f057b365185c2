"""Resumable `checkpoint_dir`: the per-epoch state of each phase of a run, written atomically.

Layout of a checkpoint directory (format version 2):

```
PATH/manifest.json          the phases in the order they started, each with the fingerprint and
                            plan it was started with, and its last two committed generations:
                            the file name, size and SHA-256 of each state (and best) file. The
                            manifest carries a SHA-256 of its own content.
PATH/.lock                  held with `fcntl.flock` by the one process writing the directory;
                            it holds that process's id (for the error message only)
PATH/<phase>/<n>.state.npz  a finished epoch of that phase: every model variable (weights and
                            random-seed state), every optimizer variable and a JSON record (next
                            epoch, joined history, finished, diverged)
PATH/<phase>/<n>.best.npz   the model variables of the best epoch so far (`restore_best` only)
```

Every file is written to a temporary file in the same directory, flushed to disk (`fsync`) and
renamed into place, and the directory is flushed too. An epoch is committed when the manifest
naming its files is renamed into place, so a process killed (or a disk filled) at any instant
leaves the previous commit complete; files a failed commit wrote are removed.

Two generations are kept, as Keras' `BackupAndRestore(double_checkpoint=True)` does: a state file
whose size or checksum no longer matches the manifest (a crash of the machine, bit rot) is never
loaded; the run resumes from the previous generation with a warning, and when no generation is
intact `CheckpointError` names the damaged files. Directories written in format version 1
(`<phase>/state.npz` and `best.npz`, no checksums) still resume; their next commit rewrites the
manifest in version 2.

Keras' `BackupAndRestore` does not fit this job: it writes with `save_weights` in place (a kill
mid-write loses the backup), deletes its directory when training ends, knows nothing of phases or
history, and resumes through the private `model._initial_epoch`, which it leaves set. transferkit
resumes through `fit(initial_epoch=...)` instead.

A directory belongs to one run: a phase can only be resumed by the same model and plan, compared
by fingerprint (architecture, trainable flags, frozen weights, plan), never by the auto-generated
layer names, which change between rebuilds in one process. It has one writer at a time: a second
process (or thread) opening it while the first holds its lock gets `CheckpointError` at once, and
the lock dies with its holder (a SIGKILLed process leaves nothing to clean up).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeGuard

import keras
import numpy as np

from transferkit._utils.files import (
    Written,
    atomic_write_bytes,
    digest_file,
    hash_arrays,
    is_no_space,
    os_reason,
)
from transferkit.errors import CheckpointError
from transferkit.model.layers import leaf_layers, unit_trainable, unit_weights

if sys.platform != "win32":
    import fcntl

__all__ = [
    "CheckpointStore",
    "PhaseState",
    "Written",
    "atomic_write_bytes",
    "fingerprint",
    "hash_arrays",
]

_FORMAT = "transferkit.checkpoint"
_VERSION = 2
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_LEGACY_STATE = "state.npz"
_LEGACY_BEST = "best.npz"
_GENERATIONS = 2
_PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Only these names are ever opened inside a phase directory: a manifest cannot point elsewhere.
_FILE_NAME = {
    "state": re.compile(r"^(?:[0-9]{1,9}\.)?state\.npz$"),
    "best": re.compile(r"^(?:[0-9]{1,9}\.)?best\.npz$"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 64 << 20
_MAX_SERIAL = 999_999_999
_MAX_FILE_BYTES = 1 << 50
_MAX_COUNT = 10_000_000
_MAX_EPOCH = 1_000_000_000
_PARTS = {
    "architecture": "the architecture",
    "trainable": "the trainable flags",
    "frozen_weights": "the frozen weights",
    "plan": "the plan (fit arguments, data, optimizer or loss)",
}


def _write_json(path: Path, data: Any) -> Written:
    text = json.dumps(data, indent=1, sort_keys=True, default=_json_default)
    return atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


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
            [
                type(layer).__name__,
                _layer_config(layer),
                [list(w.shape) for w in unit_weights(layer)],
            ]
        )
    return rows


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
        "trainable": _digest([unit_trainable(layer) for layer in leaf_layers(model)]),
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


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Written:
    savez: Any = np.savez
    return atomic_write_bytes(path, lambda fh: savez(fh, **arrays))


def _meta_array(meta: Mapping[str, Any]) -> np.ndarray:
    text = json.dumps(meta, sort_keys=True, default=_json_default)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _is_int(value: Any, low: int, high: int) -> TypeGuard[int]:
    # Not bool, not float: JSON's `true` and `1e999` are not counts.
    return type(value) is int and low <= value <= high


def _check_state_meta(meta: Any) -> dict[str, Any]:
    # The record inside a state file; a crafted file with a matching checksum gets here too.
    if not isinstance(meta, dict):
        raise ValueError("its record is not a JSON object")
    for key, high in (
        ("next_epoch", _MAX_EPOCH),
        ("model_count", _MAX_COUNT),
        ("optimizer_count", _MAX_COUNT),
    ):
        if not _is_int(meta.get(key), 0, high):
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


class _Damaged(Exception):
    """A stored file that must not be loaded."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{str(file)!r} ({reason})")
        self.file = file


# ---------------------------------------------------------------- manifest


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=_json_default)


def _manifest_checksum(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    """The validated phases of the manifest in `path` ([] for a new or empty directory).

    Reads only; raises `CheckpointError` for anything that is not a well-formed manifest.
    """
    file = path / _MANIFEST
    if not path.is_dir():
        return []
    if not file.exists():
        # A lock file and temporaries are what a run that died before its first commit leaves.
        others = [p for p in path.iterdir() if p.name != _LOCK and not _is_temporary(p.name)]
        if others:
            raise CheckpointError(
                f"checkpoint_dir {str(path)!r} is not empty and is not a transferkit checkpoint "
                "directory (no manifest.json). Pass a new or empty directory."
            )
        return []
    try:
        if file.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"it is larger than {_MAX_MANIFEST_BYTES >> 20} MiB")
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"cannot read {str(file)!r}: {exc}. The manifest is damaged or not a transferkit "
            "checkpoint manifest: delete the checkpoint_dir (or pass a new one) to start over."
        ) from exc
    return _validate_manifest(path, file, data)


def _validate_manifest(path: Path, file: Path, data: Any) -> list[dict[str, Any]]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{str(file)!r} is damaged or not a transferkit checkpoint manifest: {what}. Delete "
            "the checkpoint_dir (or pass a new one) to start over."
        )

    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a transferkit checkpoint manifest.")
    version = data.get("version")
    if not _is_int(version, 1, _MAX_SERIAL):
        raise bad(f"its version {_short(version)} is not a positive integer")
    if version > _VERSION:
        raise CheckpointError(
            f"{str(file)!r} was written by a newer transferkit (checkpoint format {version}; "
            f"this one reads up to {_VERSION}). Upgrade transferkit, or use a new checkpoint_dir."
        )
    if version >= 2 and data.get("checksum") != _manifest_checksum(data):
        raise bad("its checksum does not match its content")
    phases = data.get("phases")
    if not isinstance(phases, list):
        raise bad("'phases' is not a list")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(phases):
        if not isinstance(entry, dict):
            raise bad(f"phase #{i} is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not _PHASE_NAME.match(name):
            raise bad(f"phase #{i} has the invalid name {_short(name)}")
        if any(p["name"] == name for p in out):
            raise bad(f"phase {name!r} appears twice")
        prints = entry.get("fingerprint")
        if not isinstance(prints, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prints.items()
        ):
            raise bad(f"the fingerprint of phase {name!r} is not a mapping of strings")
        plan = entry.get("plan", {})
        if not isinstance(plan, dict):
            raise bad(f"the plan of phase {name!r} is not an object")
        if version == 1:
            serial, generations = 0, _legacy_generations(path / name)
        else:
            stored = entry.get("serial")
            if not _is_int(stored, 0, _MAX_SERIAL):
                raise bad(f"the serial of phase {name!r} is not an integer in [0, {_MAX_SERIAL}]")
            gens = entry.get("generations")
            if not isinstance(gens, list) or len(gens) > _GENERATIONS:
                raise bad(f"the generations of phase {name!r} are not a list of at most two")
            serial = stored
            generations = [_check_generation(g, serial, name, bad) for g in gens]
        out.append(
            {
                "name": name,
                "fingerprint": dict(prints),
                "plan": plan,
                "serial": serial,
                "generations": generations,
            }
        )
    return out


def _check_generation(
    gen: Any, serial: int, phase: str, bad: Callable[[str], CheckpointError]
) -> dict[str, Any]:
    if not isinstance(gen, dict):
        raise bad(f"a generation of phase {phase!r} is not an object")
    out: dict[str, Any] = {}
    for kind in ("state", "best"):
        record = gen.get(kind)
        if record is None and kind == "best":
            out[kind] = None
            continue
        if not isinstance(record, dict):
            raise bad(f"a {kind} record of phase {phase!r} is not an object")
        name, sha, size = record.get("file"), record.get("sha256"), record.get("size")
        # The name pattern is what keeps a manifest from pointing outside the phase directory.
        if not isinstance(name, str) or not _FILE_NAME[kind].match(name):
            raise bad(f"the {kind} file name {_short(name)} of phase {phase!r} is not allowed")
        number = name.split(".")[0]
        if number.isdigit() and int(number) > serial:
            raise bad(f"the {kind} file {name!r} of phase {phase!r} is newer than its serial")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise bad(f"the checksum of {name!r} in phase {phase!r} is not a SHA-256")
        if not _is_int(size, 0, _MAX_FILE_BYTES):
            raise bad(f"the size of {name!r} in phase {phase!r} is not a plausible byte count")
        out[kind] = {"file": name, "sha256": sha, "size": size}
    return out


def _legacy_generations(directory: Path) -> list[dict[str, Any]]:
    # Format 1 kept one state file per phase and recorded no checksum: it is checked when read.
    if not (directory / _LEGACY_STATE).is_file():
        return []
    best = (
        {"file": _LEGACY_BEST, "sha256": None, "size": None}
        if (directory / _LEGACY_BEST).is_file()
        else None
    )
    return [{"state": {"file": _LEGACY_STATE, "sha256": None, "size": None}, "best": best}]


# ---------------------------------------------------------------- one writer


class _Lock:
    """An exclusive `flock` on `<root>/.lock`: held until `release`, or until the process dies.

    An OS lock, not a PID file: a SIGKILLed holder leaves no stale lock behind. The PID written
    into the file only names the holder in the error message.
    """

    def __init__(self, root: Path, fd: int | None) -> None:
        self.root = root
        self._fd = fd

    @classmethod
    def acquire(cls, root: Path) -> _Lock:
        if sys.platform == "win32":  # No flock; one writer per directory is not enforced.
            return cls(root, None)
        file = root / _LOCK
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                # Nobody can write here through this path, this run included: a finished run's
                # stored result can still be read, and a write fails with its own error.
                return cls(root, None)
            raise CheckpointError(
                f"cannot open the lock file {str(file)!r} of checkpoint_dir {str(root)!r}: "
                f"{os_reason(exc)}."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(
                    f"cannot lock checkpoint_dir {str(root)!r}: {os_reason(exc)}."
                ) from exc
            who = f"process {holder}" if holder else "another process"
            raise CheckpointError(
                f"checkpoint_dir {str(root)!r} is in use by {who}, which is writing it. Only one "
                "run may write a checkpoint directory: wait for that run to end (or stop it), or "
                "pass another checkpoint_dir."
            ) from None
        return cls(root, fd)

    def claim(self) -> None:
        """Writes this process's id into the lock file, for the message a second writer gets."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # A full disk must not stop the run for this.
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Closes the lock file, which releases the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isdigit() else None
    return None


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would create, deepest first."""
    missing = []
    current = path.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


# ---------------------------------------------------------------- the store


class CheckpointStore:
    """One phase of a checkpoint directory, opened (checked and locked) once per fit.

    Use `CheckpointStore.open` (as a context manager, or call `close`); the constructor checks
    nothing and takes no lock.
    """

    def __init__(
        self,
        root: Path,
        phase: str,
        entry: dict[str, Any] | None = None,
        phases: list[dict[str, Any]] | None = None,
        lock: _Lock | None = None,
    ) -> None:
        self.root = root
        self.phase = phase
        self.directory = root / phase
        self._entry: dict[str, Any] = entry or {
            "name": phase,
            "fingerprint": {},
            "plan": {},
            "serial": 0,
            "generations": [],
        }
        self._phases: list[dict[str, Any]] = phases if phases is not None else [self._entry]
        self._lock = lock
        self._committed: int | None = None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Releases the directory's lock (closing the lock file); a second call does nothing."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        phase: str,
        prints: Mapping[str, str],
        plan: Mapping[str, Any],
    ) -> CheckpointStore:
        """Opens `root` for `phase`, creating it when new, and locks it until `close`.

        Nothing on disk changes when this raises (a directory it created is removed again).

        Raises:
            CheckpointError: `root` is a file or a directory that is not a transferkit checkpoint,
                its manifest is damaged, it holds this phase (or an unfinished earlier one) of
                another model or plan, another process is writing it, or it cannot be written.
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
        # Read-only first: a damaged or foreign directory is refused before anything is created.
        cls._inspect(path, phase, prints, plan, warn=False)
        created = _missing_dirs(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint_dir {str(path)!r}: {os_reason(exc)}."
            ) from exc
        lock: _Lock | None = None
        try:
            lock = _Lock.acquire(path)
            # Again under the lock: a writer may have committed since the first look.
            phases, entry = cls._inspect(path, phase, prints, plan, warn=True)
            store = cls(path, phase, entry, phases, lock)
            lock.claim()
            if entry is None:
                store._start_phase(prints, plan)
            store._tidy()
        except BaseException:
            if lock is not None:
                if created:
                    (path / _LOCK).unlink(missing_ok=True)
                lock.release()
            for directory in created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        return store

    @classmethod
    def _inspect(
        cls,
        path: Path,
        phase: str,
        prints: Mapping[str, str],
        plan: Mapping[str, Any],
        *,
        warn: bool,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        phases = _read_manifest(path)
        entry = next((p for p in phases if p["name"] == phase), None)
        if entry is not None:
            _compare(path, phase, entry, prints, plan)
            return phases, entry
        for previous in phases:
            state = cls(path, previous["name"], previous, phases).load(arrays=False, warn=warn)
            if state is None or not state.finished:
                raise CheckpointError(
                    f"checkpoint_dir {str(path)!r} holds the unfinished phase "
                    f"{previous['name']!r} of another run, so phase {phase!r} cannot start "
                    "there. Re-run that run to finish it, or use a new checkpoint_dir."
                )
        if phases and phases[-1]["fingerprint"].get("architecture") != prints.get("architecture"):
            raise CheckpointError(
                f"checkpoint_dir {str(path)!r} was written by a model with a different "
                "architecture. Use a new checkpoint_dir for this model."
            )
        return phases, None

    def _start_phase(self, prints: Mapping[str, str], plan: Mapping[str, Any]) -> None:
        entry: dict[str, Any] = {
            "name": self.phase,
            "fingerprint": dict(prints),
            "plan": json.loads(json.dumps(dict(plan), default=_json_default)),
            "serial": 0,
            "generations": [],
        }
        phases = [*self._phases, entry]
        try:
            self._write_manifest(phases)
        except OSError as exc:
            raise self._write_error(exc, f"the manifest for phase {self.phase!r}") from exc
        self._entry, self._phases = entry, phases

    def _tidy(self) -> None:
        # Temporaries of a process killed mid-write, and files of a commit that never happened
        # (or of generations that fell out of the manifest): nothing refers to them.
        keep = {
            rec["file"]
            for gen in self._entry["generations"]
            for rec in (gen["state"], gen["best"])
            if rec is not None
        }
        stale = list(self.root.glob(f".{_MANIFEST}.*.tmp"))
        if self.directory.is_dir():
            stale += [
                file
                for file in self.directory.iterdir()
                if file.is_file()
                and (
                    _is_temporary(file.name)
                    or (
                        file.name not in keep
                        and any(p.match(file.name) for p in _FILE_NAME.values())
                    )
                )
            ]
        for file in stale:
            with contextlib.suppress(OSError):  # a read-only directory keeps them
                file.unlink()

    # ------------------------------------------------------------ reading

    def load(
        self, *, arrays: bool = True, best: bool = False, warn: bool = True
    ) -> PhaseState | None:
        """The newest intact stored state of this phase, or None when no epoch finished yet.

        A state (or, with `best`, its best-epoch file) whose size or SHA-256 differs from the
        manifest, or that does not parse, is never loaded: the previous generation is used, with
        a warning, and the damaged one is dropped at the next commit.

        Args:
            arrays: read the weights and optimizer values (else only the record).
            best: also read the best-epoch weights committed with the state (unfinished phases).
            warn: warn when a damaged generation is skipped.

        Raises:
            CheckpointError: every stored generation is damaged; the message names the files.
        """
        generations: list[dict[str, Any]] = self._entry["generations"]
        damaged: list[_Damaged] = []
        for i, gen in enumerate(generations):
            try:
                state = self._read_state(gen["state"], arrays=arrays)
                if best and arrays and not state.finished and gen["best"] is not None:
                    state.best = self._read_best(gen["best"])
            except _Damaged as exc:
                damaged.append(exc)
                continue
            if damaged and warn:
                warnings.warn(
                    f"checkpoint file {'; '.join(map(str, damaged))} is damaged and was not "
                    f"loaded: phase {self.phase!r} resumes from the previous generation "
                    f"{gen['state']['file']!r} (next epoch {state.next_epoch + 1}), repeating "
                    "the epochs after it.",
                    RuntimeWarning,
                    stacklevel=5,
                )
            if arrays:
                del generations[:i]
                self._committed = state.next_epoch
            return state
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint of phase {self.phase!r} is left in {str(self.root)!r}: "
                f"{'; '.join(map(str, damaged))}. Damaged weights are never loaded, and the run "
                "does not silently start over: delete the checkpoint_dir (or pass a new one) to "
                "start from scratch."
            )
        return None

    def _read_bytes(self, record: dict[str, Any]) -> tuple[Path, bytes]:
        file = self.directory / record["file"]
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise _Damaged(file, "missing") from None
        except OSError as exc:
            raise _Damaged(file, f"unreadable: {os_reason(exc)}") from exc
        if record["sha256"] is None:
            return file, data
        if len(data) != record["size"]:
            raise _Damaged(file, f"{len(data)} bytes where {record['size']} were written")
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise _Damaged(file, "its SHA-256 differs from the one recorded when it was written")
        return file, data

    def _read_state(self, record: dict[str, Any], *, arrays: bool) -> PhaseState:
        file, data = self._read_bytes(record)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = _check_state_meta(json.loads(bytes(npz["meta"]).decode("utf-8")))
                model_values = [npz[f"m{i}"] for i in range(meta["model_count"])] if arrays else []
                opt_values = (
                    [npz[f"o{i}"] for i in range(meta["optimizer_count"])] if arrays else []
                )
        except Exception as exc:  # Whatever the stored bytes make NumPy or JSON raise.
            raise _Damaged(file, f"unreadable: {type(exc).__name__}: {exc}") from exc
        _remember_digest(record, data)
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

    def _read_best(self, record: dict[str, Any]) -> tuple[int, list[np.ndarray]]:
        file, data = self._read_bytes(record)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
                if not isinstance(meta, dict) or not (
                    _is_int(meta.get("epoch"), 0, _MAX_EPOCH)
                    and _is_int(meta.get("model_count"), 0, _MAX_COUNT)
                ):
                    raise ValueError("its record is not an epoch and a count")
                values = [npz[f"m{i}"] for i in range(meta["model_count"])]
        except Exception as exc:  # Whatever the stored bytes make NumPy or JSON raise.
            raise _Damaged(file, f"unreadable: {type(exc).__name__}: {exc}") from exc
        _remember_digest(record, data)
        return int(meta["epoch"]), values

    # ------------------------------------------------------------ writing

    def save(
        self, state: PhaseState, *, best: tuple[int, Sequence[np.ndarray]] | None = None
    ) -> None:
        """Commits `state` (and new best-epoch weights) as the newest generation.

        The files are written first, then the manifest naming them replaces the old one; the
        generation before the previous one is deleted afterwards.

        Args:
            state: the state to store.
            best: (1-based epoch, model values) when this epoch is the best so far; otherwise the
                best file of the previous generation is kept with the new one.

        Raises:
            CheckpointError: a file could not be written (a full disk: "no space left"); the
                previous commit is intact and the files this call wrote are removed.
        """
        serial = int(self._entry["serial"]) + 1
        if serial > _MAX_SERIAL:
            raise CheckpointError(
                f"checkpoint_dir {str(self.root)!r} has run out of serial numbers; use a new one."
            )
        generations: list[dict[str, Any]] = self._entry["generations"]
        written: list[Path] = []
        try:
            self.directory.mkdir(exist_ok=True)
            best_record = generations[0]["best"] if generations else None
            if best is not None:
                best_record = self._write_npz(
                    f"{serial}.best.npz",
                    _arrays(best[1], [], {"epoch": int(best[0]), "model_count": len(best[1])}),
                    written,
                )
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
            state_record = self._write_npz(
                f"{serial}.state.npz",
                _arrays(state.model_values, state.optimizer_values, meta),
                written,
            )
            entry = {
                **self._entry,
                "serial": serial,
                "generations": [
                    {"state": state_record, "best": best_record},
                    *generations[: _GENERATIONS - 1],
                ],
            }
            phases = [entry if p is self._entry else p for p in self._phases]
            self._write_manifest(phases)
        except OSError as exc:
            # An OSError comes before the manifest's rename: nothing refers to these files.
            for file in written:
                file.unlink(missing_ok=True)
            raise self._write_error(exc, f"the checkpoint of epoch {state.next_epoch}") from exc
        self._entry, self._phases = entry, phases
        self._committed = state.next_epoch
        self._tidy()

    def _write_npz(
        self, name: str, arrays: Mapping[str, np.ndarray], written: list[Path]
    ) -> dict[str, Any]:
        path = self.directory / name
        digest = _save_npz(path, arrays)
        written.append(path)
        return {"file": name, "sha256": digest.sha256, "size": digest.size}

    def _write_manifest(self, phases: list[dict[str, Any]]) -> None:
        for entry in phases:
            for gen in entry["generations"]:
                for kind in ("state", "best"):
                    if gen[kind] is not None and gen[kind]["sha256"] is None:
                        _hash_legacy(self.root / entry["name"], gen[kind])
        data: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "phases": phases}
        data["checksum"] = _manifest_checksum(data)
        _write_json(self.root / _MANIFEST, data)

    def _write_error(self, exc: OSError, what: str) -> CheckpointError:
        if self._committed is None:
            kept = "Nothing of this phase was committed yet, and nothing written before is lost"
        else:
            kept = f"The newest complete checkpoint (next epoch {self._committed + 1}) is intact"
        if is_no_space(exc):
            return CheckpointError(
                f"cannot write {what} in {str(self.root)!r}: no space left on device. {kept}: "
                "free some space and re-run the same call to resume there."
            )
        return CheckpointError(
            f"cannot write {what} in {str(self.root)!r}: {os_reason(exc)}. "
            f"{kept}: fix that and re-run the same call to resume there."
        )


def _arrays(
    model_values: Sequence[np.ndarray], optimizer_values: Sequence[np.ndarray], meta: Any
) -> dict[str, np.ndarray]:
    arrays = {f"m{i}": np.asarray(v) for i, v in enumerate(model_values)}
    arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(optimizer_values)})
    arrays["meta"] = _meta_array(meta)
    return arrays


def _remember_digest(record: dict[str, Any], data: bytes) -> None:
    # A format-1 file that parsed is recorded as it is, so the next commit can carry it.
    if record["sha256"] is None:
        record["sha256"] = hashlib.sha256(data).hexdigest()
        record["size"] = len(data)


def _hash_legacy(directory: Path, record: dict[str, Any]) -> None:
    with open(directory / record["file"], "rb") as fh:
        digest = digest_file(fh)
    record["sha256"], record["size"] = digest.sha256, digest.size


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
