"""The plan's resident stages: mapped and bound at load(), read into memory while the first run goes.

load() maps each resident stage's files and binds tensor views of the mappings (no reads), then one
thread populates the stages in execution order. A resident stage's first use waits for its own
populate (``StreamRuntime.pending``), and that run's stats count it as the stage's one load. So a
one-shot run starts computing as soon as its first stage is in memory, instead of after every
resident stage is (on BERT-large's 768 MiB plan, 0.4-0.7 s of load() went to those reads and to
faulting fresh memory in).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

from hermesd.engine.mapped import MappedStage
from hermesd.engine.reader import StageReader
from hermesd.engine.runtime import StreamRuntime


class ResidentSet:
    """Resident stages held as file mappings; their first reads run on a thread of their own."""

    def __init__(self, reader: StageReader, runtime: StreamRuntime, names: list[str]) -> None:
        self._reader = reader
        self._runtime = runtime
        self._stages: dict[str, MappedStage] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hermesd-resident")
        try:
            for name in names:  # map and bind every stage first: nothing is read yet
                self._stages[name] = stage = reader.map(name)
                runtime.pin(name, stage.tensors)
            for name in names:
                runtime.pending[name] = self._executor.submit(self._stages[name].populate)
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        """Stages held now (the plan's resident set, less any shed)."""
        return list(self._stages)

    @property
    def mapped_bytes(self) -> int:
        return sum(stage.nbytes for stage in self._stages.values())

    def wait(self) -> None:
        """Block until every resident stage is in memory; runs then count no loads for them."""
        futures = {name: self._runtime.pending[name] for name in self._stages if name in self._runtime.pending}
        wait(futures.values())
        for name, future in futures.items():
            future.result()  # a corrupt or unreadable file raises here
            self._runtime.pending.pop(name, None)

    def shed(self) -> int:
        """Release every resident stage's memory; they load on demand until ``restore``. Returns how many."""
        names = list(self._stages)
        for name in names:
            self._forget_pending(name)
            self._runtime.unpin(name)
            self._stages.pop(name).drop()
        return len(names)

    def restore(self, names: list[str]) -> int:
        """Map, read and bind the stages of ``names`` not held now; returns how many were loaded."""
        missing = [name for name in names if name not in self._stages]
        for name in missing:
            stage = self._reader.map(name)
            stage.populate()
            self._runtime.pin(name, stage.tensors)
            self._stages[name] = stage
        return len(missing)

    def close(self) -> None:
        """Stop the first reads and give every stage's pages back to the kernel now."""
        for name in list(self._runtime.pending):
            if name in self._stages:
                self._runtime.pending.pop(name).cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for stage in self._stages.values():
            stage.drop()
        self._stages.clear()

    def _forget_pending(self, name: str) -> None:
        future: Future | None = self._runtime.pending.pop(name, None)
        if future is not None and not future.cancel():
            wait([future])  # a populate under way finishes before its pages are dropped
