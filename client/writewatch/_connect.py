"""How to reach the daemon: address, TLS files, token and profile, resolved in one place.

Longer than our ~450-line mark because it holds both halves of one concern: resolving a
:class:`Connection` and, in :func:`explain`, telling a remote user why that very connection
failed (which needs every source the resolution recorded).

Used by :class:`writewatch.Client`, :class:`writewatch.AsyncClient` and the CLI alike. Each
option comes from the first of:

1. an explicit argument (a keyword of the client, a flag of the CLI);
2. the profile named by ``profile=`` / ``--profile`` / ``$WRITEWATCH_PROFILE``;
3. the environment: ``WRITEWATCH_ADDRESS``, ``WRITEWATCH_TOKEN``, ``WRITEWATCH_TLS_CA``,
   ``WRITEWATCH_TLS_CERT``, ``WRITEWATCH_TLS_KEY``;
4. the config file's ``default_profile``, if it names one;
5. the daemon's default Unix socket.

The config file is ``$WRITEWATCH_CONFIG``, else ``~/.config/writewatch/config.toml``
(``$XDG_CONFIG_HOME`` respected)::

    default_profile = "lab"

    [profiles.lab]
    address = "lab-host:7443"        # host:port: TLS unless insecure = true
    tls_ca_file = "lab-ca.pem"       # relative paths are relative to the config file
    tls_cert_file = "me.pem"         # optional client certificate ...
    tls_key_file = "me.key"          # ... and its key
    token_file = "lab.token"         # or token = "..." (the file must not be readable by others)

A ``host:port`` address uses TLS (with the system's CAs when no CA file is given); plaintext
only with ``insecure``. Unix sockets never use TLS. :func:`explain` turns the transport
errors a remote user meets into messages that say what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ._address import default_address, normalize_address
from ._exceptions import RpcError, rpc_error

__all__ = [
    "ENV_ADDRESS",
    "ENV_CONFIG",
    "ENV_PROFILE",
    "ENV_TLS_CA",
    "ENV_TLS_CERT",
    "ENV_TLS_KEY",
    "ENV_TOKEN",
    "Connection",
    "config_path",
    "explain",
    "read_token_file",
    "resolve",
]

ENV_ADDRESS = "WRITEWATCH_ADDRESS"
ENV_TOKEN = "WRITEWATCH_TOKEN"
ENV_TLS_CA = "WRITEWATCH_TLS_CA"
ENV_TLS_CERT = "WRITEWATCH_TLS_CERT"
ENV_TLS_KEY = "WRITEWATCH_TLS_KEY"
ENV_PROFILE = "WRITEWATCH_PROFILE"
ENV_CONFIG = "WRITEWATCH_CONFIG"

_PROFILE_KEYS = frozenset(
    {"address", "token", "token_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name", "insecure"}
)
# Bound on the diagnosis of a failed call: it must not make a failure much slower.
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Connection:
    """Everything needed to open a channel to the daemon, with where each part came from."""

    target: str
    """gRPC target: ``unix:/path`` or ``host:port``."""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """Name checked against the daemon's certificate instead of the host, if set."""
    token: str | None = field(default=None, repr=False)
    token_source: str = ""
    """Where the token came from, for error messages (never the token itself)."""
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    """Caller-built credentials; they replace the TLS files."""

    @property
    def is_unix(self) -> bool:
        """Whether the daemon is reached through a Unix socket."""
        return self.target.startswith("unix:")

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port of a TCP target."""
        host, _, port = self.target.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def describe(self) -> str:
        """One line for people: where and how."""
        if self.is_unix:
            return self.target
        if not self.tls:
            return f"{self.target} (plaintext)"
        return f"{self.target} (TLS, CA {self.ca_file or 'the system CAs'})"

    def channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel."""
        credentials = self._channel_credentials()
        options = options + self._options()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def aio_channel(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel."""
        credentials = self._channel_credentials()
        options = options + self._options()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    def _options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.tls else []

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.credentials is not None:
            return self.credentials
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


def config_path() -> Path:
    """The client config file: $WRITEWATCH_CONFIG, else $XDG_CONFIG_HOME or ~/.config, /writewatch/config.toml."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "writewatch" / "config.toml"


def read_token_file(path: Path, source: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); refuses a file others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path} ({source}): {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"the token file {path} ({source}) is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    token = text.strip()
    if not token:
        raise ValueError(f"the token file {path} ({source}) is empty")
    return token


_ARGUMENT_NAMES = {
    "address": "--address / address",
    "token": "--token / token=",
    "token_file": "--token-file / token_file=",
    "tls_ca_file": "--tls-ca / tls_ca_file=",
    "tls_cert_file": "--tls-cert / tls_cert_file=",
    "tls_key_file": "--tls-key / tls_key_file=",
    "tls_server_name": "tls_server_name=",
    "insecure": "--insecure / insecure=",
}


@dataclass(slots=True)
class _Layer:
    """One source of options: arguments, a profile, or the environment."""

    name: str
    values: dict[str, Any]
    base_dir: Path | None = None

    def source(self, key: str) -> str:
        """Where ``key`` came from, for messages."""
        return _ARGUMENT_NAMES.get(key, key) if self.name == "argument" else self.name


def _profiles(path: Path) -> tuple[dict[str, Any], str | None]:
    if not path.exists():
        return {}, None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the writewatch config {path}: {exc}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ValueError(f"{path}: [profiles] must be a table of profiles")
    for name, profile in profiles.items():
        unknown = set(profile) - _PROFILE_KEYS if isinstance(profile, dict) else {"(not a table)"}
        if unknown:
            raise ValueError(f"{path}: profile {name!r} has unknown keys {sorted(unknown)}")
    default = data.get("default_profile")
    return profiles, default if isinstance(default, str) else None


def _profile_layer(name: str, how: str) -> _Layer:
    path = config_path()
    profiles, _ = _profiles(path)
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ValueError(f"no profile {name!r} ({how}) in {path} (profiles there: {known})")
    return _Layer(f"profile {name!r} of {path}", profiles[name], path.parent)


def _layers(arguments: dict[str, Any], profile: str | None) -> list[_Layer]:
    environment = {
        "address": os.environ.get(ENV_ADDRESS),
        "token": os.environ.get(ENV_TOKEN),
        "tls_ca_file": os.environ.get(ENV_TLS_CA),
        "tls_cert_file": os.environ.get(ENV_TLS_CERT),
        "tls_key_file": os.environ.get(ENV_TLS_KEY),
    }
    env_names = {
        "address": ENV_ADDRESS,
        "token": ENV_TOKEN,
        "tls_ca_file": ENV_TLS_CA,
        "tls_cert_file": ENV_TLS_CERT,
        "tls_key_file": ENV_TLS_KEY,
    }
    layers = [_Layer("argument", arguments)]
    if profile:
        layers.append(_profile_layer(profile, "profile="))
    elif os.environ.get(ENV_PROFILE):
        layers.append(_profile_layer(os.environ[ENV_PROFILE], ENV_PROFILE))
    layers.extend(_Layer(env_names[key], {key: value}) for key, value in environment.items() if value)
    if not profile and not os.environ.get(ENV_PROFILE):
        _, default = _profiles(config_path())
        if default:
            layers.append(_profile_layer(default, "default_profile"))
    return layers


def _pick(layers: list[_Layer], *keys: str) -> tuple[str, Any, _Layer] | None:
    """The first layer giving any of ``keys`` (a token and a token file are one choice)."""
    for layer in layers:
        for key in keys:
            value = layer.values.get(key)
            if value is not None and value != "":
                return key, value, layer
    return None


def _path(layers: list[_Layer], key: str, what: str) -> tuple[Path | None, str]:
    picked = _pick(layers, key)
    if picked is None:
        return None, ""
    _, value, layer = picked
    path = Path(os.path.expanduser(str(value)))
    if layer.base_dir is not None and not path.is_absolute():
        path = layer.base_dir / path
    if not path.is_file():
        raise ValueError(f"the {what} {path} (from {layer.source(key)}) does not exist or is not a file")
    return path, layer.source(key)


def _target(address: str) -> str:
    address = address.removeprefix("tcp:")
    return normalize_address(address)


def resolve(
    address: str | Connection | None = None,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    tls_ca_file: str | os.PathLike[str] | None = None,
    tls_cert_file: str | os.PathLike[str] | None = None,
    tls_key_file: str | os.PathLike[str] | None = None,
    tls_server_name: str | None = None,
    profile: str | None = None,
    insecure: bool | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Connection:
    """The connection these options describe (see the module docstring for the order of sources).

    Raises ``ValueError`` naming the option and its source when a file is missing, a token
    file is readable by others, a profile does not exist, or a certificate comes without its key.
    """
    if isinstance(address, Connection):
        return address
    if token is not None and token_file is not None:
        raise ValueError("give a token or a token file, not both")
    arguments: dict[str, Any] = {
        "address": address,
        "token": token,
        "token_file": token_file,
        "tls_ca_file": tls_ca_file,
        "tls_cert_file": tls_cert_file,
        "tls_key_file": tls_key_file,
        "tls_server_name": tls_server_name,
        "insecure": insecure,
    }
    layers = _layers(arguments, profile)
    picked_address = _pick(layers, "address")
    target = _target(str(picked_address[1]) if picked_address else default_address())
    token_value, token_source = _token(layers)
    if target.startswith("unix:"):
        # A local socket needs no TLS: TLS settings meant for remote daemons do not apply.
        return Connection(target, token=token_value, token_source=token_source)
    picked_insecure = _pick(layers, "insecure")
    if credentials is not None:
        return Connection(target, tls=True, token=token_value, token_source=token_source, credentials=credentials)
    if picked_insecure is not None and bool(picked_insecure[1]):
        return Connection(target, token=token_value, token_source=token_source)
    ca_file, _ = _path(layers, "tls_ca_file", "TLS CA file")
    cert_file, cert_source = _path(layers, "tls_cert_file", "TLS client certificate")
    key_file, key_source = _path(layers, "tls_key_file", "TLS client key")
    if (cert_file is None) != (key_file is None):
        given, missing = ("certificate", "key") if cert_file else ("key", "certificate")
        raise ValueError(
            f"a TLS client {given} was given (from {cert_source or key_source}) without its {missing}: "
            "give both --tls-cert and --tls-key"
        )
    server_name = _pick(layers, "tls_server_name")
    return Connection(
        target,
        tls=True,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        server_name=str(server_name[1]) if server_name else None,
        token=token_value,
        token_source=token_source,
    )


def _token(layers: list[_Layer]) -> tuple[str | None, str]:
    picked = _pick(layers, "token", "token_file")
    if picked is None:
        return None, ""
    key, value, layer = picked
    if key == "token":
        return str(value).strip(), layer.source(key)
    path = Path(os.path.expanduser(str(value)))
    if layer.base_dir is not None and not path.is_absolute():
        path = layer.base_dir / path
    return read_token_file(path, layer.source(key)), f"the token file {path} (from {layer.source(key)})"


def explain(connection: Connection, error: RpcError, timeout_s: float | None) -> RpcError:
    """The same error with a message that says what to do, for transport and identity failures.

    A failed connection over TCP is diagnosed with a direct TCP connect and TLS handshake
    (blocking, at most a few seconds): gRPC reports every such failure as UNAVAILABLE.
    """
    code = error.code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return rpc_error(code, f"{error.message}; {_token_hint(connection)}")
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return error
    if connection.is_unix:
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in error.message:
            return rpc_error(
                code,
                f"cannot reach writewatchd at {connection.target} ({error.message}); "
                "is the daemon running (writewatchd serve), and may you open its socket?",
            )
        return error
    diagnosis = _diagnose(connection, min(timeout_s or _PROBE_TIMEOUT_S, _PROBE_TIMEOUT_S))
    return rpc_error(code, diagnosis) if diagnosis else error


def _token_hint(connection: Connection) -> str:
    if connection.token is None:
        return (
            "no token was sent: give --token or --token-file, set WRITEWATCH_TOKEN, or use a profile with a token "
            "(or a client certificate the daemon maps to a role)"
        )
    return f"the token sent came from {connection.token_source}; check it with the daemon's operator"


def _diagnose(connection: Connection, timeout_s: float) -> str | None:
    host, port = connection.host_port
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        return (
            f"cannot reach writewatchd at {where}: no answer within {timeout_s:g} s; "
            "check the address, that the daemon listens there (listen = tcp:HOST:PORT) and any firewall"
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return (
            f"cannot reach writewatchd at {where}: {reason}; "
            "check the address and that the daemon listens there (listen = tcp:HOST:PORT)"
        )
    with raw:
        if connection.tls and connection.credentials is None:
            return _diagnose_tls(connection, raw, where, timeout_s)
        if not connection.tls:
            return _diagnose_plaintext(raw, where, timeout_s)
    return None


def _tls_context(connection: Connection) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(connection.ca_file) if connection.ca_file else None)
    if connection.cert_file and connection.key_file:
        context.load_cert_chain(str(connection.cert_file), str(connection.key_file))
    context.set_alpn_protocols(["h2"])
    return context


def _diagnose_tls(connection: Connection, raw: socket.socket, where: str, timeout_s: float) -> str | None:
    host = connection.server_name or connection.host_port[0]
    ca = f"the CA file {connection.ca_file}" if connection.ca_file else "the system CAs (no --tls-ca given)"
    try:
        context = _tls_context(connection)
    except (ssl.SSLError, OSError) as exc:
        return f"cannot use the TLS files ({connection.ca_file}, {connection.cert_file}, {connection.key_file}): {exc}"
    try:
        with context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout_s)
            tls.do_handshake()
            # TLS 1.3: the daemon judges the client certificate after the client's side of the
            # handshake is done, and refuses by closing the connection at once.
            tls.settimeout(min(timeout_s, 1.0))
            with contextlib.suppress(TimeoutError):
                if tls.recv(1) == b"":
                    return _refused_client_certificate(connection, where)
    except ssl.SSLCertVerificationError as exc:
        return _certificate_problem(exc, where, host, ca)
    except ssl.SSLError as exc:
        return _handshake_problem(exc, connection, where)
    except TimeoutError:
        return (
            f"no TLS answer from {where} within {timeout_s:g} s: is it a writewatchd TLS listener, "
            "and is the daemon not stopped or overloaded?"
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        return f"the TLS handshake with {where} failed ({exc}); is it a writewatchd TLS listener?"
    except OSError as exc:
        return f"the TLS handshake with {where} failed: {exc}"
    return None


def _certificate_problem(exc: ssl.SSLCertVerificationError, where: str, host: str, ca: str) -> str:
    verify = exc.verify_message or str(exc)
    # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
    if exc.verify_code in (62, 64) or "mismatch" in verify.lower():
        return (
            f"the daemon's certificate at {where} is not valid for the host name {host!r} (hostname mismatch; "
            f"checked with {ca}); connect with a name the certificate lists, or reissue it with "
            f"subjectAltName=DNS:{host} (or IP:{host})"
        )
    if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"the daemon's certificate at {where} has expired ({ca}); its operator must renew it"
    return (
        f"the daemon's certificate at {where} is not trusted: {verify} (checked with {ca}, host {host!r}); "
        "give the CA that signed it with --tls-ca, WRITEWATCH_TLS_CA or tls_ca_file="
    )


def _refused_client_certificate(connection: Connection, where: str) -> str:
    cert = connection.cert_file
    if cert is None:
        return f"the daemon at {where} requires a client certificate: give --tls-cert and --tls-key"
    not_after = _not_after(cert)
    if not_after is not None and not_after < time.time():
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
        return f"the client certificate {cert} has expired (on {expired}), so the daemon refused it: renew it"
    return (
        f"the daemon at {where} refused the client certificate {cert}: it must be signed by the CA of the "
        "daemon's tls_client_ca_file and be valid now"
    )


def _not_after(cert: Path) -> float | None:
    """When a PEM certificate expires (seconds since the epoch), if the ssl module can tell."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        not_after: str = decode(str(cert))["notAfter"]
        return float(ssl.cert_time_to_seconds(not_after))
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None


def _handshake_problem(exc: ssl.SSLError, connection: Connection, where: str) -> str:
    reason = (exc.reason or str(exc)).upper()
    cert = connection.cert_file
    if "CERTIFICATE_EXPIRED" in reason:
        return f"the daemon refused the client certificate {cert}: it has expired; renew it"
    if "CERTIFICATE_REQUIRED" in reason or ("HANDSHAKE_FAILURE" in reason and cert is None):
        return f"the daemon at {where} requires a client certificate: give --tls-cert and --tls-key"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return (
            f"the daemon at {where} does not accept the client certificate {cert} ({exc.reason}): "
            "it must be signed by the CA of the daemon's tls_client_ca_file"
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason or "EOF" in reason:
        return (
            f"{where} does not speak TLS (a plaintext listener?); if that daemon runs with insecure_tcp, "
            "connect with --insecure (insecure=True), which sends everything in clear"
        )
    return f"the TLS handshake with {where} failed: {exc.reason or exc}"


def _diagnose_plaintext(raw: socket.socket, where: str, timeout_s: float) -> str | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(raw, do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout_s)
            tls.do_handshake()
    except (ssl.SSLError, OSError):
        return None
    return (
        f"{where} speaks TLS, but this client connected in plaintext (--insecure): drop --insecure and give "
        "the daemon's CA with --tls-ca"
    )
