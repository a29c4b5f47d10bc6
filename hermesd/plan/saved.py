"""Saved plans: the planner's choices kept beside the profile, found again by memory budget."""

from __future__ import annotations

import json
from pathlib import Path

from hermesd.plan.budget import Plan
from hermesd.plan.planner import Prediction
from hermesd.plan.profile import Profile
from hermesd.plan.workload import Workload
from hermesd.store.manifest import Manifest

PLANS_DIR = "plans"


def plan_path(store_dir: Path, budget: int, workload: Workload) -> Path:
    return Path(store_dir) / PLANS_DIR / f"{budget}-{workload.label()}.json"


def save_plan(store_dir: Path, prediction: Prediction, workload: Workload, profile: Profile) -> Path:
    """Write the plan (with its predictions and the profile it came from) for its budget and workload."""
    path = plan_path(store_dir, prediction.plan.budget or 0, workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = prediction.to_dict() | {"workload": workload.label(), "profile_store_sha256":
                                     profile.fingerprint["store_sha256"]}
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path


def saved_plan(store_dir: Path, budget: int, workload: Workload | None = None,
               manifest: Manifest | None = None) -> Plan | None:
    """The saved plan for ``budget`` (that workload's, else the newest), if it still covers the store's stages.

    Whether the profile behind it is still fresh is the caller's question (``hermesd.planning.resolve``
    asks it once per decision).
    """
    folder = Path(store_dir) / PLANS_DIR
    pattern = f"{budget}-{workload.label()}.json" if workload else f"{budget}-*.json"
    candidates = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        return None
    try:
        plan = Plan.from_dict(json.loads(candidates[0].read_text(encoding="utf-8"))["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    names = {s.name for s in (manifest or Manifest.load(store_dir)).stages}
    return plan if set(plan.resident) | set(plan.streamed) == names else None
