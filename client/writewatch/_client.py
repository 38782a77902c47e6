"""Blocking client: Client, Session, View."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from ._connect import Connection, explain, resolve
from ._core import SubscriptionState, attach_request, get_write_watch_request, scan_request, spawn_request
from ._exceptions import NotFound, RpcError, from_grpc_error
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub
from ._types import Delta, EndReason, RetryPolicy, ScanResult, WriteWatchResult
from ._wire import CHANNEL_OPTIONS, RangesArg, delta_from_pb, join_fragments, scan_result, to_ranges, write_watch_result

__all__ = ["Client", "Session", "View"]

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)


class Client:
    """Blocking client of writewatchd.

    ``address`` is a gRPC target (``unix:/path``, a bare socket path, ``host:port``). A
    ``host:port`` uses TLS: ``tls_ca_file`` (default: the system CAs), an optional client
    certificate ``tls_cert_file``/``tls_key_file``, or ready ``credentials``; plaintext only
    with ``insecure=True``. ``token`` (or ``token_file``) is sent as a bearer token. Options not
    given come from ``profile`` (a section of ``~/.config/writewatch/config.toml``), then from
    ``WRITEWATCH_ADDRESS``, ``WRITEWATCH_TOKEN``, ``WRITEWATCH_TLS_CA``/``_CERT``/``_KEY``;
    the default address is :func:`writewatch.default_address`. Unary calls time out after
    ``timeout_s``; streams never do.
    """

    def __init__(
        self,
        address: str | Connection | None = None,
        *,
        timeout_s: float | None = 30.0,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls_ca_file: str | os.PathLike[str] | None = None,
        tls_cert_file: str | os.PathLike[str] | None = None,
        tls_key_file: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        profile: str | None = None,
        insecure: bool | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.connection = resolve(
            address,
            token=token,
            token_file=token_file,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_server_name=tls_server_name,
            profile=profile,
            insecure=insecure,
            credentials=credentials,
        )
        self.address = self.connection.target
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._metadata = self.connection.metadata
        self._channel = self.connection.channel(CHANNEL_OPTIONS)
        self._stub = WriteWatchStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; sessions keep running in the daemon."""
        self._channel.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request) -> _Response:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _error(self, error: grpc.RpcError) -> RpcError:
        """The client exception for a failed call, explained for the remote user."""
        return explain(self.connection, from_grpc_error(error), self.timeout_s)

    def attach(
        self,
        pid: int,
        ranges: RangesArg = "auto",
        *,
        uffd_fd: int | None = None,
        tick_interval_ms: int = 0,
        labels: Mapping[str, str] | None = None,
        follow_exec: bool = True,
        follow_children: bool = False,
        max_staleness_ms: int | None = None,
    ) -> Session:
        """Track a running process: cooperative with the target's ``uffd_fd``, else by injection.

        ``follow_exec``: continue through execve in a new epoch starting with a RESYNC (auto
        ranges only); ``follow_children``: each child process becomes a session of its own,
        with ``parent_session_id`` and these labels. ``max_staleness_ms``: the longest a write
        may wait for a tick to scan its range (heat scheduling; None: the daemon's default,
        1000; 0: every range every tick).
        """
        request = attach_request(
            pid,
            ranges,
            uffd_fd=uffd_fd,
            tick_interval_ms=tick_interval_ms,
            labels=labels,
            follow_exec=follow_exec,
            follow_children=follow_children,
            max_staleness_ms=max_staleness_ms,
        )
        return Session(self, self._call(self._stub.CreateSession, request))

    def spawn(
        self,
        argv: Sequence[str],
        ranges: RangesArg = "auto",
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tick_interval_ms: int = 0,
        labels: Mapping[str, str] | None = None,
        follow_exec: bool = True,
        follow_children: bool = False,
        max_staleness_ms: int | None = None,
    ) -> Session:
        """Start ``argv`` under tracking from its first instruction (env/cwd default to the daemon's).

        ``follow_exec`` and ``follow_children`` as for :meth:`attach`: with both, a launcher
        chain (``sh -c 'exec …'``, a Python launcher forking helpers) is tracked program by program.
        """
        request = spawn_request(
            argv,
            ranges,
            env=env,
            cwd=cwd,
            tick_interval_ms=tick_interval_ms,
            labels=labels,
            follow_exec=follow_exec,
            follow_children=follow_children,
            max_staleness_ms=max_staleness_ms,
        )
        return Session(self, self._call(self._stub.CreateSession, request))

    def session(self, session_id: str) -> Session:
        """The session with this id (NotFound if there is none)."""
        return Session(self, self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id)))

    def sessions(self, *, include_ended: bool = False) -> list[Session]:
        """The daemon's active sessions, oldest first; with ``include_ended`` also the ended ones it keeps."""
        sessions: list[Session] = []
        page_token = ""
        while True:
            response = self._call(
                self._stub.ListSessions, pb.ListSessionsRequest(page_token=page_token, include_ended=include_ended)
            )
            sessions.extend(Session(self, snapshot) for snapshot in response.sessions)
            page_token = response.next_page_token
            if not page_token:
                return sessions

    def capabilities(self) -> pb.Capabilities:
        """The daemon's kernel probe and version."""
        return self._call(self._stub.GetCapabilities, pb.GetCapabilitiesRequest())

    def whoami(self) -> pb.WhoAmIResponse:
        """Who the daemon takes this client for (identity, role), with its version and kernel."""
        return self._call(self._stub.WhoAmI, pb.WhoAmIRequest())


