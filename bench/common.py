"""Shared helpers of the benchmarks: statistics, sections, C fixtures, daemon and targets.

Every benchmark module exposes ``run(quick: bool) -> Section``; ``bench/run.py`` renders the
sections into RESULTS.md. Ratios are always taken against a baseline measured in the same
run, in interleaved rounds (:func:`interleaved`), because the machine is a shared, noisy VM.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from writewatchd.kernel.procfs import read_stat

REPO = Path(__file__).resolve().parent.parent
# The target header parser is shared with the tests, whose C fixtures bench/ uses too.
sys.path.insert(0, str(REPO / "tests"))
from targetheader import TargetHeader  # noqa: E402

BENCH = REPO / "bench"
FIXTURES = BENCH / "fixtures"
BIN = BENCH / "bin"
VENV_BIN = Path(sys.executable).parent
# Every bench daemon accepts this admin token (over TCP every call needs an identity), and every
# client of the run, in worker processes too, finds it with plaintext TCP in the default profile
# of a client config made once per run (workers inherit the environment).
BENCH_TOKEN = os.environ.setdefault("WRITEWATCH_BENCH_TOKEN", secrets.token_urlsafe(24))
if "WRITEWATCH_BENCH_CONFIG" not in os.environ:
    _client_dir = tempfile.mkdtemp(prefix="ww-bench-client-")
    atexit.register(shutil.rmtree, _client_dir, ignore_errors=True)
    _client_config = Path(_client_dir) / "config.toml"
    _client_config.write_text(
        f'default_profile = "bench"\n[profiles.bench]\ninsecure = true\ntoken = "{BENCH_TOKEN}"\n'
    )
    os.environ["WRITEWATCH_BENCH_CONFIG"] = str(_client_config)
os.environ["WRITEWATCH_CONFIG"] = os.environ["WRITEWATCH_BENCH_CONFIG"]
_BENCH_TOKENS = json.dumps(
    [{"name": "bench", "sha256": hashlib.sha256(BENCH_TOKEN.encode()).hexdigest(), "role": "admin"}]
)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------------
# Statistics and report sections


@dataclass(frozen=True, slots=True)
class Stats:
    """Median with min and max of a list of samples."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        """Summarise ``samples`` (at least one)."""
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def fmt(self, digits: int = 2, scale: float = 1.0) -> str:
        """``median (min-max)``, each divided by ``scale``."""
        m, lo, hi = self.median / scale, self.low / scale, self.high / scale
        return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio_stats(candidate: Sequence[float], baseline: Sequence[float]) -> Stats:
    """Per-round ratios candidate/baseline of paired, interleaved samples."""
    return Stats.of([c / b for c, b in zip(candidate, baseline, strict=True) if b > 0])


@dataclass(slots=True)
class Section:
    """One section of RESULTS.md: goal, table of figures, verdicts and the evidence."""

    title: str
    goal: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a table row."""
        self.rows.append([str(c) for c in cells])

    def verdict(self, what: str, met: bool, why: str = "") -> None:
        """Record a goal as met or missed, with the reason for a miss."""
        self.verdicts.append(f"**{'met' if met else 'missed'}**: {what}" + (f" — {why}" if why else ""))

    def markdown(self) -> str:
        """The section as Markdown."""
        lines = [f"## {self.title}", "", f"Goal: {self.goal}", ""]
        if self.rows:
            lines.append("| " + " | ".join(self.header) + " |")
            lines.append("|" + "---|" * len(self.header))
            lines.extend("| " + " | ".join(row) + " |" for row in self.rows)
            lines.append("")
        lines.extend(f"- {v}" for v in self.verdicts)
        if self.verdicts:
            lines.append("")
        lines.extend(self.evidence)
        if self.evidence:
            lines.append("")
        return "\n".join(lines)


def interleaved(rounds: int, candidates: Sequence[Callable[[], float]]) -> list[list[float]]:
    """Run each candidate once per round, rotating the order each round; samples per candidate."""
    samples: list[list[float]] = [[] for _ in candidates]
    for r in range(rounds):
        for k in range(len(candidates)):
            index = (r + k) % len(candidates)
            samples[index].append(candidates[index]())
    return samples


def machine_lines() -> list[str]:
    """The machine description lines of RESULTS.md."""
    info = machine()
    mem_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return [
        f"- CPUs (`nproc`): {info['nproc']}, model: {info['cpu']}, THP: {info['thp']}",
        f"- kernel (`uname -r`): {info['kernel']}",
        f"- RAM: {mem_kib / (1 << 20):.1f} GiB",
        f"- Python {info['python']}, numpy {info['numpy']}, commit {info['commit']}",
        f"- date: {info['date']}",
    ]


