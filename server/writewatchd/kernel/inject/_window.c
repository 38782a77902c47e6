/* The stop window of a userfaultfd injection, in C (see inject.py for the design).
 *
 * Python decides everything before the stop (thread, gadget, pidfd, seccomp mode) and
 * everything after a refusal; these functions only run the ptrace sequence between
 * PTRACE_INTERRUPT and PTRACE_DETACH, with the same rules as the Python window:
 *
 *   ww_stop     PTRACE_INTERRUPT, wait for the stop (bounded by stop_deadline_ns), GETREGS.
 *   ww_save     GETREGS only, for a thread that is already stopped (spawn).
 *   ww_steal    EXITKILL on, rseq fix-up, EINTR-to-restart rewrite, inject userfaultfd,
 *               pidfd_getfd, inject close (each injected syscall bounded by step_limit_ns).
 *   ww_release  restore the registers, re-deliver held signals, PTRACE_DETACH.
 *
 * Between the calls the thread stays stopped, so Python can dump and evaluate seccomp
 * filters, pause (tests) or hand the fd over (spawn) there. Called through ctypes, which
 * releases the GIL for each call.
 *
 * Waiting for a stop checks waitpid(WNOHANG), then sleeps in sigtimedwait() for the SIGCHLD
 * that every ptrace stop sends the tracer (SIGCHLD is blocked in the calling thread for the
 * duration of each call, so one sent before the sleep stays pending and ends it at once).
 * No spinning: the tracee often runs on our CPU, and polling for up to 100 µs before
 * sleeping measured no faster.
 * Each sleep is capped at 1 ms, so a SIGCHLD lost to another thread or to an ignoring
 * disposition costs time, never correctness.
 *
 * One difference from the Python window: signals held in the window are kept up to
 * WW_MAX_HELD (64; only the first keeps its siginfo in either window). More than that many
 * signals inside a window of a fraction of a millisecond only comes from a flood of
 * real-time signals, and the excess is dropped rather than re-sent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PTRACE_SETOPTIONS 0x4200
#define PTRACE_GETSIGINFO 0x4202
#define PTRACE_SETSIGINFO 0x4203
#define PTRACE_INTERRUPT 0x4207
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#define PTRACE_SINGLESTEP 9
#define PTRACE_GETREGS 12
#define PTRACE_SETREGS 13
#define PTRACE_DETACH 17
#define PTRACE_O_EXITKILL (1 << 20)
#define PTRACE_EVENT_STOP 128

#define NR_CLOSE 3
#define NR_USERFAULTFD 323
#define NR_PIDFD_GETFD 438
#define ERESTARTNOHAND 514
#define WW_MAX_HELD 64
#define WW_WAIT_CAP_NS 1000000LL

enum ww_result { WW_OK = 0, WW_ERROR = 1, WW_GONE = 2, WW_TIMEOUT = 3, WW_STUCK = 4 };
/* Which call failed (WW_ERROR): shown in the Python error message. */
enum ww_call {
    WW_CALL_NONE, WW_CALL_INTERRUPT, WW_CALL_WAIT, WW_CALL_GETREGS, WW_CALL_SETREGS, WW_CALL_SETOPTIONS,
    WW_CALL_RSEQ, WW_CALL_SINGLESTEP, WW_CALL_GETSIGINFO, WW_CALL_SETSIGINFO, WW_CALL_DETACH, WW_CALL_MEM,
};

/* x86_64 struct user_regs_struct, by index. */
enum { R_R10 = 7, R_R9 = 8, R_R8 = 9, R_RAX = 10, R_RDX = 12, R_RSI = 13, R_RDI = 14, R_ORIG_RAX = 15, R_RIP = 16 };
#define N_REGS 27

/* Shared with Python (inject.py, _WindowState): keep both layouts identical. */
struct ww_window {
    /* Inputs. */
    int32_t pid, tid, pidfd, mem_fd;
    uint64_t gadget, uffd_flags;
    int64_t stop_deadline_ns; /* CLOCK_MONOTONIC */
    int64_t step_limit_ns;
    int64_t pause_ns; /* test only: sleep after the injected userfaultfd */
    int32_t n_eintr_prone;
    int32_t eintr_prone[31]; /* syscalls that a ptrace stop fails with EINTR */
    /* State and results. */
    int32_t status;       /* last waitpid status */
    int32_t stopped;      /* the thread sits in a ptrace stop */
    int32_t armed;        /* EXITKILL set, registers must be restored */
    int32_t target_fd;    /* the target's uffd, or -errno of the injected userfaultfd */
    int32_t stolen_fd;    /* our copy, or -errno of pidfd_getfd (-1: not tried) */
    int32_t close_result; /* result of the injected close */
    int32_t failed_call;  /* enum ww_call */
    int32_t failed_errno;
    int32_t n_held;       /* signals held in the window (at most WW_MAX_HELD kept) */
    int32_t held[WW_MAX_HELD];
    uint8_t first_siginfo[128];
    int64_t interrupt_ns, detach_ns;
    uint64_t saved[N_REGS], restored[N_REGS];
};