class Session:
    """Handle of one tracked process. ``snapshot`` is the state last fetched (see :meth:`info`).

    Used as a context manager, the session is deleted (:meth:`close`) on exit.
    """

    def __init__(self, client: Client, snapshot: pb.Session) -> None:
        self.client = client
        self.snapshot = snapshot
        self.end_reason: EndReason | None = None
        """Why the last subscription ended (set when its iterator finishes), else None."""
        self.end_message = ""

    @property
    def id(self) -> str:
        """The session id."""
        return self.snapshot.session_id

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, pid={self.snapshot.pid})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def info(self) -> pb.Session:
        """Fetch and return a fresh snapshot."""
        self.snapshot = self.client._call(self.client._stub.GetSession, pb.GetSessionRequest(session_id=self.id))
        return self.snapshot

    def close(self, *, recursive: bool = False) -> None:
        """Stop tracking (DeleteSession); closing an already deleted session is not an error.

        ``recursive`` also closes the sessions of every followed descendant.
        """
        try:
            self.client._call(
                self.client._stub.DeleteSession, pb.DeleteSessionRequest(session_id=self.id, recursive=recursive)
            )
        except NotFound:
            return

    def add_ranges(self, ranges: Iterable[tuple[int, int]]) -> pb.Session:
        """Track more ``[start, end)`` ranges; returns the new snapshot."""
        request = pb.AddRangesRequest(session_id=self.id, ranges=to_ranges(ranges))
        self.snapshot = self.client._call(self.client._stub.AddRanges, request)
        return self.snapshot

    def remove_ranges(self, ranges: Iterable[tuple[int, int]]) -> pb.Session:
        """Stop tracking ``[start, end)`` ranges; returns the new snapshot."""
        request = pb.RemoveRangesRequest(session_id=self.id, ranges=to_ranges(ranges))
        self.snapshot = self.client._call(self.client._stub.RemoveRanges, request)
        return self.snapshot

    def harvest(self) -> Delta | None:
        """Harvest now and publish; the delta this call published, or None when it found nothing new.

        Not a barrier: None does not mean "nothing was written", since a tick harvest may
        have published the writes a moment earlier (use :meth:`flush` to wait for writes).
        """
        response = self.client._call(self.client._stub.Harvest, pb.HarvestRequest(session_id=self.id))
        return delta_from_pb(response.delta) if response.HasField("delta") else None

    def flush(self) -> tuple[int, int]:
        """A barrier: ``(epoch, seq)`` such that every write completed before the call is in a
        published delta of ``epoch`` with a seq <= ``seq``, also when nothing new was written."""
        response = self.client._call(self.client._stub.Flush, pb.FlushRequest(session_id=self.id))
        return response.epoch, response.seq

    def scan(
        self,
        start_address: int,
        end_address: int,
        *,
        category_mask: int = 0,
        category_anyof_mask: int = 0,
        category_inverted: int = 0,
        return_mask: int | None = None,
        max_pages: int = 0,
    ) -> ScanResult:
        """Read-only PAGEMAP_SCAN of ``[start_address, end_address)`` with these ``PageCategory`` masks.

        ``return_mask`` defaults to ``category_mask | category_anyof_mask``; ``max_pages`` 0: no limit.
        """
        request = scan_request(
            self.id,
            start_address,
            end_address,
            category_mask=category_mask,
            category_anyof_mask=category_anyof_mask,
            category_inverted=category_inverted,
            return_mask=return_mask,
            max_pages=max_pages,
        )
        return scan_result(self.client._call(self.client._stub.Scan, request))

    def dirty_rate(self) -> pb.DirtyRate:
        """Recent write rate."""
        return self.client._call(self.client._stub.GetDirtyRate, pb.GetDirtyRateRequest(session_id=self.id))

    def view(self, name: str) -> View:
        """The write-watch view called ``name``, created on the daemon if it does not exist.

        A new view is empty and sees every write made after this call returns, whatever the
        tick harvests do; an existing view is returned unchanged.
        """
        request = pb.CreateViewRequest(session_id=self.id, view_id=name)
        self.client._call(self.client._stub.CreateView, request)
        return View(self, name)

    def views(self) -> list[pb.View]:
        """The session's views, by name."""
        request = pb.ListViewsRequest(session_id=self.id)
        return list((self.client._call(self.client._stub.ListViews, request)).views)

    def subscribe(
        self,
        resume: tuple[int, int] | None = None,
        *,
        filter_ranges: Iterable[tuple[int, int]] | None = None,
        reconnect: bool = True,
    ) -> Iterator[Delta]:
        """Yield every delta until the session ends, then set ``end_reason``.

        Without ``resume`` the stream starts at the beginning of the current epoch (replayed,
        or one resync delta); ``resume=(epoch, seq)`` starts after that delta. With
        ``reconnect`` a stream that breaks (UNAVAILABLE, CANCELLED), is evicted, or ends because the daemon
        restarts is reopened (``client.retry``) after the last delta yielded, so no seq is
        skipped or repeated; a new epoch starts with a resync.
        """
        state = SubscriptionState(self.id, resume, filter_ranges, reconnect=reconnect, retry=self.client.retry)
        while not state.done:
            call = self.client._stub.Subscribe(state.request(), metadata=self.client._metadata)
            try:
                for response in call:
                    fragments = state.receive(response)
                    if fragments is not None:
                        yield join_fragments(fragments)
                    elif state.stream_over:
                        break
                state.closed()
            except grpc.RpcError as error:
                delay_s = state.retry_after_s(error)
                if delay_s is None:
                    raise self.client._error(error) from None
                time.sleep(delay_s)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
        if state.end is not None:
            self.end_reason, self.end_message = state.end.reason, state.end.message


