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
import threading
from collections import deque
from dataclasses import dataclass

PAGE = mmap.PAGESIZE


def round_up(size: int, multiple: int = PAGE) -> int:
    return -(-size // multiple) * multiple


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
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(memory)), 0, len(memory))
    return memory


@dataclass(eq=False)
class Region:
    """A page-aligned span of pool memory holding one stage; ``view`` is what reads fill."""

    offset: int
    size: int
    view: memoryview
    free: bool = False
    overdraft: bool = False


class RingPool:
    """Hands out regions of one pre-faulted arena in FIFO order; never maps memory while streaming.

    ``backed=False`` gives the same bookkeeping without memory, for plan-time simulation.
    """

    def __init__(self, capacity: int, backed: bool = True) -> None:
        self.capacity = round_up(capacity) if capacity else 0
        self.backed = backed
        self._arena = map_memory(self.capacity) if backed and self.capacity else None
        self._view = memoryview(self._arena) if self._arena is not None else None
        self._live: deque[Region] = deque()
        self._head = 0
        self._lock = threading.Lock()
        self.in_use = 0
        self.high_water = 0
        self.overdrafts = 0

    def try_acquire(self, size: int) -> Region | None:
        """A region of ``size`` bytes at the ring's head, or None while the ring is too full."""
        size = round_up(size)
        with self._lock:
            offset = self._place(size)
            if offset is None:
                return None
            view = self._view[offset : offset + size] if self._view is not None else memoryview(b"")
            region = Region(offset, size, view)
            self._live.append(region)
            self._head = offset + size
            self._account(size)
            return region

    def acquire_overdraft(self, size: int) -> Region:
        """A region from the ring if it fits now, else a separately mapped one (on-demand loads)."""
        region = self.try_acquire(size)
        if region is not None:
            return region
        with self._lock:
            self.overdrafts += 1
            self._account(round_up(size))
        # A pool of no capacity (every stage resident) still serves on-demand loads of shed stages.
        view = memoryview(map_memory(size, populate=False)) if self.backed else memoryview(b"")
        return Region(0, round_up(size), view, overdraft=True)

    def release(self, region: Region) -> None:
        with self._lock:
            self.in_use -= region.size
            region.free = True
            while self._live and self._live[0].free:  # reclaim from the oldest region on
                self._live.popleft()
            if not self._live:
                self._head = 0

    def _place(self, size: int) -> int | None:
        """Offset where ``size`` contiguous free bytes start at the ring's head, or None."""
        if size > self.capacity:
            return None
        if not self._live:
            return 0
        tail, head = self._live[0].offset, self._head
        if head > tail:  # in use: [tail, head); free: [head, capacity) and [0, tail)
            if head + size <= self.capacity:
                return head
            return 0 if size <= tail else None
        # head <= tail: in use wraps around the end; free: [head, tail) (empty when head == tail)
        return head if head + size <= tail else None

    def _account(self, size: int) -> None:
        self.in_use += size
        self.high_water = max(self.high_water, self.in_use)


def ring_stalls(sizes: list[int], depth: int, capacity: int, passes: int = 2) -> int:
    """Times a ring of ``capacity`` bytes would hold the prefetcher back while streaming ``sizes``
    cyclically with ``depth`` loads ahead: a plan-time replay of Prefetcher's top-up rule."""
    pool = RingPool(capacity, backed=False)
    order = [round_up(size) for size in sizes] * passes
    pending: deque[Region] = deque()
    cursor = 0

    def top_up() -> bool:
        nonlocal cursor
        while len(pending) < depth and cursor < len(order):
            region = pool.try_acquire(order[cursor])
            if region is None:
                return False
            pending.append(region)
            cursor += 1
        return True

    stalls = 0 if top_up() else 1
    for index in range(len(order)):
        if pending:
            held = pending.popleft()
        else:  # nothing was in flight: an on-demand load
            held, cursor = pool.acquire_overdraft(order[index]), index + 1
            stalls += depth > 0
        stalls += not top_up()  # could not keep `depth` loads going while this stage computes
        pool.release(held)
        top_up()
    return stalls


def smallest_stall_free_ring(sizes: list[int], depth: int, lower: int, upper: int) -> int:
    """The smallest capacity in [lower, upper] whose ring never stalls (upper if none does)."""
    if depth == 0 or ring_stalls(sizes, depth, lower) == 0:
        return lower
    low, high = lower, upper
    while high - low > PAGE:
        middle = round_up((low + high) // 2)
        if ring_stalls(sizes, depth, middle) == 0:
            high = middle
        else:
            low = middle
    return high
