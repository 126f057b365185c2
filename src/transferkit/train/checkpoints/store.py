"""`CheckpointStore`: one phase of a checkpoint directory, opened, loaded and committed.

Opening checks the directory read-only first (a damaged or foreign directory is refused before
anything is created), then takes its lock and checks again. A commit writes the state (and best)
file, then the manifest naming them; files nothing refers to are removed afterwards. Loading
takes the newest generation whose files match the manifest and parse, with a warning when it is
not the newest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from transferkit._utils.files import is_no_space, os_reason
from transferkit.errors import CheckpointError
from transferkit.train.checkpoints.fingerprint import check_fingerprint
from transferkit.train.checkpoints.lock import LOCK, Lock
from transferkit.train.checkpoints.manifest import (
    FILE_NAME,
    GENERATIONS,
    MANIFEST,
    MAX_SERIAL,
    PHASE_NAME,
    is_temporary,
    read_manifest,
    remember_digest,
    write_manifest,
)
from transferkit.train.checkpoints.records import json_default
from transferkit.train.checkpoints.state import (
    Damaged,
    PhaseState,
    best_arrays,
    read_best,
    read_state,
    save_npz,
    state_arrays,
)

__all__ = ["CheckpointStore"]


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
        lock: Lock | None = None,
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

        Args:
            root: the checkpoint directory.
            phase: the phase's name (its subdirectory).
            prints: the `fingerprint` of the model and plan.
            plan: the plan itself, stored with a new phase to name what differs later.

        Returns:
            The open store; its `load` returns the phase's stored state, if any.

        Raises:
            CheckpointError: `root` is a file or a directory that is not a transferkit checkpoint,
                its manifest is damaged, it holds this phase (or an unfinished earlier one) of
                another model or plan, another process is writing it, or it cannot be written.
        """
        path = Path(os.fspath(root))
        if not PHASE_NAME.match(phase):
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
        lock: Lock | None = None
        try:
            lock = Lock.acquire(path)
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
                    (path / LOCK).unlink(missing_ok=True)
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
        phases = read_manifest(path)
        entry = next((p for p in phases if p["name"] == phase), None)
        if entry is not None:
            check_fingerprint(path, phase, entry, prints, plan)
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
            "plan": json.loads(json.dumps(dict(plan), default=json_default)),
            "serial": 0,
            "generations": [],
        }
        phases = [*self._phases, entry]
        try:
            write_manifest(self.root, phases)
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
        stale = list(self.root.glob(f".{MANIFEST}.*.tmp"))
        if self.directory.is_dir():
            stale += [
                file
                for file in self.directory.iterdir()
                if file.is_file()
                and (
                    is_temporary(file.name)
                    or (
                        file.name not in keep
                        and any(p.match(file.name) for p in FILE_NAME.values())
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
        damaged: list[Damaged] = []
        for i, gen in enumerate(generations):
            try:
                state = self._read_state(gen["state"], arrays=arrays)
                if best and arrays and not state.finished and gen["best"] is not None:
                    state.best = self._read_best(gen["best"])
            except Damaged as exc:
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
            raise Damaged(file, "missing") from None
        except OSError as exc:
            raise Damaged(file, f"unreadable: {os_reason(exc)}") from exc
        if record["sha256"] is None:
            return file, data
        if len(data) != record["size"]:
            raise Damaged(file, f"{len(data)} bytes where {record['size']} were written")
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise Damaged(file, "its SHA-256 differs from the one recorded when it was written")
        return file, data

    def _read_state(self, record: dict[str, Any], *, arrays: bool) -> PhaseState:
        file, data = self._read_bytes(record)
        state = read_state(file, data, arrays=arrays)
        remember_digest(record, data)
        return state

    def _read_best(self, record: dict[str, Any]) -> tuple[int, list[np.ndarray]]:
        file, data = self._read_bytes(record)
        best = read_best(file, data)
        remember_digest(record, data)
        return best

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
        if serial > MAX_SERIAL:
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
                    f"{serial}.best.npz", best_arrays(best[0], best[1]), written
                )
            state_record = self._write_npz(
                f"{serial}.state.npz", state_arrays(self.phase, state), written
            )
            entry = {
                **self._entry,
                "serial": serial,
                "generations": [
                    {"state": state_record, "best": best_record},
                    *generations[: GENERATIONS - 1],
                ],
            }
            phases = [entry if p is self._entry else p for p in self._phases]
            write_manifest(self.root, phases)
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
        digest = save_npz(path, arrays)
        written.append(path)
        return {"file": name, "sha256": digest.sha256, "size": digest.size}

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


def _missing_dirs(path: Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would create, deepest first."""
    missing = []
    current = path.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing
