"""Loader threads yield the CPU to compute: SCHED_IDLE and the lowest best-effort I/O priority.

Measured on BERT-large (1.2 GB streamed per forward, 2 cores): a loader thread spends 0.02-0.06 s of
CPU per GB (open, fstat, one preadv per 64 MiB, header check); O_DIRECT moves the bytes by DMA while
the thread sleeps. Its cost to compute is not that CPU but where it lands: torch runs one OpenMP
thread per core, and a loader that wakes on a busy core preempts one of them, so the whole parallel
region waits at its barrier. Under SCHED_IDLE the kernel runs a loader only on a core with nothing
else to do, which compute threads leave at every barrier and between stages; the loader only ever
needs a few microseconds to queue its next read.

The price: an idle loader also yields to every other process, and measured on a loaded machine its
reads took 2.5-3.5x longer (load time per stage 0.74 -> 1.9-2.9 s for 1.2 GB). That is free while
compute is the bound (a load has a whole stage's compute to finish in) and a direct loss when the disk
is, so the planner asks for "idle" only on plans it predicts compute-bound with room to spare.

The I/O class stays best-effort (an idle class would let any other process's reads starve ours); its
level 7 is the lowest in that class. Schedulers that ignore levels (mq-deadline, none) leave reads
as they were. Everything here degrades silently: a kernel or sandbox that refuses keeps defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

IOPRIO_WHO_PROCESS = 1  # with who=0: the calling thread
IOPRIO_CLASS_BE = 2
IOPRIO_CLASS_SHIFT = 13
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}

# The plan decides (``Plan.loader_priority``); this variable, "idle" or "normal", overrides it (benchmarks).
PRIORITY_ENV = "HERMESD_LOADER_PRIORITY"
PRIORITIES = ("idle", "normal")


def effective_priority(planned: str) -> str:
    """The plan's loader priority, unless ``HERMESD_LOADER_PRIORITY`` names another."""
    forced = os.environ.get(PRIORITY_ENV, "").strip().lower()
    if forced in PRIORITIES:
        return forced
    return planned if planned in PRIORITIES else "normal"


def lower_this_thread() -> dict[str, bool]:
    """Put the calling thread on SCHED_IDLE and best-effort I/O level 7; returns what took effect."""
    return {"sched_idle": _sched_idle(), "ioprio": _ioprio_lowest_best_effort()}


def _sched_idle() -> bool:
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread on Linux
    except (OSError, AttributeError):
        return False
    return True


def _ioprio_lowest_best_effort() -> bool:
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7
        return libc.syscall(number, IOPRIO_WHO_PROCESS, 0, value) == 0
    except (OSError, AttributeError):
        return False


def current_policy() -> int | None:
    """The calling thread's scheduling policy (os.SCHED_*), None where unknown."""
    try:
        return os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return None
