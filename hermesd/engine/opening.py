"""What load() does before the first run, overlapped: fault memory in, read resident stages, build the skeleton.

Done one after another (as before), opening BERT-large with every stage resident took 4.5 s for 1.2 GB:
3.8 s faulting fresh memory in, 0.64 s of reads, and the skeleton. Those three need different things
(system CPU, the disk, the interpreter), so they run at once here:
- fault-in jobs on ``cores`` threads, resident buffers first in plan order, then the ring;
- one reader thread that reads each resident stage as soon as its buffer is faulted in (O_DIRECT:
  the disk writes the bytes while the thread sleeps);
- the caller's thread, which builds the skeleton meanwhile.
load() then takes about the longest of the three instead of their sum.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from hermesd.engine.bufferpool import prefault, round_up
from hermesd.engine.reader import StageReader


@dataclass
class OpenStats:
    """Where load() spent its time (perf_counter seconds) and what it read."""

    wall_s: float = 0.0
    skeleton_s: float = 0.0  # building the model without weights (caller's thread)
    read_s: float = 0.0  # reader thread: from its start until the last resident stage was read
    read_wait_s: float = 0.0  # of which waiting for buffers to be faulted in
    resident_bytes: int = 0
    ring_bytes: int = 0
    fault_threads: int = 0

    @property
    def read_gbps(self) -> float:
        """Resident bytes per second of the reader thread's time (fault waits included)."""
        return self.resident_bytes / self.read_s / 1e9 if self.read_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"read_gbps": self.read_gbps}

    def summary(self) -> str:
        """One line for people."""
        return (f"load() {self.wall_s:.3f} s: skeleton {self.skeleton_s:.3f} s, {self.resident_bytes / 1e9:.2f} GB "
                f"resident read in {self.read_s:.3f} s ({self.read_gbps:.2f} GB/s; {self.read_wait_s:.3f} s of it "
                f"waiting for memory faulted in on {self.fault_threads} thread(s)), "
                f"ring {self.ring_bytes / 1e9:.2f} GB")


@dataclass
class ResidentStage:
    memory: mmap.mmap
    tensors: dict[str, torch.Tensor]


class OpenJob:
    """The memory and reads of one load(), under way on helper threads."""

    def __init__(self, reader: StageReader, resident: list[str], ring_bytes: int, threads: int | None = None) -> None:
        self.stats = OpenStats(ring_bytes=ring_bytes)
        self.stats.fault_threads = threads or max(1, len(os.sched_getaffinity(0)))
        self._faults = ThreadPoolExecutor(self.stats.fault_threads, thread_name_prefix="hermesd-fault")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="hermesd-open")
        try:
            buffers = {name: prefault(reader.span(name), self._faults) for name in resident}
            self._ring = prefault(round_up(ring_bytes), self._faults) if ring_bytes else None
            self._resident: Future = self._reads.submit(self._read_all, reader, buffers)
        except BaseException:
            self.close()
            raise

    def _read_all(self, reader: StageReader, buffers: dict) -> dict[str, ResidentStage]:
        started = time.perf_counter()
        loaded = {}
        for name, pending in buffers.items():
            waited = time.perf_counter()
            memory = pending.result()
            self.stats.read_wait_s += time.perf_counter() - waited
            tensors, count = reader.read(name, memoryview(memory))
            loaded[name] = ResidentStage(memory, tensors)
            self.stats.resident_bytes += count
        self.stats.read_s = time.perf_counter() - started
        return loaded

    def resident(self) -> dict[str, ResidentStage]:
        """Wait for the resident stages: name -> its memory and tensor views (a read error re-raises)."""
        return self._resident.result()

    def ring(self) -> mmap.mmap | None:
        """Wait for the ring's memory to be faulted in."""
        return self._ring.result() if self._ring is not None else None

    def close(self) -> None:
        """Stop the helper threads (waiting for jobs already running: they write into our mappings)."""
        self._reads.shutdown(wait=True, cancel_futures=True)
        self._faults.shutdown(wait=True, cancel_futures=True)
