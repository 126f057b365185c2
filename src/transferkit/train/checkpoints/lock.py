"""One writer per checkpoint directory: an exclusive `flock` on `<root>/.lock`.

An OS lock, not a PID file: a SIGKILLed holder leaves no stale lock behind. The PID written into
the file only names the holder in the error message a second writer gets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from transferkit._utils.files import os_reason
from transferkit.errors import CheckpointError

if sys.platform != "win32":
    import fcntl

__all__ = ["LOCK", "Lock"]

LOCK = ".lock"


class Lock:
    """An exclusive `flock` on `<root>/.lock`: held until `release`, or until the process dies.

    Use `Lock.acquire`; the constructor takes no lock.
    """

    def __init__(self, root: Path, fd: int | None) -> None:
        self.root = root
        self._fd = fd

    @classmethod
    def acquire(cls, root: Path) -> Lock:
        """Locks the existing directory `root`, without waiting.

        Args:
            root: the checkpoint directory.

        Returns:
            The held lock; one that holds nothing on Windows (no `flock`) and where the lock
            file cannot be created because nobody may write there.

        Raises:
            CheckpointError: another process (or thread) holds the lock, or the lock file cannot
                be opened or locked.
        """
        if sys.platform == "win32":  # No flock; one writer per directory is not enforced.
            return cls(root, None)
        file = root / LOCK
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
