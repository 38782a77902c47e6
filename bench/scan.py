"""WriteWatch.harvest against a bare ctypes PAGEMAP_SCAN over the same memory, interleaved.

    .venv/bin/python bench/scan.py            # 1 GiB, 31 rounds per case
    .venv/bin/python bench/scan.py --quick    # 64 MiB, 5 rounds: a smoke run
    .venv/bin/python bench/scan.py --json     # machine-readable

For each memory preparation (read-populated: zero page; write-populated: private pages)
and each written share (0%, 1%, 14% of pages, chosen by a hash as in docs/kernel.md §4.2), every
round re-dirties the same pages before *each* measured scan (numpy fancy-index stores, not
timed), then times one baseline scan and one candidate harvest, alternating which goes
first. Both report and re-protect the same pages; the bench checks that they return the
same regions, so the two do the same kernel work.

The baseline is the least Python can do: a pre-built ``pm_scan_arg`` with flags
WP_MATCHING|CHECK_WPASYNC and mask = return = WRITTEN (the kernel's fast path, docs/kernel.md
§1.7), a preallocated vec large enough that one ioctl always completes the range, and one
``ioctl`` call. The candidate is the public API, ``WriteWatch.harvest``, which also
validates the range, takes its lock and returns a fresh ``(n, 2)`` array.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from common import PAGE_SIZE, AnonMemory, Stats, hashed_pages, machine, ratio_stats

from writewatchd.tracking import WriteWatch

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` (uapi ``linux/fs.h``): 12 u64 fields, 96 bytes."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(PmScanArg) << 16) | (ord("f") << 8) | 16

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class BareScan:
    """The baseline: one PAGEMAP_SCAN ioctl with everything prepared in advance."""

    def __init__(self, start: int, end: int) -> None:
        n_pages = (end - start) // PAGE_SIZE
        # Isolated written pages are at most every other page: one call always suffices.
        self.vec_len = n_pages // 2 + 1
        self.vec = np.zeros((self.vec_len, 3), dtype=np.uint64)
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.arg = PmScanArg(
            size=ctypes.sizeof(PmScanArg),
            flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start=start,
            end=end,
            vec=self.vec.ctypes.data,
            vec_len=self.vec_len,
            category_mask=PAGE_IS_WRITTEN,
            return_mask=PAGE_IS_WRITTEN,
        )
        self.arg_ref = ctypes.byref(self.arg)

    def __call__(self) -> int:
        n_regions: int = _ioctl(self.fd, PAGEMAP_SCAN, self.arg_ref)
        if n_regions < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"PAGEMAP_SCAN: {os.strerror(err)}")
        return n_regions

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Case:
    prep: str
    percent: float


@dataclass
class CaseResult:
    case: Case
    written_pages: int
    regions: int
    baseline_ns: Sequence[int]
    candidate_ns: Sequence[int]

    @property
    def baseline(self) -> Stats:
        return Stats.of(self.baseline_ns)

    @property
    def candidate(self) -> Stats:
        return Stats.of(self.candidate_ns)

    @property
    def ratio(self) -> Stats:
        """Per-round candidate/baseline ratios: drifts that hit both sides of a round cancel."""
        return ratio_stats(self.candidate_ns, self.baseline_ns)

    def summary(self) -> dict[str, float | int | str]:
        return {
            "prep": self.case.prep,
            "percent": self.case.percent,
            "written_pages": self.written_pages,
            "regions": self.regions,
            "rounds": len(self.baseline_ns),
            "baseline_median_ms": self.baseline.median / 1e6,
            "baseline_min_ms": self.baseline.low / 1e6,
            "baseline_max_ms": self.baseline.high / 1e6,
            "candidate_median_ms": self.candidate.median / 1e6,
            "candidate_min_ms": self.candidate.low / 1e6,
            "candidate_max_ms": self.candidate.high / 1e6,
            "median_ratio": self.ratio.median,
        }


def run_case(
    memory: AnonMemory,
    watch: WriteWatch,
    bare: BareScan,
    case: Case,
    rounds: int,
    warmup_rounds: int,
) -> CaseResult:
    pages = hashed_pages(memory.n_pages, case.percent)
    # Spread the stores over each page so no single cache line is always hit.
    offsets = pages * PAGE_SIZE + (pages % (PAGE_SIZE // 64)) * 64
    expected_pages = len(pages)
    baseline_ns: list[int] = []
    candidate_ns: list[int] = []
    n_regions = 0
    value = 0

    def redirty() -> None:
        nonlocal value
        value = (value + 1) % 251 + 1
        memory.dirty(offsets, value)

    def time_baseline() -> npt.NDArray[np.uint64]:
        redirty()
        t0 = time.perf_counter_ns()
        n = bare()
        t1 = time.perf_counter_ns()
        baseline_ns.append(t1 - t0)
        if n >= bare.vec_len:
            raise AssertionError("baseline vec filled up; the scan may be incomplete")
        return bare.vec[:n, :2].copy()

    def time_candidate() -> npt.NDArray[np.uint64]:
        redirty()
        t0 = time.perf_counter_ns()
        regions = watch.harvest(memory.addr, memory.length_bytes)
        t1 = time.perf_counter_ns()
        candidate_ns.append(t1 - t0)
        return regions

    # Drain whatever earlier cases left written, so both sides start from the same state.
    watch.harvest(memory.addr, memory.length_bytes)
    gc.collect()
    gc.disable()
    try:
        for round_index in range(warmup_rounds + rounds):
            order: tuple[Callable[[], npt.NDArray[np.uint64]], ...] = (time_baseline, time_candidate)
            if round_index % 2:
                order = order[::-1]
            first, second = order[0](), order[1]()
            baseline_regions, candidate_regions = (first, second) if round_index % 2 == 0 else (second, first)
            if not np.array_equal(baseline_regions, candidate_regions):
                raise AssertionError(f"{case}: harvest and bare scan disagree in round {round_index}")
            n_pages_seen = int(((candidate_regions[:, 1] - candidate_regions[:, 0]) // PAGE_SIZE).sum())
            if n_pages_seen != expected_pages:
                raise AssertionError(f"{case}: {n_pages_seen} pages reported, {expected_pages} written")
            n_regions = len(candidate_regions)
            if round_index < warmup_rounds:
                baseline_ns.pop()
                candidate_ns.pop()
    finally:
        gc.enable()
    return CaseResult(case, expected_pages, n_regions, baseline_ns, candidate_ns)


def run_cases(
    size_bytes: int, rounds: int, warmup_rounds: int, preps: list[str], percents: list[float]
) -> list[CaseResult]:
    results: list[CaseResult] = []
    for prep in preps:
        memory = AnonMemory(size_bytes)
        try:
            memory.populate(prep)
            with WriteWatch() as watch:
                watch.watch(memory.addr, memory.length_bytes, no_huge_pages=True)
                bare = BareScan(memory.addr, memory.addr + memory.length_bytes)
                try:
                    for percent in percents:
                        case = Case(prep, percent)
                        results.append(run_case(memory, watch, bare, case, rounds, warmup_rounds))
                finally:
                    bare.close()
        finally:
            memory.close()
    return results


GOAL_RATIO = 1.10
GOAL_PERCENTS = (1.0, 14.0)
GOAL_SIZE_BYTES = 1 << 30


def verdict(results: list[CaseResult], size_bytes: int) -> str:
    judged = [r for r in results if r.case.percent in GOAL_PERCENTS]
    if size_bytes != GOAL_SIZE_BYTES or not judged:
        # Fixed per-call costs weigh more on a smaller range: only the 1 GiB run is judged.
        return f"goal (median ratio <= {GOAL_RATIO:.2f} at 1% and 14%, 1 GiB): not judged in this run"
    misses = [f"{r.case.prep} {r.case.percent:g}%" for r in judged if r.ratio.median > GOAL_RATIO]
    status = "met" if not misses else "missed at " + ", ".join(misses)
    return f"goal (median ratio <= {GOAL_RATIO:.2f} at 1% and 14%): {status}"


def format_table(results: list[CaseResult], size_bytes: int, rounds: int) -> str:
    lines = [
        f"Harvest vs bare PAGEMAP_SCAN: {size_bytes >> 20} MiB anon, MADV_NOHUGEPAGE, "
        f"{size_bytes // PAGE_SIZE} pages, {rounds} interleaved rounds per case",
        "",
        "| prep | written | pages | regions | bare ms median (min-max) | harvest ms median (min-max) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.case.prep} | {r.case.percent:g}% | {r.written_pages} | {r.regions} "
            f"| {r.baseline.fmt(3, 1e6)} | {r.candidate.fmt(3, 1e6)} | {r.ratio.median:.3f} |"
        )
    lines.append("")
    lines.append("ratio = median over rounds of (harvest time / bare scan time) measured in the same round")
    lines.append(verdict(results, size_bytes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="memory size (default 1024)")
    parser.add_argument("--rounds", type=int, default=31, help="measured rounds per case (default 31)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--prep", action="append", choices=["read", "write"], help="populate by (default both)")
    parser.add_argument("--percent", action="append", type=float, help="written share (default 0, 1, 14)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 5 rounds, 1 warm-up: a smoke run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    size_mib, rounds, warmup = args.size_mib, args.rounds, args.warmup
    if args.quick:
        size_mib, rounds, warmup = 64, 5, 1
    preps = args.prep or ["read", "write"]
    percents = args.percent or [0.0, 1.0, 14.0]
    size_bytes = size_mib << 20

    load_before = os.getloadavg()[0]
    results = run_cases(size_bytes, rounds, warmup, preps, percents)
    load_after = os.getloadavg()[0]
    info = machine()
    if args.json:
        report = {
            "benchmark": "harvest_vs_bare_pagemap_scan",
            "machine": info,
            "loadavg_1min": [load_before, load_after],
            "size_bytes": size_bytes,
            "rounds": rounds,
            "goal": verdict(results, size_bytes),
            "cases": [
                {**r.summary(), "baseline_ns": list(r.baseline_ns), "candidate_ns": list(r.candidate_ns)}
                for r in results
            ],
        }
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(
            f"machine: nproc={info['nproc']}, {info['cpu']}, Linux {info['kernel']}, THP {info['thp']}, "
            f"Python {info['python']}, numpy {info['numpy']}, commit {info['commit']}, {info['date']}, "
            f"1-min load {load_before:.1f} -> {load_after:.1f}"
        )
        print(format_table(results, size_bytes, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
