"""JetStream export end to end: a real nats-server -js, a real daemon, a real target, the real CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import writewatch
from daemonproc import DaemonProcess
from natsproc import NatsServer, free_port, nats_server_binary
from targets import NO_TICKS_MS, CoopTarget
from writewatch.export import STREAM_NAME, ExportAssembler, msg_id

pytestmark = pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed (.ci/run does)")

HOST = "testhost"
WRITEWATCH = str(Path(sys.executable).parent / "writewatch")


@pytest.fixture
def nats_payload_bytes() -> int | None:
    """max_payload of the test's nats-server (None: the server's default, 1 MiB)."""
    return None


@pytest.fixture
def nats(tmp_path: Path, nats_payload_bytes: int | None) -> Iterator[NatsServer]:
    directory = tmp_path / "nats"
    directory.mkdir()
    server = NatsServer(directory, max_payload_bytes=nats_payload_bytes)
    server.start()
    yield server
    server.stop()


class ExporterProcess:
    """``writewatch export`` as a child process."""

    def __init__(self, daemon: DaemonProcess, nats: NatsServer, *args: str) -> None:
        self.args = [WRITEWATCH, "--address", daemon.address, "export", "--nats", nats.url, "--host", HOST, *args]
        self.log = daemon.directory / "export.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture
def exporters() -> Iterator[list[ExporterProcess]]:
    started: list[ExporterProcess] = []
    yield started
    for exporter in started:
        if exporter.proc is not None and exporter.proc.poll() is None:
            exporter.proc.kill()
            exporter.proc.wait()


def _exporter(exporters: list[ExporterProcess], daemon: DaemonProcess, nats: NatsServer, *args: str) -> ExporterProcess:
    exporter = ExporterProcess(daemon, nats, *args)
    exporter.start()
    exporters.append(exporter)
    return exporter


async def _stored_messages(url: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message of the stream, in stream order: (subject, payload, headers)."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM_NAME)
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        if not info.state.messages:
            return messages
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = await js.get_msg(STREAM_NAME, seq)
            except NotFoundError:
                continue
            messages.append((raw.subject or "", raw.data or b"", dict(raw.headers or {})))
        return messages
    finally:
        await nc.close()


def stored_messages(nats: NatsServer) -> list[tuple[str, bytes, dict[str, str]]]:
    return asyncio.run(_stored_messages(nats.url))


def read_back(nats: NatsServer, session_id: str) -> list[writewatch.Delta]:
    """The session's deltas as a reader of the stream from its beginning gets them."""
    assembler = ExportAssembler()
    deltas = []
    for subject, payload, _ in stored_messages(nats):
        if subject != f"writewatch.{HOST}.{session_id}":
            continue
        item = assembler.add(subject, payload)
        if item is not None:
            assert item[0] == HOST
            deltas.append(item[1])
    return deltas


def events(nats: NatsServer) -> list[dict[str, object]]:
    return [json.loads(payload) for subject, payload, _ in stored_messages(nats) if subject.endswith(".events")]


def wait_until(condition: object, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_subscribed(session: writewatch.Session) -> None:
    """Until the exporter's stream is open (a session that ends before cannot be exported)."""
    wait_until(lambda: session.info().statistics.n_subscribers >= 1, "the exporter to subscribe")


def _same(a: writewatch.Delta, b: writewatch.Delta) -> bool:
    return (a.epoch, a.seq, a.first_seq, a.resync) == (b.epoch, b.seq, b.first_seq, b.resync) and np.array_equal(
        a.regions, b.regions
    )


@pytest.mark.parametrize(
    ("daemon_env", "nats_payload_bytes"),
    [
        pytest.param({}, None, id="whole-deltas"),
        pytest.param({"WRITEWATCHD_FRAGMENT_MAX_BYTES": "4096"}, None, id="daemon-fragments-passed-through"),
        pytest.param({}, 8192, id="refragmented-for-max_payload"),
    ],
)
def test_exported_deltas_equal_what_a_direct_subscriber_received(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess], nats_payload_bytes: int | None
) -> None:
    target = CoopTarget(8192)
    try:
        with writewatch.Client(daemon.address, timeout_s=20) as client:
            session = client.attach(
                target.pid,
                ranges=[(target.base, target.end)],
                uffd_fd=target.uffd_fd,
                tick_interval_ms=NO_TICKS_MS,
            )
            direct: list[writewatch.Delta] = []
            exporter = _exporter(exporters, daemon, nats, session.id)
            wait_subscribed(session)
            written: set[int] = set()
            for round_index in range(12):
                # Strided writes make many regions: thousands of them need several fragments.
                written |= target.stride_write(round_index, 4000, 2)
                written |= target.random_writes(round_index + 1, 50)
                session.harvest()
            target.exit()
            direct = list(session.subscribe())
            assert session.end_reason == writewatch.EndReason.EXITED
        assert exporter.wait() == 0, exporter.log.read_text()
    finally:
        target.kill()
    exported = read_back(nats, session.id)
    assert len(exported) == len(direct) == 13  # the resync, then 12 harvests
    for mine, theirs in zip(exported, direct, strict=True):
        assert _same(mine, theirs), (mine, theirs)
    assert {p for d in exported[1:] for p in target.pages(d.regions)} == written
    messages = [m for m in stored_messages(nats) if m[0].endswith(session.id)]
    limit = nats_payload_bytes or 1 << 20
    assert all(len(payload) <= limit for _, payload, _ in messages)
    n_fragments = {writewatch.decode_delta(payload).n_fragments for _, payload, _ in messages}
    if nats_payload_bytes is not None or daemon.env.get("WRITEWATCHD_FRAGMENT_MAX_BYTES"):
        assert max(n_fragments) > 1
    for _, payload, headers in messages:
        fragment = writewatch.decode_delta(payload)
        assert headers["Nats-Msg-Id"] == msg_id(session.id, fragment.epoch, fragment.seq, fragment.fragment_index)
    kinds = [(e["event"], e["session_id"]) for e in events(nats)]
    assert kinds == [("created", session.id), ("ended", session.id)]
    assert events(nats)[1]["reason"] == "EXITED"


