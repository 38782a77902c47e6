"""Fan-out of one session's deltas to any number of subscribers.

One harvester publishes; each subscriber has its own bounded queue. When a queue is full,
its deltas are merged by set union into one delta spanning ``first_seq..seq``: a slow
reader loses latency, never pages. A bounded history serves resumption from
``(epoch, seq)``; what it cannot serve becomes a RESYNC (every tracked page written).

Each delta is encoded once (by the injected ``encode``) and the same frames go to every
subscriber that sees it unchanged; only merged or filtered deltas are encoded per subscriber.
The hub and its subscribers share one explicit :class:`HubState`, not each other's attributes.
Everything here runs on the event loop except :meth:`Hub.prepare`, which the harvester
calls from its worker thread while it holds the session's harvest lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..tracking.delta import Delta, merge_deltas
from ..tracking.regions import RegionArray, RegionSet
from .enums import EndReason

__all__ = [
    "EndReason",
    "Hub",
    "HubState",
    "HubStatistics",
    "Published",
    "SessionEnd",
    "Subscriber",
    "SubscriberStatistics",
]

Encoder = Callable[[Delta], Sequence[bytes]]


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The last item a subscriber receives."""

    reason: EndReason
    message: str


@dataclass(slots=True)
class Published:
    """A delta with its wire frames, encoded at most once."""

    delta: Delta
    _encode: Encoder
    _frames: Sequence[bytes] | None = None

    @property
    def frames(self) -> Sequence[bytes]:
        """The encoded frames (fragments) of the delta."""
        if self._frames is None:
            self._frames = self._encode(self.delta)
        return self._frames

    @property
    def size_bytes(self) -> int:
        """Approximate memory held by the delta's regions."""
        return int(self.delta.regions.nbytes)


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    """Counters of one subscriber."""

    n_queued: int
    n_delivered: int
    n_merges: int
    max_queued: int


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """Counters of a hub."""

    epoch: int
    last_seq: int
    n_subscribers: int
    n_history: int
    history_bytes: int
    n_published: int


@dataclass(eq=False, slots=True)
class HubState:
    """What a hub and its subscribers share (as anyio's ``MemoryObjectStreamState``).

    The hub numbers, keeps history and fans out; a subscriber reads the encoder and the
    queue bound, and leaves :attr:`subscribers` when it closes.
    """

    encode: Encoder
    epoch: int
    max_queued: int
    history_max_deltas: int
    history_max_bytes: int
    last_seq: int = 0
    prepared_seq: int = 0
    n_published: int = 0
    history: deque[Published] = field(default_factory=deque)
    history_bytes: int = 0
    subscribers: set[Subscriber] = field(default_factory=set)
    end: SessionEnd | None = None

    def wrap(self, delta: Delta) -> Published:
        """``delta`` with its frames, encoded on first use."""
        return Published(delta, self.encode)

    def statistics(self) -> HubStatistics:
        """Current counters."""
        return HubStatistics(
            self.epoch,
            self.last_seq,
            len(self.subscribers),
            len(self.history),
            self.history_bytes,
            self.n_published,
        )


class Subscriber:
    """One consumer's bounded queue. Iterate with :meth:`next` until it returns a :class:`SessionEnd`."""

    def __init__(self, state: HubState, filter_ranges: RegionArray | None) -> None:
        self._state = state
        self._max_queued = state.max_queued
        self._filter = RegionSet(filter_ranges) if filter_ranges is not None and len(filter_ranges) else None
        self._queue: deque[Published] = deque()
        self._end: SessionEnd | None = None
        self._wakeup = asyncio.Event()
        self._n_delivered = 0
        self._n_merges = 0
        self.last_dequeue_monotonic = time.monotonic()

    def statistics(self) -> SubscriberStatistics:
        """Current counters."""
        return SubscriberStatistics(len(self._queue), self._n_delivered, self._n_merges, self._max_queued)

    async def next(self) -> Published | SessionEnd:
        """The next delta, or the end of the stream (returned once queued deltas are drained)."""
        while not self._queue:
            if self._end is not None:
                return self._end
            self._wakeup.clear()
            await self._wakeup.wait()
        self._n_delivered += 1
        self.last_dequeue_monotonic = time.monotonic()
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving (the stream went away)."""
        self._state.subscribers.discard(self)

    def offer(self, item: Published) -> None:
        """Queue a delta (clipped to the filter; merged with the queue when it is full). The hub's side."""
        if self._filter is not None:
            clipped = self._filter.intersection(item.delta.regions)
            if len(clipped) == 0 and not item.delta.resync:
                return
            if not np.array_equal(clipped, item.delta.regions):
                item = self._state.wrap(_replace_regions(item.delta, clipped))
        self._queue.append(item)
        if len(self._queue) > self._max_queued:
            merged = merge_deltas([queued.delta for queued in self._queue])
            self._queue.clear()
            self._queue.append(self._state.wrap(merged))
            self._n_merges += 1
        self._wakeup.set()

    def finish(self, end: SessionEnd, *, drop_queued: bool = False) -> None:
        """End the stream after the queued deltas (or at once, ``drop_queued``). The hub's side."""
        if drop_queued:
            self._queue.clear()
        self._end = end
        self._wakeup.set()


def _replace_regions(delta: Delta, regions: RegionArray) -> Delta:
    return Delta(
        delta.epoch, delta.seq, delta.first_seq, delta.resync, delta.harvested_at_unix_ns, regions, delta.covered
    )


