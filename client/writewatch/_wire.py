"""Shared by the sync and async clients: request building and response decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from ._exceptions import ProtocolError
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta, ScanResult, WriteWatchResult
from .regions import DEFAULT_PAGE_SIZE_BYTES, Regions, count_pages, decode_regions, encode_regions

__all__ = [
    "CHANNEL_OPTIONS",
    "FragmentAssembler",
    "RangesArg",
    "create_request",
    "delta_from_pb",
    "delta_to_pb",
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
) -> pb.CreateSessionRequest:
    """The CreateSession request for attach or spawn."""
    request = pb.CreateSessionRequest(
        pid=pid,
        attach_mode=attach_mode,  # type: ignore[arg-type]
        argv=list(argv),
        env=dict(env or {}),
        cwd=cwd or "",
        tick_interval_ms=tick_interval_ms,
        labels=dict(labels or {}),
    )
    if uffd_fd is not None:
        request.uffd_fd = uffd_fd
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
    """A Delta from its (last) wire message; regions default to the message's own."""
    return Delta(
        session_id=message.session_id,
        epoch=message.epoch,
        seq=message.seq,
        first_seq=message.first_seq or message.seq,
        resync=message.resync,
        harvested_at_unix_ns=message.harvested_at_unix_ns,
        regions=decode_regions(message.regions) if regions is None else regions,
        page_size_bytes=message.regions.page_size_bytes or DEFAULT_PAGE_SIZE_BYTES,
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
    )


class FragmentAssembler:
    """Joins the fragments of a delta; a delta is complete only with its last fragment."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._parts: list[Regions] = []
        self._resync = False

    def reset(self) -> None:
        """Drop a partly received delta (its stream broke; the resumed stream resends it)."""
        self._key = None
        self._parts = []
        self._resync = False

    def add(self, message: pb.Delta) -> Delta | None:
        """Add one fragment; returns the whole delta after its last fragment, else None."""
        n_fragments = message.n_fragments or 1
        key = (message.epoch, message.seq)
        expected_index = len(self._parts) if key == self._key else 0
        if message.fragment_index != expected_index or message.fragment_index >= n_fragments:
            raise ProtocolError(
                f"fragment {message.fragment_index}/{n_fragments} of delta {key} arrived, "
                f"expected fragment {expected_index}"
            )
        if expected_index == 0 and self._parts:
            raise ProtocolError(f"delta {self._key} ended after {len(self._parts)} fragments, before its last")
        self._key = key
        self._parts.append(decode_regions(message.regions))
        # Over-report rather than under-report: one fragment saying resync is enough.
        self._resync |= message.resync
        if message.fragment_index + 1 < n_fragments:
            return None
        parts, resync = self._parts, self._resync
        self.reset()
        regions = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return dataclasses.replace(delta_from_pb(message, regions), resync=resync)


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
