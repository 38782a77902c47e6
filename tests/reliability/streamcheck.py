"""Validation of delta streams, in the spirit of etcd's watch checker.

One :class:`StreamChecker` per logical subscriber (it outlives reconnects: a client that
resumes from its cursor is the same subscriber). :meth:`StreamChecker.feed` checks each
delta as it arrives and raises :class:`StreamViolation` at the first broken rule:

- regions are page aligned, sorted, non-overlapping, non-empty;
- ``1 <= first_seq <= seq``;
- within an epoch a delta starts right after the previous one (``first_seq == prev.seq + 1``):
  an overlap is a duplicate, a gap is allowed only for a RESYNC (which reports everything
  tracked) or, with ``allow_filter_gaps``, for streams with filter ranges (the daemon skips
  deltas with nothing inside the filter);
- a stream enters an epoch (its first delta, unless it resumed inside that epoch, or any
  epoch change) with a RESYNC starting at seq 1, and never returns to an epoch it left.

:meth:`StreamChecker.check_covers` then compares what was received with what the target
logged writing: every written page was received (a RESYNC covers everything it lists), and
with ``exact`` no page outside the written ones arrived in a non-RESYNC delta.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

import writewatch

__all__ = ["CheckedSubscription", "DeltaRecord", "StreamChecker", "StreamViolation", "union_pages"]

PAGE_SIZE_BYTES = 4096
Regions = npt.NDArray[np.uint64]


class StreamViolation(AssertionError):
    """A delta stream broke one of the rules of :class:`StreamChecker`."""


@dataclass(frozen=True, slots=True)
class DeltaRecord:
    """What the checker keeps of one delta (for error messages and statistics)."""

    epoch: int
    first_seq: int
    seq: int
    resync: bool
    n_pages: int


def _pages_of(regions: Regions, page_size_bytes: int) -> npt.NDArray[np.int64]:
    """Absolute page numbers inside ``regions``."""
    if len(regions) == 0:
        return np.empty(0, dtype=np.int64)
    starts = (regions[:, 0] // page_size_bytes).astype(np.int64)
    ends = (regions[:, 1] // page_size_bytes).astype(np.int64)
    return np.concatenate(
        [np.arange(s, e, dtype=np.int64) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    )


def _outside(pages: set[int], regions_list: list[Regions], page_size_bytes: int) -> set[int]:
    """The absolute page numbers of ``pages`` inside none of ``regions_list`` (interval lookups:
    RESYNC regions can be far too large to list page by page)."""
    left = np.array(sorted(pages), dtype=np.int64)
    for regions in regions_list:
        if len(left) == 0:
            break
        if len(regions) == 0:
            continue
        starts = (regions[:, 0] // page_size_bytes).astype(np.int64)
        ends = (regions[:, 1] // page_size_bytes).astype(np.int64)
        index = np.searchsorted(starts, left, side="right") - 1
        inside = (index >= 0) & (left < ends[np.maximum(index, 0)])
        left = left[~inside]
    return set(left.tolist())


def union_pages(regions_list: Iterable[Regions], page_size_bytes: int = PAGE_SIZE_BYTES) -> set[int]:
    """Absolute page numbers covered by any of ``regions_list``."""
    pages: set[int] = set()
    for regions in regions_list:
        pages.update(_pages_of(regions, page_size_bytes).tolist())
    return pages


@dataclass
class StreamChecker:
    """Checks one subscriber's deltas as they arrive; see the module docstring for the rules.

    ``resume`` is the cursor the subscription started from (``subscribe(resume=...)``);
    ``base_address`` makes :meth:`check_covers` and :meth:`received_pages` speak page
    indices relative to a buffer (0: absolute page numbers).
    """

    name: str = "subscriber"
    resume: tuple[int, int] | None = None
    base_address: int = 0
    page_size_bytes: int = PAGE_SIZE_BYTES
    allow_filter_gaps: bool = False
    records: list[DeltaRecord] = field(default_factory=list)
    _cursor: tuple[int, int] | None = None
    _left_epochs: set[int] = field(default_factory=set)
    _plain: list[Regions] = field(default_factory=list)
    _resyncs: list[Regions] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cursor = self.resume

    @property
    def cursor(self) -> tuple[int, int] | None:
        """``(epoch, seq)`` of the last delta fed (or the resume point)."""
        return self._cursor

    @property
    def n_deltas(self) -> int:
        """Deltas fed so far."""
        return len(self.records)

    @property
    def n_resyncs(self) -> int:
        """RESYNC deltas fed so far."""
        return sum(r.resync for r in self.records)

    @property
    def n_merged(self) -> int:
        """Deltas that covered more than one seq (merged for a slow reader)."""
        return sum(r.first_seq < r.seq and not r.resync for r in self.records)

    def feed(self, delta: writewatch.Delta) -> None:
        """Check one delta from the client library."""
        self.feed_raw(
            epoch=delta.epoch, first_seq=delta.first_seq, seq=delta.seq, resync=delta.resync, regions=delta.regions
        )

    def feed_raw(self, *, epoch: int, first_seq: int, seq: int, resync: bool, regions: Regions) -> None:
        """Check one whole delta given by its fields (raw streams: reassemble fragments first)."""
        regions = np.asarray(regions, dtype=np.uint64).reshape(-1, 2)
        n_pages = int((regions[:, 1] - regions[:, 0]).sum()) // self.page_size_bytes
        record = DeltaRecord(epoch, first_seq, seq, resync, n_pages)
        where = f"{self.name}: delta {record} after cursor {self._cursor}"
        self._check_regions(regions, where)
        if not 1 <= first_seq <= seq:
            raise StreamViolation(f"{where}: seqs must satisfy 1 <= first_seq <= seq")
        if self._cursor is None or self._cursor[0] != epoch:
            if epoch in self._left_epochs:
                raise StreamViolation(f"{where}: the stream returned to an epoch it had left")
            if not resync or first_seq != 1:
                raise StreamViolation(f"{where}: an epoch must be entered with a RESYNC starting at seq 1")
            if self._cursor is not None:
                self._left_epochs.add(self._cursor[0])
        else:
            expected = self._cursor[1] + 1
            if first_seq < expected:
                raise StreamViolation(f"{where}: duplicate seqs {first_seq}..{min(seq, expected - 1)}")
            if first_seq > expected and not (resync or self.allow_filter_gaps):
                raise StreamViolation(f"{where}: seqs {expected}..{first_seq - 1} missing (not merged, no RESYNC)")
        self.records.append(record)
        (self._resyncs if resync else self._plain).append(regions)
        self._cursor = (epoch, seq)

    def _check_regions(self, regions: Regions, where: str) -> None:
        if len(regions) == 0:
            return
        flat = regions.reshape(-1)
        if np.any(flat % self.page_size_bytes):
            raise StreamViolation(f"{where}: region bounds not page aligned")
        if np.any(regions[:, 0] >= regions[:, 1]):
            raise StreamViolation(f"{where}: empty or inverted region")
        if np.any(regions[1:, 0] < regions[:-1, 1]):
            raise StreamViolation(f"{where}: regions unsorted or overlapping")

    def received_pages(self, *, include_resync: bool = False) -> set[int]:
        """Pages received (relative to ``base_address``); RESYNC deltas only when asked."""
        regions = self._plain + self._resyncs if include_resync else self._plain
        base_page = self.base_address // self.page_size_bytes
        return {p - base_page for p in union_pages(regions, self.page_size_bytes)}

    def check_covers(self, pages_written: Iterable[int], *, exact: bool = True) -> None:
        """Every written page was received; with ``exact``, non-RESYNC deltas held nothing else.

        ``pages_written`` are page indices relative to ``base_address``: everything the target
        logged writing since the subscription's starting point.
        """
        written = set(pages_written)
        base_page = self.base_address // self.page_size_bytes
        missing = _outside({p + base_page for p in written}, self._plain + self._resyncs, self.page_size_bytes)
        missing = {p - base_page for p in missing}
        if missing:
            raise StreamViolation(
                f"{self.name}: {len(missing)} written pages never received, e.g. {sorted(missing)[:10]}"
                f" ({self.n_deltas} deltas, cursor {self._cursor})"
            )
        if exact:
            extra = self.received_pages() - written
            if extra:
                raise StreamViolation(
                    f"{self.name}: {len(extra)} pages received that were not written, e.g. {sorted(extra)[:10]}"
                )


class CheckedSubscription:
    """``session.subscribe()`` consumed on a thread, every delta fed to a :class:`StreamChecker`.

    The first violation (or client error) is kept in :attr:`error` and re-raised by
    :meth:`wait_for_seq` and :meth:`join`.
    """

    def __init__(
        self,
        session: writewatch.Session,
        checker: StreamChecker | None = None,
        *,
        filter_ranges: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        self.checker = checker or StreamChecker(session.id)
        self.error: BaseException | None = None
        self._stream: Iterator[writewatch.Delta] = session.subscribe(
            resume=self.checker.cursor, filter_ranges=filter_ranges
        )
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"sub-{self.checker.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for delta in self._stream:
                with self._lock:
                    self.checker.feed(delta)
        except BaseException as exc:
            self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def wait_for_seq(self, seq: int, *, epoch: int | None = None, timeout_s: float = 20) -> None:
        """Block until a delta with ``seq`` or later (in ``epoch``, when given) was checked."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise()
            cursor = self.checker.cursor
            if cursor is not None and cursor[1] >= seq and (epoch is None or cursor[0] == epoch):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.checker.name}: no delta up to seq {seq} in {timeout_s} s; at {cursor}")
            time.sleep(0.005)

    def join(self, timeout_s: float = 20) -> None:
        """Wait until the stream ended (the session ended) and re-raise what went wrong."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.checker.name}: the stream did not end in {timeout_s} s"
        self._raise()
