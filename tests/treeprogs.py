"""Launcher-chain programs for the follow tests: tests/fixtures/tree_writer.c, talked to over a Unix socket.

Each program connects to the test's socket as soon as it starts and says who it is, so the
test reaches every program of a chain (exec'd, forked, vforked) without holding its stdio.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import writewatch
from targets import PAGE, build_c


@dataclass
class Program:
    """One connected program: its tag, pid and private buffer."""

    tag: str
    pid: int
    base: int
    n_pages: int
    conn: socket.socket
    reader: object = field(repr=False)
    written: set[int] = field(default_factory=set)

    @property
    def end(self) -> int:
        """End of the buffer."""
        return self.base + self.n_pages * PAGE

    def command(self, line: str) -> str:
        """Send one command and return its answer line."""
        self.conn.sendall(line.encode() + b"\n")
        answer = self.reader.readline().decode().strip()  # type: ignore[attr-defined]
        assert answer.startswith("ok"), f"{self.tag}: {line!r} -> {answer!r}"
        return answer

    def send(self, line: str) -> None:
        """Send a command that has no answer (exec)."""
        self.conn.sendall(line.encode() + b"\n")

    def write(self, first: int, n_pages: int = 1) -> None:
        """Store into pages ``first .. first + n_pages - 1`` of the buffer."""
        self.command(f"w {first} {n_pages}")
        self.written.update(range(first, first + n_pages))

    def memory(self) -> bytes:
        """The buffer's bytes, read through /proc/PID/mem."""
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(self.base)
            return mem.read(self.n_pages * PAGE)


class Programs:
    """The test's socket; every program that connects is queued under its tag."""

    def __init__(self, directory: Path) -> None:
        self.binary = build_c("tree_writer")
        self.path = str(directory / "progs.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(64)
        self._arrived: queue.Queue[Program] = queue.Queue()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.all: list[Program] = []

    def argv(self, tag: str) -> list[str]:
        """The command line of a program announcing itself as ``tag``."""
        return [str(self.binary), tag, self.path]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            reader = conn.makefile("rb")
            words = reader.readline().decode().split()
            if len(words) != 5 or words[0] != "hello":
                conn.close()
                continue
            program = Program(words[1], int(words[2]), int(words[3], 16), int(words[4]), conn, reader)
            self._arrived.put(program)

    def wait(self, tag: str, timeout_s: float = 20.0) -> Program:
        """The next program that says hello as ``tag`` (others are kept for later waits)."""
        deadline = time.monotonic() + timeout_s
        for program in self.all:
            if program.tag == tag and not getattr(program, "_taken", False):
                program._taken = True  # type: ignore[attr-defined]
                return program
        while True:
            program = self._arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            self.all.append(program)
            if program.tag == tag:
                program._taken = True  # type: ignore[attr-defined]
                return program

    def close(self) -> None:
        """Close the socket and every connection; kill programs still alive."""
        self._server.close()
        self._thread.join(5)
        while not self._arrived.empty():
            self.all.append(self._arrived.get())
        for program in self.all:
            program.reader.close()  # type: ignore[attr-defined]  # it holds the socket's fd too
            program.conn.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(program.pid, 9)


def pages_in(regions: np.ndarray, program: Program) -> set[int]:
    """The pages of ``program``'s buffer inside ``regions`` ((n, 2) uint64 [start, end))."""
    pages: set[int] = set()
    for start, end in regions.tolist():
        lo, hi = max(start, program.base), min(end, program.end)
        pages.update(range((lo - program.base) // PAGE, (hi - program.base + PAGE - 1) // PAGE) if lo < hi else ())
    return pages


def changed_pages(before: bytes, after: bytes) -> set[int]:
    """Pages whose bytes differ."""
    return {
        i for i in range(len(before) // PAGE) if before[i * PAGE : (i + 1) * PAGE] != after[i * PAGE : (i + 1) * PAGE]
    }


def wait_until(predicate: object, timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``predicate()`` until true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def session_of(client: writewatch.Client, pid: int) -> writewatch.Session:
    """The active session tracking ``pid``."""
    matches = [s for s in client.sessions() if s.snapshot.pid == pid]
    assert len(matches) == 1, [s.snapshot for s in matches]
    return matches[0]
