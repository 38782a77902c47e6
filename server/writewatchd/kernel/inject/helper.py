"""The injection helper: a long-lived child process that does the tracing, and its protocol.

ptrace binds a tracee to the *thread* that attached, and a seized thread that will not stop
(state D) cannot be detached at all: only the tracer's exit releases it. So injections run
in a child of the caller (started lazily, one request at a time, JSON messages with fds
passed back by SCM_RIGHTS), which exits in that case; the next request starts a new one.
The caller's side is :data:`HELPER` and :func:`inject_userfaultfd`; the helper's is
:func:`_helper_main`, which serves ``inject`` (:func:`.attach.inject_running`) and ``spawn``
(:func:`writewatchd.kernel.spawn.spawn_inject`) requests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ... import _exceptions
from ..._exceptions import KernelError
from .._libc import libc
from ..ptrace import require_x86_64
from ..uffd import Userfaultfd
from . import _window
from .attach import inject_running
from .window import StuckTracee, Window

__all__ = ["DEFAULT_WINDOW", "HELPER", "HELPER_GRACE_S", "InjectionResult", "inject_userfaultfd"]

_PR_SET_TIMERSLACK = 29
HELPER_GRACE_S = 15.0
_MESSAGE_BYTES = 1 << 16
#: The window used when a call names none (spawns included).
DEFAULT_WINDOW: Window = "auto"

#: Test-only: seconds the helper sleeps inside the window (after the injected userfaultfd).
_TEST_PAUSE_IN_WINDOW_S = 0.0
#: Test-only: stop the requested ``tid`` without vetting it (to reach the stop deadline).
_TEST_UNVETTED_TID = False


@dataclass(frozen=True, slots=True)
class InjectionResult:
    """A userfaultfd created by the target, now owned by the caller (``UFFDIO_API`` not done).

    ``stop_ns`` is how long the chosen thread ``tid`` was stopped, from ``PTRACE_INTERRUPT``
    until ``PTRACE_DETACH`` returned; ``window`` says which implementation of the window
    ran: ``"c"`` (compiled) or ``"python"``.
    """

    uffd: Userfaultfd
    tid: int
    stop_ns: int
    window: str


def inject_userfaultfd(
    pid: int, *, deadline_s: float = 1.0, tid: int | None = None, window: Window | None = None
) -> InjectionResult:
    """Make process ``pid`` create a userfaultfd, copy it to us, and close the target's copy.

    ``deadline_s`` bounds the wait for a thread to stop. ``tid`` asks for a particular
    thread, which must pass the same checks as an automatic choice. ``window`` chooses the
    implementation of the stop window: ``"auto"`` (compiled when it can be built, else
    Python), ``"c"`` (:class:`FeatureUnavailable` without it) or ``"python"``; None means
    :data:`DEFAULT_WINDOW`.

    Raises :class:`InjectionRefused` (target untouched and running) when the target is
    already traced, its seccomp filters would not allow the syscalls, it is not dumpable
    for a non-root caller, no thread can be stopped before the deadline, or it has no
    vDSO; :class:`ProcessGone` when it does not exist; :class:`AccessDenied` without the
    permission to trace it.
    """
    require_x86_64()
    request = {
        "op": "inject",
        "pid": pid,
        "tid": tid,
        "deadline_s": deadline_s,
        "pause_in_window_s": _TEST_PAUSE_IN_WINDOW_S,
        "unvetted": _TEST_UNVETTED_TID,
        "window": window or DEFAULT_WINDOW,
    }
    reply, fds = HELPER.call(request, timeout_s=deadline_s + HELPER_GRACE_S)
    uffd = Userfaultfd(fds[0], owner_pid=pid)
    return InjectionResult(uffd, int(reply["tid"]), int(reply["stop_ns"]), str(reply["window"]))


def _encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, KernelError):
        return {"error": type(exc).__name__, "errno": exc.errno, "message": str(exc)}
    if isinstance(exc, _exceptions.WriteWatchError):
        return {"error": type(exc).__name__, "errno": 0, "message": str(exc)}
    return {"error": "KernelError", "errno": errno.EIO, "message": f"injection helper failed: {exc!r}"}


def _raise_error(reply: dict[str, Any]) -> None:
    cls = getattr(_exceptions, str(reply["error"]), KernelError)
    if isinstance(cls, type) and issubclass(cls, KernelError):
        raise cls(int(reply["errno"]), str(reply["message"]))
    if isinstance(cls, type) and issubclass(cls, _exceptions.WriteWatchError):
        raise cls(str(reply["message"]))
    raise KernelError(errno.EIO, str(reply["message"]))


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    data, fds, _flags, _address = socket.recv_fds(sock, _MESSAGE_BYTES, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    message: dict[str, Any] = json.loads(data)
    return message, list(fds)


def _helper_main(fd: int) -> None:
    """The helper process: serve requests until the caller's end of the socket closes."""
    # A signal meant for the daemon's process group must not end us inside a window.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
    # Every ptrace stop sends us SIGCHLD: blocked (and not ignored, which an exec may have
    # inherited) it stays pending, so waits sleep until it instead of polling (wait_stop).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    # Timed sleeps (a wait's bound) end on time instead of up to 50 µs late.
    libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    # Build (first run after a source change) or load the compiled window now, so that no
    # request's deadline pays for a compilation.
    _window.load()
    sock = socket.socket(fileno=fd)

    def send(message: dict[str, Any], fds: list[int]) -> None:
        _send(sock, message, fds)

    def receive() -> dict[str, Any]:
        got = _receive(sock)
        return got[0] if got else {}

    # Here, not at the top: spawn.py (the caller's side of a spawn) imports this module.
    from ..spawn import spawn_inject

    while True:
        got = _receive(sock)
        if got is None:
            return
        request, fds = got
        must_exit = False
        try:
            if request["op"] == "inject":
                reply, out_fds = inject_running(request)
            elif request["op"] == "spawn":
                reply, out_fds = spawn_inject(request, send, receive)
            else:
                reply, out_fds = {"pid": os.getpid()}, []
        except StuckTracee as exc:
            reply, out_fds, must_exit = _encode_error(exc.refusal), [], True
            # Tells the caller to let this helper go rather than wait for it.
            reply["helper_exits"] = True
        except Exception as exc:
            if not isinstance(exc, _exceptions.WriteWatchError):
                traceback.print_exc()
            reply, out_fds = _encode_error(exc), []
        finally:
            for fd_in in fds:
                os.close(fd_in)
        try:
            send(reply, out_fds)
        except OSError:
            return
        finally:
            for out in out_fds:
                os.close(out)
        if must_exit:
            # The thread we seized never stopped; our exit is the only way to release it.
            os._exit(0)


