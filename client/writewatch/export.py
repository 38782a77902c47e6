"""Export deltas to NATS JetStream (``writewatch export``): durable, replayable, many hosts in one stream.

The exporter is a subscriber like any other. Every delta of the chosen sessions is published
as serialized ``writewatch.v1.Delta`` fragments to stream ``WRITEWATCH``, subject
``writewatch.<host>.<session_id>``, with header ``Nats-Msg-Id: <session_id>.<epoch>.<seq>.<index>``
so that JetStream's de-duplication drops a fragment published twice (a publish retried after
a lost acknowledgement). Lifecycle events (JSON) go to ``writewatch.<host>.events``.

Where to resume is read back from JetStream itself: the last message stored on the session's
subject (exact, even after a crash between a publish and the cursor update), else the cursor
kept in the KV bucket ``WRITEWATCH_CURSORS`` (which outlives the stream's age limit). A delta
whose fragments were only partly stored when the exporter died is completed with the same
fragments when the daemon delivers it again; otherwise it stays incomplete and readers drop it
(its pages come again in the deltas that follow). docs/fleet.md has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._async_client import AsyncClient, AsyncSession
from ._exceptions import NotFound, RpcError
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import EndReason

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

from ._exportwire import (
    CURSOR_BUCKET,
    EVENTS_TOKEN,
    MESSAGE_OVERHEAD_BYTES,
    NATS_EXTRA_HINT,
    STREAM_NAME,
    SUBJECT_PREFIX,
    ExportAssembler,
    ExportError,
    IncompatibleStream,
    NatsUnavailable,
    StreamLimits,
    check_stream_config,
    check_token,
    default_host,
    events_subject,
    fit_fragments,
    msg_id,
    session_subject,
)

__all__ = [
    "CURSOR_BUCKET",
    "EVENTS_TOKEN",
    "STREAM_NAME",
    "ExportAssembler",
    "ExportError",
    "Exporter",
    "IncompatibleStream",
    "NatsUnavailable",
    "StreamLimits",
    "check_stream_config",
    "default_host",
    "fit_fragments",
    "msg_id",
    "run_until_signalled",
    "session_subject",
]


log = logging.getLogger("writewatch.export")


@dataclass
class _SessionState:
    """What JetStream holds of one session: the last whole delta, a half-stored one, lifecycle."""

    cursor: tuple[int, int] | None = None
    partial: pb.Delta | None = None
    """The last stored fragment of a delta whose later fragments were never stored."""
    announced: bool = False
    ended: bool = False

    def to_json(self) -> bytes:
        epoch, seq = self.cursor or (0, 0)
        return json.dumps({"epoch": epoch, "seq": seq, "ended": self.ended}).encode()


@dataclass
class ExportStatistics:
    """Counters of one exporter run."""

    n_deltas: int = 0
    n_messages: int = 0
    n_regions: int = 0
    n_duplicates: int = 0
    """Publishes JetStream recognised as duplicates (a retry after a lost acknowledgement)."""
    n_publish_retries: int = 0


@dataclass
class Exporter:
    """Publishes the deltas of some or all sessions of one daemon to JetStream; see the module doc."""

    client: AsyncClient
    nats_url: str
    session_ids: Sequence[str] = ()
    follow_all: bool = False
    host: str = field(default_factory=default_host)
    limits: StreamLimits = field(default_factory=StreamLimits)
    poll_interval_s: float = 1.0
    connect_attempts: int = 8
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    give_up_after_s: float = 300.0
    """How long publishing may keep failing (NATS down) before the exporter stops with NatsUnavailable."""
    publish_timeout_s: float = 5.0
    statistics: ExportStatistics = field(default_factory=ExportStatistics)
    _nc: NatsClient | None = field(default=None, init=False, repr=False)
    _js: JetStreamContext | None = field(default=None, init=False, repr=False)
    _kv: KeyValue | None = field(default=None, init=False, repr=False)
    _max_message_bytes: int = field(default=0, init=False, repr=False)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        check_token(self.host, "host")
        for session_id in self.session_ids:
            check_token(session_id, "session id")
        if not self.follow_all and not self.session_ids:
            raise ExportError("name sessions to export, or follow them all")

    async def wait_ready(self) -> None:
        """Until the stream is checked and the first sessions are being exported."""
        await self._ready.wait()

    async def run(self) -> None:
        """Export until every named session has ended (with ``follow_all``: until cancelled)."""
        await self._connect()
        try:
            await self._prepare_stream()
            if self.follow_all:
                await self._follow_all()
            else:
                for session_id in self.session_ids:
                    session = await self.client.session(session_id)
                    self._start(session)
                self._ready.set()
                await asyncio.gather(*self._tasks.values())
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._close()

    async def _connect(self) -> None:
        try:
            import nats
            import nats.errors
        except ImportError:
            raise ExportError(NATS_EXTRA_HINT) from None

        causes: list[Exception] = []

        async def on_error(error: Exception) -> None:
            causes.append(error)
            log.debug("NATS: %r", error)

        last_error: BaseException | None = None
        for attempt in range(1, self.connect_attempts + 1):
            try:
                # nats-py's own retries of a first connection would hide the failure (or, with
                # reconnecting unlimited, never end): bound them here, unlimit them once connected.
                nc = await nats.connect(
                    self.nats_url,
                    name=f"writewatch-export-{self.host}",
                    connect_timeout=2,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.05,
                    error_cb=on_error,
                )
            except (OSError, TimeoutError, nats.errors.Error) as error:
                # NoServersError says nothing of why: the error callback saw the real cause.
                last_error = causes[-1] if causes else error
                if attempt == self.connect_attempts:
                    break
                backoff_s = self._backoff_s(attempt)
                log.warning(
                    "cannot reach NATS at %s (attempt %d of %d): %s; retrying in %.2f s",
                    self.nats_url,
                    attempt,
                    self.connect_attempts,
                    last_error or type(last_error).__name__,
                    backoff_s,
                )
                await asyncio.sleep(backoff_s)
                continue
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 0.25
            self._nc = nc
            self._js = nc.jetstream(timeout=self.publish_timeout_s)
            self._max_message_bytes = nc.max_payload
            return
        raise NatsUnavailable(
            f"cannot reach NATS at {self.nats_url} after {self.connect_attempts} attempts: "
            f"{last_error or type(last_error).__name__}"
        )

    async def _close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._nc = None

    def _backoff_s(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1)))

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after connecting)."""
        assert self._js is not None, "not connected"
        return self._js

    async def _prepare_stream(self) -> None:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

        try:
            info = await self.js.stream_info(STREAM_NAME)
        except NotFoundError:
            config = StreamConfig(
                name=STREAM_NAME,
                description="writewatch deltas and session events (writewatch export)",
                subjects=[f"{SUBJECT_PREFIX}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                max_age=self.limits.max_age_s,
                max_bytes=self.limits.max_bytes,
                duplicate_window=self.limits.duplicate_window_s,
            )
            try:
                info = await self.js.add_stream(config)
            except APIError as error:
                raise ExportError(
                    f"cannot create stream {STREAM_NAME} ({self.limits}): {error.description}"
                    " (lower the limits, or create the stream yourself)"
                ) from None
            log.info(
                "created stream %s: max_age %.0f s, max_bytes %d, duplicate_window %.0f s",
                STREAM_NAME,
                self.limits.max_age_s,
                self.limits.max_bytes,
                self.limits.duplicate_window_s,
            )
        except (NoRespondersError, ServiceUnavailableError, NatsTimeoutError):
            raise NatsUnavailable(f"NATS at {self.nats_url} has no JetStream (start nats-server with -js)") from None
        problems = check_stream_config(info.config, self.host, MESSAGE_OVERHEAD_BYTES + 4096)
        if problems:
            raise IncompatibleStream(f"stream {STREAM_NAME} exists but cannot be used: " + "; ".join(problems))
        if info.config.max_msg_size and info.config.max_msg_size > 0:
            self._max_message_bytes = min(self._max_message_bytes, info.config.max_msg_size)
        try:
            self._kv = await self.js.key_value(CURSOR_BUCKET)
        except NotFoundError:
            self._kv = await self.js.create_key_value(
                bucket=CURSOR_BUCKET, description="writewatch export cursors", history=1
            )

    async def _follow_all(self) -> None:
        while True:
            try:
                # Ended sessions too: one that ended while the exporter was down still has its
                # history in the daemon (for its retention time), and its tail is exported.
                sessions = await self.client.sessions(include_ended=True)
            except RpcError as error:
                log.warning("cannot list sessions: %s", error)
            else:
                for session in sessions:
                    if session.id not in self._tasks:
                        self._start(session)
                if not self._ready.is_set():
                    log.info("following every session of %s", self.client.address)
                    self._ready.set()
            for session_id, task in list(self._tasks.items()):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception() or ExportError(f"exporting {session_id} failed")
            await asyncio.sleep(self.poll_interval_s)

    def _start(self, session: AsyncSession) -> None:
        self._tasks[session.id] = asyncio.create_task(self._export_session(session), name=f"export {session.id}")

    async def _load_state(self, session_id: str) -> _SessionState:
        from nats.js.errors import KeyNotFoundError, NotFoundError

        state = _SessionState()
        assert self._kv is not None
        try:
            entry = await self._kv.get(f"{self.host}.{session_id}")
        except KeyNotFoundError:
            pass
        else:
            stored = json.loads(entry.value or b"{}")
            state.announced = True
            state.ended = bool(stored.get("ended"))
            if stored.get("epoch"):
                state.cursor = (int(stored["epoch"]), int(stored["seq"]))
        try:
            last = await self.js.get_last_msg(STREAM_NAME, session_subject(self.host, session_id))
        except NotFoundError:
            return state
        message = pb.Delta.FromString(last.data or b"")
        state.announced = True
        stored_cursor = (message.epoch, message.seq)
        if message.fragment_index + 1 < (message.n_fragments or 1):
            # A delta's first fragment is published only after the previous delta is whole, so
            # the stream holds everything up to just before this half-stored delta.
            state.partial = message
            stored_cursor = (message.epoch, (message.first_seq or message.seq) - 1)
        if state.cursor is None or stored_cursor > state.cursor:
            state.cursor = stored_cursor
        return state

    async def _save_state(self, session_id: str, state: _SessionState) -> None:
        assert self._kv is not None
        await self._retrying(lambda: self._kv_put(f"{self.host}.{session_id}", state.to_json()))

    async def _kv_put(self, key: str, value: bytes) -> None:
        assert self._kv is not None
        await self._kv.put(key, value)

    async def _export_session(self, session: AsyncSession) -> None:
        state = await self._load_state(session.id)
        if state.ended:
            return
        if not state.announced:
            await self._event(session.id, "created", session.snapshot)
            await self._save_state(session.id, state)
        subject = session_subject(self.host, session.id)
        log.info("exporting %s to %s from %s", session.id, subject, state.cursor or "the epoch's start")
        last_saved = time.monotonic()
        try:
            async for fragments in session.subscribe_wire(state.cursor):
                await self._publish_delta(subject, session.id, fragments, state)
                last = fragments[-1]
                state.cursor = (last.epoch, last.seq)
                # The stream's last message is the exact cursor; the KV copy only has to survive
                # the stream's age limit, so it is written at most twice a second.
                if time.monotonic() - last_saved > 0.5:
                    await self._save_state(session.id, state)
                    last_saved = time.monotonic()
        except NotFound:
            session.end_reason = EndReason.DELETED
            session.end_message = "the session no longer exists"
        state.ended = True
        await self._save_state(session.id, state)
        await self._event(
            session.id,
            "ended",
            None,
            reason=EndReason(session.end_reason or EndReason.UNSPECIFIED).name,
            message=session.end_message,
            cursor=list(state.cursor or (0, 0)),
        )
        log.info("session %s ended (%s)", session.id, session.end_reason)

    async def _publish_delta(
        self, subject: str, session_id: str, fragments: list[pb.Delta], state: _SessionState
    ) -> None:
        messages = fit_fragments(fragments, self._max_message_bytes)
        payloads = [message.SerializeToString() for message in messages]
        last = messages[-1]
        partial, state.partial = state.partial, None
        skip_through = -1
        suffix = ""
        if partial is not None and (partial.epoch, partial.seq) == (last.epoch, last.seq):
            same = partial.fragment_index < len(payloads) and (
                payloads[partial.fragment_index] == partial.SerializeToString() and partial.n_fragments == len(payloads)
            )
            if same:
                skip_through = partial.fragment_index
            else:
                # A different delta under the same number (a resync replacing the half-stored one):
                # new ids, or de-duplication would drop its first fragments.
                suffix = f".r{last.harvested_at_unix_ns}"
        for index, payload in enumerate(payloads):
            if index <= skip_through:
                continue
            headers = {"Nats-Msg-Id": msg_id(session_id, last.epoch, last.seq, index) + suffix}
            await self._publish(subject, payload, headers)
        self.statistics.n_deltas += 1
        self.statistics.n_regions += sum(len(m.regions.pairs) // 8 + len(m.regions.wide_pairs) // 16 for m in messages)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        async def once() -> None:
            ack = await self.js.publish(
                subject, payload, timeout=self.publish_timeout_s, stream=STREAM_NAME, headers=headers
            )
            self.statistics.n_messages += 1
            self.statistics.n_duplicates += bool(ack.duplicate)

        await self._retrying(once)

    async def _retrying(self, operation: Any) -> None:
        """Run ``operation`` until it succeeds; NATS being down (or restarting) only delays it."""
        from nats.errors import Error as NatsError

        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                await operation()
                return
            except (NatsError, TimeoutError) as error:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.give_up_after_s:
                    raise NatsUnavailable(
                        f"NATS at {self.nats_url} failed for {self.give_up_after_s:.0f} s: {error!r}"
                    ) from None
                attempt += 1
                self.statistics.n_publish_retries += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("publishing to NATS failed (%r); retrying", error)
                await asyncio.sleep(self._backoff_s(attempt))

    async def _event(self, session_id: str, kind: str, snapshot: pb.Session | None, **extra: Any) -> None:
        event: dict[str, Any] = {"event": kind, "host": self.host, "session_id": session_id, "unix_ns": time.time_ns()}
        if snapshot is not None:
            event.update(
                pid=snapshot.pid,
                comm=snapshot.comm,
                attach_mode=pb.AttachMode.Name(snapshot.attach_mode),
                labels=dict(snapshot.labels),
                epoch=snapshot.epoch,
            )
        event.update(extra)
        await self._publish(
            events_subject(self.host),
            json.dumps(event).encode(),
            {"Nats-Msg-Id": f"{session_id}.{kind}"},
        )


async def run_until_signalled(exporter: Exporter) -> None:
    """Run the exporter; SIGTERM or SIGINT stop it cleanly (a kill only costs a resumption)."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(exporter.run())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped: %s", exporter.statistics)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await exporter.client.close()
