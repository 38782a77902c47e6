"""Prometheus metrics, computed from the sessions at scrape time: nothing on the hot path."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .sessions import SessionManager

__all__ = ["serve_metrics", "session_registry"]


class _SessionCollector(Collector):
    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sessions = self._manager.sessions()
        active = [s for s in sessions if s.active]
        yield GaugeMetricFamily("writewatchd_sessions", "Sessions tracking a live process", value=len(active))
        yield GaugeMetricFamily(
            "writewatchd_subscribers", "Connected subscribers", value=sum(s.hub.n_subscribers for s in active)
        )
        by_state = GaugeMetricFamily(
            "writewatchd_sessions_by_state",
            "Sessions by state (ended ones stay for the retention period)",
            labels=["state"],
        )
        by_state.add_metric(["active"], len(active))
        by_state.add_metric(["ended"], len(sessions) - len(active))
        yield by_state
        labels = ["session"]
        subscribers = GaugeMetricFamily(
            "writewatchd_session_subscribers", "Connected subscribers of a session", labels=labels
        )
        queued = GaugeMetricFamily(
            "writewatchd_subscriber_queue_depth",
            "Deltas queued for a session's subscribers, not yet read",
            labels=labels,
        )
        evictions = CounterMetricFamily(
            "writewatchd_evictions", "Subscribers evicted for not reading in time", labels=labels
        )
        lag = GaugeMetricFamily(
            "writewatchd_scan_lag_seconds",
            "How far behind its nominal scan schedule a session's most overdue range is (heat scheduling)",
            labels=labels,
        )
        late = CounterMetricFamily(
            "writewatchd_ticks_late",
            "Ticks that served a session late: load shed, or the tick itself started late",
            labels=labels,
        )
        for session in active:
            subscribers.add_metric([session.session_id], session.hub.n_subscribers)
            queued.add_metric([session.session_id], session.hub.n_queued)
            evictions.add_metric([session.session_id], session.hub.n_evictions)
            heat = session.heat_statistics()
            if heat is not None:
                lag.add_metric([session.session_id], heat.lag_ms / 1000)
                late.add_metric([session.session_id], heat.n_ticks_late)
        yield from (subscribers, queued, evictions, lag, late)
        shed = GaugeMetricFamily(
            "writewatchd_shed_level",
            "Load shed by the ticks of an interval: 0 none, 1 warm ranges as cold, each more doubles the hot interval",
            labels=["tick_interval_ms"],
        )
        for ticker in self._manager.tickers():
            shed.add_metric([str(ticker.interval_ms)], ticker.scheduler.shed_level)
        yield shed
        counters = {
            "writewatchd_harvests": ("Harvests since the daemon started", "n_harvests", 1.0),
            "writewatchd_harvest_seconds": ("Time spent harvesting", "total_harvest_ns", 1e-9),
            "writewatchd_regions": ("Written regions reported", "n_regions", 1.0),
            "writewatchd_pages": ("Written pages reported", "n_pages", 1.0),
        }
        for name, (help_text, field, scale) in counters.items():
            family = CounterMetricFamily(name, help_text, labels=["session"])
            for session in active:
                family.add_metric([session.session_id], getattr(session.statistics, field) * scale)
            yield family
        follow = self._manager.follower.counters
        for name, help_text, value in (
            ("writewatchd_follow_execs", "Execs followed (a new epoch each)", follow.n_execs_followed),
            ("writewatchd_follow_children_adopted", "Child processes that became sessions", follow.n_children_adopted),
            (
                "writewatchd_follow_children_exited_early",
                "Child processes that exited before they could be attached",
                follow.n_children_exited_early,
            ),
            (
                "writewatchd_follow_children_refused",
                "Child processes not followed: max_sessions_per_tree reached (RESOURCE_EXHAUSTED)",
                follow.n_children_refused,
            ),
            ("writewatchd_follow_children_failed", "Child processes whose attach failed", follow.n_children_failed),
            ("writewatchd_follow_events_lost", "Process-event overflows (recovered by polling)", follow.n_events_lost),
        ):
            yield CounterMetricFamily(name, help_text, value=value)


def session_registry(manager: SessionManager) -> CollectorRegistry:
    """A registry exposing ``manager``'s sessions."""
    registry = CollectorRegistry()
    registry.register(_SessionCollector(manager))
    return registry


def serve_metrics(manager: SessionManager, port: int) -> int:
    """Serve ``/metrics`` on ``127.0.0.1:port`` (0 picks a free port); returns the port."""
    server, _ = start_http_server(port, addr="127.0.0.1", registry=session_registry(manager))
    return int(server.server_port)
