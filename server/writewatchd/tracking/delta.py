"""The unit of publication: what one harvest found."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .regions import RegionArray, merge, n_pages

__all__ = ["Delta", "merge_deltas"]


@dataclass(frozen=True, slots=True)
class Delta:
    """Pages written in one harvest (or several merged), as sorted ``[start, end)`` regions.

    ``seq`` increases by one per non-empty delta within an ``epoch``; a merged delta covers
    ``first_seq..seq``. ``resync`` means "assume every tracked page written": the first
    delta of an epoch, or a replay that history could not serve.

    ``covered`` is what the harvest scanned (the coverage rule, docs/api.md): every write
    to those ranges completed before it started is in this delta or an earlier one. None
    means every tracked range (a full harvest); a heat-scheduled tick scans only some.
    """

    epoch: int
    seq: int
    first_seq: int
    resync: bool
    harvested_at_unix_ns: int
    regions: RegionArray
    covered: RegionArray | None = None

    @property
    def n_regions(self) -> int:
        """Number of regions."""
        return len(self.regions)

    @property
    def n_pages(self) -> int:
        """Number of pages inside the regions."""
        return n_pages(self.regions)


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One delta equal to the union of consecutive ``deltas`` (same epoch, ascending seq).

    Its coverage is the last one's: up to that harvest, the ranges it scanned.
    """
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return Delta(
        epoch=last.epoch,
        seq=last.seq,
        first_seq=deltas[0].first_seq,
        resync=any(d.resync for d in deltas),
        harvested_at_unix_ns=last.harvested_at_unix_ns,
        regions=merge(np.concatenate([d.regions for d in deltas])),
        covered=last.covered,
    )
