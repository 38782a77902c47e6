"""One daemon per state dir: an exclusive ``flock`` held for the daemon's whole life.

The kernel drops the lock when the holder dies, however it dies, so a daemon killed with
``kill -9`` can be restarted at once and re-adopt its sessions; a second daemon started
while the first runs is refused before it opens (or changes) anything in the state dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .._exceptions import WriteWatchError

__all__ = ["LOCK_FILE_NAME", "StateDirBusy", "StateDirLock"]

LOCK_FILE_NAME = "writewatchd.lock"


class StateDirBusy(WriteWatchError):
    """Another running daemon owns the state dir."""


class StateDirLock:
    """The exclusive lock of one state dir; the owner's pid is written into the lock file."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE_NAME
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StateDirBusy` naming the owner (nothing is changed then)."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_CLOEXEC: a spawned target or helper process must never inherit (and outlive us with) the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # EWOULDBLOCK: another process holds the lock.
            owner = _read_owner(fd)
            os.close(fd)
            raise StateDirBusy(
                f"the state dir {self.state_dir} is owned by another running writewatchd "
                f"(pid {owner or 'unknown'}); stop it, or start this one with --state-dir "
                "DIR (or WRITEWATCHD_STATE_DIR) naming another directory"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the kernel also does when the process dies)."""
        if self._fd < 0:
            return
        # The pid goes first: a reader that finds the file unlocked must not name a stale owner.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = -1


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    return ""
