"""A byte-capped pool of reusable, page-aligned buffers for stage weights.

Buffers are anonymous mmaps: page-aligned (as O_DIRECT needs), never zero-filled by us, and reused
from stage to stage, so streaming a model causes no allocation churn once the pool is warm. The cap is
the plan's bound on streamed bytes in memory; a request that does not fit waits for a release,
except an on-demand load, which may overdraw the cap so that execution always progresses.
"""

from __future__ import annotations

import mmap
import threading

PAGE = mmap.PAGESIZE


def round_up(size: int, multiple: int = PAGE) -> int:
    return -(-size // multiple) * multiple


class Buffer:
    """One reusable region; ``memory`` supports the buffer protocol (for preadv and frombuffer)."""

    __slots__ = ("memory", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.memory = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.memory.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults when a buffer is first filled


class BufferPool:
    """Hands out buffers of at least a requested size while the total stays under ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.allocated = 0
        self.high_water = 0
        self.buffers_created = 0
        self.overdrafts = 0
        self._free: list[Buffer] = []
        self._lock = threading.Lock()

    def try_acquire(self, size: int) -> Buffer | None:
        """A free buffer that fits, a new one if the cap allows, else None (caller retries later)."""
        size = round_up(size)
        with self._lock:
            fit = min((b for b in self._free if b.capacity >= size), key=lambda b: b.capacity, default=None)
            if fit is not None:
                self._free.remove(fit)
                return fit
            # Free buffers too small for this request are dropped, largest first, to make room.
            self._free.sort(key=lambda b: b.capacity)
            while self._free and self.allocated + size > self.capacity:
                self.allocated -= self._free.pop().capacity
            if self.allocated + size > self.capacity:
                return None
            return self._create(size)

    def acquire_overdraft(self, size: int) -> Buffer:
        """Like try_acquire, but allocate past the cap rather than fail (on-demand loads only)."""
        buffer = self.try_acquire(size)
        if buffer is not None:
            return buffer
        with self._lock:
            self.overdrafts += 1
            return self._create(round_up(size))

    def release(self, buffer: Buffer) -> None:
        with self._lock:
            if self.allocated > self.capacity:
                self.allocated -= buffer.capacity  # an overdraft is paid back at once
            else:
                self._free.append(buffer)

    def _create(self, size: int) -> Buffer:
        buffer = Buffer(size)
        self.allocated += size
        self.buffers_created += 1
        self.high_water = max(self.high_water, self.allocated)
        return buffer
