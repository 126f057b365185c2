"""The manifest of a checkpoint directory: its phases and their committed generations.

`manifest.json` (format version 2) lists the phases in the order they started, each with the
fingerprint and plan it was started with, a serial number and its last two committed generations:
the file name, size and SHA-256 of each state (and best) file. The manifest carries a SHA-256 of
its own content. Reading validates every field, since the manifest decides which files are
opened: only `[<n>.]state.npz` and `[<n>.]best.npz` inside the phase's own directory can be named.

Format version 1 (`<phase>/state.npz` and `best.npz`, no checksums, no generations) is read as
one generation whose checksums are unknown (`None`); they are taken when the file is read
(`remember_digest`), or from the file itself before the next commit, which writes version 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transferkit._utils.files import Written, atomic_write_bytes, digest_file
from transferkit.errors import CheckpointError
from transferkit.train.checkpoints.lock import LOCK
from transferkit.train.checkpoints.records import is_int, json_default

__all__ = [
    "FILE_NAME",
    "GENERATIONS",
    "MANIFEST",
    "MAX_SERIAL",
    "PHASE_NAME",
    "is_temporary",
    "read_manifest",
    "remember_digest",
    "write_manifest",
]

_FORMAT = "transferkit.checkpoint"
_VERSION = 2
MANIFEST = "manifest.json"
_LEGACY_STATE = "state.npz"
_LEGACY_BEST = "best.npz"
GENERATIONS = 2
PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Only these names are ever opened inside a phase directory: a manifest cannot point elsewhere.
FILE_NAME = {
    "state": re.compile(r"^(?:[0-9]{1,9}\.)?state\.npz$"),
    "best": re.compile(r"^(?:[0-9]{1,9}\.)?best\.npz$"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 64 << 20
MAX_SERIAL = 999_999_999
_MAX_FILE_BYTES = 1 << 50


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file of `atomic_write_bytes` (`.<name>.<random>.tmp`).

    Args:
        name: a file name.

    Returns:
        True for a temporary file's name.

    Example:

    >>> is_temporary(".manifest.json.k2x_9a.tmp"), is_temporary("manifest.json")
    (True, False)
    """
    return name.startswith(".") and name.endswith(".tmp")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=json_default)


def _manifest_checksum(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- reading


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The validated phases of the manifest in `path` ([] for a new or empty directory).

    Reads only.

    Args:
        path: the checkpoint directory.

    Returns:
        One entry per phase: its "name", "fingerprint", "plan", "serial" and "generations",
        newest first (each a "state" and a "best" record, or None for "best"). A format-1
        directory's records have `None` for their "sha256" and "size".

    Raises:
        CheckpointError: `path` holds files but no manifest, or the manifest is not a
            well-formed transferkit checkpoint manifest, or it was written by a newer format.
    """
    file = path / MANIFEST
    if not path.is_dir():
        return []
    if not file.exists():
        # A lock file and temporaries are what a run that died before its first commit leaves.
        others = [p for p in path.iterdir() if p.name != LOCK and not is_temporary(p.name)]
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
    if not is_int(version, 1, MAX_SERIAL):
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
        if not isinstance(name, str) or not PHASE_NAME.match(name):
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
            if not is_int(stored, 0, MAX_SERIAL):
                raise bad(f"the serial of phase {name!r} is not an integer in [0, {MAX_SERIAL}]")
            gens = entry.get("generations")
            if not isinstance(gens, list) or len(gens) > GENERATIONS:
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
        if not isinstance(name, str) or not FILE_NAME[kind].match(name):
            raise bad(f"the {kind} file name {_short(name)} of phase {phase!r} is not allowed")
        number = name.split(".")[0]
        if number.isdigit() and int(number) > serial:
            raise bad(f"the {kind} file {name!r} of phase {phase!r} is newer than its serial")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise bad(f"the checksum of {name!r} in phase {phase!r} is not a SHA-256")
        if not is_int(size, 0, _MAX_FILE_BYTES):
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


def remember_digest(record: dict[str, Any], data: bytes) -> None:
    """Records the size and SHA-256 of `data` in a format-1 file's record (which has none).

    A format-1 file that parsed is recorded as it is, so the next commit can carry it.

    Args:
        record: a file record of `read_manifest`; one that has a checksum is left alone.
        data: the bytes read from its file.
    """
    if record["sha256"] is None:
        record["sha256"] = hashlib.sha256(data).hexdigest()
        record["size"] = len(data)


# ---------------------------------------------------------------- writing


def write_manifest(root: Path, phases: list[dict[str, Any]]) -> None:
    """Commits `phases` by writing the manifest of `root` (format 2) atomically.

    A format-1 record without a checksum gets one from its file first (in place, in `phases`).

    Args:
        root: the checkpoint directory.
        phases: the entries, as `read_manifest` returns them.

    Raises:
        OSError: a format-1 file could not be read, or the manifest could not be written.
    """
    for entry in phases:
        for gen in entry["generations"]:
            for kind in ("state", "best"):
                if gen[kind] is not None and gen[kind]["sha256"] is None:
                    _hash_legacy(root / entry["name"], gen[kind])
    data: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "phases": phases}
    data["checksum"] = _manifest_checksum(data)
    _write_json(root / MANIFEST, data)


def _hash_legacy(directory: Path, record: dict[str, Any]) -> None:
    with open(directory / record["file"], "rb") as fh:
        digest = digest_file(fh)
    record["sha256"], record["size"] = digest.sha256, digest.size


def _write_json(path: Path, data: Any) -> Written:
    text = json.dumps(data, indent=1, sort_keys=True, default=json_default)
    return atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))
