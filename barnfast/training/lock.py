"""One process per output folder: an advisory ``fcntl.flock`` on ``<output-dir>/.lock``.

Two trainings (or sweeps) on one ``--output-dir`` delete each other's temporary checkpoints and
interleave ``metrics.jsonl``. The second one is refused at start with the pid of the holder.

``flock`` is tied to the open file, so the kernel drops the lock when the holder exits for any
reason (SIGKILL included): a stale ``.lock`` file never blocks a restart, and the file is never
deleted (deleting it would let a third process lock a new inode while the second still holds the
old one). Not every network filesystem honours ``flock`` (NFSv3 without ``local_lock``, some
FUSE mounts): there the lock is best effort.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class OutputDirLockedError(RuntimeError):
    """Another process holds the output folder's lock; the message names its pid."""


class OutputDirLock:
    """Holds ``<folder>/.lock`` from :meth:`acquire` until :meth:`release` (or garbage collection, or exit).

    ``with OutputDirLock(folder, "barnfast train"):`` acquires and releases around a block.
    """

    def __init__(self, folder: str | Path, what: str = "barnfast"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirLockedError(
                f"{self.folder} is in use by another process ({holder}); two runs on one output folder overwrite "
                f"each other's checkpoints and logs. Wait for it to finish, stop it, or use another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.what}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
