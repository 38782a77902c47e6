"""One :class:`Tracker` per target process: its userfaultfd, its tracked ranges, its harvest.

The tracker never loses a write: a range whose registration vanished (munmap, mremap, a
closed fd) or whose scan failed is reported as entirely written, and a newly registered
range starts as entirely written, because no consumer has seen its content.

Synchronous and blocking by design (each call is a few ioctls); the daemon runs it in a
thread pool. A lock serialises calls, so a tick harvest and an on-demand one never interleave.

Two ways to harvest: :meth:`Tracker.harvest` scans every tracked range; the daemon's ticks
scan only the ranges a :class:`~.heat.HeatScheduler` says are due, many trackers in one
:class:`~writewatchd.kernel.batchscan.BatchScanner` call on :attr:`Tracker.pagemap_fd`, and
hand what each found to :meth:`Tracker.settle` (which applies the same failure rules).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .._exceptions import (
    FeatureUnavailable,
    InvalidRange,
    KernelError,
    NotRegistered,
    ProcessGone,
    RangeBusy,
    UsageError,
)
from ..kernel import (
    PAGE_SIZE,
    PagemapScanner,
    ProcessHandle,
    ProcessIdentity,
    ScanResult,
    UffdFeature,
    Userfaultfd,
    mm_fingerprint,
    read_maps,
)
from .regions import EMPTY, RegionArray, RegionSet, as_regions, merge, n_pages
from .summary import regions_of_scan, summarize

__all__ = ["HarvestStatistics", "Tracker", "auto_ranges"]


def auto_ranges(pid: int) -> RegionArray:
    """Every private writable mapping of ``pid``: what ``auto`` tracking covers."""
    rows = [(m.start, m.end) for m in read_maps(pid) if m.is_private_writable and not m.is_special]
    return merge(as_regions(rows))


@dataclass(slots=True)
class HarvestStatistics:
    """Counters of a tracker since it was created."""

    n_harvests: int = 0
    last_harvest_ns: int = 0
    total_harvest_ns: int = 0
    n_regions: int = 0
    n_pages: int = 0
    n_registrations_failed: int = 0
    n_ranges_lost: int = 0
    last_errors: list[str] = field(default_factory=list)


def _check_ranges(ranges: RegionArray) -> None:
    if len(ranges) == 0:
        return
    if np.any(ranges % np.uint64(PAGE_SIZE)):
        raise InvalidRange("every range must start and end on a page boundary")
    if np.any(ranges[:, 1] <= ranges[:, 0]):
        raise InvalidRange("every range must have end > start")
    ordered = ranges[np.argsort(ranges[:, 0])]
    if np.any(ordered[1:, 0] < ordered[:-1, 1]):
        raise InvalidRange("ranges overlap")


class Tracker:
    """Write tracking of one process through a userfaultfd created by that process.

    Its scan buffer holds ``capacity_regions`` regions (24 bytes each) and grows up to
    ``max_capacity_regions`` for a target that writes more scattered pages than that between
    two harvests, so that one ioctl and one copy harvest it.
    """

    def __init__(
        self,
        identity: ProcessIdentity,
        uffd: Userfaultfd,
        *,
        ranges: Iterable[tuple[int, int]] | RegionArray = (),
        auto: bool = False,
        capacity_regions: int = 1 << 16,
        max_capacity_regions: int = 1 << 20,
    ) -> None:
        explicit = as_regions(ranges)
        _check_ranges(explicit)
        if not auto and len(explicit) == 0:
            raise UsageError("give explicit ranges or auto=True")
        self.identity = identity
        self.auto = auto
        self.statistics = HarvestStatistics()
        self._uffd = uffd
        self._lock = threading.Lock()
        self._explicit = RegionSet(explicit)
        self._registered = RegionSet()
        self._pending_written = RegionSet()
        self._ranges_of: RegionArray | None = None
        self._ranges_list: list[tuple[int, int]] = []
        self.ranges_generation = 0
        """Bumped whenever the tracked ranges change (a scheduler re-reads :attr:`tracked` then)."""
        self._process = ProcessHandle(identity.pid)
        try:
            self._scanner = PagemapScanner(
                identity.pid,
                capacity_regions=capacity_regions,
                max_capacity_regions=max_capacity_regions,
                rows_to_regions=regions_of_scan,
            )
        except BaseException:
            self._process.close()
            raise
        try:  # from here on a failure (the target may die at any point) closes what is open
            self._mm_fingerprint = mm_fingerprint(identity.pid)
            self._mm_checked_ns = time.perf_counter_ns()
            features = uffd.api()
            if UffdFeature.WP_ASYNC not in features:
                raise FeatureUnavailable(0, "the userfaultfd lacks WP_ASYNC")
            for start, end in self._explicit.regions.tolist():
                self._register(start, end, explicit=True)
            if auto:
                self._refresh_auto()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The target's pid."""
        return self.identity.pid

    @property
    def tracked(self) -> RegionArray:
        """The ranges tracked right now, sorted and merged."""
        return self._registered.regions

    @property
    def mm_fingerprint(self) -> tuple[int, ...]:
        """The mm fingerprint of the program this tracker's userfaultfd belongs to (kernel.md §8.3)."""
        return self._mm_fingerprint

    @property
    def pagemap_fd(self) -> int:
        """The open ``/proc/PID/pagemap`` (for a batched scan; do not close)."""
        return self._scanner.fileno()

    @property
    def has_pending(self) -> bool:
        """Whether newly tracked ranges wait to be reported as written by the next harvest or settle."""
        return len(self._pending_written) > 0

    def has_exited(self) -> bool:
        """Whether the target has exited (a zombie counts); never blocks."""
        return self._process.has_exited()

    def wait_exited(self, timeout_s: float) -> bool:
        """Whether the target exits within ``timeout_s`` (blocks up to that long)."""
        return self._process.wait_exited(timeout_s)

    @property
    def exit_fd(self) -> int:
        """The tracker's pidfd of the target: readable once it has exited (for event loops; do not close)."""
        return self._process.fileno()

    def add_ranges(self, ranges: Iterable[tuple[int, int]] | RegionArray) -> None:
        """Track more explicit ranges; they are reported as written by the next harvest."""
        new = as_regions(ranges)
        _check_ranges(new)
        with self._lock:
            overlap = self._explicit.intersection(new)
            if len(overlap):
                raise InvalidRange(f"range 0x{int(overlap[0, 0]):x} is already tracked")
            for start, end in merge(new).tolist():
                self._register(start, end, explicit=True)
            self._explicit.add(new)

    def remove_ranges(self, ranges: Iterable[tuple[int, int]] | RegionArray) -> None:
        """Stop tracking explicit ranges (each must be tracked)."""
        gone = merge(as_regions(ranges))
        _check_ranges(gone)
        with self._lock:
            if RegionSet(self._explicit.intersection(gone)) != RegionSet(gone):
                raise InvalidRange("only tracked ranges can be removed")
            self._explicit.discard(gone)
            for start, end in gone.tolist():
                self._unregister(start, end)

    def harvest(self) -> RegionArray:
        """The pages written since the last harvest, re-protected; sorted, merged ``(n, 2)``, read-only
        (its summary is remembered for the delta's encoding, :func:`~.summary.summarize`).

        Raises :class:`ProcessGone` once the target has exited or executed a new program,
        whatever a scan of its memory answers on this kernel build (docs/kernel.md §8.1).
        """
        with self._lock:
            started_ns = time.perf_counter_ns()
            self._check_same_mm(started_ns)
            if self.auto:
                self._refresh_auto()
            chunks = []
            if len(self._pending_written):
                chunks.append(self._pending_written.regions)
                self._pending_written.clear()
            for start, end in self._ranges():
                found = self._harvest_range(start, end)
                if len(found):
                    chunks.append(found)
            regions, n_pages_found = _counted_union(chunks)
            if len(regions) == 0:
                self._raise_if_exited()
            elapsed_ns = time.perf_counter_ns() - started_ns
            stats = self.statistics
            stats.n_harvests += 1
            stats.last_harvest_ns = elapsed_ns
            stats.total_harvest_ns += elapsed_ns
            stats.n_regions += len(regions)
            stats.n_pages += n_pages_found
            return regions

    def _ranges(self) -> list[tuple[int, int]]:
        """The tracked ranges as Python pairs, converted again only when they changed."""
        # A RegionSet replaces its array on every change and never modifies it in place.
        regions = self._registered.regions
        if regions is not self._ranges_of:
            self._ranges_of = regions
            self._ranges_list = [(start, end) for start, end in regions.tolist()]
        return self._ranges_list

    def check(self, now_ns: int | None = None, *, exec_check: bool = True) -> None:
        """What a harvest does before scanning, for a batched tick: the exec check (at most once
        a second; ``exec_check`` false when process events report execs) and, in auto mode,
        following ``/proc/PID/maps``. Raises :class:`ProcessGone`."""
        with self._lock:
            if exec_check:
                self._check_same_mm(time.perf_counter_ns() if now_ns is None else now_ns)
            if self.auto:
                self._refresh_auto()

    def settle(self, found: list[RegionArray], failed: list[tuple[int, int, int]]) -> RegionArray:
        """The written pages of a batched scan of some tracked ranges, as :meth:`harvest` returns them.

        ``found`` holds what the scans found; ``failed`` the ``(start, end, errno)`` of each scan
        that failed, which is handled as :meth:`harvest` handles it (a range whose registration
        vanished is re-registered and reported written; an exited target raises
        :class:`ProcessGone`, also when nothing was found). Ranges registered since the last
        harvest are added. Counted in the statistics' regions and pages; the scheduler counts
        the scans.
        """
        with self._lock:
            chunks = [regions for regions in found if len(regions)]
            if len(self._pending_written):
                chunks.append(self._pending_written.regions)
                self._pending_written.clear()
            for start, end, error in failed:
                chunks.append(self._scan_failed(start, end, _kernel_error(error, start, end)))
            regions = _union(chunks) if len(chunks) != 1 else merge(chunks[0])
            if len(regions) == 0:
                self._raise_if_exited()
            stats = self.statistics
            if len(regions):
                stats.n_regions += len(regions)
                stats.n_pages += n_pages(regions)
            return regions

    def scan(self, start: int, end: int, **masks: int) -> ScanResult:
        """A read-only PAGEMAP_SCAN of the target with any masks (no write-protect)."""
        if masks.get("flags"):
            raise UsageError("a read-only scan takes no flags")
        with self._lock:
            return self._scanner.scan(start, end, **masks)

    def close(self) -> None:
        """Release the userfaultfd and the pagemap fd (the kernel unregisters everything)."""
        with self._lock:
            self._uffd.close()
            self._scanner.close()
            self._process.close()
            self._registered.clear()

    def _check_same_mm(self, now_ns: int) -> None:
        """Raise ProcessGone once an execve has replaced the tracked memory.

        After an execve the old mm answers scans with nothing and registrations with ENOMEM,
        which would look like an idle process forever; /proc/PID/stat tells, once a second.
        """
        if now_ns - self._mm_checked_ns < 1_000_000_000:
            return
        self._mm_checked_ns = now_ns
        self._raise_if_exited()  # a zombie's stat reads zeros: not an exec
        if mm_fingerprint(self.pid) != self._mm_fingerprint:
            raise ProcessGone(errno.ESRCH, f"pid {self.pid} executed a new program; the tracked memory is gone")

    def _raise_if_exited(self) -> None:
        if self._process.has_exited():
            raise ProcessGone(errno.ESRCH, f"process {self.pid} has exited")

    def _harvest_range(self, start: int, end: int) -> RegionArray:
        try:
            return self._scanner.harvest(start, end)
        except KernelError as exc:
            return self._scan_failed(start, end, exc)

    def _scan_failed(self, start: int, end: int, exc: KernelError) -> RegionArray:
        """What a failed harvest of ``[start, end)`` reports (raises ProcessGone once the target is gone)."""
        if isinstance(exc, ProcessGone):
            raise exc
        # An exit tears the mappings down under the scan: nothing is left to report.
        self._raise_if_exited()
        if isinstance(exc, NotRegistered):
            # munmap/mremap/fd reuse dropped part of the registration, and the failed walk
            # may have re-protected pages it could not report: the whole range is written.
            self.statistics.n_ranges_lost += 1
            self._reregister(start, end)
        else:
            self._note(f"harvest [0x{start:x}, 0x{end:x}): {exc}")
        return as_regions([(start, end)])

    def _refresh_auto(self) -> None:
        wanted = RegionSet(auto_ranges(self.pid))
        wanted.add(self._explicit.regions)
        current = self._registered
        for start, end in RegionSet(_minus(current.regions, wanted.regions)).regions.tolist():
            self._unregister(start, end)
        for start, end in _minus(wanted.regions, current.regions).tolist():
            self._register(start, end)

    def _arm(self, start: int, end: int) -> KernelError | None:
        """Register and write-protect one range; the kernel's refusal, if any (ProcessGone raises)."""
        try:
            self._uffd.register(start, end - start)
            self._uffd.write_protect(start, end - start)
        except ProcessGone:
            raise
        except KernelError as exc:
            self._note(f"register [0x{start:x}, 0x{end:x}): {exc}")
            return exc
        return None

    def _register(self, start: int, end: int, *, explicit: bool = False) -> None:
        error = self._arm(start, end)
        if error is not None:
            self.statistics.n_registrations_failed += 1
            if not explicit:
                return  # auto mode: a mapping we cannot track is skipped, and retried next tick
            if isinstance(error, RangeBusy):
                raise error
            raise InvalidRange(f"[0x{start:x}, 0x{end:x}) cannot be tracked in pid {self.pid}: {error}")
        span = as_regions([(start, end)])
        self._registered.add(span)
        self._pending_written.add(span)
        self.ranges_generation += 1

    def _unregister(self, start: int, end: int) -> None:
        span = as_regions([(start, end)])
        self._registered.discard(span)
        self._pending_written.discard(span)
        self.ranges_generation += 1
        try:
            self._uffd.unregister(start, end - start)
        except ProcessGone:
            raise
        except KernelError:
            pass  # already unmapped: the kernel dropped the registration with the mapping

    def _reregister(self, start: int, end: int) -> None:
        span = as_regions([(start, end)])
        self._registered.discard(span)
        self.ranges_generation += 1
        mapped = RegionSet(
            as_regions([(m.start, m.end) for m in read_maps(self.pid) if m.start < end and start < m.end])
        ).clip(start, end)
        for m_start, m_end in mapped.tolist():
            # The caller reports the whole range written, so nothing goes to _pending_written.
            if self._arm(m_start, m_end) is None:
                self._registered.add(as_regions([(m_start, m_end)]))

    def _note(self, message: str) -> None:
        errors = self.statistics.last_errors
        errors.append(message)
        del errors[:-8]


