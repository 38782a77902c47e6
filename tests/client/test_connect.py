"""Connection options: one resolution for Client, AsyncClient and the CLI (arguments > profile > env)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from writewatch import Client, Unavailable
from writewatch._connect import resolve


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No WRITEWATCH_* of the caller; the client config lives in tmp_path/config.toml."""
    import os

    for key in [k for k in os.environ if k.startswith("WRITEWATCH_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "config.toml"
    monkeypatch.setenv("WRITEWATCH_CONFIG", str(config))
    yield config


def _file(path: Path, text: str = "x", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_host_port_is_tls_unless_insecure(tmp_path: Path) -> None:
    ca = _file(tmp_path / "ca.pem")
    assert resolve("lab:7443", tls_ca_file=ca).tls
    assert resolve("tcp:lab:7443").target == "lab:7443"
    assert not resolve("lab:7443", insecure=True).tls
    local = resolve("/run/w.sock", tls_ca_file=ca)
    assert local.target == "unix:/run/w.sock" and not local.tls


def test_arguments_beat_a_named_profile_which_beats_env(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_env.write_text('[profiles.lab]\naddress = "lab:1"\ntoken = "from-profile"\n')
    monkeypatch.setenv("WRITEWATCH_ADDRESS", "env:2")
    monkeypatch.setenv("WRITEWATCH_TOKEN", "from-env")
    assert resolve(profile="lab").target == "lab:1"
    assert resolve(profile="lab").token == "from-profile"
    assert resolve("arg:3", profile="lab", token="t").target == "arg:3"
    assert resolve().target == "env:2" and resolve().token == "from-env"
    assert resolve().token_source == "WRITEWATCH_TOKEN"


def test_env_beats_the_default_profile(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text('default_profile = "lab"\n[profiles.lab]\naddress = "lab:1"\ntoken = "p"\n')
    assert resolve().target == "lab:1"
    monkeypatch.setenv("WRITEWATCH_ADDRESS", "env:2")
    connection = resolve()
    assert connection.target == "env:2" and connection.token == "p"


def test_profile_paths_are_relative_to_the_config(clean_env: Path, tmp_path: Path) -> None:
    _file(tmp_path / "ca.pem")
    _file(tmp_path / "t.token", "secret\n")
    clean_env.write_text('[profiles.lab]\naddress = "lab:1"\ntls_ca_file = "ca.pem"\ntoken_file = "t.token"\n')
    connection = resolve(profile="lab")
    assert connection.ca_file == tmp_path / "ca.pem"
    assert connection.metadata == (("authorization", "Bearer secret"),)
    assert "t.token" in connection.token_source and "secret" not in repr(connection)


def test_unknown_profile_lists_the_known_ones(clean_env: Path) -> None:
    clean_env.write_text('[profiles.lab]\naddress = "lab:1"\n[profiles.prod]\naddress = "prod:1"\n')
    with pytest.raises(ValueError, match=r"no profile 'nope' .* \(profiles there: lab, prod\)"):
        resolve(profile="nope")


def test_unknown_profile_key(clean_env: Path) -> None:
    clean_env.write_text('[profiles.lab]\nadress = "lab:1"\n')
    with pytest.raises(ValueError, match=r"profile 'lab' has unknown keys \['adress'\]"):
        resolve(profile="lab")


def test_missing_ca_names_its_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WRITEWATCH_TLS_CA", str(tmp_path / "gone.pem"))
    with pytest.raises(ValueError, match=r"TLS CA file .*gone.pem \(from WRITEWATCH_TLS_CA\) does not exist"):
        resolve("lab:1")


def test_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = _file(tmp_path / "me.pem")
    with pytest.raises(ValueError, match=r"client certificate was given .* without its key"):
        resolve("lab:1", tls_cert_file=cert)


def test_token_file_readable_by_others(tmp_path: Path) -> None:
    loose = _file(tmp_path / "t", "secret", 0o640)
    with pytest.raises(ValueError, match=r"accessible by other users \(mode 0640\); run: chmod 600"):
        resolve("lab:1", token_file=loose)


def test_token_and_token_file_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        resolve("lab:1", token="a", token_file=_file(tmp_path / "t"))


def test_unreachable_socket_says_what_to_do(tmp_path: Path) -> None:
    socket_path = tmp_path / "nobody.sock"
    with Client(f"unix:{socket_path}", timeout_s=5) as client, pytest.raises(Unavailable) as info:
        client.sessions()
    assert f"cannot reach writewatchd at unix:{socket_path}" in str(info.value)
    assert "is the daemon running" in str(info.value)
