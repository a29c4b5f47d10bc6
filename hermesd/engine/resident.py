"""The plan's resident stages: read while the first run goes, not in load().

load() only marks the resident stages (their hooks leave them bound) and queues their first reads on
one thread, in execution order: fault the stage's own memory in (anonymous, on huge pages), read it
with the reader, return its tensors. A resident stage's first use waits for its own read, binds the
tensors (``StreamRuntime.pending``), and that run's stats count it as the stage's one load. So a
one-shot run starts computing as soon as its first stage is in memory, instead of after every
resident stage is: on BERT-large's 768 MiB plan, load() had spent 0.4-0.7 s on those reads and on
faulting their memory in.

Tried first and dropped: resident stages as mappings of the store's files (no zeroing, no copy). On
this VM a disk-filled page still costs its first CPU access (~1 s/GB), and GPT-2-XL's Conv1D and LM-head
products over those pages stayed 15-25 % slower than over anonymous huge pages (load+run 5.17 s
against 4.24 s in one A/B run), so the stages keep their own memory.
"""

from __future__ import annotations

import mmap
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from hermesd.engine.bufferpool import drop_pages, map_memory
from hermesd.engine.reader import StageReader
from hermesd.engine.runtime import StreamRuntime


@dataclass
class FirstRead:
    """A resident stage read into its own memory (perf_counter seconds; CPU time of the reading thread)."""

    tensors: dict[str, torch.Tensor]
    bytes_read: int
    load_start: float
    load_end: float
    cpu_s: float


class ResidentSet:
    """Resident stages in memory of their own; their first reads run on a thread of their own."""

    def __init__(self, reader: StageReader, runtime: StreamRuntime, names: list[str]) -> None:
        self._reader = reader
        self._runtime = runtime
        self._names = list(names)
        self._memory: dict[str, mmap.mmap] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hermesd-resident")
        for name in names:
            runtime.resident.add(name)  # its hooks let it be; bound when its first read is waited for
            runtime.pending[name] = self._executor.submit(self._first_read, name)

    @property
    def names(self) -> list[str]:
        """Stages held now or being read (the plan's resident set, less any shed)."""
        return list(self._names)

    @property
    def planned_bytes(self) -> int:
        return sum(self._reader.read_bytes(name) for name in self._names)

    def _first_read(self, name: str) -> FirstRead:
        started, cpu = time.perf_counter(), time.thread_time()
        memory = map_memory(self._reader.span(name))  # faulted in here, off the compute threads
        self._memory[name] = memory
        tensors, count = self._reader.read(name, memoryview(memory))
        return FirstRead(tensors, count, started, time.perf_counter(), time.thread_time() - cpu)

    def wait(self) -> None:
        """Block until every resident stage is read and bound; runs then count no loads for them.
        Call between runs. A corrupt or unreadable file raises here."""
        for name in self._names:
            if name in self._runtime.pending:
                self._runtime.settle_first_read(name)

    def shed(self) -> int:
        """Release every resident stage's memory; they load on demand until ``restore``. Returns how many."""
        names, self._names = self._names, []
        for name in names:
            self._forget_pending(name)
            self._runtime.unpin(name)
            memory = self._memory.pop(name, None)
            if memory is not None:
                drop_pages(memory)
        return len(names)

    def restore(self, names: list[str]) -> int:
        """Read the stages of ``names`` not held now back into memory and bind them; returns how many."""
        missing = [name for name in names if name not in self._names]
        for name in missing:
            memory = map_memory(self._reader.span(name))
            tensors, _ = self._reader.read(name, memoryview(memory))
            self._runtime.pin(name, tensors)
            self._memory[name] = memory
            self._names.append(name)
        return len(missing)

    def close(self) -> None:
        """Stop the first reads and give every stage's memory back to the kernel now."""
        for name in self._names:
            future = self._runtime.pending.pop(name, None)
            if future is not None:
                future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for memory in self._memory.values():
            drop_pages(memory)
        self._memory.clear()
        self._names = []

    def _forget_pending(self, name: str) -> None:
        future: Future | None = self._runtime.pending.pop(name, None)
        if future is not None and not future.cancel():
            wait([future])  # a read under way finishes before its memory is dropped
