"""Single-syscall injection against real processes that the test did not start as children.

Targets are launched with ``setsid -f`` (so they are re-parented away from us) and speak a
line protocol on stdin/stdout (tests/fixtures/inject_target.c). After each injection the
test itself drives the stolen userfaultfd and compares PAGEMAP_SCAN with what the target
reports writing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from targets import CoopTarget, traced_by_another_process
from writewatchd import AccessDenied, FeatureUnavailable, InjectionRefused, ProcessGone
from writewatchd.kernel._libc import syscall
from writewatchd.kernel.inject import InjectionResult, _window, attach, inject_userfaultfd
from writewatchd.kernel.inject import helper as inject_helper
from writewatchd.kernel.pagemap import PAGE_SIZE, PagemapScanner
from writewatchd.kernel.uffd import Userfaultfd, is_userfaultfd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="injection tests trace foreign processes: run as root"),
    # Every test runs with each implementation of the stop window (conftest.window).
    pytest.mark.usefixtures("window"),
]

FIXTURES = Path(__file__).parent.parent / "fixtures"
NOBODY = 65534

# x86_64 syscall numbers the targets block in.
NR_READ, NR_NANOSLEEP, NR_FUTEX, NR_RESTART_SYSCALL, NR_TGKILL, NR_EPOLL_WAIT = 0, 35, 202, 219, 234, 232


class Target:
    """A target process re-parented away from the test (``setsid -f``), driven over pipes."""

    def __init__(self, argv: list[str], *, user: int | None = None) -> None:
        launcher = subprocess.Popen(
            ["setsid", "-f", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
        assert launcher.stdin is not None and launcher.stdout is not None
        launcher.wait(10)
        self._stdin = launcher.stdin
        self._stdout = launcher.stdout
        self._pending = b""
        self.tids: dict[str, int] = {}
        self.pid = 0
        self.start = 0
        self.n_pages = 0
        while (line := self.readline()) != "ready":
            fields = line.split()
            if fields[0] == "pid":
                self.pid = int(fields[1])
            elif fields[0] == "region":
                self.start, self.n_pages = int(fields[1], 16), int(fields[2])
            elif fields[0] == "tid":
                self.tids[fields[1]] = int(fields[2])

    @property
    def end(self) -> int:
        return self.start + self.n_pages * PAGE_SIZE

    def readline(self, timeout_s: float = 10.0) -> str:
        deadline = time.monotonic() + timeout_s
        fd = self._stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"target {self.pid} did not answer; has: {self._pending!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"target {self.pid} closed its output")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def command(self, text: str) -> str:
        self._stdin.write(text.encode() + b"\n")
        self._stdin.flush()
        return self.readline()

    def write_pages(self, pages: Iterable[int]) -> None:
        assert self.command("w " + " ".join(str(p) for p in pages)) == "ok"

    def stats(self) -> dict[str, int]:
        reply = self.command("s").split()
        assert reply[0] == "stats", reply
        return {key: int(value) for key, value in (field.split("=") for field in reply[1:])}

    def state(self) -> str:
        """The process state letter, "" once it is gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return ""
        return stat[stat.rindex(")") + 2]

    def tracer(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
        return 0

    def thread_syscall(self, tid: int) -> str:
        return Path(f"/proc/{self.pid}/task/{tid}/syscall").read_text().split()[0]

    def uffds(self) -> list[int]:
        return [int(fd) for fd in os.listdir(f"/proc/{self.pid}/fd") if is_userfaultfd(self.pid, int(fd))]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._stdin.close()
        self._stdout.close()


@pytest.fixture
def launch(c_program: Callable[[str], Path]) -> Iterator[Callable[..., Target]]:
    """Start targets: ``launch("--threads=busy")`` for the C target, ``launch(python=True)``."""
    binary = c_program("inject_target")
    started: list[Target] = []

    def start(*options: str, python: bool = False, user: int | None = None) -> Target:
        argv = [sys.executable, str(FIXTURES / "inject_target.py")] if python else [str(binary), *options]
        target = Target(argv, user=user)
        started.append(target)
        return target

    yield start
    for target in started:
        target.kill()


def pages_of(regions: npt.NDArray[np.uint64], start: int) -> set[int]:
    pages: set[int] = set()
    for region_start, region_end in regions.tolist():
        pages.update(range((region_start - start) // PAGE_SIZE, (region_end - start) // PAGE_SIZE))
    return pages


def assert_tracks_exactly(target: Target, uffd: Userfaultfd, *, rounds: int = 3) -> None:
    """Register the target's region with the stolen uffd; every harvest equals what it wrote."""
    uffd.api()
    length_bytes = target.end - target.start
    uffd.register(target.start, length_bytes)
    uffd.write_protect(target.start, length_bytes)
    rng = random.Random(target.pid)
    with PagemapScanner(target.pid) as scanner:
        assert pages_of(scanner.harvest(target.start, target.end), target.start) == set()
        for _ in range(rounds):
            pages = set(rng.sample(range(target.n_pages), 7))
            target.write_pages(sorted(pages))
            assert pages_of(scanner.harvest(target.start, target.end), target.start) == pages
        assert pages_of(scanner.harvest(target.start, target.end), target.start) == set()


def assert_unharmed(target: Target) -> None:
    """Running, untraced, no EINTR seen, checksums intact, and no userfaultfd left behind."""
    assert target.state() not in ("", "Z", "X", "T", "t")
    assert target.tracer() == 0
    stats = target.stats()
    assert stats["eintr"] == 0
    assert stats["bad"] == 0
    assert target.uffds() == []


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


# --------------------------------------------------------------------------- success paths


def test_single_threaded_target_blocked_in_read(launch: Callable[..., Target], window: str) -> None:
    target = launch()
    result = inject_userfaultfd(target.pid)
    with result.uffd:
        assert result.window == window
        assert result.tid == target.pid
        assert result.uffd.owner_pid == target.pid
        assert 0 < result.stop_ns < 10**9
        assert_tracks_exactly(target, result.uffd)
        # A kernel-mode write (read(2) into the page) is tracked too.
        with PagemapScanner(target.pid) as scanner:
            assert target.command("k 5") == "ok"
            assert pages_of(scanner.harvest(target.start, target.end), target.start) == {5}
    assert_unharmed(target)
    wait_for(lambda: target.thread_syscall(target.pid) == str(NR_READ))


def test_python_target(launch: Callable[..., Target]) -> None:
    target = launch(python=True)
    result = inject_userfaultfd(target.pid)
    with result.uffd:
        assert result.tid == target.pid
        assert_tracks_exactly(target, result.uffd)
    assert target.tracer() == 0
    assert target.uffds() == []


@pytest.mark.parametrize(
    ("role", "blocked_in"),
    [("main", {NR_READ}), ("futex", {NR_FUTEX}), ("sleep", {NR_NANOSLEEP, NR_RESTART_SYSCALL})],
)
def test_thread_blocked_in_syscall_resumes_it(launch: Callable[..., Target], role: str, blocked_in: set[int]) -> None:
    target = launch("--threads=futex,sleep,epoll")
    tid = target.tids[role]
    result = inject_userfaultfd(target.pid, tid=tid)
    with result.uffd:
        assert result.tid == tid
        assert_tracks_exactly(target, result.uffd)
    # The interrupted syscall was restarted (nanosleep through restart_syscall), not failed.
    wait_for(lambda: target.thread_syscall(tid) in {str(nr) for nr in blocked_in})
    assert_unharmed(target)


def test_epoll_thread_is_never_chosen(launch: Callable[..., Target]) -> None:
    target = launch("--threads=epoll,busy")
    for _ in range(10):
        result = inject_userfaultfd(target.pid)
        result.uffd.close()
        assert result.tid != target.tids["epoll"]
    with pytest.raises(InjectionRefused, match="EINTR"):
        inject_userfaultfd(target.pid, tid=target.tids["epoll"], deadline_s=0.2)
    assert_unharmed(target)


def test_epoll_thread_stopped_anyway_sees_no_eintr(
    launch: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the vetting cannot close: the thread entered epoll_wait after it was chosen.
    target = launch("--threads=epoll")
    epoll = target.tids["epoll"]
    monkeypatch.setattr(inject_helper, "_TEST_UNVETTED_TID", True)
    for _ in range(5):
        result = inject_userfaultfd(target.pid, tid=epoll)
        result.uffd.close()
        assert result.tid == epoll
    # Its -EINTR was turned into a restart: epoll_wait is simply called again.
    wait_for(lambda: target.thread_syscall(epoll) == str(NR_EPOLL_WAIT))
    assert_unharmed(target)


def test_thread_busy_in_user_mode(launch: Callable[..., Target], window: str) -> None:
    target = launch("--threads=busy")
    busy = target.tids["busy"]
    loops_before = target.stats()["loops"]
    result = inject_userfaultfd(target.pid, tid=busy)
    with result.uffd:
        assert result.window == window
        assert result.tid == busy
        assert_tracks_exactly(target, result.uffd)
    wait_for(lambda: target.stats()["loops"] > loops_before + 10)
    assert_unharmed(target)


def test_200_attach_detach_cycles_on_a_busy_target(launch: Callable[..., Target]) -> None:
    target = launch("--threads=busy,futex,sleep,epoll")
    roles = ["main", "busy", "futex", "sleep"]
    stop_ns: list[int] = []
    for cycle in range(200):
        result = inject_userfaultfd(target.pid, tid=target.tids[roles[cycle % len(roles)]])
        result.uffd.close()
        stop_ns.append(result.stop_ns)
        if cycle % 50 == 0:
            assert target.stats()["bad"] == 0
    assert len(stop_ns) == 200
    assert_unharmed(target)
    final = inject_userfaultfd(target.pid)
    with final.uffd:
        assert_tracks_exactly(target, final.uffd)
    assert target.stats()["loops"] > 0


def test_signal_arriving_in_the_window_is_delivered_once(
    launch: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = launch()
    monkeypatch.setattr(inject_helper, "_TEST_PAUSE_IN_WINDOW_S", 0.3)
    results: list[InjectionResult] = []
    injector = threading.Thread(target=lambda: results.append(inject_userfaultfd(target.pid)))
    injector.start()
    wait_for(lambda: target.tracer() != 0)
    os.kill(target.pid, signal.SIGUSR1)
    injector.join(10)
    with results[0].uffd:
        assert_tracks_exactly(target, results[0].uffd)
    assert target.stats()["usr1"] == 1
    assert_unharmed(target)


def test_sigstop_in_the_window_leaves_the_target_stopped(
    launch: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = launch()
    monkeypatch.setattr(inject_helper, "_TEST_PAUSE_IN_WINDOW_S", 0.3)
    results: list[InjectionResult] = []
    injector = threading.Thread(target=lambda: results.append(inject_userfaultfd(target.pid)))
    injector.start()
    wait_for(lambda: target.tracer() != 0)
    os.kill(target.pid, signal.SIGSTOP)
    injector.join(10)
    results[0].uffd.close()
    wait_for(lambda: target.state() == "T")
    assert target.tracer() == 0
    os.kill(target.pid, signal.SIGCONT)
    assert_unharmed(target)


def test_target_killed_in_the_window_can_be_reaped_by_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child of ours (the launched targets are re-parented away): only its parent can reap it,
    # and it cannot while the helper, its tracer, has not waited for the dead thread.
    target = CoopTarget(16)
    try:
        monkeypatch.setattr(inject_helper, "_TEST_PAUSE_IN_WINDOW_S", 0.3)
        outcome: list[object] = []

        def inject() -> None:
            try:
                outcome.append(inject_userfaultfd(target.pid))
            except ProcessGone as gone:
                outcome.append(gone)

        injector = threading.Thread(target=inject)
        injector.start()
        wait_for(lambda: _tracer_of(target.pid) != 0)
        target.proc.kill()  # stopped in the window: the helper learns of it from its next ptrace call
        injector.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], ProcessGone)
        # Without the helper's wait for the dead thread this blocked for as long as the helper lived.
        assert target.proc.wait(5) == -signal.SIGKILL
    finally:
        target.kill()


def _tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def test_stopped_target_stays_stopped(launch: Callable[..., Target]) -> None:
    target = launch("--threads=futex")
    os.kill(target.pid, signal.SIGSTOP)
    wait_for(lambda: target.state() == "T")
    result = inject_userfaultfd(target.pid)
    with result.uffd:
        time.sleep(0.05)
        assert target.state() == "T"
        os.kill(target.pid, signal.SIGCONT)
        assert_tracks_exactly(target, result.uffd)
    assert_unharmed(target)


@pytest.mark.parametrize("mode", ["errno-other", "log"])
def test_seccomp_filter_that_allows_our_call(launch: Callable[..., Target], mode: str) -> None:
    # errno-other denies userfaultfd only for a flag we never pass: exact argument evaluation.
    target = launch(f"--seccomp={mode}")
    result = inject_userfaultfd(target.pid)
    with result.uffd:
        assert_tracks_exactly(target, result.uffd)
    # Again, with the verdict remembered from the first dump.
    again = inject_userfaultfd(target.pid)
    with again.uffd:
        assert_tracks_exactly(target, again.uffd)
    assert_unharmed(target)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("mode", "verdict"),
    [("errno", "ERRNO(1)"), ("trap", "TRAP(0)"), ("kill", "KILL_PROCESS"), ("errno-umo", "ERRNO(1)")],
)
def test_seccomp_filter_that_denies_is_refused(launch: Callable[..., Target], mode: str, verdict: str) -> None:
    target = launch(f"--seccomp={mode}")
    # The second refusal comes from the remembered verdict, before any stop.
    for _ in range(2):
        with pytest.raises(InjectionRefused, match=rf"seccomp filter .* answers {re.escape(verdict)} to userfaultfd"):
            inject_userfaultfd(target.pid)
    assert_unharmed(target)
    target.write_pages([1])


def test_already_traced_is_refused(launch: Callable[..., Target]) -> None:
    target = launch()
    with traced_by_another_process(target.pid) as tracer_pid:
        with pytest.raises(InjectionRefused, match=f"already traced by process {tracer_pid}"):
            inject_userfaultfd(target.pid)
        assert target.tracer() == tracer_pid
    assert_unharmed(target)


def test_thread_in_d_state_is_refused(launch: Callable[..., Target]) -> None:
    target = launch("--threads=vfork", "--vfork-seconds=3")
    vfork_tid = target.tids["vfork"]
    wait_for(lambda: Path(f"/proc/{target.pid}/task/{vfork_tid}/stat").read_text().split(") ")[1][0] == "D")
    with pytest.raises(InjectionRefused, match=r"uninterruptible sleep \(state D\)"):
        inject_userfaultfd(target.pid, tid=vfork_tid, deadline_s=0.2)
    assert_unharmed(target)


def test_thread_that_never_stops_is_released_at_the_deadline(
    launch: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skip the vetting that would refuse a D-state thread up front, to reach the stop deadline.
    target = launch("--threads=vfork", "--vfork-seconds=2")
    vfork_tid = target.tids["vfork"]
    wait_for(lambda: Path(f"/proc/{target.pid}/task/{vfork_tid}/stat").read_text().split(") ")[1][0] == "D")
    helper_before = inject_helper._helper_pid()
    monkeypatch.setattr(inject_helper, "_TEST_UNVETTED_TID", True)
    with pytest.raises(InjectionRefused, match=r"did not stop before the deadline \(state D"):
        inject_userfaultfd(target.pid, tid=vfork_tid, deadline_s=0.2)
    # The helper exited to release the thread; a fresh one serves the next request.
    assert target.tracer() == 0
    assert _gone_or_zombie(helper_before)
    # Once out of D state, the thread carries on (into its nanosleep), neither stopped nor failed.
    wait_for(lambda: target.thread_syscall(vfork_tid) in {str(NR_NANOSLEEP), str(NR_RESTART_SYSCALL)})
    assert_unharmed(target)
    assert inject_helper._helper_pid() != helper_before


def test_thread_inside_an_rseq_critical_section_keeps_its_abort(launch: Callable[..., Target]) -> None:
    target = launch("--threads=rseq")
    rseq_tid = target.tids["rseq"]
    if not rseq_tid:
        pytest.skip("glibc registered no rseq area")
    for _ in range(3):
        result = inject_userfaultfd(target.pid, tid=rseq_tid)
        result.uffd.close()
        assert result.tid == rseq_tid
    # Without the fix-up the thread would spin on with rseq_cs cleared: no abort, ever again.
    aborts = target.stats()["aborts"]
    syscall(NR_TGKILL, target.pid, rseq_tid, signal.SIGUSR1)
    wait_for(lambda: target.stats()["aborts"] > aborts)
    wait_for(lambda: target.stats()["usr1"] == 1)
    assert_unharmed(target)


def test_no_vdso_is_refused(launch: Callable[..., Target]) -> None:
    target = launch("--unmap-vdso")
    with pytest.raises(InjectionRefused, match="no vDSO"):
        inject_userfaultfd(target.pid)
    assert_unharmed(target)


def test_missing_process_is_gone() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    with pytest.raises(ProcessGone):
        inject_userfaultfd(finished.pid)


def _inject_as_nobody(pid: int, window: str) -> str:
    """Run the injection core (no helper) in a process that dropped to uid 65534.

    It imports everything as root first: the interpreter may live where uid 65534 cannot
    read (a root-owned pyenv), which would stop it from starting a helper of its own. The
    compiled window is loaded as root too (root's cache directory is not ours as 65534).
    """
    code = (
        "import ctypes, os, sys\n"
        "from writewatchd.kernel.inject import _window, attach\n"
        "_window.load()\n"
        "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        "ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: changing uid cleared it\n"
        "try:\n"
        "    request = {'pid': int(sys.argv[1]), 'deadline_s': 1.0, 'window': sys.argv[2]}\n"
        "    reply, fds = attach.inject_running(request)\n"
        "    print('ok', reply['tid'], reply['window'], os.readlink(f'/proc/self/fd/{fds[0]}'))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(pid), window], check=False, capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip() or done.stderr.strip()


def test_unprivileged_injector_into_its_own_dumpable_process(launch: Callable[..., Target], window: str) -> None:
    target = launch(user=NOBODY)
    assert _inject_as_nobody(target.pid, window) == f"ok {target.pid} {window} anon_inode:[userfaultfd]"
    assert_unharmed(target)


def test_unprivileged_injector_refuses_nondumpable_target(launch: Callable[..., Target], window: str) -> None:
    target = launch("--nondumpable", user=NOBODY)
    outcome = _inject_as_nobody(target.pid, window)
    assert outcome.startswith("InjectionRefused"), outcome
    assert "not dumpable" in outcome
    assert_unharmed(target)


def test_unprivileged_injector_is_denied_a_root_target(launch: Callable[..., Target], window: str) -> None:
    target = launch()
    outcome = _inject_as_nobody(target.pid, window)
    assert outcome.startswith("AccessDenied"), outcome
    assert_unharmed(target)
    assert issubclass(AccessDenied, OSError)


# --------------------------------------------------------------------------- death inside the window

_DAEMON = """
import sys
from writewatchd.kernel.inject import helper
helper._TEST_PAUSE_IN_WINDOW_S = 1.5
helper.DEFAULT_WINDOW = sys.argv[2]
print(helper._helper_pid(), flush=True)
helper.inject_userfaultfd(int(sys.argv[1]))
print("done", flush=True)
"""


def _start_daemon_in_window(target: Target, window: str) -> tuple[subprocess.Popen[str], int]:
    """A stand-in daemon whose helper is paused inside the window; returns (daemon, helper pid)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", _DAEMON, str(target.pid), window], stdout=subprocess.PIPE, text=True
    )
    assert daemon.stdout is not None
    helper = int(daemon.stdout.readline())
    wait_for(lambda: target.tracer() == helper)
    wait_for(lambda: bool(target.uffds()))  # the pause starts right after the injected userfaultfd returns
    return daemon, helper


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in ("Z", "X")


def test_daemon_death_in_the_window_leaves_the_target_running(launch: Callable[..., Target], window: str) -> None:
    target = launch("--threads=busy")
    daemon, helper = _start_daemon_in_window(target, window)
    daemon.kill()
    daemon.wait()
    # The helper finishes the injection (registers restored), detaches, and exits.
    wait_for(lambda: target.tracer() == 0)
    wait_for(lambda: _gone_or_zombie(helper))
    assert_unharmed(target)
    result = inject_userfaultfd(target.pid)
    with result.uffd:
        assert_tracks_exactly(target, result.uffd)


def test_helper_death_in_the_window_kills_the_target(launch: Callable[..., Target], window: str) -> None:
    target = launch("--threads=busy")
    daemon, helper = _start_daemon_in_window(target, window)
    os.kill(helper, signal.SIGKILL)
    # PTRACE_O_EXITKILL: never running with foreign registers, always dead.
    wait_for(lambda: _gone_or_zombie(target.pid))
    daemon.wait(10)
    assert daemon.returncode != 0


# --------------------------------------------------------------------------- the two windows agree


def _flags_of(fd: int) -> str:
    """The ``flags:`` line of an fd's fdinfo (shared with the target's copy: same open file)."""
    return next(line for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if line.startswith("flags"))


@pytest.mark.parametrize("window", ["both"])
@pytest.mark.parametrize("role", ["main", "busy", "futex", "sleep", "rseq"])
def test_both_windows_give_identical_results(launch: Callable[..., Target], role: str, window: str) -> None:
    target = launch("--threads=busy,futex,sleep,rseq")
    tid = target.tids[role]
    if not tid:
        pytest.skip("glibc registered no rseq area")
    fds_before = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    outcomes: dict[str, list[tuple[object, ...]]] = {"c": [], "python": []}
    for chosen in ("c", "python", "c", "python"):
        result = inject_userfaultfd(target.pid, tid=tid, window=chosen)
        with result.uffd:
            assert result.window == chosen
            fd = result.uffd.fileno()
            outcome = (result.tid, os.readlink(f"/proc/self/fd/{fd}"), _flags_of(fd))
            assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == fds_before
            assert_tracks_exactly(target, result.uffd)
        outcomes[chosen].append(outcome)
    assert outcomes["c"] == outcomes["python"]
    assert outcomes["c"][0][0] == tid
    assert_unharmed(target)


@pytest.mark.parametrize("window", ["both"])
@pytest.mark.parametrize("mode", ["errno", "kill"])
def test_both_windows_refuse_alike(launch: Callable[..., Target], mode: str, window: str) -> None:
    # One target each: a verdict is remembered per thread, and each window must find its own.
    refusals = []
    for chosen in ("c", "python"):
        target = launch(f"--seccomp={mode}")
        with pytest.raises(InjectionRefused) as refused:
            inject_userfaultfd(target.pid, window=chosen)
        assert_unharmed(target)
        message = str(refused.value).replace(f"process {target.pid}", "process PID")
        refusals.append((type(refused.value), refused.value.errno, message))
    assert refusals[0] == refusals[1]


@pytest.fixture
def fresh_window_build() -> Iterator[None]:
    """Forget the loaded compiled window before and after the test (``_window.load`` caches it)."""
    _window.load.cache_clear()
    yield
    _window.load.cache_clear()


@pytest.mark.parametrize("window", ["auto"])
def test_without_a_compiler_the_python_window_runs(
    launch: Callable[..., Target], monkeypatch: pytest.MonkeyPatch, fresh_window_build: None, window: str
) -> None:
    monkeypatch.setenv("CC", "writewatch-no-such-compiler")
    assert _window.load() is None
    target = launch()
    # In this process (the helper has its window loaded already).
    reply, fds = attach.inject_running({"pid": target.pid, "deadline_s": 1.0, "window": window})
    os.close(fds[0])
    assert reply["window"] == "python"
    with pytest.raises(FeatureUnavailable, match="compiled injection window"):
        attach.inject_running({"pid": target.pid, "deadline_s": 1.0, "window": "c"})
    assert_unharmed(target)


@pytest.mark.parametrize("window", ["auto"])
def test_no_code_is_loaded_from_a_cache_others_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_window_build: None, window: str
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    monkeypatch.setenv("WRITEWATCHD_CACHE_DIR", str(cache))
    assert _window.load() is None
    assert list(cache.iterdir()) == []
    cache.chmod(0o700)
    assert _window.load.__wrapped__() is not None
    assert [path.suffix for path in cache.iterdir()] == [".so"]


@pytest.mark.parametrize("window", ["auto"])
def test_the_window_enums_mirror_the_c_source(window: str) -> None:
    source = (Path(_window.__file__).parent / "_window.c").read_text()
    results = re.search(r"enum ww_result \{([^}]*)\}", source)
    calls = re.search(r"enum ww_call \{([^}]*)\}", source)
    assert results is not None and calls is not None
    c_results = dict(re.findall(r"WW_(\w+) = (\d+)", results.group(1)))
    assert {name: int(value) for name, value in c_results.items()} == {r.name: r.value for r in _window.WindowResult}
    c_calls = [name.strip() for name in calls.group(1).split(",") if name.strip()]
    assert len(c_calls) == len(_window.WindowCall)
    assert c_calls[_window.WindowCall.PTRACE_DETACH] == "WW_CALL_DETACH"
    assert c_calls[_window.WindowCall.WAITPID] == "WW_CALL_WAIT"
