"""Real target processes for tests: C fixtures built on demand, and the cooperative target."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from targetheader import TargetHeader

PAGE = 4096
# A tick interval for sessions whose tests compare on-demand harvests exactly: no tick
# harvest may take the pages first.
NO_TICKS_MS = 3_600_000
FIXTURES = Path(__file__).parent / "fixtures"
BIN = FIXTURES / "bin"


def build_c(name: str, *extra_flags: str) -> Path:
    """Compile tests/fixtures/NAME.c once per source change; returns the binary path."""
    source = FIXTURES / f"{name}.c"
    binary = BIN / name
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BIN.mkdir(exist_ok=True)
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(
            ["gcc", "-O2", "-g", "-Wall", "-o", str(tmp), str(source), "-lpthread", *extra_flags], check=True
        )
        tmp.rename(binary)
    return binary


class CoopTarget:
    """tests/fixtures/coop_target.c: creates its own userfaultfd and writes pages on command."""

    def __init__(self, n_pages: int = 256, *, binary: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(binary or build_c("coop_target")), str(n_pages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        header = TargetHeader.parse(self.proc.stdout.readline())
        self.pid = header.pid
        self.uffd_fd = header.uffd_fd
        self.base = header.base
        self.n_pages = header.n_pages
        self.end = self.base + self.n_pages * PAGE

    def command(self, line: str) -> str:
        """Send one command and return its answer line."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer.startswith("ok"), f"{line!r} -> {answer!r}"
        return answer

    def write(self, page: int, n_pages: int = 1) -> None:
        """User-mode stores into pages ``page .. page + n_pages - 1``."""
        self.command(f"w {page} {n_pages}")

    def stride_write(self, page: int, n_pages: int, stride_pages: int) -> set[int]:
        """User-mode stores into ``n_pages`` pages from ``page``, every ``stride_pages``-th; returns them."""
        self.command(f"s {page} {n_pages} {stride_pages}")
        return {p for p in range(page, page + n_pages * stride_pages, stride_pages) if p < self.n_pages}

    def kernel_write(self, page: int) -> None:
        """A kernel-mode write (read() from /dev/zero) into ``page``."""
        self.command(f"k {page}")

    def read(self, page: int) -> None:
        """A plain read of ``page``."""
        self.command(f"r {page}")

    def random_writes(self, seed: int, n_writes: int) -> set[int]:
        """``n_writes`` pseudo-random user- and kernel-mode writes; returns the pages written."""
        return {int(p) for p in self.command(f"rand {seed} {n_writes}").split()[1:]}

    def pages(self, regions: np.ndarray) -> set[int]:
        """Page indices (relative to the buffer) inside byte-address ``regions``."""
        return {
            (address - self.base) // PAGE
            for start, end in regions.tolist()
            for address in range(start, end, PAGE)
            if self.base <= address < self.end
        }

    def exit(self) -> None:
        """Ask the target to exit and reap it."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("x\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(5)

    def kill(self) -> None:
        """Kill and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@contextlib.contextmanager
def traced_by_another_process(pid: int) -> Iterator[int]:
    """Hold ``pid`` seized by a tracer process (so injection is refused); yields the tracer's pid."""
    code = (
        "import sys, time\n"
        "from writewatchd.kernel.ptrace import seize\n"
        "seize(int(sys.argv[1]))\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)\n"
    )
    tracer = subprocess.Popen([sys.executable, "-c", code, str(pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout is not None and tracer.stdout.readline().strip() == "ok"
        yield tracer.pid
    finally:
        tracer.kill()
        tracer.wait()
