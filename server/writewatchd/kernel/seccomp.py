"""Seccomp filters of a traced thread: dump them and evaluate them for one syscall.

An injected syscall passes through the target's seccomp filters like any other. A filter
that answers KILL would kill the target, so the injector evaluates the filters first, in
Python, against the exact ``seccomp_data`` the kernel would build, and refuses when the
verdict is anything but ALLOW or LOG.

Dumping needs ``PTRACE_SECCOMP_GET_FILTER`` (CAP_SYS_ADMIN, tracee stopped).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .._exceptions import AccessDenied, KernelError, UsageError
from ._libc import check
from .ptrace import PTRACE_SECCOMP_GET_FILTER, ptrace_raw

__all__ = [
    "AUDIT_ARCH_X86_64",
    "Action",
    "BpfInstruction",
    "SeccompData",
    "Verdict",
    "dump_filters",
    "evaluate",
    "run_filter",
]

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_DATA_SIZE = 64  # int nr; u32 arch; u64 instruction_pointer; u64 args[6]

_RET_ACTION_FULL = 0xFFFF0000
_RET_DATA = 0x0000FFFF
_MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS
_U32 = 0xFFFFFFFF


class Action(enum.IntEnum):
    """``SECCOMP_RET_*`` actions (the high 16 bits of a filter's return value)."""

    KILL_PROCESS = 0x80000000
    KILL_THREAD = 0x00000000
    TRAP = 0x00030000
    ERRNO = 0x00050000
    USER_NOTIF = 0x7FC00000
    TRACE = 0x7FF00000
    LOG = 0x7FFC0000
    ALLOW = 0x7FFF0000


#: Actions under which an injected syscall runs normally. TRACE is not one of them: without
#: PTRACE_O_TRACESECCOMP the kernel fails the syscall with ENOSYS.
_RUNS = (Action.ALLOW, Action.LOG)


@dataclass(frozen=True, slots=True)
class BpfInstruction:
    """``struct sock_filter``: one classic BPF instruction."""

    code: int
    jt: int
    jf: int
    k: int


@dataclass(frozen=True, slots=True)
class SeccompData:
    """``struct seccomp_data`` as the kernel builds it for a syscall."""

    nr: int
    arch: int
    instruction_pointer: int
    args: tuple[int, ...]

    def pack(self) -> bytes:
        """The 64-byte little-endian struct."""
        args = (tuple(a & (2**64 - 1) for a in self.args) + (0,) * 6)[:6]
        return struct.pack("<iIQ6Q", self.nr, self.arch, self.instruction_pointer, *args)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The combined answer of all filters: an action, its 16 data bits, and the raw value."""

    action: Action
    data: int
    raw: int

    @property
    def runs(self) -> bool:
        """Whether the syscall would run (ALLOW or LOG)."""
        return self.action in _RUNS

    def describe(self) -> str:
        """E.g. ``ERRNO(1)`` or ``KILL_PROCESS``."""
        if self.action in (Action.ERRNO, Action.TRAP, Action.TRACE):
            return f"{self.action.name}({self.data})"
        return self.action.name


class _NoSuchFilter(KernelError):
    """The filter index is past the last filter: the dump is complete."""


def dump_filters(tid: int) -> list[list[BpfInstruction]]:
    """The cBPF programs attached to stopped tracee ``tid``, most recently installed first."""
    filters: list[list[BpfInstruction]] = []
    index = 0
    while True:
        what = f"PTRACE_SECCOMP_GET_FILTER #{index} of thread {tid}"
        try:
            n_instructions = check(
                ptrace_raw(PTRACE_SECCOMP_GET_FILTER, tid, index, None),
                what,
                classes={errno.ENOENT: _NoSuchFilter, errno.EACCES: AccessDenied, errno.EMEDIUMTYPE: AccessDenied},
                hint="needs CAP_SYS_ADMIN (and a tracer that is not itself under seccomp)",
            )
        except _NoSuchFilter:
            return filters
        buffer = ctypes.create_string_buffer(8 * n_instructions)
        got = check(ptrace_raw(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buffer)), what)
        filters.append([BpfInstruction(*fields) for fields in struct.iter_unpack("<HBBI", buffer.raw[: 8 * got])])
        index += 1


def _priority(value: int) -> int:
    # The kernel keeps the filter result whose action, read as a signed 32-bit number, is lowest.
    action = value & _RET_ACTION_FULL
    return action - (1 << 32) if action & 0x80000000 else action


def evaluate(filters: Sequence[Sequence[BpfInstruction]], data: SeccompData) -> Verdict:
    """What the filters answer for ``data``; with no filter, ALLOW."""
    packed = data.pack()
    result = int(Action.ALLOW)
    for program in filters:
        value = run_filter(program, packed)
        if _priority(value) < _priority(result):
            result = value
    action_bits = result & _RET_ACTION_FULL
    try:
        action = Action(action_bits)
    except ValueError:
        # An unknown action is treated by the kernel as KILL_PROCESS.
        action = Action.KILL_PROCESS
    return Verdict(action, result & _RET_DATA, result)


def _alu(op: int, a: int, operand: int) -> int:
    if op == 0x00:
        return (a + operand) & _U32
    if op == 0x10:
        return (a - operand) & _U32
    if op == 0x20:
        return (a * operand) & _U32
    if op == 0x30:
        if operand == 0:
            raise UsageError("seccomp filter divides by zero")
        return a // operand
    if op == 0x40:
        return a | operand
    if op == 0x50:
        return a & operand
    if op == 0x60:
        return (a << operand) & _U32 if operand < 32 else 0
    if op == 0x70:
        return a >> operand if operand < 32 else 0
    if op == 0x80:
        return (-a) & _U32
    if op == 0x90:
        if operand == 0:
            raise UsageError("seccomp filter takes a modulo by zero")
        return a % operand
    if op == 0xA0:
        return a ^ operand
    raise UsageError(f"seccomp filter has an unknown ALU operation 0x{op:x}")


def _jump_taken(op: int, a: int, operand: int) -> bool:
    if op == 0x10:
        return a == operand
    if op == 0x20:
        return a > operand
    if op == 0x30:
        return a >= operand
    if op == 0x40:
        return bool(a & operand)
    raise UsageError(f"seccomp filter has an unknown jump 0x{op:x}")


def run_filter(program: Sequence[BpfInstruction], packed_data: bytes) -> int:
    """Run one cBPF program over the packed ``seccomp_data``; returns its 32-bit result."""
    a = x = 0
    scratch = [0] * 16
    pc = 0
    n_steps = 0
    while pc < len(program):
        n_steps += 1
        if n_steps > _MAX_INSTRUCTIONS:
            raise UsageError("seccomp filter does not terminate")
        insn = program[pc]
        pc += 1
        cls = insn.code & 0x07
        if cls == 0x00:  # LD
            mode = insn.code & 0xE0
            if mode == 0x20:  # ABS (seccomp allows 32-bit aligned loads only)
                if insn.k % 4 or insn.k + 4 > SECCOMP_DATA_SIZE:
                    raise UsageError(f"seccomp filter loads at offset {insn.k}")
                a = int.from_bytes(packed_data[insn.k : insn.k + 4], "little")
            elif mode == 0x00:  # IMM
                a = insn.k & _U32
            elif mode == 0x60:  # MEM
                a = scratch[insn.k]
            elif mode == 0x80:  # LEN
                a = SECCOMP_DATA_SIZE
            else:
                raise UsageError(f"seccomp filter has an unsupported load 0x{insn.code:x}")
        elif cls == 0x01:  # LDX
            mode = insn.code & 0xE0
            if mode == 0x00:
                x = insn.k & _U32
            elif mode == 0x60:
                x = scratch[insn.k]
            elif mode == 0x80:
                x = SECCOMP_DATA_SIZE
            else:
                raise UsageError(f"seccomp filter has an unsupported index load 0x{insn.code:x}")
        elif cls == 0x02:  # ST
            scratch[insn.k] = a
        elif cls == 0x03:  # STX
            scratch[insn.k] = x
        elif cls == 0x04:  # ALU
            a = _alu(insn.code & 0xF0, a, x if insn.code & 0x08 else insn.k & _U32)
        elif cls == 0x05:  # JMP
            op = insn.code & 0xF0
            if op == 0x00:  # JA
                pc += insn.k
            else:
                taken = _jump_taken(op, a, x if insn.code & 0x08 else insn.k & _U32)
                pc += insn.jt if taken else insn.jf
        elif cls == 0x06:  # RET
            source = insn.code & 0x18
            return a if source == 0x10 else insn.k & _U32
        elif insn.code & 0xF8 == 0x00:  # MISC TAX
            x = a
        else:  # MISC TXA
            a = x
    raise UsageError("seccomp filter runs off its end")
