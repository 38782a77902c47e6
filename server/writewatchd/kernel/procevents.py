"""The kernel's process-events connector: fork, exec and exit of every process, holding none.

A netlink socket (``NETLINK_CONNECTOR``) joined to the ``CN_IDX_PROC`` group, after a
``PROC_CN_MCAST_LISTEN``, receives one message per fork/clone, exec and exit in the whole
system (docs/kernel.md §8.11). Nothing is attached to any process, so tracers such as
wineserver, debuggers and strace are not disturbed. It needs ``CONFIG_PROC_EVENTS``, the
initial user and pid namespaces, and before Linux 6.6 ``CAP_NET_ADMIN``.

Delivery is best effort: when the receive buffer overflows the kernel drops messages and the
next ``recv`` fails with ``ENOBUFS``; :meth:`ProcEventListener.read` then raises
:class:`EventsLost`, and the caller must recover by polling ``/proc`` (docs/process-trees.md §2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from enum import IntEnum

from .._exceptions import AccessDenied, FeatureUnavailable, KernelError
from ._libc import SYS, raise_errno, syscall

__all__ = [
    "EventsLost",
    "ProcEvent",
    "ProcEventKind",
    "ProcEventListener",
    "proc_events_available",
    "shares_memory",
]

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
_NLMSG_DONE = 3
_SO_RCVBUFFORCE = 33

# struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
_NLMSGHDR = struct.Struct("=IHHII")
# struct cn_msg { u32 idx; u32 val; u32 seq; u32 ack; u16 len; u16 flags; u8 data[]; }
_CN_MSG = struct.Struct("=IIIIHH")
# struct proc_event { u32 what; u32 cpu; u64 timestamp_ns (aligned 8); union event_data; }
_PROC_EVENT = struct.Struct("=IIQ")
_EVENT_OFFSET = _NLMSGHDR.size + _CN_MSG.size
_DATA_OFFSET = _EVENT_OFFSET + _PROC_EVENT.size
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_EXIT = struct.Struct("=IIIIII")  # process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid
_KCMP_VM = 1

#: Receive buffer asked for; a burst of forks larger than this overflows (EventsLost).
DEFAULT_RECEIVE_BUFFER_BYTES = 4 << 20
_READ_BUFFER_BYTES = 64 << 10


class ProcEventKind(IntEnum):
    """``enum proc_cn_event`` values (``linux/cn_proc.h``)."""

    NONE = 0x0
    FORK = 0x1
    EXEC = 0x2
    UID = 0x4
    GID = 0x40
    SID = 0x80
    PTRACE = 0x100
    COMM = 0x200
    COREDUMP = 0x40000000
    EXIT = 0x80000000


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """One fork, exec or exit.

    ``pid``/``tgid`` name the thread and process the event is about: the child for a fork
    (``pid != tgid`` means a new thread, not a new process), the process for an exec (after
    an exec from a non-main thread, ``pid == tgid``) and the exiting thread for an exit.
    ``parent_pid``/``parent_tgid`` are set for forks and exits; ``exit_code`` is the wait
    status of an exit. Pids are in the initial pid namespace.
    """

    kind: ProcEventKind
    pid: int
    tgid: int
    timestamp_ns: int
    parent_pid: int = 0
    parent_tgid: int = 0
    exit_code: int = 0

    @property
    def is_new_process(self) -> bool:
        """A fork/clone that made a process (a thread group leader), not a thread."""
        return self.kind == ProcEventKind.FORK and self.pid == self.tgid


class EventsLost(KernelError):
    """The receive buffer overflowed: some process events were dropped; poll /proc to recover."""


class ProcEventListener:
    """A subscription to the process-events connector; close it when done.

    ``read`` never blocks when given ``timeout_s=0``: the daemon registers :meth:`fileno` in
    its event loop and reads when the socket turns readable.
    """

    def __init__(self, *, receive_buffer_bytes: int = DEFAULT_RECEIVE_BUFFER_BYTES) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        except OSError as exc:
            raise FeatureUnavailable(
                exc.errno or errno.EPROTONOSUPPORT, f"NETLINK_CONNECTOR socket: {exc.strerror}"
            ) from None
        try:
            _set_receive_buffer(sock, receive_buffer_bytes)
            try:
                sock.bind((0, CN_IDX_PROC))
            except OSError as exc:
                raise_errno(
                    exc.errno or errno.EPERM,
                    "joining the process-events group",
                    classes={errno.EPERM: AccessDenied, errno.ENOENT: FeatureUnavailable},
                    hint="needs CAP_NET_ADMIN in the initial user namespace",
                )
            self._sock = sock
            self._control(PROC_CN_MCAST_LISTEN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.n_overflows = 0
        self._overflowed = False

    def fileno(self) -> int:
        """The socket, readable when events are queued."""
        return self._sock.fileno()

    def read(self, timeout_s: float = 0.0) -> list[ProcEvent]:
        """Every queued event (waiting up to ``timeout_s`` for the first); raises :class:`EventsLost`.

        Acknowledgements and event kinds other than fork, exec and exit are skipped.
        """
        if self._overflowed:
            self._overflowed = False
            raise EventsLost(errno.ENOBUFS, "process events were dropped (receive buffer overflow)")
        events: list[ProcEvent] = []
        if not self._poll.poll(max(0, int(timeout_s * 1000))):
            return events
        while True:
            try:
                data = self._sock.recv(_READ_BUFFER_BYTES)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise_errno(exc.errno or errno.EIO, "reading process events")
                self.n_overflows += 1
                if events:
                    # Those events are older than the loss: hand them over first, raise next call.
                    self._overflowed = True
                    return events
                raise EventsLost(errno.ENOBUFS, "process events were dropped (receive buffer overflow)") from None
            events.extend(parse_messages(data))

    def close(self) -> None:
        """Stop listening and close the socket; idempotent."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):  # the socket goes away anyway
            self._control(PROC_CN_MCAST_IGNORE)
        self._sock.close()

    def __enter__(self) -> ProcEventListener:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _control(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), _NLMSG_DONE, 0, 0, os.getpid())
        self._sock.send(header + cn)


