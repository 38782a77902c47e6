"""Start a program whose memory writes are trackable from its first instruction.

How: the caller (the daemon) starts a tiny exec trampoline, ``/bin/sh -c 'kill -STOP $$ &&
exec "$@"'``, through :class:`subprocess.Popen`. Popen without ``preexec_fn`` starts the
child with vfork/exec, so no Python code runs in a forked copy of a multi-threaded daemon
(where another thread may hold a lock forever). The trampoline stops itself before its
exec. The injection helper (see :mod:`.inject`) then seizes it with
``PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL``, sends SIGCONT, and waits for the exec stop: the
new program is loaded but has not executed one instruction. There the helper injects
``userfaultfd`` (a uffd made before exec would have been closed by exec, O_CLOEXEC, and
bound to the old mm anyway), copies it out, closes the target's copy, optionally lets the
caller register ranges while the program is still stopped (``before_start``), and detaches.

The caller stays the program's parent: it must reap it (:meth:`SpawnedProcess.wait` or
:meth:`SpawnedProcess.poll`). If the helper dies before the detach, EXITKILL kills the
program; if the caller dies before the trampoline is continued, the trampoline stays
stopped until killed.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from .._exceptions import KernelError, UsageError
from . import inject
from .inject import _HELPER, _HELPER_GRACE_S
from .ptrace import require_x86_64
from .uffd import Userfaultfd

__all__ = ["SpawnedProcess", "spawn_tracked"]

_TRAMPOLINE = 'kill -STOP $$ && exec "$@"'

_Redirect = int | IO[Any] | None


class SpawnedProcess:
    """A program started by :func:`spawn_tracked`; we are its parent and must reap it."""

    def __init__(self, popen: subprocess.Popen[bytes], uffd: Userfaultfd, stop_ns: int, window: str) -> None:
        self.popen = popen
        self.uffd = uffd
        self.stop_ns = stop_ns
        #: Which implementation of the injection window ran: "c" or "python".
        self.window = window

    @property
    def pid(self) -> int:
        """The program's pid."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), or None while it runs."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """Reap the program if it has exited; returns :attr:`returncode`."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the program to exit (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the program (if it still runs) and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def terminate(self) -> None:
        """Send SIGTERM (does not reap)."""
        if self.popen.poll() is None:
            self.popen.terminate()


def _resolve(program: str, env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None) -> str:
    if "/" in program:
        path = os.path.join(os.fspath(cwd), program) if cwd is not None else program
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(errno.ENOENT, f"{program} is not an executable file", program)
        return program
    search = (env if env is not None else os.environ).get("PATH", os.defpath)
    found = shutil.which(program, path=search)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"{program} not found in PATH", program)
    return found


def spawn_tracked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: _Redirect = None,
    stdout: _Redirect = None,
    stderr: _Redirect = None,
    before_start: Callable[[Userfaultfd], None] | None = None,
    deadline_s: float = 5.0,
) -> SpawnedProcess:
    """Start ``argv`` stopped at exec, inject ``userfaultfd``, and let it run.

    The returned :attr:`SpawnedProcess.uffd` belongs to the program's mm; ``UFFDIO_API``
    is not done. ``before_start``, if given, is called with that uffd while the program is
    still stopped before its first instruction (e.g. to register and write-protect its
    mappings); the program is started whatever it does, and its exception is re-raised
    after the program is killed. The program sees ``argv[0]`` resolved to a path.
    """
    require_x86_64()
    if not argv:
        raise UsageError("argv must name a program")
    program = _resolve(argv[0], env, cwd)
    popen = subprocess.Popen(
        ["/bin/sh", "-c", _TRAMPOLINE, "writewatch-spawn", program, *argv[1:]],
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )
    received: list[Userfaultfd] = []
    callback_error: list[BaseException] = []

    def on_stopped(_reply: dict[str, Any], fds: list[int]) -> None:
        uffd = Userfaultfd(fds[0], owner_pid=popen.pid)
        received.append(uffd)
        if before_start is None:
            return
        try:
            before_start(uffd)
        except BaseException as exc:  # re-raised once the helper has let go of the program
            callback_error.append(exc)

    try:
        reply, fds = _HELPER.call(
            {
                "op": "spawn",
                "pid": popen.pid,
                "deadline_s": deadline_s,
                "pause_before_start": True,
                "window": inject.DEFAULT_WINDOW,
            },
            timeout_s=deadline_s + _HELPER_GRACE_S,
            on_stopped=on_stopped,
        )
        for fd in fds:
            os.close(fd)
        if callback_error:
            raise callback_error[0]
        if not received:
            raise KernelError(errno.EIO, f"the injection helper returned no userfaultfd for pid {popen.pid}")
    except BaseException:
        for uffd in received:
            uffd.close()
        if popen.poll() is None:
            popen.kill()
        popen.wait()
        raise
    return SpawnedProcess(popen, received[0], int(reply["stop_ns"]), str(reply["window"]))
