"""The tracking core: region sets, write watches, per-process trackers. No transport here."""

from .regions import EMPTY, RegionArray, RegionSet, as_regions, merge, page_addresses
from .writewatch import WRITE_WATCH_FLAG_RESET, WatchFlag, WriteWatch, WriteWatchResult

__all__ = [
    "EMPTY",
    "WRITE_WATCH_FLAG_RESET",
    "RegionArray",
    "RegionSet",
    "WatchFlag",
    "WriteWatch",
    "WriteWatchResult",
    "as_regions",
    "merge",
    "page_addresses",
]
