"""Hub: ordering, lossless merging for slow readers, resume from history or RESYNC, end of streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from writewatchd.service.hub import EndReason, Hub, Published, SessionEnd, Subscriber
from writewatchd.tracking.delta import Delta
from writewatchd.tracking.regions import as_regions

PAGE = 4096
TRACKED = as_regions([(0, 1024 * PAGE)])


def _encode(delta: Delta) -> list[bytes]:
    return [f"{delta.epoch}:{delta.seq}".encode()]


def _pages(*pages: int) -> np.ndarray:
    return as_regions([(p * PAGE, (p + 1) * PAGE) for p in pages])


def _publish(hub: Hub, *pages: int, resync: bool = False) -> Delta:
    prepared = hub.prepare(_pages(*pages), resync=resync)
    assert prepared is not None
    return hub.publish(prepared)


async def _drain(sub: Subscriber, n: int) -> list[Delta]:
    items = []
    for _ in range(n):
        item = await sub.next()
        assert isinstance(item, Published)
        items.append(item.delta)
    return items


def _page_set(deltas: list[Delta]) -> set[int]:
    return {a // PAGE for d in deltas for s, e in d.regions.tolist() for a in range(s, e, PAGE)}


async def test_empty_harvest_is_not_published() -> None:
    hub = Hub(_encode, epoch=7)
    assert hub.prepare(_pages()) is None
    assert hub.last_seq == 0


async def test_seq_increments_and_every_subscriber_gets_the_same_frames() -> None:
    hub = Hub(_encode, epoch=7)
    _publish(hub, 1, resync=True)
    a = hub.subscribe(TRACKED, resume=(7, 1))
    b = hub.subscribe(TRACKED, resume=(7, 1))
    _publish(hub, 2)
    _publish(hub, 3)
    got_a = [await a.next(), await a.next()]
    got_b = [await b.next(), await b.next()]
    assert [p.delta.seq for p in got_a if isinstance(p, Published)] == [2, 3]
    assert all(pa is pb for pa, pb in zip(got_a, got_b, strict=True))  # encoded once, shared


async def test_fresh_subscriber_replays_the_epoch_from_its_resync() -> None:
    hub = Hub(_encode, epoch=7)
    _publish(hub, 0, resync=True)
    _publish(hub, 5)
    sub = hub.subscribe(TRACKED)
    deltas = await _drain(sub, 2)
    assert [(d.seq, d.resync) for d in deltas] == [(1, True), (2, False)]


async def test_slow_subscriber_gets_a_lossless_merge() -> None:
    hub = Hub(_encode, epoch=1, max_queued=4)
    _publish(hub, 0, resync=True)
    sub = hub.subscribe(TRACKED, resume=(1, 1))
    for page in range(10, 30):
        _publish(hub, page)
    assert sub.statistics().n_queued <= 4
    deltas = []
    while sub.statistics().n_queued:
        deltas.extend(await _drain(sub, 1))
    assert _page_set(deltas) == set(range(10, 30))
    assert deltas[-1].seq == 21
    assert deltas[0].first_seq == 2
    assert all(b.first_seq == a.seq + 1 for a, b in itertools.pairwise(deltas))


@pytest.mark.parametrize("history", [3, 100])
async def test_resume_replays_from_history_or_resyncs(history: int) -> None:
    hub = Hub(_encode, epoch=1, history_max_deltas=history)
    _publish(hub, 0, resync=True)
    for page in range(1, 11):
        _publish(hub, page)
    sub = hub.subscribe(TRACKED, resume=(1, 5))
    if history == 100:
        deltas = await _drain(sub, 6)
        assert [d.seq for d in deltas] == [6, 7, 8, 9, 10, 11]
        assert not any(d.resync for d in deltas)
    else:
        (delta,) = await _drain(sub, 1)
        assert delta.resync and delta.seq == 11 and delta.first_seq == 6
        assert delta.regions.tolist() == TRACKED.tolist()


async def test_resume_from_another_epoch_resyncs() -> None:
    hub = Hub(_encode, epoch=2)
    _publish(hub, 0, resync=True)
    (delta,) = await _drain(hub.subscribe(TRACKED, resume=(1, 40)), 1)
    assert delta.resync and delta.epoch == 2


async def test_resume_at_the_head_gets_only_new_deltas() -> None:
    hub = Hub(_encode, epoch=1)
    _publish(hub, 0, resync=True)
    sub = hub.subscribe(TRACKED, resume=(1, 1))
    assert sub.statistics().n_queued == 0
    _publish(hub, 9)
    (delta,) = await _drain(sub, 1)
    assert delta.seq == 2


async def test_finish_drains_queued_deltas_then_ends_and_late_subscribers_see_the_end() -> None:
    hub = Hub(_encode, epoch=1)
    _publish(hub, 0, resync=True)
    sub = hub.subscribe(TRACKED, resume=(1, 1))
    _publish(hub, 4)
    hub.finish(EndReason.EXITED, "gone")
    assert isinstance(await sub.next(), Published)
    end = await sub.next()
    assert end == SessionEnd(EndReason.EXITED, "gone")
    late = hub.subscribe(TRACKED, resume=(1, 2))
    assert await late.next() == end


async def test_filter_clips_deltas_and_skips_empty_ones() -> None:
    hub = Hub(_encode, epoch=1)
    _publish(hub, 0, resync=True)
    sub = hub.subscribe(TRACKED, resume=(1, 1), filter_ranges=as_regions([(100 * PAGE, 200 * PAGE)]))
    _publish(hub, 5)
    _publish(hub, 150, 300)
    (delta,) = await _drain(sub, 1)
    assert _page_set([delta]) == {150}
    assert sub.statistics().n_queued == 0


async def test_evicted_subscriber_ends_with_reason_evicted_and_others_continue() -> None:
    hub = Hub(_encode, epoch=1)
    _publish(hub, 0, resync=True)
    slow = hub.subscribe(TRACKED, resume=(1, 1))
    fast = hub.subscribe(TRACKED, resume=(1, 1))
    hub.evict(slow, "too slow")
    _publish(hub, 3)
    assert (hub.n_evictions, hub.n_subscribers, hub.n_queued) == (1, 1, 1)  # the fast one holds seq 2
    end = await slow.next()
    assert isinstance(end, SessionEnd) and end.reason == EndReason.EVICTED
    (delta,) = await _drain(fast, 1)
    assert delta.seq == 2


async def test_encoding_waits_for_a_subscriber_and_history_is_encoded_on_first_use() -> None:
    calls: list[int] = []

    def encode(delta: Delta) -> list[bytes]:
        calls.append(delta.seq)
        return _encode(delta)

    hub = Hub(encode, epoch=7)
    unseen = hub.prepare(_pages(1), resync=True)
    assert unseen is not None
    hub.publish(unseen)
    assert calls == []  # nobody subscribes: nothing encoded
    late = hub.subscribe(TRACKED)
    replayed = await late.next()
    assert isinstance(replayed, Published)
    assert replayed.frames == [b"7:1"]
    assert calls == [1]  # encoded when the replay needed it
    seen = hub.prepare(_pages(2))
    assert seen is not None
    assert calls == [1, 2]  # a subscriber is connected: encoded in prepare, off the event loop
    hub.publish(seen)
    assert await late.next() is seen
