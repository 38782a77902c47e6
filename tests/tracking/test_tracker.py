"""Tracker against a real cooperative target: exact, lossless, and ends when the target exits."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from targets import PAGE, CoopTarget
from writewatchd import InvalidRange, ProcessGone, UsageError
from writewatchd.kernel import ProcessIdentity, Userfaultfd
from writewatchd.kernel.batchscan import BatchRequests, BatchScanner
from writewatchd.tracking import summary
from writewatchd.tracking.regions import as_regions
from writewatchd.tracking.tracker import Tracker


@pytest.fixture
def target_pages() -> int:
    return 128


def _tracker(target: CoopTarget, **kwargs: object) -> Tracker:
    uffd = Userfaultfd.from_process(target.pid, target.uffd_fd)
    ranges = kwargs.pop("ranges", [(target.base, target.end)])
    return Tracker(ProcessIdentity.of(target.pid), uffd, ranges=ranges, **kwargs)  # type: ignore[arg-type]


def test_first_harvest_reports_every_tracked_page_then_nothing(target: CoopTarget) -> None:
    tracker = _tracker(target)
    assert tracker.harvest().tolist() == [[target.base, target.end]]
    assert len(tracker.harvest()) == 0


def test_user_and_kernel_writes_reported_reads_never(target: CoopTarget) -> None:
    tracker = _tracker(target)
    tracker.harvest()
    target.write(3, 2)
    target.kernel_write(40)
    target.read(90)
    assert target.pages(tracker.harvest()) == {3, 4, 40}
    assert len(tracker.harvest()) == 0


def test_random_writes_exact_over_many_harvests(target: CoopTarget) -> None:
    tracker = _tracker(target)
    tracker.harvest()
    for seed in range(1, 30):
        written = target.random_writes(seed, 25)
        assert target.pages(tracker.harvest()) == written


@pytest.mark.parametrize(("capacity_regions", "max_capacity_regions"), [(4, 4), (4, 64), (1 << 16, 1 << 16)])
def test_harvests_copied_out_by_the_compiled_pass_are_exact(
    target: CoopTarget, capacity_regions: int, max_capacity_regions: int
) -> None:
    # 25 random writes overflow a 4-region buffer: chunks joined (the buffer grows to 32 when it
    # may), else one copy; either way the summary is remembered for the encoder.
    tracker = _tracker(target, capacity_regions=capacity_regions, max_capacity_regions=max_capacity_regions)
    tracker.harvest()
    for seed in range(1, 12):
        written = target.random_writes(seed, 25)
        regions = tracker.harvest()
        assert target.pages(regions) == written
        assert summary.summarize(regions).n_pages == len(written)
        assert summary._remembered.regions is regions
        assert not regions.flags.writeable


def test_add_and_remove_ranges(target: CoopTarget) -> None:
    half = target.base + 64 * PAGE
    tracker = _tracker(target, ranges=[(target.base, half)])
    tracker.harvest()
    target.write(100)
    assert len(tracker.harvest()) == 0
    tracker.add_ranges(as_regions([(half, target.end)]))
    assert tracker.harvest().tolist() == [[half, target.end]]  # new range starts all written
    target.write(100)
    target.write(1)
    assert target.pages(tracker.harvest()) == {1, 100}
    tracker.remove_ranges(as_regions([(half, target.end)]))
    target.write(100)
    assert len(tracker.harvest()) == 0
    with pytest.raises(InvalidRange):
        tracker.remove_ranges(as_regions([(half, target.end)]))
    with pytest.raises(InvalidRange):
        tracker.add_ranges(as_regions([(target.base, target.base + PAGE)]))


@pytest.mark.parametrize(
    ("ranges", "error"),
    [
        ([(1, PAGE)], InvalidRange),
        ([(PAGE, PAGE)], InvalidRange),
        ([(0, 2 * PAGE), (PAGE, 3 * PAGE)], InvalidRange),
        ([], UsageError),
    ],
)
def test_bad_ranges_are_refused(target: CoopTarget, ranges: list[tuple[int, int]], error: type[Exception]) -> None:
    shifted = [(target.base + s, target.base + e) for s, e in ranges]
    with pytest.raises(error):
        _tracker(target, ranges=shifted)


def test_auto_ranges_track_the_buffer_and_new_mappings(target: CoopTarget) -> None:
    tracker = _tracker(target, ranges=[], auto=True)
    tracked = tracker.tracked
    assert any(s <= target.base and target.end <= e for s, e in tracked.tolist())
    tracker.harvest()
    target.write(7)
    assert 7 in target.pages(tracker.harvest())


@pytest.mark.parametrize("auto", [False, True], ids=["explicit", "auto"])
@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_target_exit_raises_process_gone(target: CoopTarget, reaped: bool, auto: bool) -> None:
    """The contract on every kernel build, whatever a scan of an exited process answers."""
    tracker = _tracker(target, auto=auto)
    tracker.harvest()
    target.proc.kill()
    if reaped:
        target.proc.wait()
    else:
        os.waitid(os.P_PID, target.pid, os.WEXITED | os.WNOWAIT)
    assert tracker.has_exited()
    with pytest.raises(ProcessGone):
        tracker.harvest()
    with pytest.raises(ProcessGone):
        tracker.harvest()


def test_a_live_target_has_not_exited(target: CoopTarget) -> None:
    tracker = _tracker(target)
    tracker.harvest()
    assert not tracker.has_exited()
    assert len(tracker.harvest()) == 0


def test_munmap_and_fresh_mapping_report_the_range_written_then_track_again(target: CoopTarget) -> None:
    tracker = _tracker(target)
    tracker.harvest()
    target.command("u 10 4")  # fresh, unregistered memory where pages 10-13 were
    assert tracker.harvest().tolist() == [[target.base, target.end]]  # lossless: all written
    assert tracker.statistics.n_ranges_lost == 1
    target.write(11)
    target.write(50)
    assert target.pages(tracker.harvest()) == {11, 50}


def test_mremap_in_auto_mode_tracks_the_moved_buffer(target: CoopTarget) -> None:
    tracker = _tracker(target, ranges=[], auto=True)
    tracker.harvest()
    target.base = int(target.command("M").split()[1], 16)
    target.end = target.base + target.n_pages * PAGE
    moved = tracker.harvest()
    assert target.pages(moved) == set(range(target.n_pages))  # a new mapping starts all written
    target.write(5)
    assert 5 in target.pages(tracker.harvest())
    assert target.pages(tracker.harvest()) == set()


def test_fork_leaves_the_parent_tracking_exact(target: CoopTarget) -> None:
    tracker = _tracker(target)
    tracker.harvest()
    child = int(target.command("f").split()[1])
    try:
        target.write(3)
        target.kernel_write(60)
        assert target.pages(tracker.harvest()) == {3, 60}
    finally:
        os.kill(child, signal.SIGKILL)  # the target reaps it; it is not our child


def _batched_tick(tracker: Tracker, scanner: BatchScanner, ranges: list[tuple[int, int]]) -> np.ndarray:
    """One daemon-style tick of ``ranges``: check, one batched scan, settle."""
    tracker.check()
    requests = BatchRequests([tracker.pagemap_fd] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])
    result = scanner.harvest(requests)
    found = [result.regions_of(i) for i in range(len(ranges)) if not result.errors[i]]
    failed = [(s, e, int(result.errors[i])) for i, (s, e) in enumerate(ranges) if result.errors[i]]
    return tracker.settle(found, failed)


def test_batched_ticks_of_some_ranges_then_a_full_harvest_report_exactly_the_writes(target: CoopTarget) -> None:
    tracker = _tracker(target)
    scanner = BatchScanner()
    assert target.pages(_batched_tick(tracker, scanner, [])) == set(range(128))  # the new range, pending
    half = target.base + 64 * PAGE
    written = target.random_writes(3, 40)
    first = target.pages(_batched_tick(tracker, scanner, [(target.base, half)]))
    assert first == {p for p in written if p < 64}
    assert target.pages(tracker.harvest()) == {p for p in written if p >= 64}
    assert tracker.statistics.n_harvests == 1  # harvest() calls; a scheduler counts batched scans


def test_a_batched_scan_of_a_vanished_registration_reports_the_range_and_tracks_again(target: CoopTarget) -> None:
    tracker = _tracker(target)
    scanner = BatchScanner()
    tracker.harvest()
    generation = tracker.ranges_generation
    target.command("u 10 4")  # munmap + fresh mapping: the registration of pages 10..13 is gone
    whole = [(target.base, target.end)]
    assert _batched_tick(tracker, scanner, whole).tolist() == [[target.base, target.end]]
    assert tracker.statistics.n_ranges_lost == 1 and tracker.ranges_generation > generation
    target.write(11)
    assert target.pages(_batched_tick(tracker, scanner, [(s, e) for s, e in tracker.tracked.tolist()])) == {11}


def test_a_batched_scan_after_exit_raises_process_gone(target: CoopTarget) -> None:
    tracker = _tracker(target)
    scanner = BatchScanner()
    tracker.harvest()
    target.exit()
    with pytest.raises(ProcessGone):
        _batched_tick(tracker, scanner, [(target.base, target.end)])