@pytest.mark.parametrize("daemon_env", [{"WRITEWATCHD_DEFAULT_TICK_INTERVAL_MS": "20"}])
def test_kill9_of_exporter_and_nats_loses_and_repeats_nothing(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess]
) -> None:
    """Writes go on through a NATS crash and an exporter crash; the stream ends up exact."""
    target = CoopTarget(2048)
    written: set[int] = set()
    seed = iter(range(1, 10_000))

    def write_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            written.update(target.random_writes(next(seed), 20))
            time.sleep(0.01)

    try:
        with writewatch.Client(daemon.address, timeout_s=20) as client:
            session = client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd)
            exporter = _exporter(exporters, daemon, nats, session.id)
            wait_subscribed(session)
            write_for(1.0)
            nats.kill9()
            write_for(1.0)
            nats.start()
            write_for(1.0)
            exporter.kill9()
            wait_until(lambda: session.info().statistics.n_subscribers == 0, "the daemon to drop the dead stream")
            write_for(1.0)
            exporter = _exporter(exporters, daemon, nats, session.id)
            wait_subscribed(session)
            write_for(1.0)
            # Everything written is in deltas up to this seq; the harvests of the exit itself may
            # over-report (the target's memory goes away under the scan), so they are not compared.
            session.harvest()
            barrier_seq = session.info().last_seq
            wait_until(lambda: read_back(nats, session.id)[-1].seq >= barrier_seq, "the export of the last writes")
            target.exit()
            assert exporter.wait() == 0, exporter.log.read_text()
    finally:
        target.kill()
    keys = []
    for subject, payload, _ in stored_messages(nats):
        if subject.endswith(session.id):
            fragment = writewatch.decode_delta(payload)
            keys.append((fragment.epoch, fragment.seq, fragment.fragment_index))
    assert len(keys) == len(set(keys)), "a fragment was stored twice"
    exported = read_back(nats, session.id)
    assert exported[0].resync and not any(d.resync for d in exported[1:])
    for before, after in itertools.pairwise(exported):
        assert (after.epoch, after.first_seq) == (before.epoch, before.seq + 1), (before, after)
    compared = [d for d in exported[1:] if d.seq <= barrier_seq]
    assert {p for d in compared for p in target.pages(d.regions)} == written
    assert len(written) > 100


def test_all_follows_sessions_created_later(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess]
) -> None:
    exporter = _exporter(exporters, daemon, nats, "--all", "--poll-s", "0.1")
    wait_until(lambda: "following every session" in exporter.log.read_text(), "the exporter to start", 10)
    target = CoopTarget(64)
    try:
        with writewatch.Client(daemon.address, timeout_s=20) as client:
            session = client.attach(
                target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
            )
            wait_until(lambda: any(e["event"] == "created" for e in events(nats)), "the created event")
            wait_subscribed(session)
            target.write(3, 2)
            session.harvest()
            target.exit()
            wait_until(lambda: any(e["event"] == "ended" for e in events(nats)), "the ended event")
    finally:
        target.kill()
    exported = read_back(nats, session.id)
    assert exported[0].resync
    assert [target.pages(d.regions) for d in exported[1:]] == [{3, 4}]
    assert [(e["event"], e["session_id"]) for e in events(nats)] == [("created", session.id), ("ended", session.id)]
    exporter.stop()
    assert exporter.proc is not None and exporter.proc.returncode == 0, exporter.log.read_text()