# ---------------------------------------------------------------------------------------
# Processes


def build(name: str) -> Path:
    """Compile bench/fixtures/NAME.c into bench/bin/NAME when the source (or a shared header) is newer."""
    source = FIXTURES / f"{name}.c"
    binary = BIN / name
    newest_s = max(path.stat().st_mtime for path in [source, *FIXTURES.glob("*.h")])
    if not binary.exists() or binary.stat().st_mtime < newest_s:
        BIN.mkdir(exist_ok=True)
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(source), "-lpthread"], check=True)
        tmp.rename(binary)
    return binary


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    stat = read_stat(pid)
    return (stat.utime_ticks + stat.stime_ticks) / CLOCK_TICKS_PER_S


def rss_bytes(pid: int) -> int:
    """VmRSS of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Target:
    """bench/fixtures/target.c: a cooperative target that writes pages on command."""

    exit_timeout_s = 5.0

    def __init__(self, n_pages: int, populate: str = "read", *, argv: list[str] | None = None) -> None:
        """Start the target (``argv``: another fixture speaking the same header and commands)."""
        if argv is None:
            argv = [str(build("target")), str(n_pages), populate]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        header = TargetHeader.parse(self.proc.stdout.readline())
        self.pid = header.pid
        self.uffd_fd = header.uffd_fd
        self.base = header.base
        self.n_pages = header.n_pages
        self.end = self.base + self.n_pages * PAGE_SIZE

    def send(self, line: str) -> None:
        """Send a command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> list[str]:
        """The fields after "ok" of the next answer."""
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        if not words or words[0] != "ok":
            raise RuntimeError(f"target {self.pid} answered {words!r}")
        return words[1:]

    def command(self, line: str) -> list[str]:
        """Send one command and return its answer fields."""
        self.send(line)
        return self.answer()

    def close(self) -> None:
        """Ask the target to exit, kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("x")
            try:
                self.proc.wait(self.exit_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_tcp_port() -> int:
    """A loopback TCP port that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A ``writewatchd serve`` subprocess on a private Unix socket (or loopback TCP)."""

    def __init__(self, *, tcp: bool = False, **settings: object) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ww-bench-"))
        env = dict(os.environ)
        env.update({f"WRITEWATCHD_{k.upper()}": str(v) for k, v in settings.items()})
        env["WRITEWATCHD_TOKENS"] = _BENCH_TOKENS
        if tcp:
            env["WRITEWATCHD_INSECURE_TCP"] = "1"
            port = free_tcp_port()
            listen = f"tcp:127.0.0.1:{port}"
            self.address = f"127.0.0.1:{port}"
        else:
            listen = f"unix:{self.tmp / 'd.sock'}"
            self.address = listen
        self.log = open(self.tmp / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "writewatchd"),
                "serve",
                "--listen",
                listen,
                "--state-dir",
                str(self.tmp / "state"),
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # Its own session: a signal meant for the runner's terminal or process group
            # (Ctrl-C, a job-control cleanup) must not stop the daemon in mid-measurement.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        from writewatch import Client

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"writewatchd exited: {(self.tmp / 'daemon.log').read_text()}")
            try:
                with Client(self.address, timeout_s=1.0) as client:
                    client.capabilities()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def client(self, timeout_s: float = 120.0) -> object:
        """A new blocking client of this daemon."""
        from writewatch import Client

        return Client(self.address, timeout_s=timeout_s)

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; removes the temporary directory."""
        if self.proc.poll() is not None:
            # Died on its own: keep the evidence on stderr before the directory goes.
            self.log.flush()
            tail = (self.tmp / "daemon.log").read_text()[-4000:]
            print(f"writewatchd exited with {self.proc.returncode}; its log ends:\n{tail}", file=sys.stderr)
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def targets(n: int, n_pages: int, populate: str = "read") -> Iterator[list[Target]]:
    """``n`` targets, all closed on exit."""
    started: list[Target] = []
    try:
        for _ in range(n):
            started.append(Target(n_pages, populate))
        yield started
    finally:
        for target in started:
            target.close()


# ---------------------------------------------------------------------------------------
# The bare-kernel baseline: PAGEMAP_SCAN through ctypes, nothing else

