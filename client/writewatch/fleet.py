"""Many daemons as one: ``Fleet`` lists their sessions together, attaches or spawns on a chosen host,
and merges several subscriptions into one iterator of ``(host, Delta)``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._client import Client, Session
from ._exceptions import WriteWatchError
from ._types import Delta
from ._wire import RangesArg

__all__ = ["Fleet", "FleetError", "parse_fleet_file"]


class FleetError(WriteWatchError):
    """Some daemons of the fleet failed; ``errors`` maps each host to its error, ``sessions``
    holds what the others answered."""

    def __init__(self, errors: Mapping[str, Exception], sessions: Sequence[tuple[str, Session]] = ()) -> None:
        self.errors = dict(errors)
        self.sessions = list(sessions)
        details = "; ".join(f"{host}: {error}" for host, error in self.errors.items())
        super().__init__(f"{len(self.errors)} of the fleet's daemons failed: {details}")


def parse_fleet_file(path: str | Path) -> dict[str, str]:
    """A fleet file: one daemon per line, ``ADDRESS`` or ``NAME ADDRESS``; ``#`` starts a comment."""
    hosts: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ValueError(f"{path}:{number}: expected ADDRESS or NAME ADDRESS, not {raw.strip()!r}")
        name, address = (words[0], words[0]) if len(words) == 1 else (words[0], words[1])
        if name in hosts:
            raise ValueError(f"{path}:{number}: {name!r} is listed twice")
        hosts[name] = address
    if not hosts:
        raise ValueError(f"{path} names no daemon")
    return hosts


class Fleet:
    """Clients of many daemons. ``addresses`` is a list (each address is also its host name) or a
    mapping ``{host: address}``; other keyword arguments go to every :class:`Client`."""

    def __init__(self, addresses: Iterable[str] | Mapping[str, str], **client_kwargs: Any) -> None:
        hosts = dict(addresses) if isinstance(addresses, Mapping) else {address: address for address in addresses}
        if not hosts:
            raise ValueError("a fleet needs at least one daemon address")
        self.clients: dict[str, Client] = {host: Client(address, **client_kwargs) for host, address in hosts.items()}
        self._closed = threading.Event()

    @classmethod
    def from_file(cls, path: str | Path, **client_kwargs: Any) -> Fleet:
        """The fleet of a fleet file (see :func:`parse_fleet_file`)."""
        return cls(parse_fleet_file(path), **client_kwargs)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel (open subscriptions end); sessions keep running in their daemons."""
        self._closed.set()
        for client in self.clients.values():
            client.close()

    @property
    def hosts(self) -> list[str]:
        """Host names, in the order given."""
        return list(self.clients)

    def client(self, host: str) -> Client:
        """The client of one host."""
        try:
            return self.clients[host]
        except KeyError:
            raise ValueError(f"no host {host!r} in the fleet (hosts: {', '.join(self.clients)})") from None

    def sessions(self, *, include_ended: bool = False) -> list[tuple[str, Session]]:
        """Every session of every daemon as ``(host, session)``, hosts in order, asked in parallel.

        ``include_ended`` as in :meth:`Client.sessions`.

        Raises :class:`FleetError` (with the answers of the others) when a daemon fails.
        """
        with ThreadPoolExecutor(max_workers=min(32, len(self.clients))) as pool:
            futures = {
                host: pool.submit(client.sessions, include_ended=include_ended) for host, client in self.clients.items()
            }
        listed: list[tuple[str, Session]] = []
        errors: dict[str, Exception] = {}
        for host, future in futures.items():
            error = future.exception()
            if error is None:
                listed.extend((host, session) for session in future.result())
            elif isinstance(error, Exception):
                errors[host] = error
            else:
                raise error
        if errors:
            raise FleetError(errors, listed)
        return listed

    def session(self, host: str, session_id: str) -> Session:
        """The session ``session_id`` of ``host``."""
        return self.client(host).session(session_id)

    def attach(self, host: str, pid: int, ranges: RangesArg = "auto", **kwargs: Any) -> Session:
        """:meth:`Client.attach` on ``host``."""
        return self.client(host).attach(pid, ranges, **kwargs)

    def spawn(self, host: str, argv: Sequence[str], ranges: RangesArg = "auto", **kwargs: Any) -> Session:
        """:meth:`Client.spawn` on ``host``."""
        return self.client(host).spawn(argv, ranges, **kwargs)

    def subscribe(
        self, sessions: Iterable[tuple[str, Session | str]], **subscribe_kwargs: Any
    ) -> Iterator[tuple[str, Delta]]:
        """Deltas of several sessions, possibly of several hosts, as one iterator of ``(host, delta)``.

        Each session's deltas keep their order; sessions interleave as their deltas arrive. Ends
        when every session has ended (each ``Session.end_reason`` is then set); an error of one
        subscription is raised here. Keyword arguments go to each :meth:`Session.subscribe`.
        """
        chosen = [(host, item if isinstance(item, Session) else self.session(host, item)) for host, item in sessions]
        items: queue.Queue[tuple[str, Delta] | BaseException | None] = queue.Queue(maxsize=1024)

        def pump(host: str, session: Session) -> None:
            try:
                for delta in session.subscribe(**subscribe_kwargs):
                    if self._closed.is_set():
                        return
                    items.put((host, delta))
            except BaseException as error:
                items.put(error)
            finally:
                items.put(None)

        for host, session in chosen:
            # Daemon threads: one blocked on a quiet session must not keep the interpreter alive.
            threading.Thread(target=pump, args=(host, session), name=f"fleet {host} {session.id}", daemon=True).start()
        remaining = len(chosen)
        while remaining:
            item = items.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
