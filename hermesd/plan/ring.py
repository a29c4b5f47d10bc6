"""Ring arithmetic for stage buffers, without memory: where each stage lands, and whether a ring stalls.

The engine's pool (``hermesd.engine.bufferpool.RingPool``) hands out regions by exactly these rules;
the planner replays them to size a ring that never holds prefetch back.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from dataclasses import dataclass

PAGE = mmap.PAGESIZE


def round_up(size: int, multiple: int = PAGE) -> int:
    return -(-size // multiple) * multiple


@dataclass(eq=False)
class Region:
    """A page-aligned span of the ring holding one stage; ``view`` is what reads fill (empty unbacked)."""

    offset: int
    size: int
    view: memoryview
    free: bool = False
    overdraft: bool = False


class RingLayout:
    """Places regions in FIFO order in a ring of ``capacity`` bytes; bookkeeping only, no memory.

    A stage is placed at the ring's head, or wraps to its start when the tail end is too short; a
    release frees its region and space is reclaimed from the oldest region on.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = round_up(capacity) if capacity else 0
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
            region = Region(offset, size, self._view(offset, size))
            self._live.append(region)
            self._head = offset + size
            self._account(size)
            return region

    def acquire_overdraft(self, size: int) -> Region:
        """A region from the ring if it fits now, else one outside it (an on-demand load)."""
        region = self.try_acquire(size)
        if region is not None:
            return region
        with self._lock:
            self.overdrafts += 1
            self._account(round_up(size))
        return Region(0, round_up(size), self._overdraft_view(size), overdraft=True)

    def release(self, region: Region) -> None:
        with self._lock:
            self.in_use -= region.size
            region.free = True
            while self._live and self._live[0].free:  # reclaim from the oldest region on
                self._live.popleft()
            if not self._live:
                self._head = 0

    def _view(self, offset: int, size: int) -> memoryview:
        return memoryview(b"")

    def _overdraft_view(self, size: int) -> memoryview:
        return memoryview(b"")

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
    pool = RingLayout(capacity)
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
