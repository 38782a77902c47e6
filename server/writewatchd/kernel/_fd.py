"""One owned file descriptor: closed once, by :meth:`OwnedFd.close`, a ``with`` block, or collection."""

from __future__ import annotations

import os
from typing import Self

__all__ = ["OwnedFd"]


class OwnedFd:
    """Base of the kernel objects that own one fd (``self._fd``, -1 once closed)."""

    _fd: int = -1

    def fileno(self) -> int:
        """The file descriptor."""
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have failed before the fd was set.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
