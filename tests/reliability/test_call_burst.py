"""A burst of calls is served, every one: none is refused while the daemon can still queue it."""

from __future__ import annotations

import asyncio
import collections

import writewatch
from daemonproc import DaemonProcess

# Well above the 1000 queued calls at which gRPC starts dropping them (docs/kernel.md 8.13),
# well below the daemon's max_pending_calls: without the daemon's limits about a third of
# these calls failed with CANCELLED though no client cancelled anything.
N_CALLS = 5000
N_CHANNELS = 4


async def test_a_burst_of_calls_is_not_dropped(daemon: DaemonProcess) -> None:
    clients = [writewatch.AsyncClient(daemon.address, timeout_s=60) for _ in range(N_CHANNELS)]
    try:
        await asyncio.gather(*(client.sessions() for client in clients))  # connected before the burst
        results = await asyncio.gather(
            *(clients[i % N_CHANNELS].sessions() for i in range(N_CALLS)), return_exceptions=True
        )
        outcomes = collections.Counter(type(result).__name__ for result in results)
        assert outcomes == {"list": N_CALLS}
    finally:
        for client in clients:
            await client.close()
