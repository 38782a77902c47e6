"""Faults: targets killed at random points, the daemon killed with SIGKILL and restarted, and
attach/close cycles on a busy multi-threaded target.

Nothing may be lost for the parties that survive (checked with :class:`StreamChecker`), no fd,
thread or child process may leak (daemon and target), and a surviving target must be
unharmed. The default run uses reduced counts; ``WRITEWATCH_SOAK=1`` runs the full ones
(100 target kills, 20 daemon kills, 200 attach/close cycles).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import writewatch
from daemonproc import DaemonProcess
from reliability.streamcheck import CheckedSubscription, StreamChecker
from targets import NO_TICKS_MS, PAGE, CoopTarget, build_c

SOAK = os.environ.get("WRITEWATCH_SOAK") == "1"
N_TARGET_KILLS_PER_PHASE = 34 if SOAK else 4  # x3 phases: 102 (soak) or 12
N_DAEMON_KILLS = 20 if SOAK else 3
N_CYCLES = 200 if SOAK else 50
T = TypeVar("T")
HARVEST_THREADS = 4  # the daemon's default harvest pool, which starts threads on demand
PATIENT = writewatch.RetryPolicy(max_attempts=200, initial_backoff_s=0.02, max_backoff_s=0.25)


def _n_entries(path: str) -> int:
    return len(os.listdir(path))


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            children |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    return children


def _wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Resources:
    """fd, thread and child counts of a process, for leak checks against a baseline."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.now()
        self.baseline_fds = self.fds()

    def fds(self) -> dict[str, str]:
        links = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                links[fd] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
        return links

    def now(self) -> tuple[int, int, int]:
        return (
            _n_entries(f"/proc/{self.pid}/fd"),
            _n_entries(f"/proc/{self.pid}/task"),
            len(_children(self.pid)),
        )

    def assert_back_to_baseline(self, timeout_s: float = 20, *, thread_slack: int = 0) -> None:
        """Counts settle back (closing and reaping are asynchronous); never above the baseline.

        ``thread_slack``: threads a bounded pool may still add (it grows on demand up to its
        size): a leak grows with the number of cycles, a pool does not.
        """
        deadline = time.monotonic() + timeout_s
        limits = (self.baseline[0], self.baseline[1] + thread_slack, self.baseline[2])
        while any(n > b for n, b in zip(self.now(), limits, strict=True)):
            assert time.monotonic() < deadline, (
                f"pid {self.pid} (fds, threads, children) {self.now()} > baseline {self.baseline}; new fds: "
                f"{ {fd: link for fd, link in self.fds().items() if self.baseline_fds.get(fd) != link} }"
            )
            time.sleep(0.05)


def _attach(client: writewatch.Client, target: CoopTarget, **kwargs: object) -> writewatch.Session:
    return client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, **kwargs)


@pytest.fixture
def bystander(client: writewatch.Client) -> Iterator[tuple[CoopTarget, writewatch.Session, CheckedSubscription]]:
    """A session that must stay exact whatever happens to the others."""
    target = CoopTarget(64)
    session = _attach(client, target, tick_interval_ms=5)
    sub = CheckedSubscription(session, StreamChecker("bystander", base_address=target.base))
    yield target, session, sub
    target.kill()


def _bystander_exact(bystander: tuple[CoopTarget, writewatch.Session, CheckedSubscription], written: set[int]) -> None:
    _target, session, sub = bystander
    session.harvest()
    info = session.info()
    sub.wait_for_seq(info.last_seq, epoch=info.epoch)
    sub.checker.check_covers(written)


# --------------------------------------------------------------------------- targets killed


