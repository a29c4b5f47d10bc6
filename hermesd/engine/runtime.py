"""Stage hooks: put a stage's weights into the model right before it runs and take them out after.

The model's own ``forward`` and ``generate`` run unmodified. Forward pre-hooks on each streamed
stage's module wait for its load and bind the loaded tensors; forward hooks (also called when the
forward raises) restore the meta parameters and hand the buffer back. Resident stages stay bound; their
pre-hooks wait only for a first read still under way (engine.resident). Large embedding tables are
gathered: a pre-hook reads only the rows of the batch's token ids and remaps the ids onto them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch
from torch import nn

from hermesd import memory
from hermesd.engine.mapped import FirstRead
from hermesd.engine.prefetch import LoadedStage, Prefetcher
from hermesd.engine.reader import StageReader
from hermesd.engine.runstats import RunStats, StageStats
from hermesd.errors import StoreError
from hermesd.quant.embedding import QuantEmbedding
from hermesd.quant.linear import QuantLinear
from hermesd.store.manifest import Manifest, StageEntry

TIMELINE_LIMIT = 20_000  # events kept per run; a long generation stops adding after this


def _standard_strides(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Give stage inputs whose size-1 dimensions carry a parent tensor's strides fresh, standard strides.

    ``generate`` slices the last position (``hidden[:, -1:, :]``) before the LM head. The slice
    counts as contiguous but keeps the batch stride of the whole prompt, and PyTorch's CPU bf16
    matmul then takes a path that copies the whole weight: measured 2.0 s and +500 MiB for a
    Llama-1B head, against 33 ms with fresh strides, with bit-identical output. The copy is of the
    activation (a few KiB), so the model's own code is unchanged.
    """
    if not any(_odd_strides(v) for v in (*args, *kwargs.values())):
        return None
    return tuple(_restrided(v) for v in args), {k: _restrided(v) for k, v in kwargs.items()}


