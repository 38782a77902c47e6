"""Typed readers of ``/proc/PID`` files: maps, stat, status, threads.

Each file has one parser here (as psutil's ``_parse_stat_file``); no other module splits
their text.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

from .._exceptions import AccessDenied, ProcessGone
from ._libc import raise_errno

__all__ = [
    "Mapping",
    "child_pids",
    "gained_privileges",
    "mm_fingerprint",
    "read_cmdline",
    "MappingPerm",
    "ProcessIdentity",
    "ProcessStat",
    "ProcessStatus",
    "SeccompMode",
    "parse_stat",
    "read_maps",
    "read_stat",
    "read_status",
    "thread_ids",
]


class MappingPerm(enum.Flag):
    """The ``rwxp``/``s`` permission column of ``/proc/PID/maps``."""

    NONE = 0
    READ = enum.auto()
    WRITE = enum.auto()
    EXEC = enum.auto()
    SHARED = enum.auto()


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/PID/maps``; ``start``/``end`` are byte addresses, ``end`` exclusive."""

    start: int
    end: int
    perms: MappingPerm
    offset_bytes: int
    device: str
    inode: int
    path: str

    @property
    def length_bytes(self) -> int:
        """Size of the mapping in bytes."""
        return self.end - self.start

    @property
    def is_private_writable(self) -> bool:
        """A private, writable mapping: what ``auto`` tracking covers."""
        return MappingPerm.WRITE in self.perms and MappingPerm.SHARED not in self.perms

    @property
    def is_special(self) -> bool:
        """vdso/vvar/vsyscall-like kernel mappings, which cannot be tracked."""
        return self.path in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]")


def _perms(text: str) -> MappingPerm:
    perms = MappingPerm.NONE
    if text[0] == "r":
        perms |= MappingPerm.READ
    if text[1] == "w":
        perms |= MappingPerm.WRITE
    if text[2] == "x":
        perms |= MappingPerm.EXEC
    if text[3] == "s":
        perms |= MappingPerm.SHARED
    return perms