def _kill_during(client: writewatch.Client, phase: str, rng: random.Random) -> tuple[str, writewatch.Session | None]:
    """One target, killed after a random delay while ``phase`` runs; returns what the attach said."""
    target = CoopTarget(1 << 14 if phase == "scan" else 64)
    outcome: dict[str, object] = {}

    def attach() -> None:
        try:
            if phase == "inject":
                outcome["session"] = client.attach(target.pid, ranges="auto", tick_interval_ms=NO_TICKS_MS)
            elif phase == "register":
                outcome["session"] = client.attach(
                    target.pid, ranges="auto", uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
                )
            else:
                outcome["session"] = _attach(client, target, tick_interval_ms=1)
        except writewatch.WriteWatchError as error:
            outcome["error"] = error

    try:
        if phase == "scan":
            attach()  # the scans are what gets interrupted: many regions to walk on every tick
            session = outcome.get("session")
            assert isinstance(session, writewatch.Session)
            target.stride_write(0, target.n_pages // 2, 2)
            harvester = threading.Thread(target=lambda: _harvest_until_gone(session), daemon=True)
            harvester.start()
            time.sleep(rng.uniform(0, 0.05))
            target.kill()
            harvester.join(20)
            assert not harvester.is_alive()
        else:
            thread = threading.Thread(target=attach, daemon=True)
            thread.start()
            time.sleep(rng.uniform(0, 0.01))
            # Killed mid-injection, the target is reported to its tracer (the daemon's helper)
            # before its parent can reap it; the helper collects it before it answers, within
            # its stop deadline (1 s) and its bound on a dying thread (5 s).
            target.proc.kill()
            target.proc.wait(10)
            thread.join(30)
            assert not thread.is_alive(), f"{phase}: the attach hung after its target was killed"
    finally:
        target.kill()
    error = outcome.get("error")
    if error is not None:
        # Refused because the target vanished under it: NOT_FOUND, or a kernel refusal of a
        # half-gone process (FAILED_PRECONDITION); never INTERNAL.
        assert isinstance(error, writewatch.NotFound | writewatch.FailedPrecondition), repr(error)
        return "refused", None
    session = outcome.get("session")
    assert isinstance(session, writewatch.Session)
    return "attached", session


def _warm_up(client: writewatch.Client) -> None:
    """Start what the daemon keeps for its life (harvest threads, the injection helper) before
    a leak check takes its baseline."""
    target = CoopTarget(16)
    try:
        client.attach(target.pid, ranges="auto", tick_interval_ms=1).close()
        _attach(client, target, tick_interval_ms=1).close()
    finally:
        target.kill()


def _harvest_until_gone(session: writewatch.Session) -> None:
    for _ in range(10_000):
        try:
            session.harvest()
        except (writewatch.FailedPrecondition, writewatch.NotFound):
            return


@pytest.mark.parametrize("phase", ["scan", "inject", "register"])
def test_targets_killed_at_random_points(
    client: writewatch.Client,
    daemon: DaemonProcess,
    bystander: tuple[CoopTarget, writewatch.Session, CheckedSubscription],
    phase: str,
) -> None:
    rng = random.Random(phase)
    target_b = bystander[0]
    written_b: set[int] = set()
    _warm_up(client)
    resources = Resources(daemon.pid)
    outcomes: list[str] = []
    for _ in range(N_TARGET_KILLS_PER_PHASE):
        outcome, session = _kill_during(client, phase, rng)
        outcomes.append(outcome)
        written_b |= target_b.random_writes(rng.randrange(1 << 30), 10)
        if session is not None:
            _wait_for(lambda s=session: s.info().state == writewatch.pb.SESSION_STATE_ENDED, "session not ended")
            assert session.info().end_reason == writewatch.pb.END_REASON_EXITED
            session.close()  # deleted: its record and resources go
    _bystander_exact(bystander, written_b)
    resources.assert_back_to_baseline(thread_slack=HARVEST_THREADS)
    log = daemon.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    print(
        f"\n{phase}: {len(outcomes)} targets killed: {outcomes.count('attached')} after attach, "
        f"{outcomes.count('refused')} refused"
    )


# --------------------------------------------------------------------------- daemon killed


def test_daemon_killed_at_random_points_loses_nothing(daemon: DaemonProcess) -> None:
    rng = random.Random(20)
    targets = [CoopTarget(128) for _ in range(3)]
    client = writewatch.Client(daemon.address, timeout_s=20, retry=PATIENT)
    try:
        sessions = [_attach(client, t, tick_interval_ms=rng.choice([1, 5, 50])) for t in targets]
        subs = [
            CheckedSubscription(s, StreamChecker(f"{s.id}/{j}", base_address=t.base))
            for s, t in zip(sessions, targets, strict=True)
            for j in range(2)
        ]
        fds_before = [_n_entries(f"/proc/{t.pid}/fd") for t in targets]
        written: list[set[int]] = [set() for _ in targets]
        stop = threading.Event()

        def write() -> None:
            seed = 0
            while not stop.is_set():
                seed += 1
                for i, t in enumerate(targets):
                    written[i] |= t.random_writes(seed, 5)
                time.sleep(0.002)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        epochs = {sessions[0].info().epoch}
        for _ in range(N_DAEMON_KILLS):
            time.sleep(rng.uniform(0.05, 0.4))
            daemon.kill9()
            daemon.start()
            epochs.add(_retry(lambda: sessions[0].info().epoch))
        stop.set()
        writer.join(10)
        assert len(epochs) == N_DAEMON_KILLS + 1, "each restart re-adopts the session in a new epoch"
        for i, (session, target) in enumerate(zip(sessions, targets, strict=True)):
            _retry(session.harvest)
            info = session.info()
            assert info.state == writewatch.pb.SESSION_STATE_ACTIVE
            for sub in subs[2 * i : 2 * i + 2]:
                sub.wait_for_seq(info.last_seq, epoch=info.epoch, timeout_s=30)
                sub.checker.check_covers(written[i])
                # A subscriber that was still reconnecting when the daemon died again skips that
                # epoch altogether: it sees at least one new epoch, not necessarily every one.
                assert sub.checker.n_resyncs >= 2
            target.read(0)  # unharmed: still answers
            assert _n_entries(f"/proc/{target.pid}/fd") == fds_before[i]
        n_checked = sum(len(w) for w in written) * 2
        print(f"\ndaemon killed {N_DAEMON_KILLS} times; {n_checked} (page, subscriber) pairs checked")
    finally:
        client.close()
        for t in targets:
            t.kill()


def _retry(call: Callable[[], T]) -> T:
    """A call right after a restart: the first attempts may meet a socket not yet served."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return call()
        except writewatch.Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# --------------------------------------------------------------------------- attach/close cycles


class BusyTarget:
    """tests/fixtures/inject_target.c with busy, futex and sleeping threads."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(build_c("inject_target")), "--pages=64", "--threads=busy,futex,sleep"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.pid = self.proc.pid
        self._pending = b""
        self.start = self.n_pages = 0
        while (line := self._readline()) != "ready":
            fields = line.split()
            if fields[0] == "region":
                self.start, self.n_pages = int(fields[1], 16), int(fields[2])

    @property
    def end(self) -> int:
        return self.start + self.n_pages * PAGE

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 10
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the target did not answer; has {self._pending!r}"
            chunk = os.read(fd, 4096)
            assert chunk, "the target closed its output"
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()

    def command(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self._readline()

    def stats(self) -> dict[str, int]:
        reply = self.command("s").split()
        return {key: int(value) for key, value in (field.split("=") for field in reply[1:])}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def test_attach_close_cycles_on_a_busy_multithreaded_target(client: writewatch.Client, daemon: DaemonProcess) -> None:
    target = BusyTarget()
    rng = random.Random(200)
    try:
        target_resources = Resources(target.pid)
        for cycle in range(N_CYCLES + 1):
            session = client.attach(target.pid, ranges=[(target.start, target.end)], tick_interval_ms=NO_TICKS_MS)
            sub = CheckedSubscription(session, StreamChecker(f"cycle{cycle}", base_address=target.start))
            session.harvest()
            pages = set(rng.sample(range(target.n_pages), 5))
            assert target.command("w " + " ".join(map(str, sorted(pages)))) == "ok"
            delta = session.harvest()
            assert delta is not None and {(a - target.start) // PAGE for a in _page_addresses(delta)} == pages
            sub.wait_for_seq(delta.seq)
            sub.checker.check_covers(pages)
            session.close()
            sub.join()
            if cycle == 0:
                daemon_resources = Resources(daemon.pid)  # after the first cycle warmed the pools up
        daemon_resources.assert_back_to_baseline(thread_slack=HARVEST_THREADS)
        target_resources.assert_back_to_baseline()
        stats = target.stats()
        assert (stats["eintr"], stats["bad"]) == (0, 0), stats
        assert stats["loops"] > 0
        assert "TracerPid:\t0" in Path(f"/proc/{target.pid}/status").read_text()
        print(f"\n{N_CYCLES} attach/close cycles; target threads {target_resources.now()[1]}, stats {stats}")
    finally:
        target.kill()


def _page_addresses(delta: writewatch.Delta) -> list[int]:
    return [a for start, end in delta.regions.tolist() for a in range(start, end, PAGE)]
