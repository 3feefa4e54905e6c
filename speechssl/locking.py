"""An exclusive lock on an output folder, held for a job's life.

Two jobs writing into one run folder (or one extraction or shard folder) overwrite each other's
checkpoints and double each other's log lines. ``FolderLock`` takes an ``fcntl.flock`` on
``FOLDER/.lock``: the kernel releases it when the process exits, however it exits (``kill -9``
included), so a lock file left behind by a dead job is stale by construction and is simply taken
over. The file records the holder's host and pid for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder, "the run folder"):`` or ``lock = FolderLock(...).acquire()``.

    Raises :class:`FolderLocked` naming the holder when another process has the folder.
    """

    def __init__(self, folder: str | Path, what: str = "the folder"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderLocked(f"{self.folder} is in use by {holder}: {self.what} takes one job at a time "
                               "(wait for that job to end, or choose another folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