/* Python checks its mirror of the struct against this before the first call. */
size_t ww_size(void) {
    return sizeof(struct ww_window);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long pt(long request, pid_t tid, unsigned long addr, unsigned long data) {
    long r = syscall(SYS_ptrace, request, tid, addr, data);
    return r == -1 ? -errno : r;
}

static int fail(struct ww_window *w, int call, long negative_errno) {
    w->failed_call = call;
    w->failed_errno = (int32_t)-negative_errno;
    return WW_ERROR;
}

/* 1: w->status holds a new status; 0: deadline passed; <0: -errno of waitpid. */
static int wait_tracee(struct ww_window *w, int64_t deadline_ns) {
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    for (;;) {
        int status;
        pid_t got = waitpid(w->tid, &status, WNOHANG | __WALL);
        if (got > 0) {
            w->status = status;
            return 1;
        }
        if (got < 0) return -errno;
        int64_t t = now_ns();
        if (t >= deadline_ns) return 0;
        int64_t left = deadline_ns - t < WW_WAIT_CAP_NS ? deadline_ns - t : WW_WAIT_CAP_NS;
        struct timespec ts = {.tv_sec = left / 1000000000LL, .tv_nsec = left % 1000000000LL};
        sigtimedwait(&chld, NULL, &ts);
    }
}

/* SIGCHLD blocked for the duration of one call, so that sigtimedwait() receives it. */
static void block_sigchld(sigset_t *old) {
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    pthread_sigmask(SIG_BLOCK, &chld, old);
}

static void restore_mask(const sigset_t *old) {
    pthread_sigmask(SIG_SETMASK, old, NULL);
}

int ww_save(struct ww_window *w) {
    long r = pt(PTRACE_GETREGS, w->tid, 0, (unsigned long)w->saved);
    if (r < 0) return fail(w, WW_CALL_GETREGS, r);
    memcpy(w->restored, w->saved, sizeof w->saved);
    w->stopped = 1;
    return WW_OK;
}

int ww_stop(struct ww_window *w) {
    sigset_t old;
    block_sigchld(&old);
    int result;
    w->interrupt_ns = now_ns();
    long r = pt(PTRACE_INTERRUPT, w->tid, 0, 0);
    if (r < 0) {
        result = fail(w, WW_CALL_INTERRUPT, r);
    } else {
        int waited = wait_tracee(w, w->stop_deadline_ns);
        if (waited < 0)
            result = fail(w, WW_CALL_WAIT, waited);
        else if (waited == 0)
            result = WW_TIMEOUT;
        else if (WIFEXITED(w->status) || WIFSIGNALED(w->status))
            result = WW_GONE;
        else
            result = ww_save(w);
    }
    restore_mask(&old);
    return result;
}

static int is_eintr_prone(const struct ww_window *w, int64_t nr) {
    for (int i = 0; i < w->n_eintr_prone; i++)
        if (w->eintr_prone[i] == nr) return 1;
    return 0;
}

/* The thread stopped inside an rseq critical section: take the abort the kernel owes it. */
static int fix_rseq(struct ww_window *w) {
    /* A thread stopped in a syscall is outside any critical section (the rseq ABI forbids
     * syscalls inside one), so its rseq area need not be read. */
    if ((int64_t)w->saved[R_ORIG_RAX] >= 0) return WW_OK;
    struct {
        uint64_t rseq_abi_pointer;
        uint32_t rseq_abi_size, signature, flags, pad;
    } conf = {0};
    long r = pt(PTRACE_GET_RSEQ_CONFIGURATION, w->tid, sizeof conf, (unsigned long)&conf);
    if (r == -EIO || (r >= 0 && !conf.rseq_abi_pointer)) return WW_OK;
    if (r < 0) return fail(w, WW_CALL_RSEQ, r);
    uint64_t rseq_cs_field = conf.rseq_abi_pointer + 8, cs_address;
    if (pread(w->mem_fd, &cs_address, 8, (off_t)rseq_cs_field) != 8 || !cs_address) return WW_OK;
    struct {
        uint32_t version, flags;
        uint64_t start_ip, post_commit_offset, abort_ip;
    } cs;
    if (pread(w->mem_fd, &cs, sizeof cs, (off_t)cs_address) != (ssize_t)sizeof cs) return WW_OK;
    uint64_t rip = w->saved[R_RIP];
    if (!(cs.start_ip <= rip && rip < cs.start_ip + cs.post_commit_offset)) return WW_OK;
    uint32_t signature;
    if (pread(w->mem_fd, &signature, 4, (off_t)(cs.abort_ip - 4)) != 4) return WW_OK;
    if (signature != conf.signature) return WW_OK;
    w->restored[R_RIP] = cs.abort_ip;
    uint64_t zero = 0;
    if (pwrite(w->mem_fd, &zero, 8, (off_t)rseq_cs_field) != 8) return fail(w, WW_CALL_MEM, -errno);
    return WW_OK;
}

static int arm(struct ww_window *w) {
    long r = pt(PTRACE_SETOPTIONS, w->tid, 0, PTRACE_O_EXITKILL);
    if (r < 0) return fail(w, WW_CALL_SETOPTIONS, r);
    w->armed = 1;
    int result = fix_rseq(w);
    if (result != WW_OK) return result;
    int interrupted = (w->status >> 16) != 0 && WIFSTOPPED(w->status) && WSTOPSIG(w->status) == SIGTRAP;
    if (interrupted && is_eintr_prone(w, (int64_t)w->saved[R_ORIG_RAX]) && (int64_t)w->saved[R_RAX] == -EINTR)
        w->restored[R_RAX] = (uint64_t)-ERESTARTNOHAND;
    return WW_OK;
}

/* Run syscall nr in the thread; its result goes to *result. */
static int run(struct ww_window *w, long nr, uint64_t arg0, long *result) {
    uint64_t regs[N_REGS];
    memcpy(regs, w->saved, sizeof regs);
    regs[R_RIP] = w->gadget;
    regs[R_RAX] = (uint64_t)nr;
    regs[R_ORIG_RAX] = (uint64_t)-1;
    regs[R_RDI] = arg0;
    long r = pt(PTRACE_SETREGS, w->tid, 0, (unsigned long)regs);
    if (r < 0) return fail(w, WW_CALL_SETREGS, r);
    int64_t deadline_ns = now_ns() + w->step_limit_ns;
    for (;;) {
        r = pt(PTRACE_SINGLESTEP, w->tid, 0, 0);
        if (r < 0) return fail(w, WW_CALL_SINGLESTEP, r);
        w->stopped = 0;
        int waited = wait_tracee(w, deadline_ns);
        if (waited < 0) return fail(w, WW_CALL_WAIT, waited);
        if (waited == 0) return WW_STUCK;
        w->stopped = 1;
        if (WIFEXITED(w->status) || WIFSIGNALED(w->status)) return WW_GONE;
        if (w->status >> 16) continue; /* a group-stop or our interrupt's trap: nothing to hold */
        int sig = WSTOPSIG(w->status);
        if (sig != SIGTRAP) {
            if (w->n_held == 0) {
                r = pt(PTRACE_GETSIGINFO, w->tid, 0, (unsigned long)w->first_siginfo);
                if (r < 0) return fail(w, WW_CALL_GETSIGINFO, r);
            }
            if (w->n_held < WW_MAX_HELD) w->held[w->n_held++] = sig;
        }
        r = pt(PTRACE_GETREGS, w->tid, 0, (unsigned long)regs);
        if (r < 0) return fail(w, WW_CALL_GETREGS, r);
        if (regs[R_RIP] == w->gadget + 2) {
            *result = (long)regs[R_RAX];
            return WW_OK;
        }
    }
}

int ww_steal(struct ww_window *w) {
    sigset_t old;
    block_sigchld(&old);
    long value;
    int result = arm(w);
    if (result == WW_OK) result = run(w, NR_USERFAULTFD, w->uffd_flags, &value);
    if (result == WW_OK) {
        w->target_fd = (int32_t)value;
        if (w->pause_ns) {
            struct timespec ts = {.tv_sec = w->pause_ns / 1000000000LL, .tv_nsec = w->pause_ns % 1000000000LL};
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
            }
        }
    }
    if (result == WW_OK && w->target_fd >= 0) {
        long fd = syscall(NR_PIDFD_GETFD, w->pidfd, w->target_fd, 0);
        w->stolen_fd = fd < 0 ? -errno : (int32_t)fd;
        result = run(w, NR_CLOSE, (uint64_t)w->target_fd, &value);
        if (result == WW_OK) w->close_result = (int32_t)value;
    }
    restore_mask(&old);
    return result;
}

int ww_release(struct ww_window *w) {
    if (!w->stopped) return WW_STUCK;
    long r;
    if (w->armed) {
        r = pt(PTRACE_SETREGS, w->tid, 0, (unsigned long)w->restored);
        if (r < 0) return fail(w, WW_CALL_SETREGS, r);
    }
    int sig = 0;
    if (w->n_held) {
        sig = w->held[0];
        r = pt(PTRACE_SETSIGINFO, w->tid, 0, (unsigned long)w->first_siginfo);
        if (r < 0) return fail(w, WW_CALL_SETSIGINFO, r);
        for (int i = 1; i < w->n_held; i++) syscall(SYS_tgkill, w->pid, w->tid, w->held[i]);
    }
    r = pt(PTRACE_DETACH, w->tid, 0, (unsigned long)sig);
    w->detach_ns = now_ns();
    if (r < 0) return fail(w, WW_CALL_DETACH, r);
    return WW_OK;
}
