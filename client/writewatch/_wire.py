"""Shared by the sync and async clients: request building and response decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from google.protobuf.message import DecodeError

from ._exceptions import ProtocolError
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta, ScanResult, WriteWatchResult
from .regions import DEFAULT_PAGE_SIZE_BYTES, Regions, count_pages, decode_regions, encode_regions

__all__ = [
    "CHANNEL_OPTIONS",
    "FragmentAssembler",
    "FragmentCollector",
    "RangesArg",
    "create_request",
    "decode_delta",
    "delta_from_pb",
    "delta_to_pb",
    "join_fragments",
    "pages_in",
    "scan_result",
    "subscribe_request",
    "to_ranges",
    "write_watch_result",
]

RangesArg = Sequence[tuple[int, int]] | Literal["auto"]
"""Explicit ``[(start, end), ...]`` byte ranges, or ``"auto"`` for every writable private mapping."""

# Harvest replies are whole deltas (never fragmented) and can be large.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def pages_in(size_bytes: int) -> int:
    """Pages a range of size_bytes can span at most (at least 1, the daemon refuses 0)."""
    return max(1, -(-size_bytes // DEFAULT_PAGE_SIZE_BYTES) + 1)


def to_ranges(ranges: Iterable[tuple[int, int]]) -> list[pb.AddressRange]:
    """AddressRange messages from ``(start, end)`` pairs."""
    return [pb.AddressRange(start_address=int(start), end_address=int(end)) for start, end in ranges]


def create_request(
    *,
    pid: int,
    attach_mode: int,
    ranges: RangesArg,
    uffd_fd: int | None = None,
    argv: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    tick_interval_ms: int = 0,
    labels: Mapping[str, str] | None = None,
    follow_exec: bool = True,
    follow_children: bool = False,
    max_staleness_ms: int | None = None,
) -> pb.CreateSessionRequest:
    """The CreateSession request for attach or spawn (``max_staleness_ms`` None: the daemon's default)."""
    request = pb.CreateSessionRequest(
        pid=pid,
        attach_mode=attach_mode,  # type: ignore[arg-type]
        argv=list(argv),
        env=dict(env or {}),
        cwd=cwd or "",
        tick_interval_ms=tick_interval_ms,
        labels=dict(labels or {}),
        follow_exec=follow_exec,
        follow_children=follow_children,
    )
    if uffd_fd is not None:
        request.uffd_fd = uffd_fd
    if max_staleness_ms is not None:
        request.max_staleness_ms = max_staleness_ms
    if isinstance(ranges, str):
        if ranges != "auto":
            raise ValueError(f'ranges must be a sequence of (start, end) or "auto", not {ranges!r}')
        request.auto_ranges = True
    else:
        request.ranges.extend(to_ranges(ranges))
    return request


def subscribe_request(
    session_id: str, resume: tuple[int, int] | None, filter_ranges: Iterable[tuple[int, int]] | None
) -> pb.SubscribeRequest:
    """The Subscribe request resuming after ``resume = (epoch, seq)`` if given."""
    request = pb.SubscribeRequest(session_id=session_id, filter_ranges=to_ranges(filter_ranges or ()))
    if resume is not None:
        request.resume_epoch, request.resume_seq = resume
    return request


def delta_from_pb(message: pb.Delta, regions: Regions | None = None) -> Delta:
    """A Delta from one wire message: that fragment's own regions, or ``regions`` of the joined delta."""
    if regions is None:
        regions = decode_regions(message.regions)
        fragment_index, n_fragments = message.fragment_index, message.n_fragments or 1
    else:
        fragment_index, n_fragments = 0, 1
    return Delta(
        session_id=message.session_id,
        epoch=message.epoch,
        seq=message.seq,
        first_seq=message.first_seq or message.seq,
        resync=message.resync,
        harvested_at_unix_ns=message.harvested_at_unix_ns,
        regions=regions,
        page_size_bytes=message.regions.page_size_bytes or DEFAULT_PAGE_SIZE_BYTES,
        fragment_index=fragment_index,
        n_fragments=n_fragments,
        covered=decode_regions(message.covered) if message.partial else None,
    )


def delta_to_pb(delta: Delta) -> pb.Delta:
    """The wire message of a whole delta (one fragment): the inverse of :func:`delta_from_pb`."""
    return pb.Delta(
        session_id=delta.session_id,
        epoch=delta.epoch,
        seq=delta.seq,
        first_seq=delta.first_seq,
        resync=delta.resync,
        harvested_at_unix_ns=delta.harvested_at_unix_ns,
        regions=encode_regions(delta.regions, page_size_bytes=delta.page_size_bytes),
        fragment_index=0,
        n_fragments=1,
        n_regions=len(delta.regions),
        n_pages=count_pages(delta.regions, delta.page_size_bytes),
        partial=delta.covered is not None,
        covered=encode_regions(delta.covered, page_size_bytes=delta.page_size_bytes)
        if delta.covered is not None
        else None,
    )


def decode_delta(payload: bytes) -> Delta:
    """One serialized ``writewatch.v1.Delta`` (an exported message): a whole delta, or one fragment of it.

    A fragment has ``n_fragments > 1``; :class:`FragmentAssembler` joins the fragments of a delta.
    """
    try:
        message = pb.Delta.FromString(payload)
    except DecodeError as error:
        raise ProtocolError(f"not a writewatch.v1.Delta: {error}") from None
    try:
        return delta_from_pb(message)
    except ValueError as error:
        raise ProtocolError(f"bad regions in a writewatch.v1.Delta: {error}") from None


class FragmentAssembler:
    """Joins the fragments of a delta, in order; a delta is complete only with its last fragment."""

    def __init__(self) -> None:
        self._first: Delta | None = None
        self._parts: list[Regions] = []
        self._resync = False

    def reset(self) -> None:
        """Drop a partly received delta (its stream broke; the resumed stream resends it)."""
        self._first = None
        self._parts = []
        self._resync = False

    @property
    def pending(self) -> Delta | None:
        """The first fragment of a partly received delta, if any."""
        return self._first

    @property
    def n_received(self) -> int:
        """Fragments received of the partly received delta."""
        return len(self._parts)

    def add(self, fragment: pb.Delta | Delta) -> Delta | None:
        """Add one fragment (wire message or decoded); returns the whole delta after its last, else None."""
        part = delta_from_pb(fragment) if isinstance(fragment, pb.Delta) else fragment
        key = (part.epoch, part.seq)
        pending = self._first
        expected_index = len(self._parts) if pending is not None and key == (pending.epoch, pending.seq) else 0
        if part.fragment_index != expected_index or part.fragment_index >= part.n_fragments:
            raise ProtocolError(
                f"fragment {part.fragment_index}/{part.n_fragments} of delta {key} arrived, "
                f"expected fragment {expected_index}"
            )
        if expected_index == 0 and pending is not None:
            raise ProtocolError(
                f"delta {(pending.epoch, pending.seq)} ended after {len(self._parts)} fragments, before its last"
            )
        if pending is None or expected_index == 0:
            self._first = part
        self._parts.append(part.regions)
        # Over-report rather than under-report: one fragment saying resync is enough.
        self._resync |= part.resync
        if part.fragment_index + 1 < part.n_fragments:
            return None
        parts, resync, first = self._parts, self._resync, self._first
        self.reset()
        regions = parts[0] if len(parts) == 1 else np.concatenate(parts)
        covered = first.covered if first is not None else None  # the first fragment carries it
        return dataclasses.replace(
            part, regions=regions, resync=resync, fragment_index=0, n_fragments=1, covered=covered
        )


class FragmentCollector:
    """Collects the wire messages of a delta in order; returns them all with the last one."""

    def __init__(self) -> None:
        self._parts: list[pb.Delta] = []

    def reset(self) -> None:
        """Drop a partly received delta (its stream broke; the resumed stream resends it)."""
        self._parts = []

    def add(self, message: pb.Delta) -> list[pb.Delta] | None:
        """Add one fragment; returns every fragment of the delta after its last, else None."""
        n_fragments = message.n_fragments or 1
        first = self._parts[0] if self._parts else None
        same = first is not None and (first.epoch, first.seq) == (message.epoch, message.seq)
        expected_index = len(self._parts) if same else 0
        if message.fragment_index != expected_index or message.fragment_index >= n_fragments:
            raise ProtocolError(
                f"fragment {message.fragment_index}/{n_fragments} of delta {(message.epoch, message.seq)} "
                f"arrived, expected fragment {expected_index}"
            )
        if expected_index == 0 and first is not None:
            raise ProtocolError(f"delta {(first.epoch, first.seq)} ended after {len(self._parts)} fragments")
        self._parts.append(message)
        if message.fragment_index + 1 < n_fragments:
            return None
        parts = self._parts
        self._parts = []
        return parts


def join_fragments(fragments: Sequence[pb.Delta]) -> Delta:
    """The whole delta of a complete, ordered list of wire fragments."""
    assembler = FragmentAssembler()
    for message in fragments:
        delta = assembler.add(message)
        if delta is not None:
            return delta
    raise ProtocolError(f"{len(fragments)} fragments do not make a whole delta")


def scan_result(response: pb.ScanResponse) -> ScanResult:
    """A ScanResult from its wire message."""
    regions = decode_regions(response.regions)
    categories = np.frombuffer(response.categories, dtype="<u8").astype(np.uint64)
    if not response.categories:
        # A daemon may leave categories out when return_mask selects none.
        categories = np.zeros(len(regions), dtype=np.uint64)
    if len(categories) != len(regions):
        raise ProtocolError(f"scan returned {len(regions)} regions but {len(categories)} categories")
    return ScanResult(
        regions=regions,
        categories=categories,
        complete=response.complete,
        resume_address=response.resume_address,
    )


def write_watch_result(response: pb.GetWriteWatchResponse) -> WriteWatchResult:
    """A WriteWatchResult from its wire message."""
    return WriteWatchResult(
        addresses=list(response.addresses),
        granularity_bytes=response.granularity_bytes or DEFAULT_PAGE_SIZE_BYTES,
    )
