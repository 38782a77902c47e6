"""Injection into a running process: the checks before any stop, and the request the helper serves."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import Any

from ..._exceptions import InjectionRefused
from .._libc import raise_errno
from ..pidfd import pidfd_open
from ..procfs import SeccompMode, read_maps, read_status
from .threads import ThreadChoice, ThreadRank, choose_thread
from .window import open_window, prioritized, seccomp_check, steal_uffd, stop_thread

__all__ = ["find_vdso_gadget", "inject_running", "open_mem", "refuse_early"]


def find_vdso_gadget(pid: int, mem_fd: int) -> int:
    """Address of a ``syscall`` instruction (bytes ``0f 05``) in the vDSO of ``pid``."""
    vdso = [m for m in read_maps(pid) if m.path == "[vdso]"]
    if not vdso:
        raise InjectionRefused(errno.ENOENT, f"process {pid} has no vDSO, so no syscall instruction to borrow")
    try:
        image = os.pread(mem_fd, vdso[0].length_bytes, vdso[0].start)
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, f"read the vDSO of process {pid}")
    offset = image.find(b"\x0f\x05")
    if offset < 0:
        raise InjectionRefused(errno.ENOENT, f"the vDSO of process {pid} holds no syscall instruction")
    return vdso[0].start + offset


def refuse_early(pid: int) -> None:
    """Refusals that need no stop: already traced, strict seccomp, not dumpable for us."""
    status = read_status(pid)
    if status.tracer_pid:
        raise InjectionRefused(errno.EBUSY, f"process {pid} is already traced by process {status.tracer_pid}")
    if status.seccomp_mode == SeccompMode.STRICT:
        raise InjectionRefused(errno.EPERM, f"process {pid} runs under strict seccomp, which forbids userfaultfd")
    if os.geteuid() != 0 and status.effective_uid != 0:
        # The files in /proc/PID are owned by root exactly when the task is not dumpable
        # (task_dump_owner); the directory itself keeps the task's uid.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(f"/proc/{pid}/status").st_uid == 0:
                raise InjectionRefused(
                    errno.EPERM, f"process {pid} is not dumpable; only root (CAP_SYS_PTRACE) may inject into it"
                )


def open_mem(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, f"open /proc/{pid}/mem", hint="ptrace access to the target is needed")


def inject_running(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Serve an ``inject`` request (in the helper): the reply and the stolen uffd."""
    pid = int(request["pid"])
    deadline_ns = time.monotonic_ns() + int(float(request["deadline_s"]) * 1e9)
    window = str(request.get("window") or "auto")
    refuse_early(pid)
    mem_fd = open_mem(pid)
    pidfd = -1
    try:
        pidfd = pidfd_open(pid)
        gadget = find_vdso_gadget(pid, mem_fd)
        preferred = request.get("tid")
        while True:
            choice = choose_thread(pid, preferred)
            if request.get("unvetted") and preferred is not None:
                choice = ThreadChoice(preferred, min(ThreadRank), "unvetted (test)")
            if isinstance(choice, ThreadChoice):
                break
            if time.monotonic_ns() >= deadline_ns:
                causes = "; ".join(f"thread {t} is {why}" for t, why in choice.items())
                raise InjectionRefused(errno.EAGAIN, f"no thread of process {pid} can be stopped safely: {causes}")
            time.sleep(0.001)
        seccomp = seccomp_check(pid, choice.tid, gadget)
        # Before the seize: a seized thread that is never stopped could not be let go.
        compiled = open_window(pid, choice.tid, window, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
        with prioritized():
            session = stop_thread(pid, choice.tid, deadline_ns, compiled, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
            stolen = steal_uffd(session, seccomp, float(request.get("pause_in_window_s") or 0))
    finally:
        os.close(mem_fd)
        if pidfd >= 0:
            os.close(pidfd)
    reply = {"tid": choice.tid, "stop_ns": session.detach_ns - session.interrupt_ns, "window": session.window}
    return reply, [stolen]
