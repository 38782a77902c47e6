"""Typed readers of ``/proc/PID`` files: maps, stat (identity), status, threads."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from .._exceptions import AccessDenied, ProcessGone
from ._libc import raise_errno

__all__ = [
    "Mapping",
    "mm_fingerprint",
    "MappingPerm",
    "ProcessIdentity",
    "ProcessStatus",
    "read_maps",
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


def _read(pid: int | str, name: str) -> str:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ProcessGone(exc.errno or 2, f"{path}: process {pid} does not exist") from None
    except PermissionError as exc:
        raise AccessDenied(exc.errno or 13, f"{path}: permission denied") from None
    except OSError as exc:
        raise_errno(exc.errno or 5, f"read {path}")


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


@dataclass(frozen=True, slots=True, order=True)
class ProcessIdentity:
    """A process as pid plus start time (clock ticks after boot), so a recycled pid never matches."""

    pid: int
    start_time_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The identity of the live process ``pid``."""
        stat = _read(pid, "stat")
        # comm (field 2) may contain spaces and parentheses: split after its last ')'.
        after_comm = stat[stat.rindex(")") + 2 :].split()
        return cls(pid, int(after_comm[19]))

    def is_alive(self) -> bool:
        """Whether this very process still exists (and is not a zombie)."""
        try:
            stat = _read(self.pid, "stat")
        except (ProcessGone, AccessDenied):
            return False
        after_comm = stat[stat.rindex(")") + 2 :].split()
        return int(after_comm[19]) == self.start_time_ticks and after_comm[0] not in ("Z", "X")


def mm_fingerprint(pid: int) -> tuple[int, ...]:
    """Addresses an execve re-chooses (code, stack, argument block): they change when the mm is replaced."""
    stat = _read(pid, "stat")
    fields = stat[stat.rindex(")") + 2 :].split()
    # start_code, end_code, start_stack (fields 26-28) and arg_start (48), counted from 1.
    return tuple(int(fields[i - 3]) for i in (26, 27, 28, 48))


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The fields of ``/proc/PID/status`` that tracking decisions need."""

    name: str
    state: str
    tracer_pid: int
    seccomp_mode: int
    effective_uid: int
    n_threads: int


def read_status(pid: int | str = "self") -> ProcessStatus:
    """Parse ``/proc/PID/status``."""
    fields: dict[str, str] = {}
    for line in _read(pid, "status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcessStatus(
        name=fields.get("Name", ""),
        state=fields.get("State", "?")[:1],
        tracer_pid=int(fields.get("TracerPid", "0")),
        seccomp_mode=int(fields.get("Seccomp", "0")),
        effective_uid=int(fields.get("Uid", "0 0").split()[1]),
        n_threads=int(fields.get("Threads", "1")),
    )


def thread_ids(pid: int) -> list[int]:
    """The thread ids of process ``pid``, ascending."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ProcessGone(2, f"process {pid} does not exist") from None
