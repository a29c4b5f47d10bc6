"""The one place that decides which plan a model runs with, and ``load`` that opens a store under it.

The CLI (``run``, ``plan``, ``profile``), the daemon and ``hermesd.load`` all come here:

- no budget and no explicit settings, or ``"auto"``: the memory actually available (``auto_budget``);
- explicit settings (``prefetch``, ``resident``, ``loaders``) and no budget: the fit of those settings
  alone (``plan.budget.fit_plan``), nothing resident unless named;
- a budget and a fresh profile: the plan ``hermesd plan`` saved for that budget and workload, else the
  Pipeline Planner's choice from the profile;
- a budget and no profile: the fit, unless ``profile="if-missing"`` measures one first.

A budget below the model's minimum is refused by one rule for every caller (``minimum_budget``):
``hermesd info``, ``plan``, ``run``, ``serve`` and ``hermesd.load`` all quote the same figure for the
same workload and profile.

The profile is read (or measured) once per decision. This module sits above the engine because
measuring a profile runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from hermesd import memory
from hermesd.engine.engine import Engine
from hermesd.engine.reader import StageReader
from hermesd.errors import BudgetError
from hermesd.plan.budget import Plan, breakdown, fit_plan
from hermesd.plan.planner import Prediction, choose_plan, minimum_plan
from hermesd.plan.profile import Profile, load_fresh_profile, profile_path
from hermesd.plan.saved import saved_plan
from hermesd.plan.workload import DEFAULT_WORKLOAD, Workload
from hermesd.profiling import profile_store
from hermesd.store.manifest import Manifest
from hermesd.units import parse_size
from hermesd.watchdog.sensors import MemoryReading, read_memory, read_memory_available

ProfileMode = Literal["never", "if-fresh", "if-missing", "force"]
ProgressFn = Callable[[str], None]
AUTO = "auto"
# An automatic budget leaves this much of the available memory to everything else (page cache for the
# streamed stages, other processes, allocator slack) ...
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 64 << 20
# ... and never plans past this share of the enforced limit, so a planned peak stays below the memory
# watchdog's default low water (85 %) and does not shed what it just loaded.
AUTO_LIMIT_SHARE = 0.80


@dataclass(frozen=True)
class Resolved:
    """A decided plan and where it came from: "fit", "saved plan" or "planner"."""

    plan: Plan
    source: str
    profile: Profile | None = None
    prediction: Prediction | None = None  # the planner's prediction, when it chose


def auto_budget(reading: MemoryReading | None = None) -> int:
    """The process budget that uses the memory that is there: this process's RSS plus what is free now.

    Free means the tightest of the cgroup limit's headroom and MemAvailable, less a margin of 10 %
    (at least 64 MiB), and the whole is capped at 80 % of the enforced limit (cgroup, else MemTotal).
    """
    reading = reading or read_memory()
    free = reading.limit_bytes - reading.used_bytes
    if reading.source != "meminfo":  # a cgroup limit: the machine may still be the tighter bound
        free = min(free, read_memory_available())
    margin = max(int(free * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN)
    return int(min(memory.rss_bytes() + max(free - margin, 0), reading.limit_bytes * AUTO_LIMIT_SHARE))


@dataclass(frozen=True)
class Minimum:
    """The smallest budget a store runs a workload under, and where the figure comes from.

    source: "profile" (a fresh saved profile: measured runtime and activations, the figure the daemon
    and the planner use) or "estimate" (no fresh profile: this process's memory plus a margin, and
    activations estimated from the model's config, as the fit uses).
    """

    bytes: int
    workload: Workload
    source: str
    detail: str

    def refuse(self, budget: int) -> None:
        """Raise BudgetError when ``budget`` is below this minimum."""
        if budget < self.bytes:
            raise BudgetError(budget, self.bytes, f"a {self.workload.prompt_tokens}-token prompt and "
                                                  f"{self.workload.new_tokens} new tokens need {self.detail}; "
                                                  f"give at least {self.bytes} bytes")


def minimum_budget(store_dir: str | os.PathLike[str], workload: Workload | None = None,
                   profile: ProfileMode = "if-fresh") -> Minimum:
    """The minimum budget of a store for ``workload`` (default DEFAULT_WORKLOAD): no prefetch, only
    pinned stages resident. From the fresh profile when there is one, else estimated."""
    store_dir = Path(store_dir)
    manifest = Manifest.load(store_dir)
    measured = obtain_profile(store_dir, profile)
    return _minimum(store_dir, manifest, measured, workload or DEFAULT_WORKLOAD)


def _minimum(store_dir: Path, manifest: Manifest, measured: Profile | None, workload: Workload,
             direct_io: bool | None = None) -> Minimum:
    if measured is not None:
        plan, source = minimum_plan(measured, workload), "profile"
    else:
        reader = StageReader(store_dir, manifest, direct=direct_io)
        pinned = [s.name for s in manifest.stages if s.kind == "pinned"]
        plan = fit_plan(manifest, reader.span, memory.rss_bytes(), prefetch=0, resident=pinned, workload=workload)
        source = "estimate"
    return Minimum(plan.peak_bound, workload, source, breakdown(plan))


def budget_bytes_for(budget: int | str | None, explicit: bool) -> int | None:
    """Bytes for a budget as given: a size, "auto", or None (auto unless explicit settings stand alone)."""
    if budget == AUTO or (budget is None and not explicit):
        return auto_budget()
    return parse_size(budget) if budget is not None else None


def obtain_profile(store_dir: Path, mode: ProfileMode = "if-fresh", reference_tokens: int = 128,
                   progress: ProgressFn | None = None, on_stage: Callable[[str], None] | None = None) -> Profile | None:
    """The store's profile: the saved one while fresh; measured (and saved) when ``mode`` asks for it.

    never: None. if-fresh: the fresh saved profile or None. if-missing: measure when none is fresh.
    force: always measure. A profile that cannot be saved is still returned (the reason goes to progress).
    on_stage: see ``profile_store`` (progress bars).
    """
    if mode == "never":
        return None
    profile = None if mode == "force" else load_fresh_profile(store_dir)
    if profile is not None or mode == "if-fresh":
        return profile
    say = progress or (lambda message: None)
    say(f"profiling {store_dir} (a few passes over the model)")
    profile = profile_store(store_dir, reference_tokens=reference_tokens, progress=say, on_stage=on_stage)
    try:
        profile.save(profile_path(store_dir))
    except OSError as exc:
        say(f"cannot save the profile: {exc}")
    return profile


def resolve(store_dir: str | os.PathLike[str], budget: int | str | None = None, workload: Workload | None = None, *,
            prefetch: int | None = None, resident: list[str] | str | None = None, loaders: int | None = None,
            profile: ProfileMode = "if-fresh", depths: range | None = None, use_saved: bool = True,
            direct_io: bool | None = None, progress: ProgressFn | None = None) -> Resolved:
    """Decide the plan for a store under a memory budget (bytes, a size such as "512MiB", or "auto").

    No budget means "auto" unless ``prefetch``, ``resident`` or ``loaders`` are given: those alone are
    planned as stated, with nothing else resident.
    workload: the largest job the plan must fit; None takes a saved plan's own workload, else 512 tokens.
    depths: prefetch depths the planner may consider (``hermesd plan --prefetch``).
    use_saved: False ignores saved plans (``hermesd plan`` decides anew).
    A budget below the model's minimum raises BudgetError; unknown resident names raise ValueError.
    """
    store_dir = Path(store_dir)
    manifest = Manifest.load(store_dir)
    explicit = prefetch is not None or resident is not None or loaders is not None
    budget_bytes = budget_bytes_for(budget, explicit)
    measured = None if budget_bytes is None or explicit else obtain_profile(store_dir, profile, progress=progress)
    saved = saved_plan(store_dir, budget_bytes, workload, manifest) if use_saved and measured else None
    if saved is not None:
        return Resolved(saved, "saved plan", measured)
    if budget_bytes is not None:
        _minimum(store_dir, manifest, measured, workload or DEFAULT_WORKLOAD, direct_io).refuse(budget_bytes)
    if measured is not None:
        prediction = choose_plan(measured, budget_bytes, workload or DEFAULT_WORKLOAD,
                                 depths if depths is not None else range(5))
        return Resolved(prediction.plan, "planner", measured, prediction)
    reader = StageReader(store_dir, manifest, direct=direct_io)
    plan = fit_plan(manifest, reader.span, memory.rss_bytes(), budget=budget_bytes, prefetch=prefetch,
                    resident=resident, loaders=loaders, workload=workload or DEFAULT_WORKLOAD)
    return Resolved(plan, "fit")


def load(store_dir: str | os.PathLike[str], memory_budget: int | str | None = None, prefetch: int | None = None,
         resident: list[str] | str | None = None, loaders: int | None = None, direct_io: bool | None = None,
         workload: Workload | None = None, plan: Plan | None = None) -> Engine:
    """Open a store and return an Engine whose ``model`` streams stages under a memory plan.

    memory_budget: bytes, a size such as "512MiB", or "auto", for the whole process; the deepest prefetch
        and the most resident stages that fit are chosen. A budget below the model's minimum raises
        BudgetError. None means "auto" (the memory available now) unless prefetch/resident/loaders are given.
    prefetch: stages read ahead while one computes (k); default 2 (see plan.budget.DEFAULT_PREFETCH).
    resident: stage names kept in memory, or "all"; default: none without a budget, chosen with one.
    loaders: loader threads (default: one per prefetched stage).
    direct_io: force O_DIRECT on or off; default: use it where the filesystem supports it.
    workload: the largest job the plan must fit (default: a saved plan's, else a 512-token prompt).
    plan: an explicit plan (from hermesd.plan.planner); otherwise ``resolve`` decides, using the plan
        ``hermesd plan`` saved for the budget while the store's profile is fresh.
    """
    if plan is None:
        plan = resolve(store_dir, memory_budget, workload, prefetch=prefetch, resident=resident, loaders=loaders,
                       direct_io=direct_io).plan
    return Engine.open(store_dir, plan, direct_io=direct_io)
