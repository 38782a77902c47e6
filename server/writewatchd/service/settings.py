"""Daemon settings: embedded defaults, then a TOML file, then ``WRITEWATCHD_*`` env, then flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

__all__ = ["Settings", "default_listen_address", "default_state_dir"]


def default_listen_address() -> str:
    """Where the daemon listens by default: its Unix socket under $XDG_RUNTIME_DIR, else under /run.

    The client's ``writewatch.default_address()`` must agree (a test pins them equal).
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return f"unix:{runtime_dir}/writewatch/writewatchd.sock"
    return "unix:/run/writewatch/writewatchd.sock"


def default_state_dir() -> Path:
    """Where the SQLite state store lives by default."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "writewatch"
    return Path("/var/lib/writewatch") if os.geteuid() == 0 else Path.home() / ".local/state/writewatch"


class Settings(BaseSettings):
    """Everything the daemon can be told; every field has a working default."""

    model_config = SettingsConfigDict(env_prefix="WRITEWATCHD_", extra="forbid", toml_file=None)

    listen: str = Field(default_factory=default_listen_address, description="unix:PATH or tcp:HOST:PORT")
    socket_mode: int = Field(0o600, description="permission bits of the Unix socket")
    state_dir: Path = Field(default_factory=default_state_dir, description="directory of the SQLite state store")
    tls_cert_file: Path | None = Field(None, description="PEM certificate; required for tcp: unless insecure_tcp")
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="when set, TCP clients must present a certificate")
    insecure_tcp: bool = Field(False, description="allow plaintext TCP (tests only)")
    default_tick_interval_ms: int = Field(50, ge=1)
    min_tick_interval_ms: int = Field(1, ge=1)
    max_sessions: int = Field(1024, ge=1)
    max_ranges_per_session: int = Field(65536, ge=1)
    max_subscribers_per_session: int = Field(256, ge=1)
    max_views_per_session: int = Field(256, ge=1)
    ended_session_retention_s: float = Field(
        3600.0, ge=0, description="an ended session is kept this long, then pruned from memory and the store"
    )
    ended_session_max_count: int = Field(
        1000, ge=0, description="at most this many ended sessions are kept; the oldest are pruned first"
    )
    subscriber_queue_deltas: int = Field(64, ge=1)
    subscriber_evict_after_ms: int = Field(30_000, ge=1, description="a stream blocked this long is evicted")
    history_max_deltas: int = Field(1024, ge=1)
    history_max_bytes: int = Field(64 << 20, ge=0)
    fragment_max_bytes: int = Field(1 << 20, ge=4096)
    harvest_threads: int = Field(4, ge=1)
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port on localhost; 0 = off")
    inject_deadline_ms: int = Field(1000, ge=1)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if not value.startswith(("unix:", "tcp:")):
            raise ValueError("listen must be unix:PATH or tcp:HOST:PORT")
        return value

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Defaults < TOML ``config_file`` < environment < ``overrides`` (the command-line flags)."""
        toml_file = config_file

        class _WithToml(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
                if toml_file is not None:
                    sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
                return tuple(sources)

        loaded = _WithToml(**{k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(loaded.model_dump())
