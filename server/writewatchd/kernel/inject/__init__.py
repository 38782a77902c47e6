"""Make an uncooperative process create a userfaultfd, and take it.

A userfaultfd acts on the memory of the process that created it, so the target itself has
to run ``userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)``. We make it do so with
ptrace, copy the new fd with ``pidfd_getfd`` and close the target's copy ("steal" mode,
docs/injection.md §1): afterwards the target's fd table is as before and the caller drives every
``UFFDIO_*`` ioctl itself, without stopping the target again.

How one injection runs:

1. *Before any stop*: read ``/proc/PID/status`` (refuse if already traced, strict seccomp,
   or non-dumpable for a non-root caller), open the pidfd and ``/proc/PID/mem``, find a
   ``0f 05`` (``syscall``) byte pair in the target's vDSO, choose a thread
   (:func:`.threads.choose_thread`), read its seccomp mode and, when a verdict for its filters is
   remembered, use it (a remembered refusal refuses here), and prepare the window's state.
2. ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` that one thread and wait, bounded by the deadline,
   for its ``PTRACE_EVENT_STOP``. Other threads keep running: nothing is written into the
   target's code or data.
3. Save the registers. Unless a verdict is remembered, dump the thread's seccomp filters and
   evaluate them for the two syscalls we will run (:mod:`..seccomp`); refuse, untouched,
   unless both would be allowed. If the thread is inside an rseq critical section (only
   possible when it was stopped in user mode, since the rseq ABI forbids syscalls inside
   one), move the saved RIP to its abort handler and clear ``rseq_cs``, exactly as the
   kernel would have done.
4. For each syscall set ``rip`` = gadget, ``rax`` = number, arguments, and ``orig_rax = -1``
   (so the kernel's restart logic leaves our registers alone), then single-step and read
   ``rax`` at the SIGTRAP after the gadget. Other signals that stop the thread meanwhile
   are recorded and suppressed.
5. Restore the registers. The last stop is a signal-delivery-stop inside ``get_signal()``,
   so a restored ``rax = -ERESTART*`` with the original ``orig_rax`` lets the interrupted
   syscall restart. ``PTRACE_DETACH``, re-delivering the first held signal with its
   siginfo (others by ``tgkill``).

Decisions:

* **Two implementations of the window, same rules.** Steps 2-5 (from ``PTRACE_INTERRUPT``
  to ``PTRACE_DETACH``) run in C when they can (``_window.c``, a small shared library called
  through ctypes, which keeps the GIL released; :class:`.window.CompiledWindow`), else in
  Python (:class:`.window.PythonWindow`); ``window`` / :data:`DEFAULT_WINDOW` choose. Every decision stays in
  Python outside the window: thread choice, refusals, seccomp evaluation (between the stop
  and the first change, in Python for both), error mapping; the C code only runs the
  same ptrace sequence with the same rseq fix-up, EINTR rewrite, signal holding and
  re-delivery, and EXITKILL scope. The C window is compiled on first use with ``cc`` into
  a private cache directory, keyed by the hash of the source (:mod:`._window` documents
  the build and its fallback: without a compiler the Python window runs, with one logged
  warning). Measured on this 2-vCPU VM, interleaved on the same targets, the C window
  stops a target for about 100-150 µs (median), the Python window about 1.4-2x that.
* **What the window's time is.** Three hand-overs between tracer and tracee (the stop and
  two single-steps), each a wake-up of the other task, often on a halted vCPU: about
  25-35 µs each; the syscalls themselves are about 1-3 µs each and the Python overhead
  of the C window about 5 µs. The C window's waits sleep in ``sigtimedwait`` until the
  SIGCHLD that a ptrace stop sends the tracer (the helper blocks SIGCHLD): spinning before,
  with pause or with sched_yield, measured no faster and worse in the tail. The Python
  window yields 50 times before that sleep, which measured about 40 µs faster there
  (:func:`.ptrace.wait_stop`). The tracer runs the window at nice -20
  (:func:`.window.prioritized`) because on busy CPUs each hand-over can wait for a time slice.
* **A helper process does the tracing.** Injections run in a long-lived child process of the
  caller (started lazily, one request at a time, fds passed back with SCM_RIGHTS). ptrace
  binds a tracee to the *thread* that attached, and a seized thread that will not stop
  (state D) cannot be detached at all: only the tracer's exit releases it. The helper
  exits in that case (the next request starts a new one), leaving the target untouched.
* **Daemon death inside the window is harmless**: the helper is a separate process, finishes
  the injection (restoring the target's registers), detaches, and exits when it finds the
  daemon's end of the socket closed. The target keeps running with its own registers and
  an unchanged fd table; the stolen uffd dies with the helper (nothing was registered).
* **Helper death inside the window kills the target.** ``PTRACE_O_EXITKILL`` is set only
  while the target holds foreign registers (from just before the first ``PTRACE_SETREGS``
  until ``PTRACE_DETACH``). A helper killed then takes the target with it (SIGKILL),
  never leaving it running with wrong registers or a pending single-step SIGTRAP; a helper
  killed before (seized, waiting for the stop) leaves the target unharmed. The helper
  blocks catchable termination signals and asks for ``oom_score_adj = -1000``. The same
  rule covers an injected syscall that does not return within 5 s (it cannot block, so
  the thread is wedged): the helper exits and the target dies rather than run on wrongly.
* **Deadlines.** ``deadline_s`` bounds the choice of a thread and the wait for its stop.
  Once stopped, each injected syscall has its own fixed bound, so a slow machine never
  abandons a thread that holds our registers.
* **Thread choice** (:func:`.threads.choose_thread`): a thread blocked in a restartable syscall first
  (read, futex, nanosleep, poll, wait...), then one running, then a group-stopped one,
  then one blocked elsewhere, socket calls last. Never a thread in D state, and never one
  blocked in a syscall that a ptrace stop turns into EINTR (``epoll_wait``, ``semop``,
  ``sigtimedwait``, ``io_getevents`` and their variants; signal(7)). Should such a thread
  be stopped anyway (it entered that syscall after we chose it), its ``-EINTR`` is
  rewritten to ``-ERESTARTNOHAND`` so the syscall restarts (or fails with EINTR after all
  if a real signal handler runs, as it would have).
* **Seccomp** is evaluated for ``userfaultfd(flags)`` and ``close(0)`` (the fd number is
  not known beforehand) with ``ip`` = the address after the gadget, against the chosen
  thread's own filters (they are per thread without TSYNC). The filter dump needs the
  thread stopped, so the first injection into a filtered thread pays for it inside the
  window; its verdict is remembered by (thread, start time, number of filters, gadget):
  filters can only be added, so the same count means the same filters.

The package's modules: :mod:`.threads` (which thread), :mod:`.attach` (the checks before any
stop, and an injection into a running process), :mod:`.window` (the two windows and the
seccomp cache), :mod:`.helper` (the helper process and its protocol, and the caller's
:func:`inject_userfaultfd`); spawning is :mod:`writewatchd.kernel.spawn`.
"""

from .attach import find_vdso_gadget
from .helper import DEFAULT_WINDOW, InjectionResult, inject_userfaultfd
from .threads import ThreadChoice, ThreadRank, choose_thread
from .window import Window

__all__ = [
    "DEFAULT_WINDOW",
    "InjectionResult",
    "ThreadChoice",
    "ThreadRank",
    "Window",
    "choose_thread",
    "find_vdso_gadget",
    "inject_userfaultfd",
]