class Hub:
    """Numbering, history and fan-out of one session's deltas."""

    def __init__(
        self,
        encode: Encoder,
        *,
        epoch: int,
        max_queued: int = 64,
        history_max_deltas: int = 1024,
        history_max_bytes: int = 64 << 20,
    ) -> None:
        self._state = HubState(encode, epoch, max_queued, history_max_deltas, history_max_bytes)
        self.n_evictions = 0
        """Subscribers evicted so far."""

    def statistics(self) -> HubStatistics:
        """Current counters."""
        return self._state.statistics()

    @property
    def epoch(self) -> int:
        """The epoch of the deltas published now (a followed exec starts a new one)."""
        return self._state.epoch

    @property
    def last_seq(self) -> int:
        """The seq of the last published delta (0: none yet)."""
        return self._state.last_seq

    @property
    def end(self) -> SessionEnd | None:
        """How the session ended, once it has."""
        return self._state.end

    @property
    def n_subscribers(self) -> int:
        """Subscribers connected now."""
        return len(self._state.subscribers)

    @property
    def n_queued(self) -> int:
        """Deltas queued for the connected subscribers, all together."""
        return sum(subscriber.statistics().n_queued for subscriber in self._state.subscribers)

    def prepare(
        self,
        regions: RegionArray,
        *,
        resync: bool = False,
        encode_now: bool = True,
        covered: RegionArray | None = None,
    ) -> Published | None:
        """Number a harvest result and encode it (off the event loop); ``None`` when empty.

        The encoding is skipped while nobody subscribes (or with ``encode_now=False``): the
        frames are then encoded on first use, by a subscriber that replays history.
        ``covered``: the ranges the harvest scanned, None for all (:class:`Delta`).

        Callers serialise prepare+publish pairs (the session's harvest lock), so numbers
        are handed out in publication order.
        """
        if len(regions) == 0 and not resync:
            return None
        state = self._state
        state.prepared_seq = max(state.prepared_seq, state.last_seq) + 1
        delta = Delta(state.epoch, state.prepared_seq, state.prepared_seq, resync, time.time_ns(), regions, covered)
        published = state.wrap(delta)
        if encode_now and state.subscribers:
            _ = published.frames
        return published

    def publish(self, published: Published) -> Delta:
        """Hand a prepared delta to every subscriber and to history."""
        state = self._state
        state.last_seq = published.delta.seq
        state.n_published += 1
        state.history.append(published)
        state.history_bytes += published.size_bytes
        while len(state.history) > state.history_max_deltas or (
            state.history_bytes > state.history_max_bytes and len(state.history) > 1
        ):
            state.history_bytes -= state.history.popleft().size_bytes
        for subscriber in list(state.subscribers):
            subscriber.offer(published)
        return published.delta

    def subscribe(
        self,
        tracked: RegionArray,
        *,
        resume: tuple[int, int] | None = None,
        filter_ranges: RegionArray | None = None,
    ) -> Subscriber:
        """A new subscriber, primed with what it missed since ``resume`` (default: the epoch's start).

        Replays history when it holds every delta after the resume point; otherwise the
        subscriber first gets a RESYNC of ``tracked``, numbered as the latest delta.
        """
        state = self._state
        subscriber = Subscriber(state, filter_ranges)
        resume_epoch, resume_seq = resume if resume is not None else (state.epoch, 0)
        if resume_epoch == state.epoch and resume_seq <= state.last_seq:
            oldest = state.history[0].delta.first_seq if state.history else state.last_seq + 1
            if resume_seq + 1 >= oldest:
                for item in state.history:
                    if item.delta.seq > resume_seq:
                        subscriber.offer(item)
            else:
                subscriber.offer(self._resync(tracked, first_seq=resume_seq + 1))
        else:
            subscriber.offer(self._resync(tracked, first_seq=1))
        if state.end is not None:
            subscriber.finish(state.end)
        else:
            state.subscribers.add(subscriber)
        return subscriber

    def new_epoch(self, epoch: int) -> None:
        """Start numbering again at seq 1 in ``epoch`` (the target executed a new program).

        The history of the old epoch is dropped: a subscriber resuming in it gets a RESYNC.
        Streams stay open; the next prepared delta must be the new epoch's RESYNC.
        """
        state = self._state
        state.epoch = epoch
        state.last_seq = 0
        state.prepared_seq = 0
        state.history.clear()
        state.history_bytes = 0

    def finish(self, reason: EndReason, message: str) -> None:
        """End every stream (after its queued deltas) and refuse nothing: late subscribers get the end too."""
        state = self._state
        if state.end is not None:
            return
        state.end = SessionEnd(reason, message)
        for subscriber in list(state.subscribers):
            subscriber.finish(state.end)
        state.subscribers.clear()

    def evict(self, subscriber: Subscriber, message: str) -> None:
        """Drop one subscriber and its queue; its next item is the end, reason EVICTED."""
        self._state.subscribers.discard(subscriber)
        subscriber.finish(SessionEnd(EndReason.EVICTED, message), drop_queued=True)
        self.n_evictions += 1

    def _resync(self, tracked: RegionArray, *, first_seq: int) -> Published:
        seq = max(self._state.last_seq, first_seq)
        return self._state.wrap(Delta(self._state.epoch, seq, min(first_seq, seq), True, time.time_ns(), tracked))
