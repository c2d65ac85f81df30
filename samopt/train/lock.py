"""One writer per output directory: an exclusive lock held for the life of a run or a comparison.

``samopt train``, ``samopt glue`` and ``samopt compare`` write checkpoints, metrics and
tables into their ``--out``; two processes writing one directory would interleave
their metrics and overwrite each other's checkpoints. :class:`DirectoryLock` takes an
exclusive ``fcntl.flock`` on ``<directory>/samopt.lock`` and writes the holder's process
id into it. The kernel releases the lock when the process ends, however it ends
(``kill -9`` included), so a crashed run never blocks its own resume; a second writer
meanwhile gets a :class:`DirectoryInUseError` naming the holder's process id.

Example::

    with DirectoryLock(Path("runs/sam")):
        ...  # the only samopt process writing into runs/sam
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "DirectoryInUseError", "DirectoryLock"]

#: The lock file in a locked directory; it holds the process id of the holder.
LOCK_NAME = "samopt.lock"


class DirectoryInUseError(RuntimeError):
    """Another samopt process holds the lock of the directory."""


class DirectoryLock:
    """An exclusive lock on ``directory`` (created if missing) for this process; see the module docstring.

    Released by :meth:`release` (or leaving the ``with`` block): the lock file is removed,
    and so is the directory if this lock created it and nothing else was written there.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DirectoryInUseError` at once if another process holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lock")
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            warnings.warn(
                f"{self.directory} is not locked: this platform has no fcntl; run one samopt process per --out",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").split("\n")[0].strip() or "unknown"
                os.close(fd)
                raise DirectoryInUseError(
                    f"{self.directory} is in use by another samopt process (pid {holder}); wait for it to finish or "
                    "stop it (Ctrl-C or kill saves its checkpoint), or use another --out"
                ) from None
            try:  # a previous holder may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{' '.join(sys.argv)}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (a no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no one else can hold this file now
            os.close(fd)
        if self._created:
            self._created = False
            with contextlib.suppress(OSError):  # only if empty: a run that failed before writing anything
                self.directory.rmdir()

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
