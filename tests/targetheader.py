"""The first line a cooperative target prints, shared by the tests and bench/.

``tests/fixtures/coop_target.c`` and ``bench/fixtures/target.c`` both announce themselves
with ``pid=N uffd=FD base=0xADDR pages=N`` before taking commands. bench/ imports this module
from here (``bench/common.py`` puts ``tests/`` on its path), as it takes C fixtures from
``tests/fixtures``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TargetHeader"]


@dataclass(frozen=True, slots=True)
class TargetHeader:
    """Who the target is and where its tracked buffer lies (``n_pages`` pages from ``base``)."""

    pid: int
    uffd_fd: int
    base: int
    n_pages: int

    @classmethod
    def parse(cls, line: str) -> TargetHeader:
        """Parse the header line (``key=value`` words; ``base`` in hex)."""
        fields = dict(word.split("=", 1) for word in line.split())
        return cls(int(fields["pid"]), int(fields["uffd"]), int(fields["base"], 16), int(fields["pages"]))
