"""Served models: a store opened under its plan, as the daemon's config describes it."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hermesd.daemon.config import ConfigError, ModelSettings
from hermesd.daemon.preflight import check_defaults, workload_of
from hermesd.engine import Engine
from hermesd.errors import BudgetError, StoreError
from hermesd.plan.batchmem import allowance, max_batch
from hermesd.plan.budget import Plan
from hermesd.planning import resolve
from hermesd.store.manifest import Manifest

log = logging.getLogger("hermesd.models")


@dataclass
class ModelHost:
    """One configured model: its plan, and its engine while loaded.

    The engine is opened and released on the executor thread only (``ensure_open``, ``release``);
    other threads read ``engine`` once into a local and accept None (not loaded).
    """

    name: str
    settings: ModelSettings
    engine: Engine | None
    plan_source: str  # "planner", "saved plan" or "fit" (hermesd.planning.Resolved.source)
    plan: Plan | None = None
    last_used: float = field(default_factory=time.monotonic)

    def ensure_open(self) -> Engine:
        """The engine, opened under the model's plan if it is not loaded (first use, or after idling)."""
        if self.engine is None:
            engine = Engine.open(self.settings.store, self.plan)
            engine.max_input_tokens = self.settings.max_prompt_tokens
            self.engine = engine
            log.info("model %s loaded", self.name)
        self.last_used = time.monotonic()
        return self.engine

    def release(self) -> bool:
        """Close the engine (its ring, resident stages and skeleton); True if it was loaded."""
        engine, self.engine = self.engine, None
        if engine is None:
            return False
        engine.close()
        del engine
        gc.collect()  # the skeleton and the pool hold reference cycles: give their memory back now
        log.info("model %s released", self.name)
        return True

    def idle_expired(self, now: float) -> bool:
        """Loaded and unused for longer than its keep_alive (never with keep_alive -1)."""
        keep = self.settings.keep_alive_s
        return self.engine is not None and keep is not None and now - self.last_used >= keep

    @property
    def shed_bytes(self) -> int:
        engine = self.engine
        return engine.shed_bytes if engine is not None else 0

    def describe(self) -> dict[str, Any]:
        """The model as the protocol's ``models`` reply shows it."""
        engine, plan = self.engine, self.plan
        manifest = engine.manifest if engine is not None else Manifest.load(self.settings.store)
        keep = self.settings.keep_alive_s
        return {"name": self.name, "store": str(self.settings.store),
                "architecture": manifest.architecture, "dtype": manifest.dtype,
                "stages": len(manifest.stages), "memory_budget": self.settings.memory_budget,
                "plan": plan.to_dict(), "plan_source": self.plan_source,
                "plan_summary": f"prefetch {plan.prefetch}, {len(plan.resident)} resident stage(s), "
                                f"ring {plan.pool_bytes / 2**20:.0f} MiB ({self.plan_source})",
                "resident_now": engine.resident_now if engine is not None else [],
                "load_stats": engine.open_stats.to_dict() if engine is not None else None,  # the last load()
                "loaded": engine is not None, "keep_alive_s": -1 if keep is None else keep,
                "idle_s": round(time.monotonic() - self.last_used, 3),
                "max_prompt_tokens": self.settings.max_prompt_tokens,
                "max_new_tokens": self.settings.max_new_tokens, "defaults": self.settings.defaults,
                "weight_bytes": manifest.weight_bytes(), "store_modified": _modified(self.settings.store),
                "quantization": sorted({fmt for stage in manifest.stages for fmt in stage.quant_formats}),
                **self._batching(manifest)}

    def _batching(self, manifest: Manifest) -> dict[str, Any]:
        """How many jobs may share a sweep: the config's cap, the plan's room for them, and how many
        generate jobs of the largest allowed size fit that room together (derived from the plan)."""
        room = allowance(self.plan) if self.plan is not None else None
        settings = self.settings
        full = max_batch(manifest, self.plan, settings.max_prompt_tokens, settings.max_new_tokens,
                         settings.max_batch, fp32=settings.fp32_prompts) if self.plan is not None else 1
        return {"max_batch": settings.max_batch, "batch_room": room, "max_batch_full_size": full}

    def close(self) -> None:
        self.release()


def _modified(store: Any) -> float:
    """When the store's manifest was last written (unix time; 0 if it cannot be read)."""
    try:
        return os.stat(os.path.join(store, "manifest.json")).st_mtime
    except OSError:
        return 0.0


def open_model(name: str, settings: ModelSettings, progress: Callable[[str], None] = lambda _: None) -> ModelHost:
    """Open a model's store under the plan ``hermesd.planning.resolve`` decides for its settings.

    With a budget: a saved plan or the planner's choice from a fresh profile (profiling first if
    ``profile`` is set and no fresh profile exists), else the fit. A missing store or a budget below
    the model's minimum is a ConfigError: the config names something that cannot work.
    """
    try:
        manifest = Manifest.load(settings.store)
    except StoreError as exc:
        raise ConfigError(f"models.{name}.store: {exc}") from None
    check_defaults(name, settings, manifest.architecture)  # a typo in a default would fail every job

    def say(message: str) -> None:
        progress(f"model {name}: {message}")
        log.info("model %s: %s", name, message)

    try:
        resolved = resolve(settings.store, settings.memory_budget, workload_of(settings), prefetch=settings.prefetch,
                           resident=settings.resident, profile="if-missing" if settings.profile else "if-fresh",
                           progress=say)
    except BudgetError as exc:
        raise ConfigError(f"models.{name}.memory_budget: {exc}") from None
    except ValueError as exc:  # unknown resident stage names
        raise ConfigError(f"models.{name}: {exc}") from None
    host = ModelHost(name, settings, None, resolved.source, resolved.plan)
    if settings.load == "start":
        try:
            host.ensure_open()
        except ValueError as exc:  # a plan that does not cover the store
            raise ConfigError(f"models.{name}: {exc}") from None
    log.info("model %s ready: %s%s", name, host.describe()["plan_summary"],
             "" if host.engine is not None else "; opens on first use")
    return host
