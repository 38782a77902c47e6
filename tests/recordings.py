"""Helpers of the recording tests: the writewatch CLI as a user runs it, a recorder in the background."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import writewatch
from targets import CoopTarget

WRITEWATCH = str(Path(sys.executable).parent / "writewatch")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The writewatch command, as a user runs it."""
    return subprocess.run([WRITEWATCH, *args], capture_output=True, text=True, timeout=60, check=False)


def attach(
    client: writewatch.Client, target: CoopTarget, ranges: list[tuple[int, int]] | None = None, tick_ms: int = 10
) -> writewatch.Session:
    """Track the target cooperatively; returns once the first delta (new ranges, all written) is out.

    Every range is scanned every tick (``max_staleness_ms=0``): the recording tests time their
    writes against ticks, and a cold range's write may otherwise arrive up to a second later.
    """
    session = client.attach(
        target.pid,
        ranges=ranges or [(target.base, target.end)],
        uffd_fd=target.uffd_fd,
        tick_interval_ms=tick_ms,
        max_staleness_ms=0,
    )
    deadline = time.monotonic() + 10
    while session.info().last_seq < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return session


def start_recorder(address: str, session_id: str, path: Path, *args: str) -> subprocess.Popen[str]:
    """``writewatch record`` in the background; returns once the file has its header."""
    recorder = subprocess.Popen(
        [WRITEWATCH, "--address", address, "record", session_id, "-o", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:  # the header is written before the recorder subscribes
        try:
            writewatch.read_recording(path)
            return recorder
        except (OSError, writewatch.RecordingError):
            assert recorder.poll() is None, recorder.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
