"""The ``writewatch.v1.WriteWatch`` gRPC service: request validation and the RPC handlers.

Domain exceptions become gRPC statuses in one place, :mod:`.status`; a handler never leaks a
traceback to a client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
from typing import Any

import grpc

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch._proto.writewatch.v1 import writewatch_pb2_grpc as pb_grpc
from writewatch.regions import encode_regions

from .. import __version__
from .._exceptions import (
    InvalidRange,
    PolicyDenied,
    ProcessGone,
    SessionNotFound,
    UsageError,
    WriteWatchError,
)
from ..kernel import PAGE_SIZE, read_status
from ..kernel.probe import probe
from .attach import SessionSpec
from .auth import Identity, current_identity
from .enums import AttachMode
from .hub import SessionEnd, Subscriber
from .sessions import ManagedSession, SessionManager
from .status import MalformedRequest, abort, details, request_parser, rpc
from .wire import (
    capabilities_message,
    categories_bytes,
    delta_message,
    ended_frame,
    ranges_from_message,
    session_message,
    view_message,
)

__all__ = ["WriteWatchServicer", "generic_handler"]

log = logging.getLogger(__name__)

# Labels live as long as the session, in memory and in the state store: bounded like
# Kubernetes labels, so one request cannot make the daemon hold megabytes.
_MAX_LABELS = 64
_MAX_LABEL_KEY_CHARS = 63
_MAX_LABEL_VALUE_CHARS = 256


def _check_labels(labels: dict[str, str]) -> None:
    if len(labels) > _MAX_LABELS:
        raise UsageError(f"{len(labels)} labels; at most {_MAX_LABELS} are allowed")
    for key, value in labels.items():
        if not 0 < len(key) <= _MAX_LABEL_KEY_CHARS or len(value) > _MAX_LABEL_VALUE_CHARS:
            raise UsageError(
                f"labels: keys must have 1..{_MAX_LABEL_KEY_CHARS} characters and values at most "
                f"{_MAX_LABEL_VALUE_CHARS}; got a {len(key)}-character key with a {len(value)}-character value"
            )


def _require_id(session_id: str) -> str:
    if not session_id:
        raise UsageError("session_id is required")
    return session_id


class WriteWatchServicer(pb_grpc.WriteWatchServicer):
    """gRPC adapter over the :class:`SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager
        self._open_streams = 0
        self._streams_closed = asyncio.Event()
        self.stopping = False
        """Set when shutdown begins: new streams are refused UNAVAILABLE, so clients back off and retry."""
        self._streams_by_owner: collections.Counter[str] = collections.Counter()

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until every open stream has written its last message and returned."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        with contextlib.suppress(TimeoutError):
            while self._open_streams:
                self._streams_closed.clear()
                remaining_s = deadline - asyncio.get_running_loop().time()
                await asyncio.wait_for(self._streams_closed.wait(), max(remaining_s, 0))

    def _session(self, session_id: str) -> ManagedSession:
        """The session, if the caller's target policy lets it touch the session's process."""
        session = self._manager.get(_require_id(session_id))
        record = session.record
        current_identity().check_target(record.pid, record.uid, record.comm)
        return session

    def _may_touch(self, identity: Identity, session: ManagedSession) -> bool:
        try:
            identity.check_target(session.record.pid, session.record.uid, session.record.comm)
        except PolicyDenied:
            return False
        return True

    def _check_create(self, identity: Identity, spec: SessionSpec) -> None:
        """The caller's own limits and target policy for a new session."""
        owned = sum(1 for s in self._manager.sessions() if s.active and s.record.owner == spec.owner)
        identity.check_limit("max_sessions", owned)
        if spec.ranges:
            identity.check_limit("max_ranges_per_session", 0, len(spec.ranges))
        if spec.attach_mode == AttachMode.SPAWN:
            # A spawned program runs as the daemon's user, under the name of its executable.
            identity.check_target(0, os.geteuid(), os.path.basename(spec.argv[0])[:15] if spec.argv else "")
            return
        if spec.pid > 0 and (identity.policy.target_uids is not None or identity.policy.target_comm is not None):
            try:
                status = read_status(spec.pid)
            except ProcessGone:
                raise ProcessGone(errno.ESRCH, f"process {spec.pid} does not exist") from None
            identity.check_target(spec.pid, status.effective_uid, status.name)

    @rpc
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.Session:
        try:
            mode = AttachMode(request.attach_mode) if request.attach_mode else _infer_mode(request)
        except ValueError:
            raise UsageError(f"unknown attach_mode {request.attach_mode}") from None
        _check_labels(dict(request.labels))
        if mode != AttachMode.SPAWN and request.argv:
            raise UsageError("argv is only for attach_mode SPAWN")
        if mode == AttachMode.SPAWN and request.pid:
            raise UsageError("pid must be 0 for attach_mode SPAWN; the daemon starts the process")
        if mode != AttachMode.COOPERATIVE and request.HasField("uffd_fd"):
            raise UsageError("uffd_fd is only for attach_mode COOPERATIVE")
        spec = SessionSpec(
            attach_mode=mode,
            pid=request.pid,
            uffd_fd=request.uffd_fd if request.HasField("uffd_fd") else None,
            argv=tuple(request.argv),
            env=dict(request.env) or None,
            cwd=request.cwd or None,
            ranges=tuple((int(s), int(e)) for s, e in ranges_from_message(request.ranges).tolist()),
            auto_ranges=request.auto_ranges,
            tick_interval_ms=request.tick_interval_ms,
            labels=dict(request.labels),
            owner=_owner(identity := current_identity()),
            follow_exec=request.follow_exec if request.HasField("follow_exec") else True,
            follow_children=request.follow_children,
            max_staleness_ms=request.max_staleness_ms if request.HasField("max_staleness_ms") else None,
        )
        self._check_create(identity, spec)
        session = await self._manager.create(spec)
        return session_message(session)

    @rpc
    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        return session_message(self._session(request.session_id))

    @rpc
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        identity = current_identity()
        sessions = [
            s for s in self._manager.sessions() if (request.include_ended or s.active) and self._may_touch(identity, s)
        ]
        start = 0
        if request.page_token:
            # The token names the first session of the page; it may have ended (or been
            # pruned) since, so the page starts at its creation time.
            try:
                first_ns = self._manager.get(request.page_token).record.created_at_unix_ns
            except SessionNotFound:
                raise UsageError("page_token is not valid (the session it names is gone)") from None
            start = next((i for i, s in enumerate(sessions) if s.record.created_at_unix_ns >= first_ns), len(sessions))
        page_size = request.page_size or 1000
        page = sessions[start : start + page_size]
        following = sessions[start + page_size : start + page_size + 1]
        return pb.ListSessionsResponse(
            sessions=[session_message(s) for s in page],
            next_page_token=following[0].session_id if following else "",
        )

    @rpc
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any) -> pb.DeleteSessionResponse:
        await self._manager.delete(self._session(request.session_id).session_id, recursive=request.recursive)
        return pb.DeleteSessionResponse()

    @rpc
    async def AddRanges(self, request: pb.AddRangesRequest, context: Any) -> pb.Session:
        session = self._session(request.session_id)
        current_identity().check_limit("max_ranges_per_session", len(session.tracked), len(request.ranges))
        await session.change_ranges(ranges_from_message(request.ranges).tolist(), add=True)
        return session_message(session)

    @rpc
    async def RemoveRanges(self, request: pb.RemoveRangesRequest, context: Any) -> pb.Session:
        session = self._session(request.session_id)
        await session.change_ranges(ranges_from_message(request.ranges).tolist(), add=False)
        return session_message(session)

    async def Subscribe(self, request: pb.SubscribeRequest | MalformedRequest, context: Any) -> None:  # type: ignore[override]
        """Stream deltas with ``context.write`` so a blocked stream can be detected and evicted."""
        if self.stopping:
            # Accepted now, the stream would only be cancelled when the server stops; a subscriber
            # reconnecting after DAEMON_SHUTDOWN must rather back off until the daemon is back.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down; retry")
            return
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details(request))
            return
        try:
            session = self._session(request.session_id)
            if request.HasField("resume_epoch") != request.HasField("resume_seq"):
                raise UsageError("resume_epoch and resume_seq go together")
            resume = (request.resume_epoch, request.resume_seq) if request.HasField("resume_epoch") else None
            if any(
                r.start_address % PAGE_SIZE or r.end_address % PAGE_SIZE or r.end_address <= r.start_address
                for r in request.filter_ranges
            ):
                raise InvalidRange("filter_ranges must be page aligned, each with end_address > start_address")
            filter_ranges = ranges_from_message(request.filter_ranges) if request.filter_ranges else None
            identity = current_identity()
            owner = _owner(identity)
            identity.check_limit("max_subscribers", self._streams_by_owner[owner])
            subscriber = session.subscribe(resume, filter_ranges)
        except WriteWatchError as exc:
            await abort(context, exc)
            return
        evict_after_s = self._manager.settings.subscriber_evict_after_ms / 1000
        self._open_streams += 1
        self._streams_by_owner[owner] += 1
        try:
            while True:
                item = await subscriber.next()
                if isinstance(item, SessionEnd):
                    await context.write(ended_frame(item))
                    return
                for frame in item.frames:
                    await self._write_or_evict(context, frame, session, subscriber, evict_after_s)
        finally:
            subscriber.close()
            self._open_streams -= 1
            self._streams_by_owner[owner] -= 1
            self._streams_closed.set()

    @staticmethod
    async def _write_or_evict(
        context: Any, frame: bytes, session: ManagedSession, subscriber: Subscriber, evict_after_s: float
    ) -> None:
        """Write one frame; a stream blocked past the deadline is evicted from the hub.

        The blocked write itself cannot be withdrawn (gRPC has no way to send a status past
        queued data), so the stream stays open holding that one frame; once the client reads
        again it gets the rest of the frame and then ``SessionEnded(EVICTED)``, and can
        resume from its cursor. Meanwhile the hub queues nothing more for it.
        """
        write = asyncio.ensure_future(context.write(frame))
        # When the stream is cancelled (the client went away) while we wait, nobody awaits the
        # write: take its error here, or asyncio logs "Task exception was never retrieved".
        write.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({write}, timeout=evict_after_s)
        if not done:
            message = f"evicted: the subscriber did not read for {evict_after_s:g} s; resume from your last delta"
            log.warning("session %s: %s", session.session_id, message)
            session.hub.evict(subscriber, message)
        await write

    @rpc
    async def Harvest(self, request: pb.HarvestRequest, context: Any) -> pb.HarvestResponse:
        session = self._session(request.session_id)
        harvested = await session.harvest_now()
        response = pb.HarvestResponse(epoch=harvested.epoch, seq=harvested.seq)
        if harvested.delta is not None:
            response.delta.CopyFrom(delta_message(session.session_id, harvested.delta))
        return response

    @rpc
    async def Flush(self, request: pb.FlushRequest, context: Any) -> pb.FlushResponse:
        epoch, seq = await self._session(request.session_id).flush()
        return pb.FlushResponse(epoch=epoch, seq=seq)

    @rpc
    async def CreateView(self, request: pb.CreateViewRequest, context: Any) -> pb.CreateViewResponse:
        view, created = await self._session(request.session_id).create_view(request.view_id)
        return pb.CreateViewResponse(view=view_message(view), created=created)

    @rpc
    async def ListViews(self, request: pb.ListViewsRequest, context: Any) -> pb.ListViewsResponse:
        session = self._session(request.session_id)
        return pb.ListViewsResponse(views=[view_message(session.views[name]) for name in sorted(session.views)])

    @rpc
    async def DeleteView(self, request: pb.DeleteViewRequest, context: Any) -> pb.DeleteViewResponse:
        await self._session(request.session_id).delete_view(request.view_id)
        return pb.DeleteViewResponse()

    @rpc
    async def Scan(self, request: pb.ScanRequest, context: Any) -> pb.ScanResponse:
        session = self._session(request.session_id)
        if request.end_address <= request.start_address:
            raise UsageError("end_address must be > start_address")
        result = await asyncio.get_running_loop().run_in_executor(
            self._manager.executor,
            functools.partial(
                session.scan,
                request.start_address,
                request.end_address,
                category_mask=request.category_mask,
                category_anyof_mask=request.category_anyof_mask,
                category_inverted=request.category_inverted,
                return_mask=request.return_mask,
                max_pages=request.max_pages,
            ),
        )
        return pb.ScanResponse(
            regions=encode_regions(result.regions[:, :2], page_size_bytes=PAGE_SIZE),
            categories=categories_bytes(result.regions[:, 2]),
            complete=result.complete,
            resume_address=result.resume_at,
        )

    @rpc
    async def GetWriteWatch(self, request: pb.GetWriteWatchRequest, context: Any) -> pb.GetWriteWatchResponse:
        session = self._session(request.session_id)
        result = await session.get_write_watch(
            request.view_id,
            request.base_address,
            request.size_bytes,
            max_count=request.max_count,
            flags=request.flags,
        )
        return pb.GetWriteWatchResponse(addresses=result.addresses, granularity_bytes=result.granularity)

    @rpc
    async def ResetWriteWatch(self, request: pb.ResetWriteWatchRequest, context: Any) -> pb.ResetWriteWatchResponse:
        session = self._session(request.session_id)
        await session.reset_write_watch(request.view_id, request.base_address, request.size_bytes)
        return pb.ResetWriteWatchResponse()

    @rpc
    async def GetDirtyRate(self, request: pb.GetDirtyRateRequest, context: Any) -> pb.DirtyRate:
        session = self._session(request.session_id)
        rate = session.dirty_rate()
        return pb.DirtyRate(
            session_id=session.session_id,
            pages_per_second=rate.pages_per_second,
            bytes_per_second=rate.bytes_per_second,
            regions_per_second=rate.regions_per_second,
            window_ms=rate.window_ms,
        )

    @rpc
    async def GetCapabilities(self, request: pb.GetCapabilitiesRequest, context: Any) -> pb.Capabilities:
        caps = await asyncio.get_running_loop().run_in_executor(self._manager.executor, probe)
        return capabilities_message(caps, __version__, process_events=self._manager.settings.process_events)

    @rpc
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.WhoAmIResponse:
        identity = current_identity()
        return pb.WhoAmIResponse(
            identity=identity.name,
            role=int(identity.role),  # type: ignore[arg-type]
            auth_method=int(identity.method),  # type: ignore[arg-type]
            daemon_version=__version__,
            kernel_version=os.uname().release,
            peer=context.peer(),
        )


def _owner(identity: Identity) -> str:
    """The owner recorded for sessions and streams: kind and name, so a token and a certificate never share."""
    return identity.name if identity.kind == "unix-socket" else f"{identity.kind}:{identity.name}"


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _infer_mode(request: pb.CreateSessionRequest) -> AttachMode:
    if request.HasField("uffd_fd"):
        return AttachMode.COOPERATIVE
    if request.argv:
        return AttachMode.SPAWN
    return AttachMode.INJECT


def _serialize(message: Any) -> bytes:
    # Deltas arrive already serialized (once for every stream); everything else is a message.
    return message if isinstance(message, bytes) else message.SerializeToString()


def generic_handler(servicer: WriteWatchServicer) -> grpc.GenericRpcHandler[Any, Any]:
    """The service's handler, with a pass-through serializer for pre-serialized stream frames."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    service = pb.DESCRIPTOR.services_by_name["WriteWatch"]
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                implementation, request_deserializer=request_parser(request_class), response_serializer=_serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                implementation, request_deserializer=request_parser(request_class), response_serializer=_serialize
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
