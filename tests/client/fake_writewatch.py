"""A scripted in-process fake of the WriteWatch service, for client tests (a test seam, not a server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from writewatch import RetryPolicy
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch._proto.writewatch.v1 import writewatch_pb2_grpc as pb_grpc
from writewatch.regions import encode_regions

EPOCH = 3
SESSION_ID = "s-1"
# Reconnect instantly: tests must not depend on timing.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0)


@dataclass(frozen=True)
class Abort:
    """Script step: end the stream with this status."""

    code: grpc.StatusCode
    message: str = "scripted failure"


def delta(
    seq: int, regions: list[tuple[int, int]], *, index: int = 0, n_fragments: int = 1, **fields: object
) -> pb.SubscribeResponse:
    """One Delta message (or fragment) of a Subscribe stream."""
    values: dict[str, object] = {"session_id": SESSION_ID, "epoch": EPOCH, "first_seq": seq, **fields}
    message = pb.Delta(
        seq=seq,
        regions=encode_regions(np.array(regions, dtype=np.uint64).reshape(-1, 2)),
        fragment_index=index,
        n_fragments=n_fragments,
        **values,  # type: ignore[arg-type]
    )
    return pb.SubscribeResponse(delta=message)


def ended(reason: int = pb.END_REASON_EXITED, message: str = "exited with status 0") -> pb.SubscribeResponse:
    """The final SessionEnded message of a stream."""
    return pb.SubscribeResponse(session_ended=pb.SessionEnded(reason=reason, message=message))  # type: ignore[arg-type]


@dataclass
class FakeWriteWatch(pb_grpc.WriteWatchServicer):
    """Answers from scripted state and records every request it receives."""

    sessions: dict[str, pb.Session] = field(default_factory=dict)
    streams: list[list[pb.SubscribeResponse | Abort]] = field(default_factory=list)
    errors: dict[str, Abort] = field(default_factory=dict)
    harvest_delta: pb.Delta | None = None
    scan_response: pb.ScanResponse = field(default_factory=pb.ScanResponse)
    write_watch_addresses: list[int] = field(default_factory=list)
    views: dict[str, int] = field(default_factory=dict)
    page_size_bytes: int = 4096
    requests: dict[str, list[object]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.requests.setdefault(method, []).append(request)
        abort = self.errors.get(method)
        if abort is not None:
            context.abort(abort.code, abort.message)

    def _session(self, session_id: str, context: grpc.ServicerContext) -> pb.Session:
        if session_id not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} not found")
        return self.sessions[session_id]

    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.Session:
        self._record("CreateSession", request, context)
        session = pb.Session(
            session_id=f"s-{len(self.sessions) + 1}",
            pid=request.pid or 4242,
            attach_mode=request.attach_mode,
            state=pb.SESSION_STATE_ACTIVE,
            ranges=request.ranges,
            auto_ranges=request.auto_ranges,
            labels=request.labels,
            epoch=EPOCH,
        )
        self.sessions[session.session_id] = session
        return session

    def GetSession(self, request: pb.GetSessionRequest, context: grpc.ServicerContext) -> pb.Session:
        self._record("GetSession", request, context)
        return self._session(request.session_id, context)

    def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.ServicerContext) -> pb.ListSessionsResponse:
        self._record("ListSessions", request, context)
        # One session per page, so that clients must follow next_page_token.
        ids = sorted(self.sessions)
        index = int(request.page_token or 0)
        page = [self.sessions[i] for i in ids[index : index + 1]]
        next_token = str(index + 1) if index + 1 < len(ids) else ""
        return pb.ListSessionsResponse(sessions=page, next_page_token=next_token)

    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        self._record("DeleteSession", request, context)
        self._session(request.session_id, context)
        del self.sessions[request.session_id]
        return pb.DeleteSessionResponse()

    def AddRanges(self, request: pb.AddRangesRequest, context: grpc.ServicerContext) -> pb.Session:
        self._record("AddRanges", request, context)
        session = self._session(request.session_id, context)
        session.ranges.extend(request.ranges)
        return session

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.ServicerContext) -> Iterator[pb.SubscribeResponse]:
        self._record("Subscribe", request, context)
        self._session(request.session_id, context)
        with self.lock:
            script = self.streams.pop(0) if self.streams else [Abort(grpc.StatusCode.UNAVAILABLE, "no script left")]
        for step in script:
            if isinstance(step, Abort):
                context.abort(step.code, step.message)
            yield step

    def Harvest(self, request: pb.HarvestRequest, context: grpc.ServicerContext) -> pb.HarvestResponse:
        self._record("Harvest", request, context)
        self._session(request.session_id, context)
        return pb.HarvestResponse(delta=self.harvest_delta)

    def Flush(self, request: pb.FlushRequest, context: grpc.ServicerContext) -> pb.FlushResponse:
        self._record("Flush", request, context)
        session = self._session(request.session_id, context)
        return pb.FlushResponse(epoch=session.epoch, seq=session.last_seq)

    def CreateView(self, request: pb.CreateViewRequest, context: grpc.ServicerContext) -> pb.CreateViewResponse:
        self._record("CreateView", request, context)
        self._session(request.session_id, context)
        created = request.view_id not in self.views
        self.views.setdefault(request.view_id, 0)
        return pb.CreateViewResponse(view=pb.View(view_id=request.view_id), created=created)

    def ListViews(self, request: pb.ListViewsRequest, context: grpc.ServicerContext) -> pb.ListViewsResponse:
        self._record("ListViews", request, context)
        self._session(request.session_id, context)
        return pb.ListViewsResponse(views=[pb.View(view_id=v, n_pages=n) for v, n in sorted(self.views.items())])

    def DeleteView(self, request: pb.DeleteViewRequest, context: grpc.ServicerContext) -> pb.DeleteViewResponse:
        self._record("DeleteView", request, context)
        if self.views.pop(request.view_id, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no view {request.view_id!r}")
        return pb.DeleteViewResponse()

    def Scan(self, request: pb.ScanRequest, context: grpc.ServicerContext) -> pb.ScanResponse:
        self._record("Scan", request, context)
        return self.scan_response

    def GetWriteWatch(
        self, request: pb.GetWriteWatchRequest, context: grpc.ServicerContext
    ) -> pb.GetWriteWatchResponse:
        self._record("GetWriteWatch", request, context)
        addresses = self.write_watch_addresses[: request.max_count or None]
        return pb.GetWriteWatchResponse(addresses=addresses, granularity_bytes=4096)

    def ResetWriteWatch(
        self, request: pb.ResetWriteWatchRequest, context: grpc.ServicerContext
    ) -> pb.ResetWriteWatchResponse:
        self._record("ResetWriteWatch", request, context)
        return pb.ResetWriteWatchResponse()

    def GetDirtyRate(self, request: pb.GetDirtyRateRequest, context: grpc.ServicerContext) -> pb.DirtyRate:
        self._record("GetDirtyRate", request, context)
        return pb.DirtyRate(
            session_id=request.session_id, pages_per_second=10.0, bytes_per_second=40960.0, window_ms=1000
        )

    def GetCapabilities(self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext) -> pb.Capabilities:
        self._record("GetCapabilities", request, context)
        return pb.Capabilities(
            kernel_version="6.18.0",
            pagemap_scan=True,
            supported_category_mask=0x1FF,
            wp_async=True,
            unpopulated_pte_fix=pb.FIX_STATUS_FIXED,
            pmd_hole_fix=pb.FIX_STATUS_UNKNOWN,
            daemon_version="0.1.0",
            page_size_bytes=self.page_size_bytes,
        )