def _odd_strides(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or not value.is_contiguous():
        return False
    expected, step = [], 1
    for size in reversed(value.shape):
        expected.append(step)
        step *= size
    return tuple(reversed(expected)) != value.stride()


def _restrided(value: Any) -> Any:
    return value.clone(memory_format=torch.contiguous_format) if _odd_strides(value) else value


class StageBinding:
    """The slots of one stage in the model: bind loaded tensors into them, restore meta after use."""

    def __init__(self, model: nn.Module, entry: StageEntry) -> None:
        self.name = entry.name
        try:
            base = model.get_submodule(entry.module)
            locals_ = [n for n in [*entry.tensors, *entry.tied] if n not in entry.gather]
            self._slots = [self._slot(base, local) for local in locals_]
        except (AttributeError, KeyError) as exc:
            raise StoreError(f"stage {entry.name!r} does not fit the {type(model).__name__} skeleton: {exc}") from None

    @staticmethod
    def _slot(base: nn.Module, local: str) -> tuple[str, nn.Module, str, bool, Any]:
        path, _, attr = local.rpartition(".")
        owner = base.get_submodule(path) if path else base
        if attr in owner._parameters:
            return local, owner, attr, True, owner._parameters[attr]
        if attr in owner._buffers:
            return local, owner, attr, False, owner._buffers[attr]
        raise KeyError(f"no parameter or buffer {local!r}")

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        for local, owner, attr, is_param, _ in self._slots:
            if is_param:
                owner._parameters[attr] = nn.Parameter(tensors[local], requires_grad=False)
            else:
                owner._buffers[attr] = tensors[local]

    def unbind(self) -> None:
        for _, owner, attr, is_param, original in self._slots:
            (owner._parameters if is_param else owner._buffers)[attr] = original
            if isinstance(owner, QuantLinear):
                owner.release()  # its kernel-ready copy belongs to the tensors just unbound


class StreamRuntime:
    """Owns the hooks of one model and the statistics of its runs."""

    def __init__(self, model: nn.Module, manifest: Manifest, reader: StageReader, prefetcher: Prefetcher,
                 streamed: list[str]) -> None:
        self.model = model
        self.reader = reader
        self.prefetcher = prefetcher
        self.bindings = {entry.name: StageBinding(model, entry) for entry in manifest.stages}
        self.last_stats = RunStats()
        self._stats: RunStats | None = None
        self._by_name: dict[str, StageStats] = {}
        self._held: dict[str, tuple[LoadedStage, float]] = {}
        self._resident_started: dict[str, float] = {}  # resident stage -> when its compute began
        self._run_owner: str | None = None
        self._t0 = 0.0
        self._handles = []
        self.checkpoint: Callable[[str], None] | None = None
        self.resident: set[str] = set()  # stages bound for good: their hooks let them be
        self.pending: dict[str, Future] = {}  # resident stage -> its first read, until a run has waited for it
        for entry in manifest.stages:  # resident stages too, so that they can be shed under memory pressure
            self._hook_stage(entry)
        for entry in manifest.stages:
            module = model.get_submodule(entry.module)
            self._handles.append(module.register_forward_pre_hook(_standard_strides, with_kwargs=True))
            self._handles.append(module.register_forward_pre_hook(self._checkpoint_hook(entry.name), prepend=True))
        for entry in manifest.stages:
            by_module: dict[str, list[str]] = {}
            for local in entry.gather:
                by_module.setdefault(local.rpartition(".")[0], []).append(local)
            for path, locals_ in by_module.items():
                self._hook_gather(entry, path, locals_)
        self._handles.append(model.register_forward_pre_hook(self._root_pre))
        self._handles.append(model.register_forward_hook(self._root_post, always_call=True))
        self._original_generate = getattr(model, "generate", None)
        if self._original_generate is not None:
            model.generate = self._wrap_generate(self._original_generate)

    def detach(self) -> None:
        """Remove every hook and unbind every stage (the model is left with meta weights)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for binding in self.bindings.values():
            binding.unbind()
        if self._original_generate is not None:
            del self.model.generate
            self._original_generate = None

    def pin(self, name: str, tensors: dict) -> None:
        """Bind stage ``name`` to ``tensors`` for good: its hooks leave it in place until ``unpin``."""
        self.bindings[name].bind(tensors)
        self.resident.add(name)

    def unpin(self, name: str) -> None:
        """Release a pinned stage: it is unbound now and streams (loads on demand) from the next run."""
        self.resident.discard(name)
        self.bindings[name].unbind()

    # -- runs ---------------------------------------------------------------------------------
    def _wrap_generate(self, original):
        @functools.wraps(original)
        def generate(*args, **kwargs):
            if self._run_owner is not None:
                return original(*args, **kwargs)
            self._begin("generate", wrap=True)
            try:
                return original(*args, **kwargs)
            finally:
                self._end()
        return generate

    def begin_span(self) -> bool:
        """Start one run that spans many forward calls (a decode loop driven from outside ``generate``):
        read-ahead wraps from the last stage to the first between them. False if a run is under way."""
        if self._run_owner is not None:
            return False
        self._begin("generate", wrap=True)
        return True

    def end_span(self) -> None:
        if self._run_owner == "generate":
            self._end()

    def live_stats(self) -> RunStats:
        """The statistics of the run under way so far (the last run's if none is)."""
        stats = self._stats
        if stats is None:
            return self.last_stats
        return dataclasses.replace(stats, wall_s=time.perf_counter() - self._t0, peak_rss_bytes=memory.peak_rss_bytes(),
                                   pool_high_water_bytes=self.prefetcher.pool.high_water,
                                   stages=list(self._by_name.values()), timeline=[])

    def _root_pre(self, module: nn.Module, args: tuple) -> None:
        if self._run_owner == "forward":
            self._end()  # the previous forward was interrupted (torch skips always_call hooks on KeyboardInterrupt)
        if self._run_owner is None:
            self._begin("forward", wrap=False)
        self._stats.passes += 1

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._run_owner == "forward":
            self._end()

    def _begin(self, owner: str, wrap: bool) -> None:
        self._run_owner = owner
        self._stats = RunStats(prefetch=self.prefetcher.depth, loaders=self.prefetcher.loaders,
                               read_mode=self.reader.read_mode,
                               loader_priority="idle" if self.prefetcher.idle_priority else "normal")
        self._by_name = {}
        self._resident_started.clear()  # left by an interrupted pass
        memory.reset_peak_rss()
        self._t0 = time.perf_counter()
        self.prefetcher.start(wrap=wrap)

    def _end(self) -> None:
        stats = self._stats
        try:
            for name in list(self._held):
                self._stage_post(name)  # a forward that raised may leave stages bound
            self.prefetcher.stop()
        finally:
            stats.wall_s = time.perf_counter() - self._t0
            stats.peak_rss_bytes = memory.peak_rss_bytes()
            stats.pool_high_water_bytes = self.prefetcher.pool.high_water
            stats.stages = list(self._by_name.values())
            self.last_stats, self._stats, self._run_owner = stats, None, None

    def _checkpoint_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        """A pre-hook that calls ``self.checkpoint(name)`` before the stage loads or runs.

        The daemon sets ``checkpoint`` to apply cancels, deadlines and watchdog pauses between stages;
        an exception it raises ends the run cleanly (regions returned, prefetch stopped).
        """
        def hook(module: nn.Module, args: tuple) -> None:
            if self.checkpoint is not None:
                self.checkpoint(name)
        return hook

    # -- stages -------------------------------------------------------------------------------
    def _hook_stage(self, entry: StageEntry) -> None:
        module = self.model.get_submodule(entry.module)
        name = entry.name
        self._handles.append(module.register_forward_pre_hook(lambda m, a: self._stage_pre(name)))
        self._handles.append(module.register_forward_hook(lambda m, a, o: self._stage_post(name), always_call=True))

    def _stage_pre(self, name: str) -> None:
        if name in self.resident:
            if name in self.pending:
                self._await_first_read(name)
            self._resident_started[name] = time.perf_counter()  # its compute counts like a streamed stage's
            return
        if name in self._held:  # still bound from an interrupted pass: give its region back first
            self._stage_post(name)
        asked = time.perf_counter()
        loaded = self.prefetcher.acquire(name)
        self.bindings[name].bind(loaded.tensors)
        ready = time.perf_counter()
        self._held[name] = (loaded, ready)
        self._record_load(name, loaded, ready - asked)
        if self._stats is not None:
            self._stats.on_demand_loads += not loaded.prefetched

    def _await_first_read(self, name: str) -> None:
        """A resident stage whose first read is still under way: wait for it; this run counts it as a load.
        A failed read (a corrupt file) stays pending, so every run that needs the stage fails alike."""
        asked = time.perf_counter()
        first = self.pending[name].result()
        del self.pending[name]
        self._record_load(name, first, time.perf_counter() - asked)

    def _record_load(self, name: str, loaded: LoadedStage | FirstRead, waited: float) -> None:
        """Count one load (a streamed stage's, or a resident stage's first read) and the wait for it."""
        if self._stats is None:
            return
        record = self._stage_record(name)
        record.loads += 1
        record.bytes_read += loaded.bytes_read
        record.load_s += loaded.load_end - loaded.load_start
        record.load_cpu_s += loaded.cpu_s
        record.wait_s += waited
        self._event(name, "load", loaded.load_start, loaded.load_end)

    def _stage_post(self, name: str) -> None:
        started = self._resident_started.pop(name, None)
        if started is not None:
            self._record_compute(name, started, resident=True)
        held = self._held.pop(name, None)
        if held is None:
            return
        loaded, ready = held
        self.bindings[name].unbind()
        self._record_compute(name, ready)
        self.prefetcher.release(loaded)

    def _record_compute(self, name: str, started: float, resident: bool = False) -> None:
        if self._stats is None:
            return
        done = time.perf_counter()
        record = self._stage_record(name)
        record.resident = record.resident or resident
        record.compute_s += done - started
        self._event(name, "compute", started, done)

    def _stage_record(self, name: str) -> StageStats:
        if name not in self._by_name:
            self._by_name[name] = StageStats(name)
        return self._by_name[name]

    def _event(self, name: str, kind: str, start: float, end: float) -> None:
        if len(self._stats.timeline) < TIMELINE_LIMIT:
            self._stats.timeline.append((name, kind, round(start - self._t0, 6), round(end - self._t0, 6)))

    # -- gathered embedding tables ------------------------------------------------------------
    def _hook_gather(self, entry: StageEntry, path: str, locals_: list[str]) -> None:
        module = self.model.get_submodule(".".join(p for p in (entry.module, path) if p))
        if isinstance(module, QuantEmbedding):
            return self._hook_gather_quantized(entry, module, locals_)
        local = locals_[0]
        meta_weight = module._parameters["weight"]
        padding_idx = module.padding_idx

        def gather(mod: nn.Module, args: tuple, kwargs: dict):
            ids = args[0] if args else kwargs.pop("input")
            unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            rows = self.reader.read_rows(entry.name, local, unique.tolist())
            mod._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
            mod.padding_idx = None  # only affects gradients; the compact table has no such row
            if self._stats is not None:
                self._stats.gathered_bytes += rows.numel() * rows.element_size()
            return (inverse, *args[1:]), kwargs

        def restore(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            mod._parameters["weight"] = meta_weight
            mod.padding_idx = padding_idx

        self._handles.append(module.register_forward_pre_hook(gather, with_kwargs=True))
        self._handles.append(module.register_forward_hook(restore, with_kwargs=True, always_call=True))

    def _hook_gather_quantized(self, entry: StageEntry, module: QuantEmbedding, locals_: list[str]) -> None:
        """Gather the batch's rows of each stored tensor of a quantized table; the module de-quantizes them."""
        meta_parts = dict(module._buffers)

        def gather(mod: nn.Module, args: tuple, kwargs: dict):
            ids = args[0]
            unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            rows = unique.tolist()
            for local in locals_:
                part = self.reader.read_rows(entry.name, local, rows)
                mod._buffers[local.rpartition(".")[2]] = part
                if self._stats is not None:
                    self._stats.gathered_bytes += part.numel() * part.element_size()
            return (inverse, *args[1:]), kwargs

        def restore(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            mod._buffers.update(meta_parts)

        self._handles.append(module.register_forward_pre_hook(gather, with_kwargs=True))
        self._handles.append(module.register_forward_hook(restore, with_kwargs=True, always_call=True))
