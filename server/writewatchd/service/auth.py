"""Who is calling, and may they: identities, roles, the one method table, one interceptor.

Every RPC passes :class:`AuthInterceptor`. It establishes the caller's :class:`Identity`
(bearer token, else TLS client certificate, else, on the Unix socket, the socket itself),
looks the method up in :data:`METHOD_ROLES` and refuses a caller whose role is below the
method's. A method missing from the table is refused for everyone: a new RPC is closed until
someone decides who may call it. Control methods (controller and above) get one audit line
each, allowed or not.

Handlers read the caller with :func:`current_identity` (a context variable set for the call).
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import grpc

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb

from .._exceptions import LimitExceeded, PolicyDenied
from .audit import AuditLog
from .settings import IdentityPolicy, Settings

__all__ = [
    "METHOD_ROLES",
    "PUBLIC",
    "AuthInterceptor",
    "AuthMethod",
    "Authenticator",
    "Identity",
    "Refused",
    "Role",
    "current_identity",
]

log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    """What an identity may do; each role has every right of the roles below it."""

    READER = pb.ROLE_READER
    CONTROLLER = pb.ROLE_CONTROLLER
    ADMIN = pb.ROLE_ADMIN

    @property
    def label(self) -> str:
        """The role as written in the settings."""
        return self.name.lower()


class AuthMethod(enum.IntEnum):
    """How an identity was established."""

    UNIX_SOCKET = pb.AUTH_METHOD_UNIX_SOCKET
    TOKEN = pb.AUTH_METHOD_TOKEN
    CLIENT_CERTIFICATE = pb.AUTH_METHOD_CLIENT_CERTIFICATE


PUBLIC = None
"""Marks a method anyone may call, even without an identity (health checks)."""

_WW = "/writewatch.v1.WriteWatch/"
METHOD_ROLES: Mapping[str, Role | None] = {
    f"{_WW}CreateSession": Role.CONTROLLER,
    f"{_WW}GetSession": Role.READER,
    f"{_WW}ListSessions": Role.READER,
    f"{_WW}DeleteSession": Role.CONTROLLER,
    f"{_WW}AddRanges": Role.CONTROLLER,
    f"{_WW}RemoveRanges": Role.CONTROLLER,
    f"{_WW}Subscribe": Role.READER,
    f"{_WW}Harvest": Role.CONTROLLER,
    # A flush is a harvest that waits until every consumer has the result.
    f"{_WW}Flush": Role.CONTROLLER,
    f"{_WW}Scan": Role.READER,
    # Views are per-consumer state: a reader's view changes nothing another consumer sees.
    f"{_WW}CreateView": Role.READER,
    f"{_WW}ListViews": Role.READER,
    f"{_WW}DeleteView": Role.READER,
    f"{_WW}GetWriteWatch": Role.READER,
    f"{_WW}ResetWriteWatch": Role.READER,
    f"{_WW}GetDirtyRate": Role.READER,
    f"{_WW}GetCapabilities": Role.READER,
    f"{_WW}WhoAmI": Role.READER,
    # Orchestrators probe health without secrets; the answer is SERVING or NOT_SERVING.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READER,
}
"""The minimum role of every method the daemon serves; a method not listed is refused."""

_BEARER = re.compile(r"Bearer ([\x21-\x7e]+)", re.IGNORECASE)
_SAN_KEYS = ("x509_subject_alternative_name",)


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller the daemon recognised."""

    name: str
    role: Role
    method: AuthMethod
    policy: IdentityPolicy = field(default_factory=IdentityPolicy)
    kind: str = "unix-socket"
    """What the name names, for messages: ``token``, ``certificate`` or ``unix-socket``."""

    def describe(self) -> str:
        """``token 'ci' (controller)``."""
        if self.method == AuthMethod.UNIX_SOCKET:
            return f"the Unix socket caller ({self.role.label})"
        return f"{self.kind} {self.name!r} ({self.role.label})"

    def check_target(self, pid: int, uid: int, comm: str) -> None:
        """Raise :class:`PolicyDenied` naming the rule when this identity may not touch the process."""
        uids, patterns = self.policy.target_uids, self.policy.target_comm
        if uids is not None and uid not in uids:
            raise PolicyDenied(
                f"{self.describe()} may not touch pid {pid} ({comm!r}) owned by uid {uid}: rule target_uids = {uids}"
            )
        if patterns is not None and not any(fnmatchcase(comm, pattern) for pattern in patterns):
            raise PolicyDenied(
                f"{self.describe()} may not touch pid {pid}: its command {comm!r} matches no "
                f"rule target_comm = {patterns}"
            )

    def check_limit(self, limit: str, used: int, adding: int = 1) -> None:
        """Raise :class:`LimitExceeded` naming ``limit`` when ``used + adding`` exceeds it."""
        maximum: int | None = getattr(self.policy, limit)
        if maximum is not None and used + adding > maximum:
            raise LimitExceeded(f"{self.describe()} is at its limit {limit} = {maximum} (in use: {used})")