def _read(pid: int | str, name: str, tid: int | None = None) -> str:
    """The text of ``/proc/PID/NAME`` (``/proc/PID/task/TID/NAME`` for one thread)."""
    path = f"/proc/{pid}/{name}" if tid is None else f"/proc/{pid}/task/{tid}/{name}"
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ProcessGone(exc.errno or errno.ENOENT, f"{path}: process {pid} does not exist") from None
    except PermissionError as exc:
        raise AccessDenied(exc.errno or errno.EACCES, f"{path}: permission denied") from None
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, f"read {path}")


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of a ``/proc/PID/maps`` file."""
    mappings = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start_text, _, end_text = fields[0].partition("-")
        mappings.append(
            Mapping(
                start=int(start_text, 16),
                end=int(end_text, 16),
                perms=_perms(fields[1]),
                offset_bytes=int(fields[2], 16),
                device=fields[3],
                inode=int(fields[4]),
                path=fields[5].strip() if len(fields) > 5 else "",
            )
        )
    return mappings


def read_maps(pid: int | str = "self") -> list[Mapping]:
    """The mappings of process ``pid``, ascending."""
    return parse_maps(_read(pid, "maps"))


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """The fields of ``/proc/PID/stat`` (or of one thread's) that we use; addresses in bytes."""

    pid: int
    comm: str
    #: The state letter: R, S, D, T (group-stopped), t (tracing stop), Z, X...
    state: str
    #: CPU time in user and in kernel mode, in clock ticks (``SC_CLK_TCK`` per second).
    utime_ticks: int
    stime_ticks: int
    start_time_ticks: int
    start_code: int
    end_code: int
    start_stack: int
    arg_start: int


def parse_stat(text: str) -> ProcessStat:
    """Parse the text of a ``/proc/PID/stat`` file."""
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    close = text.rindex(")")
    after_comm = text[close + 2 :].split()

    def field(number: int) -> int:
        # Numbered from 1 as in proc(5); after_comm starts at field 3.
        return int(after_comm[number - 3])

    return ProcessStat(
        pid=int(text[: text.index("(")]),
        comm=text[text.index("(") + 1 : close],
        state=after_comm[0],
        utime_ticks=field(14),
        stime_ticks=field(15),
        start_time_ticks=field(22),
        start_code=field(26),
        end_code=field(27),
        start_stack=field(28),
        arg_start=field(48),
    )


def read_stat(pid: int, tid: int | None = None) -> ProcessStat:
    """``/proc/PID/stat``, or ``/proc/PID/task/TID/stat`` when ``tid`` is given."""
    return parse_stat(_read(pid, "stat", tid))


@dataclass(frozen=True, slots=True, order=True)
class ProcessIdentity:
    """A process as pid plus start time (clock ticks after boot), so a recycled pid never matches."""

    pid: int
    start_time_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The identity of the live process ``pid``."""
        return cls(pid, read_stat(pid).start_time_ticks)

    def is_alive(self) -> bool:
        """Whether this very process still exists (and is not a zombie)."""
        try:
            stat = read_stat(self.pid)
        except (ProcessGone, AccessDenied):
            return False
        return stat.start_time_ticks == self.start_time_ticks and stat.state not in ("Z", "X")


def mm_fingerprint(pid: int) -> tuple[int, ...]:
    """Addresses an execve re-chooses (code, stack, argument block): they change when the mm is replaced."""
    stat = read_stat(pid)
    return (stat.start_code, stat.end_code, stat.start_stack, stat.arg_start)


class SeccompMode(enum.IntEnum):
    """The ``Seccomp`` field of ``/proc/PID/status``."""

    DISABLED = 0
    STRICT = 1
    FILTER = 2


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The fields of ``/proc/PID/status`` that tracking decisions need."""

    name: str
    state: str
    tracer_pid: int
    seccomp_mode: SeccompMode
    #: How many seccomp filters are attached (-1 when the kernel does not say).
    n_seccomp_filters: int
    effective_uid: int
    n_threads: int


def read_status(pid: int | str = "self", tid: int | None = None) -> ProcessStatus:
    """Parse ``/proc/PID/status`` (``/proc/PID/task/TID/status`` when ``tid`` is given)."""
    fields: dict[str, str] = {}
    for line in _read(pid, "status", tid).splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcessStatus(
        name=fields.get("Name", ""),
        state=fields.get("State", "?")[:1],
        tracer_pid=int(fields.get("TracerPid", "0")),
        seccomp_mode=SeccompMode(int(fields.get("Seccomp", "0"))),
        n_seccomp_filters=int(fields.get("Seccomp_filters", "-1")),
        effective_uid=int(fields.get("Uid", "0 0").split()[1]),
        n_threads=int(fields.get("Threads", "1")),
    )


def thread_ids(pid: int) -> list[int]:
    """The thread ids of process ``pid``, ascending."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ProcessGone(errno.ENOENT, f"process {pid} does not exist") from None


def read_cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` (empty for a zombie or a kernel thread)."""
    text = _read(pid, "cmdline")
    return text.split("\0")[:-1] if text.endswith("\0") else [text] if text else []


def gained_privileges(pid: int) -> str:
    """Why ``pid`` runs with privileges its user does not have, or ``""``.

    A set-user-ID or set-group-ID program shows different real and effective ids; a
    non-dumpable process of another user has its ``/proc/PID`` owned by root
    (docs/kernel.md §4.1). writewatch does not inject into such programs.
    """
    fields: dict[str, list[int]] = {}
    for line in _read(pid, "status").splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            fields[key] = [int(v) for v in value.split()]
    uids, gids = fields.get("Uid", [0, 0, 0, 0]), fields.get("Gid", [0, 0, 0, 0])
    if len(set(uids[:3])) > 1:
        return f"it runs a set-user-ID program (uids {uids[0]}/{uids[1]}/{uids[2]})"
    if len(set(gids[:3])) > 1:
        return f"it runs a set-group-ID program (gids {gids[0]}/{gids[1]}/{gids[2]})"
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise ProcessGone(errno.ENOENT, f"process {pid} does not exist") from None
    if owner != uids[1]:
        return "it is not dumpable (a privileged program)"
    return ""


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (all its threads'), ascending; threads are not children."""
    children: set[int] = set()
    for tid in thread_ids(pid):
        try:
            text = _read(pid, f"task/{tid}/children")
        except ProcessGone:
            continue  # the thread exited meanwhile
        children.update(int(c) for c in text.split())
    return sorted(children)
