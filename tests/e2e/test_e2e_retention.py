"""Retention: ended sessions are kept for a time and a count, then pruned from memory and the store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, CoopTarget


@pytest.fixture
def daemon_env() -> dict[str, str]:
    return {"WRITEWATCHD_ENDED_SESSION_MAX_COUNT": "2", "WRITEWATCHD_ENDED_SESSION_RETENTION_S": "3600"}


def _stored(state_dir: Path) -> dict[str, str]:
    """Session id -> state, as the daemon's store holds them."""
    with sqlite3.connect(state_dir / "state.db") as db:
        return dict(db.execute("SELECT id, state FROM sessions").fetchall())


def _run_to_exit(client: writewatch.Client) -> str:
    target = CoopTarget(8)
    try:
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
        target.exit()
        for _ in session.subscribe():
            pass
        assert session.end_reason == writewatch.EndReason.EXITED
        return session.id
    finally:
        target.kill()


def _wait_until(condition: object, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_newest_ended_sessions_are_kept_up_to_the_count(daemon: DaemonProcess) -> None:
    live = CoopTarget(8)
    try:
        with writewatch.Client(daemon.address) as client:
            active = client.attach(live.pid, ranges=[(live.base, live.end)], uffd_fd=live.uffd_fd)
            ended = [_run_to_exit(client) for _ in range(4)]
            _wait_until(lambda: len(_stored(daemon.state_dir)) == 3)
            assert [s.id for s in client.sessions()] == [active.id]
            assert [s.id for s in client.sessions(include_ended=True)] == [active.id, *ended[2:]]
            assert _stored(daemon.state_dir) == {active.id: "ACTIVE", ended[2]: "ENDED", ended[3]: "ENDED"}
            with pytest.raises(writewatch.NotFound):
                client.session(ended[0])
            assert client.session(ended[3]).info().end_reason == writewatch.pb.END_REASON_EXITED
        daemon.stop()
        daemon.start()
        with writewatch.Client(daemon.address) as client:
            assert [s.id for s in client.sessions(include_ended=True)] == [active.id, *ended[2:]]
    finally:
        live.kill()


def test_ended_sessions_are_pruned_after_the_retention_time(daemon: DaemonProcess) -> None:
    with writewatch.Client(daemon.address) as client:
        kept_id = _run_to_exit(client)
        assert kept_id in _stored(daemon.state_dir)
    daemon.stop()
    # A restart with a short retention prunes what is older, and the rest once it expires.
    daemon.env["WRITEWATCHD_ENDED_SESSION_RETENTION_S"] = "1.5"
    time.sleep(1.5)
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        assert client.sessions(include_ended=True) == []
        assert _stored(daemon.state_dir) == {}
        fresh = _run_to_exit(client)
        assert fresh in _stored(daemon.state_dir)
        _wait_until(lambda: fresh not in _stored(daemon.state_dir))
        assert client.sessions(include_ended=True) == []


def test_a_session_ended_by_delete_is_forgotten_at_once(daemon: DaemonProcess) -> None:
    target = CoopTarget(8)
    try:
        with writewatch.Client(daemon.address) as client:
            session = client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd)
            session.close()
            assert client.sessions(include_ended=True) == []
            assert _stored(daemon.state_dir) == {}
    finally:
        target.kill()
