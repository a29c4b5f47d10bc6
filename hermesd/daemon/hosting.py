"""Served models: a store opened under its plan, as the daemon's config describes it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from hermesd.daemon.config import ConfigError, ModelSettings
from hermesd.engine import Engine
from hermesd.errors import BudgetError, StoreError
from hermesd.plan.workload import Workload
from hermesd.planning import resolve
from hermesd.store.manifest import Manifest

log = logging.getLogger("hermesd.models")


@dataclass
class ModelHost:
    """One configured model and its loaded engine."""

    name: str
    settings: ModelSettings
    engine: Engine
    plan_source: str  # "planner", "saved plan" or "fit" (hermesd.planning.Resolved.source)

    def describe(self) -> dict[str, Any]:
        """The model as the protocol's ``models`` reply shows it."""
        plan, manifest = self.engine.plan, self.engine.manifest
        return {"name": self.name, "store": str(self.settings.store),
                "architecture": self.engine.manifest.architecture, "dtype": self.engine.manifest.dtype,
                "stages": len(self.engine.manifest.stages), "memory_budget": self.settings.memory_budget,
                "plan": plan.to_dict(), "plan_source": self.plan_source,
                "plan_summary": f"prefetch {plan.prefetch}, {len(plan.resident)} resident stage(s), "
                                f"ring {plan.pool_bytes / 2**20:.0f} MiB ({self.plan_source})",
                "resident_now": self.engine.resident_now,
                "max_prompt_tokens": self.settings.max_prompt_tokens,
                "max_new_tokens": self.settings.max_new_tokens, "defaults": self.settings.defaults,
                "weight_bytes": manifest.weight_bytes(), "store_modified": _modified(self.settings.store),
                "quantization": sorted({fmt for stage in manifest.stages for fmt in stage.quant_formats})}

    def close(self) -> None:
        self.engine.close()


def _modified(store: Any) -> float:
    """When the store's manifest was last written (unix time; 0 if it cannot be read)."""
    try:
        return os.stat(os.path.join(store, "manifest.json")).st_mtime
    except OSError:
        return 0.0


def workload_of(settings: ModelSettings) -> Workload:
    """The largest job a model's config allows: what its plan must fit in the budget."""
    return Workload(prompt_tokens=settings.max_prompt_tokens, new_tokens=settings.max_new_tokens)


def open_model(name: str, settings: ModelSettings, progress: Callable[[str], None] = lambda _: None) -> ModelHost:
    """Open a model's store under the plan ``hermesd.planning.resolve`` decides for its settings.

    With a budget: a saved plan or the planner's choice from a fresh profile (profiling first if
    ``profile`` is set and no fresh profile exists), else the fit. A missing store or a budget below
    the model's minimum is a ConfigError: the config names something that cannot work.
    """
    try:
        Manifest.load(settings.store)
    except StoreError as exc:
        raise ConfigError(f"models.{name}.store: {exc}") from None

    def say(message: str) -> None:
        progress(f"model {name}: {message}")
        log.info("model %s: %s", name, message)

    try:
        resolved = resolve(settings.store, settings.memory_budget, workload_of(settings), prefetch=settings.prefetch,
                           resident=settings.resident, profile="if-missing" if settings.profile else "if-fresh",
                           progress=say)
        engine = Engine.open(settings.store, resolved.plan)
    except BudgetError as exc:
        raise ConfigError(f"models.{name}.memory_budget: {exc}") from None
    except ValueError as exc:  # unknown resident stage names
        raise ConfigError(f"models.{name}: {exc}") from None
    engine.max_input_tokens = settings.max_prompt_tokens
    host = ModelHost(name, settings, engine, resolved.source)
    log.info("model %s ready: %s", name, host.describe()["plan_summary"])
    return host