class _Helper:
    """The caller's side: starts the helper on demand and talks to it, one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def pid(self) -> int:
        """The helper's pid, starting it if needed."""
        with self._lock:
            return self._ensure()[0].pid

    def _ensure(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        if self._process is not None and self._sock is not None and self._process.poll() is None:
            return self._process, self._sock
        self._discard()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = "import sys; from writewatchd.kernel.inject.helper import _helper_main; _helper_main(int(sys.argv[1]))"
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._process, self._sock = process, ours
        return process, ours

    def _discard(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None

    def call(
        self,
        request: dict[str, Any],
        *,
        timeout_s: float,
        fds: tuple[int, ...] = (),
        on_stopped: Callable[[dict[str, Any], list[int]], None] | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Send ``request``; return the final reply and the fds it carries (raising errors)."""
        with self._lock:
            _, sock = self._ensure()
            sock.settimeout(timeout_s)
            try:
                _send(sock, request, list(fds))
                while True:
                    got = _receive(sock)
                    if got is None:
                        raise KernelError(errno.EPIPE, "the injection helper died")
                    reply, reply_fds = got
                    if reply.get("phase") != "stopped" or on_stopped is None:
                        break
                    try:
                        on_stopped(reply, reply_fds)
                    finally:
                        _send(sock, {"op": "resume"}, [])
            except (TimeoutError, OSError) as exc:
                # A helper that does not answer may be stuck on a tracee; its exit releases it.
                self._discard()
                if isinstance(exc, KernelError):
                    raise
                raise KernelError(errno.ETIMEDOUT, f"the injection helper did not answer: {exc!r}") from None
        if "error" in reply:
            for fd in reply_fds:
                os.close(fd)
            if reply.get("helper_exits"):
                with self._lock:
                    self._discard()
            _raise_error(reply)
        return reply, reply_fds


HELPER = _Helper()


def _helper_pid() -> int:
    """Test hook: the pid of the injection helper (started if needed)."""
    return HELPER.pid()