def test_all_exports_the_tail_of_a_session_that_ended_while_it_was_down(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess]
) -> None:
    target = CoopTarget(64)
    try:
        with writewatch.Client(daemon.address, timeout_s=20) as client:
            session = client.attach(
                target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
            )
            exporter = _exporter(exporters, daemon, nats, "--all", "--poll-s", "0.1")
            wait_subscribed(session)
            target.write(1)
            session.harvest()
            wait_until(lambda: len(read_back(nats, session.id)) == 2, "the first delta")
            exporter.kill9()
            target.write(5, 3)
            session.harvest()
            target.exit()
            wait_until(lambda: session.info().state == writewatch.pb.SESSION_STATE_ENDED, "the session to end")
            exporter = _exporter(exporters, daemon, nats, "--all", "--poll-s", "0.1")
            wait_until(lambda: any(e["event"] == "ended" for e in events(nats)), "the ended event")
    finally:
        target.kill()
    exported = read_back(nats, session.id)
    assert [target.pages(d.regions) for d in exported[1:]] == [{1}, {5, 6, 7}]
    assert [e["event"] for e in events(nats)] == ["created", "ended"]
    exporter.stop()


def test_a_restarted_exporter_completes_a_half_published_delta(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess]
) -> None:
    """As if an exporter died after storing 2 fragments of a delta: the restart adds exactly the rest."""
    target = CoopTarget(4096)
    try:
        with writewatch.Client(daemon.address, timeout_s=20) as client:
            session = client.attach(
                target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
            )
            written = target.stride_write(0, 2048, 2)
            session.harvest()
            n_fragments = asyncio.run(_publish_half(daemon.address, nats.url, session.id))
            exporter = _exporter(exporters, daemon, nats, session.id)
            wait_subscribed(session)
            target.exit()
            assert exporter.wait() == 0, exporter.log.read_text()
    finally:
        target.kill()
    keys = [
        (f.epoch, f.seq, f.fragment_index)
        for f in (writewatch.decode_delta(p) for s, p, _ in stored_messages(nats) if s.endswith(session.id))
    ]
    assert len(keys) == len(set(keys)) == 1 + n_fragments  # the RESYNC, then each fragment of delta 2 once
    exported = read_back(nats, session.id)
    assert [d.seq for d in exported] == [1, 2]
    assert target.pages(exported[1].regions) == written


async def _publish_half(address: str, url: str, session_id: str) -> int:
    """Store what a first exporter life stored before kill -9: the RESYNC and 2 fragments of delta 2."""
    import nats as nats_py

    from writewatch.export import fit_fragments, session_subject

    async with writewatch.AsyncClient(address) as client:
        session = await client.session(session_id)
        deltas = []
        async for fragments in session.subscribe_wire():
            deltas.append(fragments)
            if len(deltas) == 2:
                break
    nc = await nats_py.connect(url)
    js = nc.jetstream()
    # A de-duplication window that is over before the restart: only the exporter's own
    # comparison can keep it from storing the first two fragments again.
    await js.add_stream(name=STREAM_NAME, subjects=["writewatch.>"], duplicate_window=0.2, max_msg_size=8192)
    resync, delta = (fit_fragments(fragments, 8192) for fragments in deltas)
    for message in [*resync, *delta[:2]]:
        headers = {"Nats-Msg-Id": msg_id(session_id, message.epoch, message.seq, message.fragment_index)}
        await js.publish(session_subject(HOST, session_id), message.SerializeToString(), headers=headers)
    await nc.close()
    await asyncio.sleep(0.5)
    assert len(resync) == 1 and len(delta) > 2
    return len(delta)


def test_unreachable_nats_is_a_clear_error_after_retries(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            WRITEWATCH,
            "--address",
            f"unix:{tmp_path}/none.sock",
            "export",
            "--nats",
            url,
            "--connect-attempts",
            "2",
            "s-1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert f"cannot reach NATS at {url} after 2 attempts" in result.stderr
    assert "attempt 1 of 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_incompatible_stream_is_refused_with_the_reason(
    daemon: DaemonProcess, nats: NatsServer, exporters: list[ExporterProcess]
) -> None:
    async def create_foreign_stream() -> None:
        import nats as nats_py
        from nats.js.api import RetentionPolicy

        nc = await nats_py.connect(nats.url)
        await nc.jetstream().add_stream(name=STREAM_NAME, subjects=["other.>"], retention=RetentionPolicy.WORK_QUEUE)
        await nc.close()

    asyncio.run(create_foreign_stream())
    exporter = _exporter(exporters, daemon, nats, "--all")
    assert exporter.wait() == 4
    log = exporter.log.read_text()
    assert f"stream {STREAM_NAME} exists but cannot be used" in log
    assert f"do not cover writewatch.{HOST}." in log
    assert "retention workqueue" in log
    assert "Traceback" not in log


def test_missing_nats_extra_names_it(tmp_path: Path) -> None:
    """Without nats-py the command says which extra to install."""
    blocker = tmp_path / "nats.py"
    blocker.write_text("raise ImportError('no nats here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [WRITEWATCH, "--address", f"unix:{tmp_path}/none.sock", "export", "--nats", "nats://127.0.0.1:1", "s-1"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "pip install 'writewatch[nats]'" in result.stderr
