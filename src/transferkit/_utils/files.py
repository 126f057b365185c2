"""File helpers shared by every writer: atomic, durable writes and the OS's words for a failure.

Each writer of transferkit (results, provenance records, adapters, checkpoints) goes through
`atomic_write_bytes`, so a crash or a full disk leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

__all__ = [
    "Written",
    "atomic_write_bytes",
    "digest_file",
    "fsync_dir",
    "fsync_file",
    "hash_arrays",
    "is_no_space",
    "os_reason",
]


class Written(NamedTuple):
    """What `atomic_write_bytes` wrote: the SHA-256 and size of the file as it is on disk."""

    sha256: str
    size: int


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], Any]) -> Written:
    """Writes a file through a temporary file in the same directory and an `os.replace`.

    The temporary file is flushed to disk before the rename and the directory after it, so after
    a crash of the machine `path` holds either its old or its new content. On any failure
    (a full disk included) the temporary file is removed and `path` is untouched.

    Args:
        path: the final path.
        write: a callable taking the open binary file object.

    Returns:
        The SHA-256 and size of the written file, read back from the temporary file.

    Raises:
        OSError: the file could not be written.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            written = digest_file(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return written


def digest_file(fh: IO[bytes]) -> Written:
    """The SHA-256 and size of an open binary file, read from its current position."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    return Written(h.hexdigest(), size)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flushes a file written by someone else (Keras, h5py) to disk."""
    _fsync(path)


def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable; a platform that cannot open directories skips it."""
    with contextlib.suppress(OSError):
        _fsync(directory)


def os_reason(exc: BaseException) -> str:
    """The operating system's words for the first `OSError` in `exc`'s chain, else `str(exc)`.

    h5py, for one, wraps ENOSPC in a long message; "No space left on device" is what matters.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} [Errno {seen.errno}]"
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (or an exception in its chain) is a full disk or an exhausted quota."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hash_arrays(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 over the shapes, dtypes and bytes of `arrays`."""
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.data)
    return h.hexdigest()
