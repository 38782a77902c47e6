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
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from .._exceptions import KernelError, ProcessGone, UsageError
from .inject import helper
from .inject.attach import find_vdso_gadget, open_mem
from .inject.window import CompiledWindow, PythonWindow, open_window, prioritized, seccomp_check, steal_uffd
from .pidfd import pidfd_open
from .procfs import read_stat
from .ptrace import PtraceEvent, PtraceOption, WaitStatus, interrupt, require_x86_64, resume, seize, wait_stop
from .uffd import Userfaultfd

__all__ = ["SpawnedProcess", "spawn_inject", "spawn_tracked"]

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
        reply, fds = helper.HELPER.call(
            {
                "op": "spawn",
                "pid": popen.pid,
                "deadline_s": deadline_s,
                "pause_before_start": True,
                "window": helper.DEFAULT_WINDOW,
            },
            timeout_s=deadline_s + helper.HELPER_GRACE_S,
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


# --------------------------------------------------------------------------- in the injection helper


def _wait_group_stopped(pid: int, deadline_ns: int) -> None:
    while True:
        try:
            state = read_stat(pid).state
        except ProcessGone:
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} vanished before exec") from None
        if state == "T":
            return
        if state in ("Z", "X"):
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} exited before exec")
        if time.monotonic_ns() >= deadline_ns:
            raise KernelError(errno.ETIMEDOUT, f"spawned process {pid} did not reach its pre-exec stop")
        time.sleep(0.0002)


def _run_to_exec(pid: int, deadline_ns: int) -> WaitStatus:
    """Seize the self-stopped trampoline, continue it, and stop the new program before its first instruction.

    The exec event itself is no place to inject: the thread is still inside ``execve``, whose
    return value would overwrite our ``rax``. An interrupt queued at that stop traps the
    thread in ``get_signal()`` on its way out to user mode; that stop is returned.
    """
    seize(pid, PtraceOption.TRACEEXEC | PtraceOption.EXITKILL)
    os.kill(pid, signal.SIGCONT)
    exec_seen = False
    while True:
        status = wait_stop(pid, deadline_ns)
        if status is None:
            raise KernelError(errno.ETIMEDOUT, f"spawned process {pid} did not exec in time")
        if status.gone:
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} {status.describe()} before exec")
        if status.event == PtraceEvent.EXEC:
            exec_seen = True
            interrupt(pid)
        elif exec_seen and status.event == PtraceEvent.STOP and status.stop_signal == signal.SIGTRAP:
            return status
        resume(pid, 0 if status.event != PtraceEvent.NONE else status.stop_signal)


def spawn_inject(
    request: dict[str, Any], send: Callable[[dict[str, Any], list[int]], None], receive: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], list[int]]:
    """Serve a ``spawn`` request (in the helper): inject into the stopped trampoline's new program.

    The stolen uffd is handed over with a ``stopped`` message (``send``) while the program is
    still stopped; ``receive`` waits for the caller's go-ahead.
    """
    pid = int(request["pid"])
    deadline_ns = time.monotonic_ns() + int(float(request["deadline_s"]) * 1e9)
    _wait_group_stopped(pid, deadline_ns)
    first_stop = _run_to_exec(pid, deadline_ns)
    started_ns = time.monotonic_ns()

    def hand_over(fd: int) -> None:
        try:
            send({"phase": "stopped"}, [fd])
        finally:
            os.close(fd)
        receive()

    mem_fd = open_mem(pid)
    pidfd = -1
    try:
        pidfd = pidfd_open(pid)
        gadget = find_vdso_gadget(pid, mem_fd)
        window = str(request.get("window") or "auto")
        session: PythonWindow | CompiledWindow | None
        session = open_window(pid, pid, window, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
        seccomp = seccomp_check(pid, pid, gadget)
        with prioritized():
            if isinstance(session, CompiledWindow):
                session.adopt(first_stop)
            else:
                session = PythonWindow(pid, pid, first_stop, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
            stolen = steal_uffd(
                session, seccomp, before_detach=hand_over if request.get("pause_before_start") else None
            )
    finally:
        os.close(mem_fd)
        if pidfd >= 0:
            os.close(pidfd)
    reply = {"phase": "done", "stop_ns": time.monotonic_ns() - started_ns, "window": session.window}
    return reply, [] if stolen < 0 else [stolen]
