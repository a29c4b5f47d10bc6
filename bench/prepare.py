"""Everything a scenario needs before its timed runs: store, HF twin, profile, plans, AirLLM's split.

Each step is skipped when its result already exists (stores and twins are large and reused between
runs). The store is made with the ``hermesd`` CLI; the plans come from ``hermesd plan --json``, the
same command a user runs, for the scenario's memory cap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import run_json_child, weight_files
from bench.scenarios import Scenario

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


@dataclass
class Prepared:
    """The files of one prepared scenario."""

    scenario: Scenario
    store: Path
    twin: Path
    cap_bytes: int
    weight_bytes: int
    dtype: str  # torch dtype name of the stored weights
    airllm_shards: Path
    plans: dict[str, dict[str, Any]]  # contender -> `hermesd plan --json` output; key "file" is its path

    def weight_files(self) -> list[Path]:
        """Every file any contender reads weights from (evicted before each cold run)."""
        roots = [self.store / "stages", self.twin] + ([self.airllm_shards] if self.airllm_shards.exists() else [])
        return weight_files(*roots)


def resolve_source(path: str) -> Path:
    """A source path; ``pip:PKG/REL`` is a file inside this interpreter's site-packages."""
    if path.startswith("pip:"):
        return Path(sysconfig.get_paths()["purelib"]) / path[len("pip:"):]
    return Path(path)


def hermesd_cli(*args: str) -> list[str]:
    """The command line of the ``hermesd`` CLI of this interpreter."""
    return [sys.executable, "-m", "hermesd.cli", *args]


def ensure_store(scenario: Scenario, data: Path, timeout: float) -> Path:
    """Convert the scenario's store unless a finished one exists."""
    store = data / scenario.store
    if (store / "manifest.json").is_file():
        return store
    source = scenario.source
    if source.kind == "random":
        command = hermesd_cli("convert", "--random-config", source.path, str(store), "--dtype", source.dtype or "fp32")
    else:
        command = hermesd_cli("convert", str(resolve_source(source.path)), str(store))
    print(f"[prepare] converting {store} ...", file=sys.stderr, flush=True)
    subprocess.run([*command, "--quiet"], check=True, timeout=timeout, stdout=sys.stderr)
    return store


def ensure_twin(store: Path, twin: Path, timeout: float) -> None:
    """Export (and verify once) the Hugging Face twin unless a complete one exists."""
    from bench.twin import is_complete

    if is_complete(store, twin):
        return
    print(f"[prepare] exporting twin {twin} ...", file=sys.stderr, flush=True)
    result = run_json_child([sys.executable, "-m", "bench.twin", str(store), str(twin), "--verify"],
                            timeout=timeout, cwd=REPO_ROOT)
    if not result.get("ok"):
        raise RuntimeError(f"twin export failed: {result.get('error')}\n{result.get('stderr_tail', '')}")


def cap_for(scenario: Scenario, weight_bytes: int) -> int:
    """The scenario's cap: a fixed size, or a fraction of the stored weights (rounded to MiB)."""
    if scenario.cap_bytes is not None:
        return scenario.cap_bytes
    if scenario.cap_fraction is None:
        raise ValueError(f"scenario {scenario.name} has no cap")
    return int(weight_bytes * scenario.cap_fraction) // MIB * MIB


def plan_for(store: Path, budget: int, workload: str, out: Path, prefetch: int | None = None,
             timeout: float = 1800) -> dict[str, Any]:
    """Run ``hermesd plan --json`` (profiling first if the saved profile is stale); keep its answer in ``out``.

    A budget the planner refuses is returned as ``{"error": ...}``: that contender then fails to run.
    """
    # The suite's hermesd runs are fresh processes timed from load() on: one-shot plans, load() counted.
    command = hermesd_cli("plan", str(store), "--memory-budget", str(budget), "--workload", workload, "--json",
                          "--one-shot")
    if prefetch is not None:
        command += ["--prefetch", str(prefetch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:] or f"exit status {done.returncode}"}
    answer = json.loads(done.stdout)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(answer, indent=1), encoding="utf-8")
    return answer | {"file": str(out)}


def plans_for(store: Path, scenario: Scenario, cap: int, folder: Path) -> dict[str, dict[str, Any]]:
    """The planner's plan for the cap (``hermesd``) and its best plan without prefetch (``hermesd-k0``)."""
    workload = scenario.workload_text()
    return {
        "hermesd": plan_for(store, cap, workload, folder / f"plan-{cap}.json"),
        "hermesd-k0": plan_for(store, cap, workload, folder / f"plan-{cap}-k0.json", prefetch=0),
    }


def ensure_airllm_split(prepared: Prepared, python: str, timeout: float) -> dict[str, Any]:
    """Let AirLLM split the twin into its per-layer files once, before any timed run."""
    marker = prepared.airllm_shards / ".hermesd-bench-split-done"
    if marker.exists():
        return {"ok": True, "prepared": False}
    print(f"[prepare] AirLLM splits {prepared.twin} into {prepared.airllm_shards} ...", file=sys.stderr, flush=True)
    result = run_json_child([python, "-m", "bench.runner", "airllm", "--prepare", "--scenario",
                             prepared.scenario.to_json(), "--store", str(prepared.store), "--twin", str(prepared.twin),
                             "--dtype", prepared.dtype, "--airllm-shards", str(prepared.airllm_shards)],
                            timeout=timeout, cwd=REPO_ROOT)
    if result.get("ok"):
        marker.write_text("")
    return result


def prepare(scenario: Scenario, data: Path, folder: Path, timeout: float = 3600) -> Prepared:
    """Store, twin, profile and plans of ``scenario`` (AirLLM's split is done by the suite when used)."""
    from hermesd.store.manifest import Manifest

    store = ensure_store(scenario, data, timeout)
    twin = data / f"{scenario.store}-hf"
    ensure_twin(store, twin, timeout)
    manifest = Manifest.load(store)
    weights = manifest.weight_bytes()
    cap = cap_for(scenario, weights)
    print(f"[prepare] {scenario.name}: planning for a {cap / MIB:,.0f} MiB cap (profiles the store if needed) ...",
          file=sys.stderr, flush=True)
    plans = plans_for(store, scenario, cap, folder / scenario.name)
    return Prepared(scenario, store, twin, cap, weights, manifest.dtype, data / f"{scenario.store}-airllm", plans)
