"""Daemon settings: embedded defaults, then a TOML file, then ``WRITEWATCHD_*`` env, then flags."""

from __future__ import annotations

import grp
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from ..tracking.heat import DEFAULT_MAX_STALENESS_MS, MAX_STALENESS_MS

__all__ = ["Settings", "default_listen_address", "default_state_dir"]

__all__ = [
    "ClientCertSettings",
    "IdentityPolicy",
    "RoleName",
    "Settings",
    "TokenSettings",
    "default_listen_address",
    "default_state_dir",
]

RoleName = Literal["reader", "controller", "admin"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]*")


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


class IdentityPolicy(BaseModel):
    """Limits and target policy of one identity; None means "no limit of its own"."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int | None = Field(default=None, ge=0, description="active sessions this identity created")
    max_subscribers: int | None = Field(default=None, ge=0, description="streams this identity has open at once")
    max_ranges_per_session: int | None = Field(default=None, ge=1, description="explicit ranges in one session")
    target_uids: list[int] | None = Field(default=None, description="uids of the processes it may touch (None: any)")
    target_comm: list[str] | None = Field(
        default=None, description="fnmatch patterns of the command names (/proc/PID/comm) it may touch (None: any)"
    )


class TokenSettings(IdentityPolicy):
    """A bearer token: its name (in logs), the SHA-256 of the token, and the role it grants."""

    name: str
    sha256: str = Field(description="hex SHA-256 digest of the token (printf %s TOKEN | sha256sum)")
    role: RoleName

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("a token name is letters, digits and _ . @ : - (it appears in the audit log)")
        return value

    @field_validator("sha256")
    @classmethod
    def _check_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be the 64 hex digits of the token's SHA-256 digest (not the token itself)")
        return value.lower()


class ClientCertSettings(IdentityPolicy):
    """A TLS client certificate identity: a subject CN or SAN value, and the role it grants."""

    subject: str = Field(description="the certificate's subject CN, or one of its subjectAltName values")
    role: RoleName
    name: str | None = Field(default=None, description="name in the audit log (default: the subject)")


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
    max_pending_calls: int = Field(
        10_000, ge=1, description="calls received but not yet accepted by the daemon; beyond, new calls are refused"
    )
    subscriber_queue_deltas: int = Field(64, ge=1)
    subscriber_evict_after_ms: int = Field(30_000, ge=1, description="a stream blocked this long is evicted")
    history_max_deltas: int = Field(1024, ge=1)
    history_max_bytes: int = Field(64 << 20, ge=0)
    fragment_max_bytes: int = Field(1 << 20, ge=4096)
    harvest_threads: int = Field(4, ge=1)
    scan_threads: int = Field(
        2, ge=1, description="threads one tick's batched scan is split across when it walks over 1 GiB of memory"
    )
    default_max_staleness_ms: int = Field(
        DEFAULT_MAX_STALENESS_MS,
        ge=0,
        le=MAX_STALENESS_MS,
        description="heat scheduling: the longest a write waits for a tick to scan it (0: scan everything every tick)",
    )
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port on localhost; 0 = off")
    inject_deadline_ms: int = Field(1000, ge=1)
    tokens: list[TokenSettings] = Field(default_factory=list, description="bearer tokens ([[tokens]])")
    client_certs: list[ClientCertSettings] = Field(
        default_factory=list, description="TLS client certificate subjects mapped to roles ([[client_certs]])"
    )
    socket_requires_token: bool = Field(False, description="Unix socket callers need a token too (else: admin)")
    socket_group: str | None = Field(None, description="group (name or gid) given the Unix socket, mode 0660")
    audit_log: Path | None = Field(None, description="file of the audit trail (JSON lines); default: the log")
    max_sessions_per_tree: int = Field(
        64, ge=1, description="sessions of one followed process tree (root and descendants) at most"
    )
    process_events: bool = Field(
        True, description="learn execs and forks from the process-events connector; false: poll /proc"
    )
    process_poll_interval_ms: int = Field(
        1000, ge=10, description="how often followed processes are polled when process events are unavailable"
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if not value.startswith(("unix:", "tcp:")):
            raise ValueError("listen must be unix:PATH or tcp:HOST:PORT")
        return value

    @field_validator("socket_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            grp.getgrgid(int(value)) if value.isdigit() else grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"there is no group {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_identities(self) -> Settings:
        for what, keys in (
            ("tokens: the name", [t.name for t in self.tokens]),
            ("tokens: the sha256", [t.sha256 for t in self.tokens]),
            ("client_certs: the subject", [c.subject for c in self.client_certs]),
        ):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    raise ValueError(f"{what} {key!r} appears twice")
                seen.add(key)
        return self

    @property
    def socket_gid(self) -> int | None:
        """The gid of ``socket_group``, if set."""
        if self.socket_group is None:
            return None
        return int(self.socket_group) if self.socket_group.isdigit() else grp.getgrnam(self.socket_group).gr_gid

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Defaults < TOML ``config_file`` < environment < ``overrides`` (the command-line flags)."""
        if config_file is not None:
            _check_config_file(config_file)
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


def _check_config_file(path: Path) -> None:
    """A settings file that others may write grants them admin; one others may read leaks token digests."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IWOTH:
        raise ValueError(f"the settings file {path} is writable by every user (mode {mode:04o}): chmod o-w {path}")
    if mode & stat.S_IROTH and "[[tokens]]" in path.read_text():
        raise ValueError(
            f"the settings file {path} declares tokens and is readable by every user (mode {mode:04o}): "
            f"chmod o-r {path}"
        )
