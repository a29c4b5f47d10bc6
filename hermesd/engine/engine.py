"""The Execution Engine: a store opened under a plan, as a transformers model that streams its weights."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hermesd.engine.bufferpool import RingPool
from hermesd.engine.opening import OpenJob, OpenStats
from hermesd.engine.prefetch import Prefetcher
from hermesd.engine.priority import effective_priority
from hermesd.engine.reader import StageReader
from hermesd.engine.resident import ResidentSet
from hermesd.engine.runstats import RunStats
from hermesd.engine.runtime import StreamRuntime
from hermesd.errors import TaskError
from hermesd.plan.budget import Plan
from hermesd.store.manifest import Manifest
from hermesd.store.quantized import manifest_metas, quantize_skeleton
from hermesd.store.stages import build_skeleton, config_from_dict


class Engine:
    """A model loaded from a store. ``model`` is the transformers model; ``stats`` its last run.

    Call ``engine.model(...)`` or ``engine.model.generate(...)`` as with any transformers model;
    stages stream from disk under the plan. Use as a context manager, or call ``close()``.
    """

    def __init__(self, store_dir: Path, manifest: Manifest, model: torch.nn.Module, plan: Plan,
                 reader: StageReader, runtime: StreamRuntime) -> None:
        self.store_dir = store_dir
        self.manifest = manifest
        self.model = model
        self.plan = plan
        self.reader = reader
        self._runtime = runtime
        # Empty until open() maps the plan's set: mapping can fail, and close() must work on the engine then.
        self._resident = ResidentSet(reader, runtime, [])
        self._tokenizer = None
        self._image_processor = None
        self.max_input_tokens: int | None = None  # set by a server: tasks refuse longer inputs (the plan's size)
        self.open_stats = OpenStats()  # where load() spent its time (set by open)

    @property
    def stats(self) -> RunStats:
        """Statistics of the last completed run (a forward call or a whole generate call)."""
        return self._runtime.last_stats

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        """One run over several ``model(...)`` calls (a decode loop of one's own, as ``generate`` is one
        run): read-ahead carries on from each call into the next; ``live_stats`` covers it so far."""
        began = self._runtime.begin_span()
        try:
            yield
        finally:
            if began:
                self._runtime.end_span()

    def live_stats(self) -> RunStats:
        """Statistics of the run under way (``span``) so far."""
        return self._runtime.live_stats()

    def set_checkpoint(self, checkpoint: Callable[[str], None] | None) -> None:
        """Call ``checkpoint(stage_name)`` before each stage of each run (None removes it).

        An exception raised there ends the run cleanly; the daemon uses it for cancels, deadlines and
        watchdog pauses between stages.
        """
        self._runtime.checkpoint = checkpoint

    @property
    def resident_now(self) -> list[str]:
        """Stages held in memory right now (the plan's resident set, less any shed)."""
        return sorted(self._resident.names)

    @property
    def shed_bytes(self) -> int:
        """Bytes of the plan's resident stages not in memory now (what ``restore_resident`` reads back)."""
        held = set(self._resident.names)
        return sum(self.reader.span(name) for name in self.plan.resident if name not in held)

    def wait_resident(self) -> None:
        """Block until the resident stages' first reads are done (load() returns before them: the first
        run waits for each as it needs it). For measurements that must not count those reads."""
        self._resident.wait()

    def shed_resident(self) -> int:
        """Release every resident stage's memory; they load on demand until ``restore_resident``.

        Call between stages or runs (the daemon's checkpoint). Returns the number of stages released.
        """
        return self._resident.shed()

    def restore_resident(self) -> int:
        """Read the plan's resident stages back into memory; returns how many were loaded."""
        return self._resident.restore(list(self.plan.resident))

    def pause_prefetch(self, paused: bool) -> None:
        """With ``paused`` no new read-ahead starts: stages load on demand (k drops to 0) until resumed."""
        self._runtime.prefetcher.paused = paused

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.store_dir, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise TaskError(f"{self.store_dir} has no usable tokenizer ({exc}); pass token ids") from None
        return self._tokenizer

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.store_dir, local_files_only=True)
        return self._image_processor

    def close(self) -> None:
        """Stop the loader threads and drop the hooks; the model keeps only meta weights.

        The ring and the resident stages' memory go back to the kernel here, not when the last
        reference to this engine goes: a caller's variable or a reference cycle kept 300 MiB of
        GPT-2-XL's ring resident into the profiler's next measured pass (counted as 244 MiB of
        "peak slack", which then refused the 1 GiB budget the model runs in)."""
        self._runtime.prefetcher.close()
        self._runtime.detach()
        self._runtime.prefetcher.pool.close()
        self._resident.close()

    @classmethod
    def open(cls, store_dir: str | os.PathLike[str], plan: Plan, direct_io: bool | None = None) -> "Engine":
        """Open a store under ``plan`` (decided by ``hermesd.planning.resolve``): build the skeleton,
        start the loaders, map the resident stages. ``direct_io`` forces O_DIRECT on or off.

        The ring is faulted in while the skeleton is built (engine.opening); resident stages are read
        while the first run goes, each waited for where it is first needed (engine.resident; call
        ``wait_resident`` to have them all in memory first). ``engine.open_stats`` says where the time went."""
        started = time.perf_counter()
        store_dir = Path(store_dir)
        manifest = Manifest.load(store_dir)
        _check_plan_covers(manifest, plan)
        reader = StageReader(store_dir, manifest, direct=direct_io)
        job = OpenJob(plan.pool_bytes if plan.streamed else 0)
        try:
            model = _skeleton(manifest)
            job.stats.skeleton_s = time.perf_counter() - started
            prefetcher = Prefetcher(reader, RingPool(plan.pool_bytes, arena=job.ring()), list(plan.streamed),
                                    plan.prefetch, plan.loaders,
                                    idle_priority=effective_priority(plan.loader_priority) == "idle")
        finally:
            job.close()
        runtime = StreamRuntime(model, manifest, reader, prefetcher, list(plan.streamed))
        engine = cls(store_dir, manifest, model, plan, reader, runtime)
        mapping = time.perf_counter()
        try:
            engine._resident = ResidentSet(reader, runtime, list(plan.resident))
        except BaseException:
            engine.close()
            raise
        job.stats.map_s = time.perf_counter() - mapping
        job.stats.resident_bytes = engine._resident.mapped_bytes
        job.stats.wall_s = time.perf_counter() - started
        engine.open_stats = job.stats
        return engine

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_plan_covers(manifest: Manifest, plan: Plan) -> None:
    """A plan names every stage once, resident or streamed (a saved plan may be for another store)."""
    names = [s.name for s in manifest.stages]
    planned = list(plan.resident) + list(plan.streamed)
    if sorted(planned) != sorted(names):
        raise ValueError(f"the plan does not cover this store's stages exactly (plan: {len(planned)} names, "
                         f"store: {len(names)} stages)")


def _skeleton(manifest: Manifest) -> torch.nn.Module:
    dtype = getattr(torch, manifest.dtype)
    model = build_skeleton(manifest.architecture, config_from_dict(manifest.config), dtype)
    quantize_skeleton(model, manifest_metas(manifest), dtype)  # quantized stores: QuantLinear/QuantEmbedding
    return model
