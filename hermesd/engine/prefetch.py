"""The loading agents: k loader threads read the next stages while the current one computes.

The compute thread drives everything: it asks for a stage (``acquire``), uses it, and gives it back
(``release``). After each of those calls the prefetcher tops up its queue: while fewer than ``depth``
loads are pending and the pool has room, the next stage in execution order is submitted to a loader.
Pool regions are always taken in execution order, so a tight pool cannot deadlock; a stage that is
requested out of order (a model that skips or repeats a module) is loaded on demand.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from hermesd.engine.bufferpool import Region, RingPool
from hermesd.engine.priority import lower_this_thread
from hermesd.engine.reader import StageReader


@dataclass
class LoadedStage:
    """A stage's tensors, the pool region they alias, and when its load ran (perf_counter seconds)."""

    name: str
    tensors: dict[str, torch.Tensor]
    region: Region
    bytes_read: int
    load_start: float
    load_end: float
    prefetched: bool
    cpu_s: float = 0.0  # CPU time the reading thread spent on it (syscalls, header check, views)


@dataclass
class _Pending:
    name: str
    region: Region
    future: Future


class Prefetcher:
    """Keeps up to ``depth`` loads of upcoming stages in flight on ``loaders`` threads."""

    def __init__(self, reader: StageReader, pool: RingPool, order: list[str], depth: int, loaders: int,
                 idle_priority: bool = False) -> None:
        self.reader = reader
        self.pool = pool
        self.order = list(order)
        self.depth = depth if self.order else 0
        self.loaders = max(1, loaders) if self.depth else 0
        self.idle_priority = idle_priority  # loaders on SCHED_IDLE (engine.priority)
        self.priority_applied: dict[str, bool] = {}  # what lower_this_thread achieved (filled by the loaders)
        self._executor = (
            ThreadPoolExecutor(max_workers=self.loaders, thread_name_prefix="hermesd-loader",
                               initializer=self._lower_priority if self.idle_priority else None)
            if self.depth > 0 else None
        )
        self._pending: deque[_Pending] = deque()
        self._draining: list[Future] = []  # discarded loads whose regions free when their reads end
        self._cursor = 0
        self._active = False
        self._wrap = False
        self.paused = False

    def _lower_priority(self) -> None:
        # Runs in each loader thread as it starts: compute keeps every core (see engine.priority).
        self.priority_applied = lower_this_thread()

    def start(self, wrap: bool) -> None:
        """Begin a run; with ``wrap`` the schedule continues into the next forward pass (generation)."""
        self._drain()
        self._active, self._wrap, self._cursor = True, wrap, 0
        self._top_up()

    def stop(self) -> None:
        """End a run: loads still queued are dropped; their regions free as their reads end."""
        self._active = False
        self._discard(len(self._pending))

    def close(self) -> None:
        self.stop()
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _drain(self) -> None:
        """Wait until every discarded read has ended, so the whole ring is free again."""
        wait(self._draining)
        self._draining.clear()

    def acquire(self, name: str) -> LoadedStage:
        """Stage ``name`` loaded: from the queue if it was prefetched, else read now."""
        position = next((i for i, p in enumerate(self._pending) if p.name == name), None)
        if position is None:
            if name in self.order:  # the schedule moved on (a skipped stage or a new pass): drop stale loads
                self._discard(len(self._pending))
            loaded = self._load_now(name)  # a shed resident stage leaves the schedule alone
            self._cursor = self.order.index(name) + 1 if name in self.order else self._cursor
        else:
            self._discard(position)
            pending = self._pending.popleft()
            try:
                loaded = pending.future.result()
            except BaseException:
                self._release_when_done(pending)  # an interrupt can arrive while the read still runs
                raise
        self._top_up()
        return loaded

    def release(self, loaded: LoadedStage) -> None:
        self.pool.release(loaded.region)
        self._top_up()

    def _top_up(self) -> None:
        if not self._active or self.paused or self._executor is None:
            return
        while len(self._pending) < self.depth:
            if self._cursor >= len(self.order):
                if not self._wrap:
                    return
                self._cursor = 0
            name = self.order[self._cursor]
            region = self.pool.try_acquire(self.reader.span(name))
            if region is None:
                return  # the pool is full: retried when a stage is released
            future = self._executor.submit(self._load, name, region, True)
            self._pending.append(_Pending(name, region, future))
            self._cursor += 1

    def _load(self, name: str, region: Region, prefetched: bool) -> LoadedStage:
        started, cpu = time.perf_counter(), time.thread_time()
        tensors, count = self.reader.read(name, region.view)
        return LoadedStage(name, tensors, region, count, started, time.perf_counter(), prefetched,
                           time.thread_time() - cpu)

    def _load_now(self, name: str) -> LoadedStage:
        region = self.pool.acquire_overdraft(self.reader.span(name))
        try:
            return self._load(name, region, prefetched=False)
        except BaseException:
            self.pool.release(region)
            raise

    def _discard(self, count: int) -> None:
        """Drop the first ``count`` pending loads (skipped or no longer needed stages)."""
        for _ in range(count):
            pending = self._pending.popleft()
            pending.future.cancel()
            self._release_when_done(pending)

    def _release_when_done(self, pending: _Pending) -> None:
        """Free a pending load's region, but never while a loader may still be writing into it."""
        self._draining.append(pending.future)
        pending.future.add_done_callback(lambda _: self.pool.release(pending.region))
