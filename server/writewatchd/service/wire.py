"""Core objects to ``writewatch.v1`` messages. The only module that knows both sides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch.regions import encode_regions, split_regions

from ..kernel import PAGE_SIZE
from ..kernel.probe import Capabilities
from ..tracking.delta import Delta
from ..tracking.regions import RegionArray, as_regions, n_pages
from ..tracking.summary import summarize
from ..tracking.views import View
from .hub import SessionEnd

if TYPE_CHECKING:
    from .sessions import ManagedSession

__all__ = [
    "capabilities_message",
    "delta_frames",
    "delta_message",
    "ended_frame",
    "ranges_from_message",
    "session_message",
    "view_message",
]

_WIDE_PAIR_BYTES = 16  # the widest encoding of one region
_NARROW_PAIR_BYTES = 8
_ZERO_GAP_BYTES = 4  # the u32 gap of a narrow pair
_ZERO_GAP = bytes(_ZERO_GAP_BYTES)
# Keys (field number, wire type 2: length-delimited; numbers below 16 make one-byte keys) of the
# fields that hold a frame's pairs.
_DELTA_KEY, _REGIONS_KEY, _PAIRS_KEY = (
    bytes((descriptor.fields_by_name[name].number << 3 | 2,))
    for descriptor, name in (
        (pb.SubscribeResponse.DESCRIPTOR, "delta"),
        (pb.Delta.DESCRIPTOR, "regions"),
        (pb.PackedRegions.DESCRIPTOR, "pairs"),
    )
)
_WIRE_PAGE_SIZE = 0 if PAGE_SIZE == 4096 else PAGE_SIZE  # 0 on the wire means 4 KiB


def delta_message(
    session_id: str,
    delta: Delta,
    regions: RegionArray | None = None,
    index: int = 0,
    count: int = 1,
    *,
    n_pages: int | None = None,
) -> pb.Delta:
    """One ``Delta`` message (fragment ``index`` of ``count``) carrying ``regions``.

    ``n_pages`` is the delta's page count when the caller already has it (a pass over all
    regions otherwise).
    """
    message = pb.Delta()
    _fill_delta(message, session_id, delta, regions=regions, index=index, count=count, n_pages=n_pages)
    return message


def _fill_delta(
    message: pb.Delta,
    session_id: str,
    delta: Delta,
    *,
    regions: RegionArray | None,
    index: int,
    count: int,
    n_pages: int | None,
    with_pairs: bool = True,
) -> None:
    """Fill ``message`` in place; without ``with_pairs`` the regions get their base and page size only."""
    # Filled in place, regions included: passing a built message to a constructor or to
    # CopyFrom copies it (a 1 MiB fragment would be copied once more per level of nesting).
    message.session_id = session_id
    message.epoch = delta.epoch
    message.seq = delta.seq
    message.first_seq = delta.first_seq
    message.resync = delta.resync
    message.harvested_at_unix_ns = delta.harvested_at_unix_ns
    chunk = delta.regions if regions is None else regions
    if with_pairs:
        encode_regions(chunk, page_size_bytes=PAGE_SIZE, out=message.regions)
    else:
        packed = message.regions
        packed.base_address = int(chunk[0, 0])
        packed.page_size_bytes = _WIRE_PAGE_SIZE
    message.fragment_index = index
    message.n_fragments = count
    message.n_regions = len(delta.regions)
    message.n_pages = delta.n_pages if n_pages is None else n_pages
    if delta.covered is not None and index == 0:
        message.partial = True
        message.covered.CopyFrom(encode_regions(delta.covered, page_size_bytes=PAGE_SIZE))


def delta_frames(session_id: str, delta: Delta, max_fragment_bytes: int) -> list[bytes]:
    """A delta as serialized ``SubscribeResponse`` frames, each carrying at most ``max_fragment_bytes`` of regions."""
    regions = delta.regions
    # The common delta fits one fragment even at the widest encoding: no split to compute.
    chunks = [regions] if len(regions) * _WIDE_PAIR_BYTES <= max_fragment_bytes else None
    if len(regions) == 0:
        pairs: bytes | memoryview | None = None
        n_pages = 0
    else:
        # The page count and the u32 pairs of all the regions from one compiled pass, usually
        # the one that copied them out of the scan (remembered); else from the codec.
        summary = summarize(regions, pairs=True)
        pairs, n_pages = summary.pairs, summary.n_pages
        if pairs is None:
            pairs = encode_regions(regions, page_size_bytes=PAGE_SIZE).pairs or None  # None: wide pairs
    if chunks is None:
        chunks = split_regions(regions, max_fragment_bytes, page_size_bytes=PAGE_SIZE)
    frames: list[bytes] = []
    first = 0
    for i, chunk in enumerate(chunks):
        if pairs is None:
            response = pb.SubscribeResponse()
            _fill_delta(response.delta, session_id, delta, regions=chunk, index=i, count=len(chunks), n_pages=n_pages)
            frames.append(response.SerializeToString())
        else:
            frames.append(
                _frame_with_pairs(
                    session_id, delta, chunk, index=i, count=len(chunks), n_pages=n_pages, pairs=pairs, first=first
                )
            )
        first += len(chunk)
    return frames


def _frame_with_pairs(
    session_id: str,
    delta: Delta,
    chunk: RegionArray,
    *,
    index: int,
    count: int,
    n_pages: int,
    pairs: bytes | memoryview,
    first: int,
) -> bytes:
    """One ``SubscribeResponse`` frame of fragment ``index``: ``chunk``, the regions from ``first`` on,
    whose narrow pairs are the slice of the delta's ``pairs`` (from its first start).

    The pairs are copied once, into the frame: everything else is serialized without them,
    and the pairs follow as a second ``SubscribeResponse`` holding only ``delta.regions.pairs``.
    A parser merges two occurrences of a message field (the protobuf encoding's "last one
    wins" rule merges embedded messages), so the frame parses exactly as the message with
    the pairs inside; putting them inside would copy them into the message and again out.
    """
    response = pb.SubscribeResponse()
    _fill_delta(
        response.delta, session_id, delta, regions=chunk, index=index, count=count, n_pages=n_pages, with_pairs=False
    )
    n_bytes = _NARROW_PAIR_BYTES * len(chunk)
    parts: list[bytes | memoryview] = [response.SerializeToString(), _pairs_prefix(n_bytes)]
    start_byte, end_byte = _NARROW_PAIR_BYTES * first, _NARROW_PAIR_BYTES * first + n_bytes
    view = memoryview(pairs)
    if first == 0:
        parts.append(view[:end_byte])
    else:  # a fragment's base is its own first start: its first gap is 0
        parts += [_ZERO_GAP, view[start_byte + _ZERO_GAP_BYTES : end_byte]]
    return b"".join(parts)


def _pairs_prefix(n_bytes: int) -> bytes:
    """The keys and lengths that make the next ``n_bytes`` a ``SubscribeResponse``'s ``delta.regions.pairs``."""
    pairs_head = _PAIRS_KEY + _varint(n_bytes)
    regions_length = len(pairs_head) + n_bytes
    regions_head = _REGIONS_KEY + _varint(regions_length)
    return _DELTA_KEY + _varint(len(regions_head) + regions_length) + regions_head + pairs_head


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def ended_frame(end: SessionEnd) -> bytes:
    """The final ``SubscribeResponse`` of a stream."""
    return pb.SubscribeResponse(
        session_ended=pb.SessionEnded(reason=int(end.reason), message=end.message)  # type: ignore[arg-type]
    ).SerializeToString()


def ranges_from_message(ranges: Sequence[pb.AddressRange]) -> RegionArray:
    """``AddressRange`` messages as an ``(n, 2)`` array, unsorted, as given."""
    return as_regions([(r.start_address, r.end_address) for r in ranges])


def capabilities_message(caps: Capabilities, daemon_version: str, *, process_events: bool) -> pb.Capabilities:
    """The kernel probe as a ``Capabilities`` message (``process_events``: the daemon's setting)."""

    def fix(value: bool | None) -> int:
        if value is None:
            return pb.FIX_STATUS_UNKNOWN
        return pb.FIX_STATUS_FIXED if value else pb.FIX_STATUS_BROKEN

    return pb.Capabilities(
        kernel_version=caps.kernel_release,
        pagemap_scan=caps.pagemap_scan,
        supported_category_mask=int(caps.categories),
        uffd_features=int(caps.uffd_features),
        wp_async=caps.wp_async,
        unpopulated_pte_fix=fix(caps.fix_unpopulated_written),  # type: ignore[arg-type]
        pmd_hole_fix=fix(caps.fix_pmd_hole_written),  # type: ignore[arg-type]
        soft_dirty=bool(caps.soft_dirty),
        is_root=caps.euid == 0,
        daemon_version=daemon_version,
        page_size_bytes=PAGE_SIZE,
        exec_fork_detection=caps.exec_fork_detection if process_events else "polling",
    )


def categories_bytes(categories: np.ndarray) -> bytes:
    """Scan categories as packed little-endian u64."""
    return np.ascontiguousarray(categories, dtype="<u8").tobytes()


def view_message(view: View) -> pb.View:
    """A ``View`` listing: its name and how many pages it holds written."""
    return pb.View(view_id=view.name, n_pages=n_pages(view.written))


def session_message(session: ManagedSession) -> pb.Session:
    """A ``Session`` snapshot."""
    record = session.record
    stats = session.statistics
    tracked: list[list[int]] = session.tracked.tolist()
    message = pb.Session(
        session_id=record.session_id,
        pid=record.pid,
        process_start_time_ticks=record.start_time_ticks,
        attach_mode=record.attach_mode,  # type: ignore[arg-type]
        state=pb.SESSION_STATE_ACTIVE if session.active else pb.SESSION_STATE_ENDED,
        end_reason=record.end_reason,  # type: ignore[arg-type]
        end_message=record.end_message,
        ranges=[pb.AddressRange(start_address=int(s), end_address=int(e)) for s, e in tracked],
        auto_ranges=record.auto_ranges,
        tick_interval_ms=record.tick_interval_ms,
        labels=record.labels,
        epoch=session.hub.epoch,
        last_seq=session.hub.last_seq,
        created_at_unix_ns=record.created_at_unix_ns,
        statistics=pb.SessionStatistics(
            n_harvests=stats.n_harvests,
            last_harvest_ns=stats.last_harvest_ns,
            total_harvest_ns=stats.total_harvest_ns,
            n_regions=stats.n_regions,
            n_pages=stats.n_pages,
            n_subscribers=session.hub.n_subscribers,
            n_views=len(session.views),
        ),
        n_tracked_pages=n_pages(session.tracked),
        comm=record.comm,
        parent_session_id=record.parent_session_id,
        n_execs_followed=record.n_execs_followed,
        argv=record.cmdline,
        follow_exec=record.follow_exec,
        follow_children=record.follow_children,
        max_staleness_ms=record.max_staleness_ms,
    )
    heat = session.heat_statistics()
    if heat is not None:
        statistics = message.statistics
        statistics.scan_lag_ms = heat.lag_ms
        statistics.max_scan_lag_ms = heat.max_lag_ms
        statistics.n_ticks_due = heat.n_ticks_due
        statistics.n_ticks_late = heat.n_ticks_late
        statistics.shed_level = heat.shed_level
        statistics.n_hot_pages = heat.n_hot_pages
        statistics.n_warm_pages = heat.n_warm_pages
        statistics.n_cold_pages = heat.n_cold_pages
    return message