class View:
    """A named write-watch view of a session with Win32 GetWriteWatch/ResetWriteWatch semantics."""

    def __init__(self, session: Session, name: str) -> None:
        self.session = session
        self.name = name

    def __repr__(self) -> str:
        return f"View(session={self.session.id!r}, name={self.name!r})"

    def get_write_watch(
        self, base_address: int, size_bytes: int, *, max_count: int | None = None, reset: bool = False
    ) -> WriteWatchResult:
        """Written pages of ``[base_address, base_address + size_bytes)`` in ascending order.

        At most ``max_count`` addresses (default: as many as the range has pages); with
        ``reset`` the returned pages are cleared in this view only.
        """
        request = get_write_watch_request(
            self.session.id, self.name, base_address, size_bytes, max_count=max_count, reset=reset
        )
        client = self.session.client
        return write_watch_result(client._call(client._stub.GetWriteWatch, request))

    def reset_write_watch(self, base_address: int, size_bytes: int) -> None:
        """Clear the written state of ``[base_address, base_address + size_bytes)`` in this view."""
        request = pb.ResetWriteWatchRequest(
            session_id=self.session.id, view_id=self.name, base_address=base_address, size_bytes=size_bytes
        )
        client = self.session.client
        client._call(client._stub.ResetWriteWatch, request)

    def delete(self) -> None:
        """Delete the view on the daemon (NotFound when it is already gone)."""
        request = pb.DeleteViewRequest(session_id=self.session.id, view_id=self.name)
        client = self.session.client
        client._call(client._stub.DeleteView, request)
