"""docs/grafana-dashboard.json names only metrics a real daemon exports, and shows all of them."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import writewatch
from daemonproc import DaemonProcess
from targets import CoopTarget

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bwritewatchd_[a-z_]+\b")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _exported(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def _expressions(dashboard: dict[str, object]) -> list[str]:
    panels = dashboard["panels"]
    assert isinstance(panels, list)
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_every_metric_of_the_dashboard_exists_and_every_metric_is_shown(tmp_path: Path) -> None:
    port = _free_port()
    daemon = DaemonProcess(tmp_path, {"WRITEWATCHD_METRICS_PORT": str(port)})
    daemon.start()
    target = CoopTarget(16)
    try:
        with writewatch.Client(daemon.address) as client:
            session = client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd)
            stream = session.subscribe()
            next(stream)  # a connected subscriber, so per-subscriber series exist
            target.write(3)
            deadline = time.monotonic() + 20
            while True:
                try:
                    exported = _exported(port)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            stream.close()
    finally:
        target.kill()
        daemon.stop()
    dashboard = json.loads(DASHBOARD.read_text())
    named = {name for expr in _expressions(dashboard) for name in METRIC.findall(expr)}
    named |= set(METRIC.findall(json.dumps(dashboard["templating"])))
    assert len(named) >= 8
    assert named <= exported, f"not exported: {sorted(named - exported)}"
    assert exported <= named, f"not on the dashboard: {sorted(exported - named)}"


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