LOCAL_ADMIN = Identity("unix-socket", Role.ADMIN, AuthMethod.UNIX_SOCKET)
_CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar("writewatch_identity", default=LOCAL_ADMIN)


def current_identity() -> Identity:
    """The caller of the RPC being handled (the local admin outside an authenticated call)."""
    return _CURRENT.get()


class Refused(Exception):
    """The caller is not let in: ``code`` and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Authenticator:
    """Identifies callers from the settings' tokens and certificate subjects."""

    def __init__(self, settings: Settings) -> None:
        self.unix = settings.listen.startswith("unix:")
        self.socket_requires_token = settings.socket_requires_token
        self._tokens = [(bytes.fromhex(t.sha256), t) for t in settings.tokens]
        self._certs = {c.subject: c for c in settings.client_certs}

    def identify(
        self, metadata: Iterable[tuple[str, str | bytes]], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Identity:
        """The caller's identity; raises :class:`Refused` (UNAUTHENTICATED) when there is none."""
        headers = [value for key, value in metadata if key == "authorization"]
        if headers:
            return self._token_identity(headers)
        if not self.unix:
            certificate = self._certificate_identity(auth_context)
            if certificate is not None:
                return certificate
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no credentials: over TCP every call needs a bearer token (authorization: Bearer TOKEN) "
                "or a client certificate the daemon maps to a role",
            )
        if self.socket_requires_token:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "this daemon's socket requires a token (socket_requires_token): send authorization: Bearer TOKEN",
            )
        return LOCAL_ADMIN

    def _token_identity(self, headers: list[str | bytes]) -> Identity:
        if len(headers) != 1:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization: send exactly one header")
        header = headers[0]
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        match = _BEARER.fullmatch(text.strip())
        if match is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization header: expected 'Bearer TOKEN'")
        digest = hashlib.sha256(match[1].encode()).digest()
        found = None
        # Every digest is compared, in constant time each, so timing tells nothing about which matched.
        for expected, token in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = token
        if found is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid (unknown, mistyped or revoked)")
        return Identity(found.name, Role[found.role.upper()], AuthMethod.TOKEN, found, "token")

    def _certificate_identity(self, auth_context: Mapping[str, Iterable[bytes]]) -> Identity | None:
        common_names = [v.decode() for v in auth_context.get("x509_common_name", ())]
        alt_names = [v.decode() for key in _SAN_KEYS for v in auth_context.get(key, ())]
        for subject in [*common_names, *alt_names]:
            mapped = self._certs.get(subject)
            if mapped is not None:
                role = Role[mapped.role.upper()]
                return Identity(mapped.name or subject, role, AuthMethod.CLIENT_CERTIFICATE, mapped, "certificate")
        if common_names or alt_names:
            names = ", ".join([f"CN={n}" for n in common_names] + alt_names)
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate ({names}) is not mapped to a role: add its subject to client_certs",
            )
        return None


