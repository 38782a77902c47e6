"""Deployment files: checked with each engine's own validator where this machine has it, and
for the properties the daemon needs in any case (no container engine can run images here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VENV_BIN = Path(sys.executable).parent


def _unit_settings(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit's sections and their settings (the last assignment wins)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if header := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(header[1], {})
            continue
        key, found, value = line.partition("=")
        assert found and current is not None, f"{path.name}: {line!r} is not KEY=VALUE in a section"
        current[key] = value
    return sections


def test_the_daemon_unit_is_hardened_and_keeps_what_tracking_needs() -> None:
    service = _unit_settings(DEPLOY / "systemd" / "writewatchd.service")["Service"]
    assert service["ProtectSystem"] == "strict"
    capabilities = set(service["CapabilityBoundingSet"].split())
    assert {"CAP_SYS_PTRACE", "CAP_NET_ADMIN"} <= capabilities
    assert "CAP_SYS_MODULE" not in capabilities and "CAP_NET_RAW" not in capabilities
    assert service["NoNewPrivileges"] == "yes"
    # Every process must stay visible to the daemon.
    assert service.get("ProtectProc", "default") == "default"
    assert "unix:/run/writewatch/writewatchd.sock" in service["ExecStart"]
    assert service["RuntimeDirectory"] == "writewatch"
    export = _unit_settings(DEPLOY / "systemd" / "writewatch-export.service")
    assert export["Service"]["CapabilityBoundingSet"] == ""
    assert " export --all --nats " in export["Service"]["ExecStart"]
    assert "writewatchd.service" in export["Unit"]["Requires"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's.
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/", f"{VENV_BIN}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in UNITS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "writewatch" not in done.stderr, done.stderr


def test_the_daemonset_has_host_pid_capabilities_socket_and_tls_service() -> None:
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    kinds = re.findall(r"^kind: (\w+)$", text, re.MULTILINE)
    assert kinds == ["Namespace", "ServiceAccount", "DaemonSet", "Service"]
    assert "hostPID: true" in text
    assert re.search(r'add: \[[^]]*"SYS_PTRACE"[^]]*"NET_ADMIN"', text)
    assert "hostPath: {path: /run/writewatch, type: DirectoryOrCreate}" in text
    assert "unix:/run/writewatch/writewatchd.sock" in text
    assert re.search(r"port: 7443, targetPort: grpc-tls", text)
    assert "export --all --nats" in text
    assert "\t" not in text


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_builds_the_manifests_offline() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert sorted(re.findall(r"^kind: (\w+)$", done.stdout, re.MULTILINE)) == [
        "DaemonSet",
        "Namespace",
        "Service",
        "ServiceAccount",
    ]


def test_compose_runs_nats_and_the_exporter() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = re.findall(r"^  (\w[\w-]*):$", text.partition("\nvolumes:")[0], re.MULTILINE)
    assert services == ["writewatchd", "subscriber", "nats", "exporter"]
    assert '"-js"' in text
    assert '"export", "--all",' in text and '"nats://nats:4222"' in text


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="neither docker-compose nor docker compose is installed")
def test_compose_config_accepts_the_file() -> None:
    command = _compose_command()
    assert command is not None
    done = subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
