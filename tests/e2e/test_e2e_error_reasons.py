"""Client errors by meaning: the daemon names the reason behind a status, the client raises its class."""

from __future__ import annotations

import asyncio

import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, CoopTarget, traced_by_another_process


@pytest.fixture
def daemon(shared_daemon: DaemonProcess) -> DaemonProcess:
    """Nothing here changes the daemon for another test: one serves the whole module."""
    return shared_daemon


@pytest.fixture
def target_pages() -> int:
    return 16


def test_a_change_to_an_ended_session_is_session_ended(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )
    target.exit()
    for _ in session.subscribe():
        pass
    with pytest.raises(writewatch.SessionEnded) as info:
        session.flush()
    assert isinstance(info.value, writewatch.FailedPrecondition) and info.value.reason == "SESSION_ENDED"
    assert f"session {session.id} has ended" in info.value.message


def test_arguments_that_can_never_work_are_a_usage_error(client: writewatch.Client, target: CoopTarget) -> None:
    with pytest.raises(writewatch.UsageError) as info:
        client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=10**8)
    assert isinstance(info.value, ValueError) and isinstance(info.value, writewatch.InvalidArgument)
    assert info.value.reason == "USAGE_ERROR"


def test_errors_opening_a_stream_carry_their_reason_too(shared_daemon: DaemonProcess) -> None:
    async def subscribe_with_no_session_id() -> None:
        async with writewatch.AsyncClient(shared_daemon.address, timeout_s=20) as client:
            session = writewatch.AsyncSession(client, writewatch.pb.Session(session_id=""))
            async for _ in session.subscribe(reconnect=False):
                pass

    with pytest.raises(writewatch.UsageError, match="session_id is required"):
        asyncio.run(subscribe_with_no_session_id())


def test_a_refused_injection_is_injection_refused(client: writewatch.Client, target: CoopTarget) -> None:
    with (
        traced_by_another_process(target.pid) as tracer_pid,
        pytest.raises(writewatch.InjectionRefused, match=f"already traced by process {tracer_pid}") as info,
    ):
        client.attach(target.pid, ranges=[(target.base, target.end)], tick_interval_ms=NO_TICKS_MS)
    assert isinstance(info.value, writewatch.FailedPrecondition) and info.value.reason == "INJECTION_REFUSED"
