"""What a recording says: totals, dirty rate over time, working set, busiest ranges, epochs.

Counts follow docs/recording.md §6: written pages come from non-RESYNC deltas (a RESYNC says
"assume everything written", not that the target wrote it); RESYNCs are counted apart.
Addresses are handled in page units (int64), so sums over millions of regions cannot overflow.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ._types import Delta, EndReason
from .recording import Recording, RecordingStop, RecordingTruncatedWarning, read_recording
from .regions import Regions

__all__ = [
    "LoadedRecording",
    "coverage",
    "load_recording",
    "merge_ranges",
    "recording_report",
]

Pages = npt.NDArray[np.int64]
"""``(n, 2)`` int64 ``[start, end)`` page numbers (address // page size)."""

_N_BUSIEST = 5


def merge_ranges(ranges: Pages, *, join_touching: bool = False) -> Pages:
    """Union of ``[start, end)`` rows, sorted: overlapping rows joined (touching ones too if asked)."""
    if not len(ranges):
        return np.empty((0, 2), dtype=np.int64)
    ordered = ranges[np.argsort(ranges[:, 0], kind="stable")]
    reach = np.maximum.accumulate(ordered[:, 1])
    # A row starts a new group when it begins after (or, keeping touching rows apart, at) the
    # end of everything before it.
    new_group = np.ones(len(ordered), dtype=bool)
    new_group[1:] = ordered[1:, 0] > reach[:-1] if join_touching else ordered[1:, 0] >= reach[:-1]
    starts = ordered[new_group, 0]
    group_ends = np.maximum.reduceat(ordered[:, 1], np.flatnonzero(new_group))
    return np.stack([starts, group_ends], axis=1)


def coverage(regions: Pages, edges: Pages) -> Pages:
    """Pages of ``regions`` (which may overlap: each counts) inside each ``[edges[k], edges[k+1])``."""
    if not len(regions):
        return np.zeros(max(len(edges) - 1, 0), dtype=np.int64)
    starts = np.sort(regions[:, 0])
    ends = np.sort(regions[:, 1])
    start_sums = np.concatenate([[0], np.cumsum(starts)])
    end_sums = np.concatenate([[0], np.cumsum(ends)])
    # Pages covered below x: sum over regions of clip(x - start, 0, length)
    #   = sum_{start < x} (x - start) - sum_{end < x} (x - end).
    n_started = np.searchsorted(starts, edges, side="left")
    n_ended = np.searchsorted(ends, edges, side="left")
    below: Pages = (n_started * edges - start_sums[n_started]) - (n_ended * edges - end_sums[n_ended])
    return np.diff(below)


def _pages(regions: Regions, page_size_bytes: int) -> Pages:
    return (regions // np.uint64(page_size_bytes)).astype(np.int64).reshape(-1, 2)


@dataclass
class LoadedRecording:
    """A recording read into memory, in page units, with its time axis."""

    recording: Recording
    deltas: list[Delta]
    page_size_bytes: int
    start_ns: int
    """Time zero: the earlier of the recorder's start and the first delta's harvest."""
    stop_ns: int
    """The end record's time, else the last delta's harvest (else the start)."""
    tracked: Pages
    """Every tracked range the recording knows (header and snapshots); overlapping ones merged."""
    written: list[Pages] = field(default_factory=list)
    """Page regions of each delta, parallel to ``deltas``."""

    @property
    def duration_s(self) -> float:
        """Seconds from time zero to the stop."""
        return (self.stop_ns - self.start_ns) / 1e9

    def seconds(self, delta: Delta) -> float:
        """When ``delta`` was harvested, in seconds from time zero."""
        return (delta.harvested_at_unix_ns - self.start_ns) / 1e9


def load_recording(path_or_recording: str | os.PathLike[str] | Recording) -> LoadedRecording:
    """Read a whole recording (a truncated one warns once, see :class:`Recording`)."""
    recording = path_or_recording if isinstance(path_or_recording, Recording) else read_recording(path_or_recording)
    with warnings.catch_warnings():
        # The caller learns of it from recording.truncated; a report says so in its own words.
        warnings.simplefilter("ignore", RecordingTruncatedWarning)
        deltas = list(recording)
    page = recording.page_size_bytes
    written = [_pages(delta.regions, delta.page_size_bytes or page) for delta in deltas]
    snapshots = [_pages(ranges, page) for ranges in recording.range_snapshots]
    tracked = merge_ranges(np.concatenate([np.empty((0, 2), dtype=np.int64), *snapshots]))
    start_ns = min([recording.started_at_unix_ns, *(d.harvested_at_unix_ns for d in deltas[:1])])
    if not start_ns:
        start_ns = deltas[0].harvested_at_unix_ns if deltas else 0
    if recording.end is not None:
        stop_ns = recording.end.stopped_at_unix_ns
    else:
        stop_ns = max([start_ns, *(d.harvested_at_unix_ns for d in deltas[-1:])])
    return LoadedRecording(recording, deltas, page, start_ns, stop_ns, tracked, written)


def recording_report(
    path_or_recording: str | os.PathLike[str] | Recording | LoadedRecording,
    *,
    interval_s: float = 1.0,
    n_busiest: int = _N_BUSIEST,
) -> dict[str, Any]:
    """The summary one reads first, JSON-ready (docs/recording.md §6 defines the counts)."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    loaded = path_or_recording if isinstance(path_or_recording, LoadedRecording) else load_recording(path_or_recording)
    recording, deltas, page = loaded.recording, loaded.deltas, loaded.page_size_bytes
    is_written = np.array([not d.resync for d in deltas], dtype=bool)
    n_pages = np.array([int(np.sum(w[:, 1] - w[:, 0])) for w in loaded.written], dtype=np.int64)
    n_written_pages = int(n_pages[is_written].sum()) if len(deltas) else 0
    written = [w for w, keep in zip(loaded.written, is_written.tolist(), strict=True) if keep]
    all_written = np.concatenate([np.empty((0, 2), dtype=np.int64), *written])
    working_set = merge_ranges(all_written, join_touching=True)
    session = recording.session
    end = recording.end
    return {
        "path": str(recording.path),
        "format_version": recording.format_version,
        "session_id": session.session_id,
        "pid": session.pid,
        "comm": session.comm,
        "labels": dict(session.labels),
        "daemon_version": recording.daemon_version,
        "page_size_bytes": page,
        "started_at_unix_ns": loaded.start_ns,
        "duration_s": round(loaded.duration_s, 3),
        "complete": recording.complete,
        "truncated": recording.truncated,
        "stop": RecordingStop(end.stop).name if end is not None else None,
        "end_reason": EndReason(end.end_reason).name if end is not None and end.end_reason else None,
        "n_deltas": len(deltas),
        "n_resyncs": int((~is_written).sum()),
        "n_regions": sum(d.n_regions for d in deltas),
        "n_pages": int(n_pages.sum()),
        "size_bytes": int(n_pages.sum()) * page,
        "n_resync_pages": int(n_pages[~is_written].sum()) if len(deltas) else 0,
        "n_written_pages": n_written_pages,
        "written_bytes": n_written_pages * page,
        "working_set_pages": int(np.sum(working_set[:, 1] - working_set[:, 0])),
        "working_set_bytes": int(np.sum(working_set[:, 1] - working_set[:, 0])) * page,
        "tracked_pages": int(np.sum(loaded.tracked[:, 1] - loaded.tracked[:, 0])),
        "rate": _rate(loaded, n_pages, is_written, interval_s),
        "busiest": _busiest(loaded, all_written, n_busiest),
        "epochs": _epochs(deltas, n_pages),
    }


def _rate(
    loaded: LoadedRecording, n_pages: Pages, is_written: npt.NDArray[np.bool_], interval_s: float
) -> dict[str, Any]:
    """Written pages/s per whole interval from time zero (one partial interval if there is no whole one)."""
    page = loaded.page_size_bytes
    n_intervals = math.floor(loaded.duration_s / interval_s)
    span_s = interval_s
    if n_intervals == 0:
        n_intervals, span_s = 1, max(loaded.duration_s, 1e-9)
    times_s = np.array([loaded.seconds(d) for d in loaded.deltas], dtype=np.float64)
    index = np.floor(times_s / span_s).astype(np.int64) if len(times_s) else np.empty(0, dtype=np.int64)
    inside = is_written & (index >= 0) & (index < n_intervals)
    per_interval = np.bincount(index[inside], weights=n_pages[inside], minlength=n_intervals)[:n_intervals]
    pages_per_second = per_interval / span_s
    stats = {name: float(getattr(np, name)(pages_per_second)) for name in ("min", "median", "max")} | {
        "mean": float(pages_per_second.mean())
    }
    return {
        "interval_s": span_s,
        "n_intervals": n_intervals,
        "pages_per_second": stats,
        "bytes_per_second": {name: value * page for name, value in stats.items()},
    }


def _busiest(loaded: LoadedRecording, written: Pages, n_busiest: int) -> list[dict[str, int | float]]:
    """Tracked ranges (merged) by written pages, most first."""
    ranges = merge_ranges(np.concatenate([loaded.tracked, written])) if len(written) else loaded.tracked
    if not len(ranges) or not len(written):
        return []
    edges = ranges.reshape(-1)
    per_range = coverage(written, edges)[::2]
    total = int(per_range.sum())
    page = loaded.page_size_bytes
    rows: list[dict[str, int | float]] = []
    for i in np.argsort(-per_range, kind="stable")[:n_busiest].tolist():
        n_pages = int(per_range[i])
        if not n_pages:
            break
        start, end = int(ranges[i, 0]), int(ranges[i, 1])
        rows.append(
            {
                "start_address": start * page,
                "end_address": end * page,
                "n_written_pages": n_pages,
                "written_bytes": n_pages * page,
                "share": round(n_pages / total, 4),
            }
        )
    return rows


def _epochs(deltas: list[Delta], n_pages: Pages) -> list[dict[str, int]]:
    epochs: list[dict[str, int]] = []
    for delta, pages in zip(deltas, n_pages.tolist(), strict=True):
        if not epochs or epochs[-1]["epoch"] != delta.epoch:
            epochs.append({"epoch": delta.epoch, "first_seq": delta.first_seq, "n_deltas": 0, "n_resyncs": 0,
                           "n_pages": 0})  # fmt: skip
        current = epochs[-1]
        current["last_seq"] = delta.seq
        current["n_deltas"] += 1
        current["n_resyncs"] += delta.resync
        current["n_pages"] += pages
    return epochs
