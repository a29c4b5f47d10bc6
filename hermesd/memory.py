"""Process memory readings from /proc (Linux): resident set, its peak, and resetting the peak; and how
glibc gives freed memory back."""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since process start or the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS so the next peak reading covers one run; False if not allowed."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """Have glibc serve blocks of ``threshold`` bytes and more with mmap, so that freeing one gives its
    memory back to the kernel at once; False where the C library is not glibc.

    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, and from then
    on keeps freed blocks in its heap. A convert, which allocates and frees one stage's tensors after
    another, grew by about 160 MiB that way on TinyLlama's Q4_0 file and needed a 500 MiB cgroup; with a
    fixed 1 MiB threshold it converts in 400 MiB (BENCHMARKS.md, issue 12's convert memory). Fixing the
    threshold also stops the adjustment. Large blocks then cost a fresh mapping each time, which is
    why only the convert command asks for it, not the engine.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