_PAGEMAP_SCAN = 0xC0606610
_WRITTEN = 1 << 1
_WP_MATCHING_CHECK_WPASYNC = 0x3
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class BareScan:
    """The floor: the kernel's fast-path WP scan of ``/proc/PID/pagemap`` into one big buffer.

    The buffer holds ``capacity_regions`` so that one ioctl covers the whole range; the loop
    only exists for the safe completion rule (docs/kernel.md §5.1).
    """

    def __init__(self, pid: int, capacity_regions: int) -> None:
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.vec: npt.NDArray[np.uint64] = np.zeros((capacity_regions, 3), dtype=np.uint64)
        self.arg: npt.NDArray[np.uint64] = np.zeros(12, dtype=np.uint64)
        self.arg[0] = 96
        self.arg[1] = _WP_MATCHING_CHECK_WPASYNC
        self.arg[5] = self.vec.ctypes.data
        self.arg[6] = capacity_regions
        self.arg[9] = self.arg[11] = _WRITTEN

    def harvest(self, start: int, end: int) -> int:
        """Report and re-protect the written pages of ``[start, end)``; returns the region count."""
        total = 0
        position = start
        capacity = len(self.vec)
        arg_pointer = self.arg.ctypes.data
        while position < end:
            self.arg[2] = position
            self.arg[3] = end
            n = _libc.ioctl(self.fd, _PAGEMAP_SCAN, arg_pointer)
            if n < 0:
                raise OSError(ctypes.get_errno(), "PAGEMAP_SCAN")
            total += n
            if n < capacity:
                break
            position = max(int(self.arg[4]), int(self.vec[-1, 1]))
        return total

    def close(self) -> None:
        """Close the pagemap fd."""
        os.close(self.fd)


def timed_ns(func: Callable[[], object]) -> int:
    """Wall time of one call, in nanoseconds."""
    started_ns = time.perf_counter_ns()
    func()
    return time.perf_counter_ns() - started_ns


# ---------------------------------------------------------------------------------------
# In-process memory

_MAP_PRIVATE_ANONYMOUS_NORESERVE = 0x02 | 0x20 | 0x4000
_PROT_READ_WRITE = 0x1 | 0x2
_MADV_NOHUGEPAGE = 15
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class AnonMemory:
    """A private anonymous ``MAP_NORESERVE`` mapping with ``MADV_NOHUGEPAGE``, viewed as bytes."""

    def __init__(self, length_bytes: int) -> None:
        addr = _libc.mmap(None, length_bytes, _PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS_NORESERVE, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.addr = int(addr)
        self.length_bytes = length_bytes
        self.n_pages = length_bytes // PAGE_SIZE
        _libc.madvise(self.addr, length_bytes, _MADV_NOHUGEPAGE)
        buffer = (ctypes.c_uint8 * length_bytes).from_address(self.addr)
        self.bytes: npt.NDArray[np.uint8] = np.ctypeslib.as_array(buffer)

    def populate(self, how: str) -> None:
        """``read``: map the zero page everywhere (RSS stays small); ``write``: private pages."""
        first_bytes = self.bytes[::PAGE_SIZE]
        if how == "read":
            int(first_bytes.sum())
        elif how == "write":
            first_bytes[:] = 1
        else:
            raise ValueError(f"populate by read or write, not {how!r}")

    def dirty(self, offsets: npt.NDArray[np.int64], value: int) -> None:
        """Store ``value`` at each byte offset (numpy fancy indexing: no Python loop)."""
        self.bytes[offsets] = value

    def close(self) -> None:
        """Unmap."""
        if self.addr:
            del self.bytes
            _libc.munmap(self.addr, self.length_bytes)
            self.addr = 0


def hashed_pages(n_pages: int, percent: float, seed: int = 0) -> npt.NDArray[np.int64]:
    """Sorted page indices chosen by a hash (splitmix64), ``percent`` of ``n_pages``, as in docs/kernel.md §4.2.

    The same hash as bench/fixtures/target.c's ``h`` command, so both pick the same pages.
    """
    x = np.arange(n_pages, dtype=np.uint64) ^ np.uint64(seed << 40)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return np.flatnonzero(x % np.uint64(1_000_000) < np.uint64(round(percent * 10_000))).astype(np.int64)


def machine() -> dict[str, str]:
    """The machine and software a result was measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    thp = "unknown"
    with contextlib.suppress(OSError):
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "thp": thp,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "commit": commit.stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
