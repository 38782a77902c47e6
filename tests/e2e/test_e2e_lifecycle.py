"""Daemon lifecycle: spawn, inject, graceful shutdown, kill -9 and re-adoption, health, reflection."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatchd.kernel.probe import probe


@pytest.fixture
def target_pages() -> int:
    return 128


def _harvest_pages(session: writewatch.Session, target: CoopTarget) -> set[int]:
    delta = session.harvest()
    return set() if delta is None else target.pages(delta.regions)


def _first_delta(session: writewatch.Session, resume: tuple[int, int] | None = None) -> writewatch.Delta:
    for delta in session.subscribe(resume=resume):
        return delta
    raise AssertionError("the stream ended without a delta")


def test_health_and_reflection(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="writewatch.v1.WriteWatch"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in answer.list_services_response.service}
        assert {"writewatch.v1.WriteWatch", "grpc.health.v1.Health"} <= names


def test_capabilities(client: writewatch.Client) -> None:
    caps = client.capabilities()
    assert caps.pagemap_scan and caps.wp_async
    assert caps.page_size_bytes == PAGE
    # The daemon runs with the default settings (process events on): what it uses is what this kernel offers.
    assert caps.exec_fork_detection == probe().exec_fork_detection


def test_inject_attach_tracks_a_process_that_did_not_cooperate(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(target.pid, ranges=[(target.base, target.end)], tick_interval_ms=NO_TICKS_MS)
    assert session.info().attach_mode == writewatch.pb.ATTACH_MODE_INJECT
    session.harvest()
    for seed in range(5):
        written = target.random_writes(seed, 30)
        assert _harvest_pages(session, target) == written
    target.read(3)  # the target still answers: unharmed


def test_spawn_tracks_from_the_start_and_ends_when_the_program_exits(client: writewatch.Client) -> None:
    program = [sys.executable, "-m", "writewatchd.demo_writer", "--seconds", "1", "--size-mib", "4"]
    session = client.spawn(program, ranges="auto", tick_interval_ms=10)
    deltas = list(session.subscribe())
    assert deltas[0].resync
    assert sum(d.n_pages for d in deltas[1:]) > 0
    assert session.end_reason == writewatch.EndReason.EXITED
    assert session.info().state == writewatch.pb.SESSION_STATE_ENDED


def test_graceful_shutdown_ends_streams_then_restart_readopts(daemon: DaemonProcess, target: CoopTarget) -> None:
    with writewatch.Client(daemon.address) as client:
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
        first_epoch = _first_delta(session).epoch
        stream = session.subscribe(reconnect=False)
        next(stream)
        assert daemon.stop() == 0
        assert list(stream) == []
        assert session.end_reason == writewatch.EndReason.DAEMON_SHUTDOWN
    target.write(11)  # written while no daemon runs
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        session = client.session(session.id)
        info = session.info()
        assert info.state == writewatch.pb.SESSION_STATE_ACTIVE and info.epoch != first_epoch
        resync = _first_delta(session, resume=(first_epoch, 1))
        assert resync.resync and resync.epoch == info.epoch
        assert resync.regions.tolist() == [[target.base, target.end]]
        session.harvest()
        target.write(12)
        assert _harvest_pages(session, target) == {12}


@pytest.mark.parametrize("mode", ["cooperative", "inject"])
def test_kill_9_then_restart_readopts_with_resync_and_misses_nothing(
    daemon: DaemonProcess, target: CoopTarget, mode: str
) -> None:
    uffd_fd = target.uffd_fd if mode == "cooperative" else None
    with writewatch.Client(daemon.address) as client:
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
        before = session.info()
        session.harvest()
        target.write(1)
        daemon.kill9()
    target.write(2)  # while the daemon is dead
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        session = client.session(session.id)
        after = session.info()
        assert after.state == writewatch.pb.SESSION_STATE_ACTIVE
        assert after.epoch != before.epoch
        resync = _first_delta(session, resume=(before.epoch, before.last_seq))
        assert resync.resync and target.pages(resync.regions) == set(range(target.n_pages))
        session.harvest()
        for seed in range(5):
            written = target.random_writes(100 + seed, 20)
            assert _harvest_pages(session, target) == written


def test_restart_records_a_target_that_died_meanwhile(daemon: DaemonProcess, target: CoopTarget) -> None:
    with writewatch.Client(daemon.address) as client:
        session = client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd)
    daemon.kill9()
    target.kill()
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        info = client.session(session.id).info()
        assert info.state == writewatch.pb.SESSION_STATE_ENDED
        assert info.end_reason == writewatch.pb.END_REASON_EXITED


def test_sessions_are_listed_with_labels(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, labels={"team": "compat"}
    )
    listed = {s.id: s.info() for s in client.sessions()}
    assert listed[session.id].labels == {"team": "compat"}
    assert listed[session.id].n_tracked_pages == target.n_pages
    assert listed[session.id].comm == "coop_target"
    deadline = time.monotonic() + 20  # ticks keep coming, however slow the machine
    while client.session(session.id).info().statistics.n_harvests < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_exec_ends_the_session_with_reason_execed(client: writewatch.Client) -> None:
    """With follow_exec=False (exec is followed by default: tests/e2e/test_e2e_follow.py)."""
    session = client.spawn(
        ["/bin/sh", "-c", "sleep 0.3; exec sleep 2"], ranges="auto", tick_interval_ms=10, follow_exec=False
    )
    for _ in session.subscribe():
        pass
    assert session.end_reason == writewatch.EndReason.EXECED, session.info().end_message
    assert "executed a new program" in session.info().end_message


def test_a_subscriber_rides_through_a_daemon_restart(daemon: DaemonProcess, target: CoopTarget) -> None:
    with writewatch.Client(daemon.address) as client:
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=5
        )
        stream = session.subscribe()
        first = next(stream)
        assert first.resync
        daemon.stop()
        target.write(21)  # while no daemon runs
        daemon.start()
        resync = next(stream)
        assert resync.resync and resync.epoch != first.epoch
        assert target.pages(resync.regions) == set(range(target.n_pages))
        target.write(22)
        following = next(stream)
        assert following.epoch == resync.epoch and following.first_seq == resync.seq + 1
        assert target.pages(following.regions) == {22}
        stream.close()


def test_exit_ends_a_session_whose_tick_is_an_hour(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )
    ended = threading.Event()

    def consume() -> None:
        for _ in session.subscribe():
            pass
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    target.exit()
    assert ended.wait(20), "the exit was not noticed without a harvest"
    assert session.end_reason == writewatch.EndReason.EXITED
