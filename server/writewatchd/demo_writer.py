"""The demo's target: a process that writes memory in a recognisable pattern.

It keeps a 64 MiB buffer and, every millisecond, rewrites a hot 1 MiB stretch and a few
random pages elsewhere, so a live view shows steady rates and one obviously busiest range.
"""

from __future__ import annotations

import argparse
import mmap
import random
import time

_PAGE = 4096


def main() -> None:
    """Write for ``--seconds`` seconds, then exit 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    size_bytes = args.size_mib << 20
    # Private, like heap memory: auto tracking covers private writable mappings.
    buffer = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    hot_start = size_bytes // 4
    n_pages = size_bytes // _PAGE
    rng = random.Random(1)
    deadline_s = time.monotonic() + args.seconds
    tick = 0
    while time.monotonic() < deadline_s:
        tick += 1
        for offset in range(hot_start, hot_start + (1 << 20), _PAGE):
            buffer[offset] = tick & 0xFF
        for _ in range(32):
            buffer[rng.randrange(n_pages) * _PAGE] = tick & 0xFF
        time.sleep(0.001)


if __name__ == "__main__":
    main()
