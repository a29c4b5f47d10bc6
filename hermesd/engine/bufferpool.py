"""Memory for streamed stages: one pre-faulted arena used as a ring, plus on-demand overdrafts.

Measured here: O_DIRECT reads into freshly mapped memory run at ~0.6 GB/s and cost ~1.3 s of CPU per
GB in page faults, against ~2.5 GB/s into memory already faulted in (and ~3 GB/s on huge pages). Loader threads faulting pages
steal the cores compute needs. So the pool maps and faults its whole arena once, when the engine
loads, and never maps again while streaming.

Stages are loaded and released in execution order, so allocation is FIFO and a ring fits. A stage
is placed at the ring's head, or wraps to its start when the tail end is too short. A release frees
its region; space is reclaimed from the oldest region on. An out-of-order (on-demand) load gets a
separate buffer, mapped for that one read, so execution always moves on.
"""

from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import Executor, Future, wait

from hermesd.plan.ring import PAGE, Region, RingLayout, round_up

__all__ = ["PAGE", "Region", "RingPool", "Prefaulted", "drop_pages", "map_memory", "prefault", "round_up"]

FAULT_CHUNK = 32 << 20  # bytes per fault-in job: a multiple of the 2 MiB huge page, small enough to spread


def map_memory(size: int, populate: bool = True) -> mmap.mmap:
    """Anonymous, page-aligned memory on transparent huge pages where the kernel allows them.

    Huge pages matter for O_DIRECT: each read pins the pages it fills, and with 2 MiB pages that
    kernel work fell 8x (0.11 s to 0.014 s of system time per 3 GB read, measured here), time the
    loader threads would otherwise take from compute. ``populate`` faults every page in now (the
    kernel zeroes them) rather than in the middle of a streamed run.
    """
    memory = mmap.mmap(-1, max(size, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, or the pages are already small
    if populate:
        _fault_in(memory, 0, len(memory))
    return memory


def drop_pages(memory: mmap.mmap) -> None:
    """Give an anonymous mapping's pages back to the kernel now (``MADV_DONTNEED``; a later read sees
    zeros). For memory no tensor will read again: views of it may outlive their owner (a reference
    cycle, a caller's local), and the mapping would stay resident until the garbage collector ran."""
    try:
        memory.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):  # closed, or not Linux: freed with the mapping
        pass


def _fault_in(memory: mmap.mmap, start: int, length: int) -> None:
    """Fault pages [start, start + length) in by writing them. ctypes.memset releases the GIL, so several
    threads fault in parallel. Not MADV_POPULATE_WRITE: it holds the process's mmap lock for the whole
    range, and every allocation and O_DIRECT read of the other threads queued behind it (measured: the
    skeleton build went from 0.05 to 4.4 s)."""
    ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(memory)) + start, 0, length)


class Prefaulted:
    """Memory being faulted in on an executor's threads; ``result()`` waits and returns the mapping."""

    def __init__(self, memory: mmap.mmap, jobs: list[Future]) -> None:
        self.memory = memory
        self._jobs = jobs

    def result(self) -> mmap.mmap:
        wait(self._jobs)
        for job in self._jobs:
            job.result()  # re-raise a failure (none expected: the fallback is a memset)
        return self.memory


def prefault(size: int, executor: Executor) -> Prefaulted:
    """Map ``size`` bytes now and fault them in on ``executor`` in FAULT_CHUNK pieces, in order.

    Fresh memory is costly on a VM whose host backs guest pages lazily: measured here 2.5-3.5 s of
    system time per GB the first time, 0.15-0.4 s once the host holds the pages. load() overlaps
    this with its disk reads and the skeleton build, and spreads it over the cores.
    """
    memory = map_memory(size, populate=False)
    jobs = [executor.submit(_fault_in, memory, start, min(FAULT_CHUNK, len(memory) - start))
            for start in range(0, len(memory), FAULT_CHUNK)]
    return Prefaulted(memory, jobs)


class RingPool(RingLayout):
    """Hands out regions of one pre-faulted arena in FIFO order; never maps memory while streaming."""

    def __init__(self, capacity: int, arena: mmap.mmap | None = None) -> None:
        """``arena``: memory of at least ``capacity`` bytes, already faulted in (else mapped here)."""
        super().__init__(capacity)
        if arena is not None and len(arena) < self.capacity:
            raise ValueError(f"arena of {len(arena)} bytes for a ring of {self.capacity}")
        self._arena = (arena if arena is not None else map_memory(self.capacity)) if self.capacity else None
        self._memory = memoryview(self._arena) if self._arena is not None else None

    def _view(self, offset: int, size: int) -> memoryview:
        return self._memory[offset : offset + size]

    def close(self) -> None:
        """Return the arena's memory to the kernel; the pool is not used after this."""
        if self._arena is not None:
            drop_pages(self._arena)

    def _overdraft_view(self, size: int) -> memoryview:
        # A pool of no capacity (every stage resident) still serves on-demand loads of shed stages.
        return memoryview(map_memory(size, populate=False))
