"""What load() does before the first run: build the skeleton while the ring's memory is faulted in.

The ring (the streamed stages' buffers) is fresh anonymous memory, and faulting it in is costly on a
VM whose host backs guest pages lazily (1.4-3.7 s of CPU per GB measured here), so it runs on
``cores`` threads while the caller's thread builds the skeleton, and load() takes about the longer
of the two. Resident stages are not read here at all: they are mapped, and read while the first
run goes (engine.resident).
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from hermesd.engine.bufferpool import prefault, round_up


@dataclass
class OpenStats:
    """Where load() spent its time (perf_counter seconds) and what it set up."""

    wall_s: float = 0.0
    skeleton_s: float = 0.0  # building the model without weights (caller's thread)
    ring_wait_s: float = 0.0  # then waiting for the ring's fault-in to finish
    map_s: float = 0.0  # mapping and binding the resident stages (no reads: the first run reads them)
    resident_bytes: int = 0  # mapped, read during the first run
    ring_bytes: int = 0
    fault_threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for people."""
        return (f"load() {self.wall_s:.3f} s: skeleton {self.skeleton_s:.3f} s, ring {self.ring_bytes / 1e9:.2f} GB "
                f"faulted in on {self.fault_threads} thread(s) ({self.ring_wait_s:.3f} s waited for it), "
                f"{self.resident_bytes / 1e9:.2f} GB resident mapped in {self.map_s:.3f} s "
                f"(read during the first run)")


class OpenJob:
    """The ring's memory of one load(), being faulted in on helper threads."""

    def __init__(self, ring_bytes: int, threads: int | None = None) -> None:
        self.stats = OpenStats(ring_bytes=ring_bytes)
        self.stats.fault_threads = threads or max(1, len(os.sched_getaffinity(0)))
        self._faults = ThreadPoolExecutor(self.stats.fault_threads, thread_name_prefix="hermesd-fault")
        try:
            self._ring = prefault(round_up(ring_bytes), self._faults) if ring_bytes else None
        except BaseException:
            self.close()
            raise

    def ring(self) -> mmap.mmap | None:
        """Wait for the ring's memory to be faulted in."""
        if self._ring is None:
            return None
        waited = time.perf_counter()
        memory = self._ring.result()
        self.stats.ring_wait_s = time.perf_counter() - waited
        return memory

    def close(self) -> None:
        """Stop the helper threads (waiting for jobs already running: they write into our mapping)."""
        self._faults.shutdown(wait=True, cancel_futures=True)