def _kernel_error(error: int, start: int, end: int) -> KernelError:
    """The exception :meth:`PagemapScanner.harvest` raises for ``error`` (one errno mapping for both paths)."""
    classes: dict[int, type[KernelError]] = {errno.EPERM: NotRegistered, errno.ESRCH: ProcessGone}
    return classes.get(error, KernelError)(error, f"PAGEMAP_SCAN [0x{start:x}, 0x{end:x}): {os.strerror(error)}")


def _union(chunks: list[RegionArray]) -> RegionArray:
    """The merged union of harvest chunks, each sorted and non-overlapping (a scan or the pending set)."""
    return _counted_union(chunks)[0]


def _counted_union(chunks: list[RegionArray]) -> tuple[RegionArray, int]:
    """:func:`_union` and its page count."""
    if not chunks:
        return EMPTY, 0
    if len(chunks) == 1:
        # The common case, one range: the kernel already merged adjacent pages, except where
        # its bounce buffer filled up, so a full merge (several passes over every region) is
        # only needed if two rows touch. One pass counts both (right after a scan every
        # numpy call costs tens of microseconds), and is remembered for the delta's encoding
        # (usually it is the pass that copied the rows out of the scan).
        summary = summarize(chunks[0], remember=True)
        if not summary.n_touching:
            return chunks[0], summary.n_pages
        regions = merge(chunks[0])
    else:
        regions = merge(np.concatenate(chunks))
    return regions, summarize(regions, remember=True).n_pages


def _minus(a: RegionArray, b: RegionArray) -> RegionArray:
    result = RegionSet(a)
    result.discard(b)
    return result.regions if len(result) else EMPTY
