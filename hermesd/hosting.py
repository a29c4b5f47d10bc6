"""Served models: a store opened under its plan, as the daemon's config describes it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from hermesd.config import ConfigError, ModelSettings
from hermesd.engine import Engine, load
from hermesd.errors import BudgetError, StoreError
from hermesd.manifest import Manifest
from hermesd.workload import Workload

log = logging.getLogger("hermesd.models")


@dataclass
class ModelHost:
    """One configured model and its loaded engine."""

    name: str
    settings: ModelSettings
    engine: Engine
    plan_source: str  # "planner (profile)", "saved plan" or "fit"

    def describe(self) -> dict[str, Any]:
        """The model as the protocol's ``models`` reply shows it."""
        plan = self.engine.plan
        return {"name": self.name, "store": str(self.settings.store),
                "architecture": self.engine.manifest.architecture, "dtype": self.engine.manifest.dtype,
                "stages": len(self.engine.manifest.stages), "memory_budget": self.settings.memory_budget,
                "plan": plan.to_dict(), "plan_source": self.plan_source,
                "plan_summary": f"prefetch {plan.prefetch}, {len(plan.resident)} resident stage(s), "
                                f"ring {plan.pool_bytes / 2**20:.0f} MiB ({self.plan_source})",
                "resident_now": self.engine.resident_now,
                "max_prompt_tokens": self.settings.max_prompt_tokens,
                "max_new_tokens": self.settings.max_new_tokens, "defaults": self.settings.defaults}

    def close(self) -> None:
        self.engine.close()


def workload_of(settings: ModelSettings) -> Workload:
    """The largest job a model's config allows: what its plan must fit in the budget."""
    return Workload(prompt_tokens=settings.max_prompt_tokens, new_tokens=settings.max_new_tokens)


def open_model(name: str, settings: ModelSettings, progress: Callable[[str], None] = lambda _: None) -> ModelHost:
    """Open a model's store under the best plan available for its budget.

    With a budget: the planner's choice from a fresh profile (profiling first if ``profile`` is set and
    no fresh profile exists), else the engine's own fit. A missing store or a budget below the model's
    minimum is a ConfigError: the config names something that cannot work.
    """
    try:
        Manifest.load(settings.store)
    except StoreError as exc:
        raise ConfigError(f"models.{name}.store: {exc}") from None
    plan, source = None, "fit"
    budget = settings.budget_bytes
    explicit = settings.prefetch is not None or settings.resident is not None
    if budget is not None and not explicit:
        plan, source = _planned(name, settings, progress)
    try:
        engine = load(settings.store, memory_budget=budget, prefetch=settings.prefetch, resident=settings.resident,
                      workload=workload_of(settings), plan=plan)
    except BudgetError as exc:
        raise ConfigError(f"models.{name}.memory_budget: {exc}") from None
    except ValueError as exc:  # unknown resident stage names
        raise ConfigError(f"models.{name}: {exc}") from None
    engine.max_input_tokens = settings.max_prompt_tokens
    host = ModelHost(name, settings, engine, source)
    log.info("model %s ready: %s", name, host.describe()["plan_summary"])
    return host


def _planned(name: str, settings: ModelSettings, progress: Callable[[str], None]):
    """(plan, source) from the Pipeline Planner when a profile is (or is made) available, else (None, "fit")."""
    from hermesd.planner import choose_plan
    from hermesd.profiler import load_fresh_profile, profile_path, profile_store

    profile = load_fresh_profile(settings.store)
    if profile is None and settings.profile:
        progress(f"profiling model {name}")
        log.info("profiling model %s (no fresh profile in %s)", name, settings.store)
        profile = profile_store(settings.store, progress=lambda message: log.info("profile %s: %s", name, message))
        try:
            profile.save(profile_path(settings.store))
        except OSError as exc:
            log.warning("model %s: cannot save its profile: %s", name, exc)
    if profile is None:
        return None, "fit"
    try:
        prediction = choose_plan(profile, settings.budget_bytes, workload_of(settings))
    except BudgetError as exc:
        raise ConfigError(f"models.{name}.memory_budget: {exc}") from None
    return prediction.plan, "planner"
