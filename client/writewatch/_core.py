"""What the blocking and the asyncio client share, without I/O (as httpx does).

The request builders, and :class:`SubscriptionState`: the cursor, the fragments of the delta
being received and the reconnect decisions of one subscription. Each client is a thin shell
that sends what these build and feeds them what the daemon answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import AttachMode, EndReason, RetryPolicy
from ._wire import FragmentCollector, RangesArg, create_request, pages_in, subscribe_request

__all__ = [
    "RESUMABLE_ENDS",
    "RETRYABLE_CODES",
    "StreamEnd",
    "SubscriptionState",
    "attach_request",
    "get_write_watch_request",
    "scan_request",
    "spawn_request",
]

# Ends of a stream, not of the session: a subscriber that reconnects resumes from its cursor.
RESUMABLE_ENDS = (EndReason.EVICTED, EndReason.DAEMON_SHUTDOWN)

# The client never cancels a stream it still reads, so CANCELLED comes from the other side: a
# stopping daemon cancels the streams that reached it after its last SessionEnded, and gRPC
# refuses calls with it when more than the daemon's max_pending_calls wait to be accepted.
RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def attach_request(
    pid: int,
    ranges: RangesArg,
    *,
    uffd_fd: int | None,
    tick_interval_ms: int,
    labels: Mapping[str, str] | None,
    follow_exec: bool,
    follow_children: bool,
    max_staleness_ms: int | None = None,
) -> pb.CreateSessionRequest:
    """CreateSession for a running process: cooperative with the target's ``uffd_fd``, else by injection."""
    mode = AttachMode.COOPERATIVE if uffd_fd is not None else AttachMode.INJECT
    return create_request(
        pid=pid,
        attach_mode=mode,
        ranges=ranges,
        uffd_fd=uffd_fd,
        tick_interval_ms=tick_interval_ms,
        labels=labels,
        follow_exec=follow_exec,
        follow_children=follow_children,
        max_staleness_ms=max_staleness_ms,
    )


def spawn_request(
    argv: Sequence[str],
    ranges: RangesArg,
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    tick_interval_ms: int,
    labels: Mapping[str, str] | None,
    follow_exec: bool,
    follow_children: bool,
    max_staleness_ms: int | None = None,
) -> pb.CreateSessionRequest:
    """CreateSession for a program the daemon starts; raises ValueError without a program."""
    if not argv:
        raise ValueError("argv must name a program")
    return create_request(
        pid=0,
        attach_mode=AttachMode.SPAWN,
        ranges=ranges,
        argv=argv,
        env=env,
        cwd=cwd,
        tick_interval_ms=tick_interval_ms,
        labels=labels,
        follow_exec=follow_exec,
        follow_children=follow_children,
        max_staleness_ms=max_staleness_ms,
    )


def scan_request(
    session_id: str,
    start_address: int,
    end_address: int,
    *,
    category_mask: int,
    category_anyof_mask: int,
    category_inverted: int,
    return_mask: int | None,
    max_pages: int,
) -> pb.ScanRequest:
    """A Scan request; ``return_mask`` defaults to ``category_mask | category_anyof_mask``."""
    return pb.ScanRequest(
        session_id=session_id,
        start_address=start_address,
        end_address=end_address,
        category_mask=category_mask,
        category_anyof_mask=category_anyof_mask,
        category_inverted=category_inverted,
        return_mask=category_mask | category_anyof_mask if return_mask is None else return_mask,
        max_pages=max_pages,
    )


def get_write_watch_request(
    session_id: str, view_id: str, base_address: int, size_bytes: int, *, max_count: int | None, reset: bool
) -> pb.GetWriteWatchRequest:
    """A GetWriteWatch request; ``max_count`` defaults to as many pages as the range can span."""
    return pb.GetWriteWatchRequest(
        session_id=session_id,
        view_id=view_id,
        base_address=base_address,
        size_bytes=size_bytes,
        flags=pb.WRITE_WATCH_FLAG_RESET if reset else 0,
        max_count=pages_in(size_bytes) if max_count is None else max_count,
    )


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a subscription ended: the session's end reason and message."""

    reason: EndReason
    message: str


class SubscriptionState:
    """One subscription without I/O: what to ask for, what a message means, whether to reopen.

    The shell loops while not :attr:`done`: it opens a stream with :meth:`request`, feeds each
    message to :meth:`receive` (yielding the whole deltas it returns, leaving the stream when
    :attr:`stream_over`), calls :meth:`closed` when the stream is left or closes, and on a
    gRPC error waits :meth:`retry_after_s` or raises when that is None. A resumed stream
    starts after :attr:`cursor`, the last delta delivered, so no seq is skipped or repeated.
    """

    def __init__(
        self,
        session_id: str,
        resume: tuple[int, int] | None,
        filter_ranges: Iterable[tuple[int, int]] | None,
        *,
        reconnect: bool,
        retry: RetryPolicy,
    ) -> None:
        self.session_id = session_id
        self.cursor = resume
        """``(epoch, seq)`` of the last delta delivered (or the resume point)."""
        self.end: StreamEnd | None = None
        """Set when the session ended (not when a stream was evicted or the daemon restarts)."""
        self.stream_over = False
        """The current stream has nothing more to give: leave it (then :meth:`closed`)."""
        self._filters = list(filter_ranges or ())
        self._reconnect = reconnect
        self._retry = retry
        self._collector = FragmentCollector()
        self._failures = 0
        self._closed_without_end = False

    @property
    def done(self) -> bool:
        """Whether the subscription is over (the session ended, or the daemon closed the stream)."""
        return self.end is not None or self._closed_without_end

    def request(self) -> pb.SubscribeRequest:
        """The request that opens a stream after the cursor (fragments of a broken one are dropped)."""
        self._collector.reset()
        self.stream_over = False
        return subscribe_request(self.session_id, self.cursor, self._filters)

    def receive(self, response: pb.SubscribeResponse) -> list[pb.Delta] | None:
        """One message: the fragments of a new whole delta, else None."""
        self._failures = 0
        if response.HasField("session_ended"):
            reason = EndReason(response.session_ended.reason)
            if reason not in RESUMABLE_ENDS or not self._reconnect:
                self.end = StreamEnd(reason, response.session_ended.message)
            # Otherwise the session goes on (an evicted stream, a restarting daemon): reopen from the cursor.
            self.stream_over = True
            return None
        fragments = self._collector.add(response.delta)
        if fragments is None:
            return None
        last = fragments[-1]
        if self.cursor is not None and last.epoch == self.cursor[0] and last.seq <= self.cursor[1]:
            return None  # delivered before the stream was resumed
        self.cursor = (last.epoch, last.seq)
        return fragments

    def closed(self) -> None:
        """The stream was left or closed; closed by the daemon without an end, the subscription is over."""
        if not self.stream_over:
            self._closed_without_end = True

    def retry_after_s(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before reopening after ``error`` (UNAVAILABLE, CANCELLED, attempts left); None: raise it."""
        self._failures += 1
        code: Callable[[], grpc.StatusCode] | None = getattr(error, "code", None)
        retryable = code is not None and code() in RETRYABLE_CODES
        if not (self._reconnect and retryable and self._failures <= self._retry.max_attempts):
            return None
        return self._retry.backoff_s(self._failures)
