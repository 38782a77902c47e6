"""Benchmark 8: deltas through NATS JetStream (``writewatch export``) against a direct gRPC subscriber.

A target's writes are harvested into ``K`` deltas first; they stay in the daemon's history
(queue and history large enough that nothing is merged). Then, in interleaved rounds:

- direct: one ``AsyncSession.subscribe`` from the epoch's start reads the ``K + 1`` deltas
  (the RESYNC and the K) and decodes them;
- export: an in-process :class:`writewatch.export.Exporter` publishes the same deltas to a
  fresh stream of a local ``nats-server -js`` (file store), each fragment acknowledged by
  JetStream before the next, timed until the last is acknowledged;
- read back: a JetStream pull consumer reads the stream from its beginning and
  :class:`writewatch.export.ExportAssembler` makes whole deltas again.

Two shapes: many small deltas (deltas/s matters) and a few large ones (regions/s matters).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import PAGE_SIZE, Daemon, Section, Stats, Target, free_tcp_port

from writewatch import AsyncClient
from writewatch.export import CURSOR_BUCKET, STREAM_NAME, ExportAssembler, Exporter

_HOST = "bench"


class NatsServer:
    """``nats-server -js`` on a free loopback port with its store in a temporary directory."""

    def __init__(self) -> None:
        binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (apt-get install nats-server)")
        self.tmp = Path(tempfile.mkdtemp(prefix="ww-bench-nats-"))
        self.port = free_tcp_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        config = self.tmp / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream: {{store_dir: "{self.tmp / "store"}", max_file_store: 16G, max_memory_store: 64M}}\n'
        )
        self.log = open(self.tmp / "nats.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-c", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        import socket

        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"nats-server did not start: {(self.tmp / 'nats.log').read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, wait; removes the store."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def _direct(address: str, session_id: str, n_deltas: int) -> tuple[float, int]:
    """Seconds to read ``n_deltas`` deltas from the epoch's start, and their regions."""
    async with AsyncClient(address, timeout_s=120) as client:
        session = await client.session(session_id)
        n_regions = 0
        count = 0
        start = time.perf_counter()
        async for delta in session.subscribe():
            n_regions += delta.n_regions
            count += 1
            if count == n_deltas:
                break
        return time.perf_counter() - start, n_regions


async def _reset_stream(url: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in (STREAM_NAME, f"KV_{CURSOR_BUCKET}"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def _export(address: str, url: str, session_id: str, n_deltas: int) -> tuple[float, int, int]:
    """Seconds until the exporter has ``n_deltas`` deltas acknowledged; their regions and messages."""
    await _reset_stream(url)
    exporter = Exporter(AsyncClient(address, timeout_s=120), url, session_ids=[session_id], host=_HOST)
    start = time.perf_counter()
    task = asyncio.create_task(exporter.run())
    while exporter.statistics.n_deltas < n_deltas:
        if task.done():
            task.result()
            raise RuntimeError("the exporter stopped early")
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - start
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await exporter.client.close()
    return elapsed, exporter.statistics.n_regions, exporter.statistics.n_messages


async def _read_back(url: str, n_messages: int) -> tuple[float, int, int]:
    """Seconds to read the stream from its beginning into whole deltas; deltas and regions."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        assembler = ExportAssembler()
        n_deltas = n_regions = 0
        start = time.perf_counter()
        # A pull consumer without acks (a reader that only replays): nats-py's ordered push
        # consumer (flow control) read ~5x slower here, and unacked messages stop at max_ack_pending.
        subscription = await js.pull_subscribe(
            f"writewatch.{_HOST}.*",
            durable=None,
            stream=STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, max_ack_pending=-1),
        )
        received = 0
        while received < n_messages:
            for message in await subscription.fetch(min(256, n_messages - received), timeout=30):
                received += 1
                item = assembler.add(message.subject, message.data)
                if item is not None:
                    n_deltas += 1
                    n_regions += item[1].n_regions
        elapsed = time.perf_counter() - start
        await subscription.unsubscribe()
        return elapsed, n_deltas, n_regions
    finally:
        await nc.close()


def _case(
    section: Section, name: str, nats_server: NatsServer, n_pages: int, n_deltas: int, command: str, rounds: int
) -> None:
    with (
        Daemon(history_max_deltas=n_deltas + 16, history_max_bytes=8 << 30, subscriber_queue_deltas=n_deltas + 16) as d,
        Target(n_pages) as target,
    ):
        client = d.client()
        session = client.attach(  # type: ignore[attr-defined]
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=3_600_000
        )
        for index in range(n_deltas):
            target.command(command.format(seed=index + 1))
            session.harvest()
        total = n_deltas + 1  # the epoch's RESYNC first
        rates: dict[str, list[tuple[float, float]]] = {"direct": [], "export": [], "read": []}
        for _ in range(rounds):
            seconds, regions = asyncio.run(_direct(d.address, session.id, total))
            rates["direct"].append((total / seconds, regions / seconds))
            seconds, regions, n_messages = asyncio.run(_export(d.address, nats_server.url, session.id, total))
            rates["export"].append((total / seconds, regions / seconds))
            seconds, read_deltas, read_regions = asyncio.run(_read_back(nats_server.url, n_messages))
            if (read_deltas, read_regions) != (total, regions):
                raise RuntimeError(f"read back {read_deltas} deltas/{read_regions} regions of {total}/{regions}")
            rates["read"].append((total / seconds, read_regions / seconds))
        client.close()  # type: ignore[attr-defined]
    direct = Stats.of([r[0] for r in rates["direct"]])
    for kind, label in (
        ("direct", "direct gRPC subscriber"),
        ("export", "export: daemon -> JetStream (acked)"),
        ("read", "read back: JetStream -> whole deltas"),
    ):
        deltas = Stats.of([r[0] for r in rates[kind]])
        section.add(
            name,
            label,
            deltas.fmt(0),
            Stats.of([r[1] for r in rates[kind]]).fmt(2, 1e6),
            f"{deltas.median / direct.median:.3f}",
        )
    section.evidence.append(
        f"{name}: {n_deltas} deltas of `{command.format(seed='N')}` over {n_pages * PAGE_SIZE >> 20} MiB "
        f"+ the RESYNC, {n_messages} NATS messages; {rounds} interleaved rounds."
    )


def run(quick: bool) -> Section:
    """Benchmark 8."""
    section = Section(
        "8. JetStream export",
        "deltas/s and regions/s through JetStream (export, then read back) against direct gRPC, same run.",
        ["deltas", "path", "deltas/s", "M regions/s", "deltas/s vs direct"],
    )
    try:
        nats_server = NatsServer()
    except FileNotFoundError as error:
        section.evidence.append(f"not run: {error}")
        return section
    try:
        if quick:
            _case(section, "small", nats_server, 4096, 50, "h 4000 {seed}", 1)
            _case(section, "large", nats_server, 16384, 2, "s 2 {seed}", 1)
        else:
            _case(section, "small", nats_server, 16384, 2000, "h 4000 {seed}", 3)
            _case(section, "large", nats_server, 1 << 18, 16, "s 2 {seed}", 3)
    finally:
        nats_server.stop()
    section.evidence.append(
        "The exporter publishes one fragment at a time and waits for JetStream's acknowledgement (file store, "
        "loopback): its rate is bounded by that round trip, not by the daemon. A large delta (131,072 regions, "
        "1 MiB of pairs) is re-split to fit NATS's 1 MiB max_payload."
    )
    return section