TargetLookup = Callable[[str], tuple[int, str] | None]
"""session id -> (pid, comm) of its target, for the audit log."""


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates and authorizes every call, and audits control actions."""

    def __init__(self, authenticator: Authenticator, audit: AuditLog, lookup: TargetLookup) -> None:
        self._authenticator = authenticator
        self._audit = audit
        self._lookup = lookup

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]  # an unknown method: gRPC answers UNIMPLEMENTED
        method: str = handler_call_details.method
        if method in METHOD_ROLES and METHOD_ROLES[method] is PUBLIC:
            return handler
        return _wrap(handler, _Gate(self, method))


@dataclass(slots=True)
class _Gate:
    """The checks and the audit line of one call of ``method``."""

    interceptor: AuthInterceptor
    method: str
    target: tuple[int, str] | None = None
    """pid and comm of the session's target, looked up before the call (a deleted session is gone after)."""

    @property
    def audited(self) -> bool:
        required = METHOD_ROLES.get(self.method)
        return required is None or required >= Role.CONTROLLER

    async def enter(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> contextvars.Token[Identity]:
        """Authenticate and authorize, or abort the call (audited when it is a control method)."""
        session_id = getattr(request, "session_id", "")
        if self.audited and session_id:
            self.target = self.interceptor._lookup(session_id)
        metadata: Iterable[tuple[str, str | bytes]] = context.invocation_metadata() or ()
        try:
            identity = self.interceptor._authenticator.identify(metadata, context.auth_context())
        except Refused as refused:
            if self.audited:
                self.audit(context, None, request, None, refused.code, refused.message)
            await context.abort(refused.code, refused.message)
            raise
        message = ""
        if self.method not in METHOD_ROLES:
            message = f"no role may call {self.method}: it is not in the daemon's role table"
        else:
            required = METHOD_ROLES[self.method]
            if required is not None and identity.role < required:
                short = self.method.rsplit("/", 1)[-1]
                message = f"{identity.describe()} may not call {short}: it needs the role {required.label}"
        if message:
            if self.audited:
                self.audit(context, identity, request, None, grpc.StatusCode.PERMISSION_DENIED, message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        return _CURRENT.set(identity)

    def leave(
        self,
        token: contextvars.Token[Identity],
        request: Any,
        response: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> None:
        """Audit the outcome of a control method and forget the caller."""
        identity = _CURRENT.get()
        _CURRENT.reset(token)
        if not self.audited:
            return
        code: Any = context.code() if error is not None else grpc.StatusCode.OK
        if not isinstance(code, grpc.StatusCode):
            code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        details = (context.details() or "") if error is not None else ""
        self.audit(context, identity, request, response, code, details)

    def audit(  # noqa: PLR0917 - one line's fields
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: Identity | None,
        request: Any,
        response: Any,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """One line for one control action."""
        session_id = getattr(response, "session_id", "") or getattr(request, "session_id", "")
        pid = getattr(response, "pid", 0) or getattr(request, "pid", 0)
        comm = getattr(response, "comm", "")
        if not comm and getattr(request, "argv", None):
            comm = os.path.basename(request.argv[0])[:15]
        if not comm and self.target is not None:
            pid, comm = self.target
        mode: Any = getattr(response, "attach_mode", 0) or getattr(request, "attach_mode", 0)
        self.interceptor._audit.write(
            identity=identity.name if identity else None,
            role=identity.role.label if identity else None,
            auth=identity.method.name.lower() if identity else None,
            peer=context.peer(),
            method=self.method.rsplit("/", 1)[-1],
            attach_mode=_attach_mode_name(mode) if mode else None,
            session_id=session_id or None,
            pid=pid or None,
            comm=comm or None,
            result=code.name,
            message=message,
        )


def _attach_mode_name(mode: int) -> str:
    """``INJECT``; an undefined value (a refused request may carry one) as its number."""
    value = pb.AttachMode.DESCRIPTOR.values_by_number.get(mode)
    return value.name.removeprefix("ATTACH_MODE_") if value is not None else str(mode)


_CODES: dict[Any, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], gate: _Gate) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with ``gate`` around its behavior (unary or streaming, coroutine or generator)."""
    factory: Any
    behavior: Any
    if handler.unary_unary is not None:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream is not None:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary is not None:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = await gate.enter(request, context)
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                gate.leave(token, request, None, context, error)

        wrapped: Any = generator
    else:

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = await gate.enter(request, context)
            error: BaseException | None = None
            response = None
            try:
                response = await behavior(request, context)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                gate.leave(token, request, response, context, error)

        wrapped = coroutine
    return factory(  # type: ignore[no-any-return]
        wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