def _set_receive_buffer(sock: socket.socket, size_bytes: int) -> None:
    """SO_RCVBUFFORCE (CAP_NET_ADMIN, which listening needs anyway) ignores net.core.rmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size_bytes)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size_bytes)


def parse_messages(data: bytes) -> list[ProcEvent]:
    """The fork, exec and exit events in one datagram of netlink messages."""
    events: list[ProcEvent] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        event = _parse_event(data[offset : offset + length])
        if event is not None:
            events.append(event)
        offset += (length + 3) & ~3
    return events


def _parse_event(message: bytes) -> ProcEvent | None:
    if len(message) < _DATA_OFFSET:
        return None
    idx, val = _CN_MSG.unpack_from(message, _NLMSGHDR.size)[:2]
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None
    what, _cpu, timestamp_ns = _PROC_EVENT.unpack_from(message, _EVENT_OFFSET)
    if what == ProcEventKind.FORK and len(message) >= _DATA_OFFSET + _FORK.size:
        parent_pid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(message, _DATA_OFFSET)
        return ProcEvent(ProcEventKind.FORK, child_pid, child_tgid, timestamp_ns, parent_pid, parent_tgid)
    if what == ProcEventKind.EXEC and len(message) >= _DATA_OFFSET + _EXEC.size:
        pid, tgid = _EXEC.unpack_from(message, _DATA_OFFSET)
        return ProcEvent(ProcEventKind.EXEC, pid, tgid, timestamp_ns)
    if what == ProcEventKind.EXIT and len(message) >= _DATA_OFFSET + _EXIT.size:
        pid, tgid, code, _signal, parent_pid, parent_tgid = _EXIT.unpack_from(message, _DATA_OFFSET)
        return ProcEvent(ProcEventKind.EXIT, pid, tgid, timestamp_ns, parent_pid, parent_tgid, code)
    return None


def proc_events_available(timeout_s: float = 2.0) -> tuple[bool, str]:
    """Whether this process receives process events, and why not.

    Tried end to end: listen, start ``/bin/true``, wait for its fork event. Before Linux 6.6
    listening needs ``CAP_NET_ADMIN``; later kernels accept any listener (docs/kernel.md §8.11).
    """
    try:
        with ProcEventListener(receive_buffer_bytes=1 << 20) as listener:
            child = subprocess.Popen(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            child.wait()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    events = listener.read(0.1)
                except EventsLost:
                    continue
                if any(e.kind == ProcEventKind.FORK and e.pid == child.pid for e in events):
                    return True, "process-events connector"
            return False, f"no fork event within {timeout_s:g} s of starting a child"
    except (KernelError, OSError) as exc:
        return False, str(exc)


def shares_memory(pid_a: int, pid_b: int) -> bool:
    """Whether two processes share one mm: a ``vfork`` child (or ``CLONE_VM``) before its exec.

    A userfaultfd injected into such a child would act on the parent's memory, so a follower
    waits for the child's exec instead. ``kcmp(KCMP_VM)`` needs PTRACE_MODE_READ on both.
    """
    result = syscall(SYS["kcmp"], pid_a, pid_b, _KCMP_VM, 0, 0)
    if result < 0:
        raise_errno(-result, f"kcmp(KCMP_VM, {pid_a}, {pid_b})")
    return result == 0
