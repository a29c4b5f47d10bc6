"""Planner accuracy: predicted vs measured latency and peak, and the chosen plan vs a sweep of plans.

    python -m bench.planner [--data /work/benchdata] [--models gpt2-xl,llama-1b] [--confirm 2]

For each model (random weights at a real shape) and three budgets (the minimum, runtime + 25% of the
weights, the whole model), the planner's choice and a sweep (k = 0..4, each with the planner's
resident set for that k and with none) run in fresh processes, cold. Reported: predicted/measured
latency, predicted/measured peak (VmHWM), and chosen/fastest latency after confirming both again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import median, run_json_child
from hermesd.plan.planner import Prediction, best_for_depth, choose_plan, evaluate, minimum_budget
from hermesd.plan.profile import Profile
from hermesd.plan.workload import Workload

CONFIGS = Path(__file__).parent / "configs"
MODELS = {
    "gpt2-xl": ("gpt2-xl.json", "fp32", Workload(128, 0)),
    "llama-1b": ("llama-1b.json", "bf16", Workload(128, 8)),
}
MIB = 1 << 20


def ensure_store(data: Path, name: str) -> Path:
    config, dtype, _ = MODELS[name]
    store = data / f"{name}-{dtype}"
    if not (store / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", "--random-config", str(CONFIGS / config),
                        str(store), "--dtype", dtype, "--quiet", "--force"], check=True)
    return store


def ensure_profile(store: Path) -> Profile:
    """Profile in a fresh process (as ``hermesd profile`` would run), reusing a fresh saved profile."""
    subprocess.run([sys.executable, "-m", "hermesd.cli", "profile", str(store)], check=True)
    return Profile.load(store / "profile.json")


def budgets(profile: Profile, workload: Workload) -> dict[str, int]:
    weights = sum(s.bytes for s in profile.stages)
    minimum = minimum_budget(profile, workload)
    activations = minimum - profile.runtime_bytes - max(s.bytes for s in profile.stages)
    quarter = profile.runtime_bytes + weights // 4 + activations
    whole = profile.runtime_bytes + weights + activations + 64 * MIB
    return {"minimum": minimum, "25%": max(quarter, minimum), "whole": whole}


def sweep(profile: Profile, budget: int, workload: Workload) -> list[Prediction]:
    """Plans for k = 0..4: the planner's resident set for that k, and no resident stages."""
    plans: dict[tuple, Prediction] = {}
    for depth in range(5):
        for candidate in (best_for_depth(profile, budget, workload, depth),
                          evaluate(profile, workload, depth, [], budget)):
            if candidate is not None and candidate.peak_bytes <= budget:
                plans.setdefault((candidate.plan.prefetch, candidate.plan.resident), candidate)
    return list(plans.values())


def measure(store: Path, prediction: Prediction, workload: Workload, folder: Path, tag: str) -> dict[str, Any]:
    plan_file = folder / f"{tag}.json"
    plan_file.write_text(json.dumps(prediction.to_dict()))
    command = [sys.executable, "-m", "bench.plan_runner", str(store), str(plan_file),
               str(workload.prompt_tokens), str(workload.new_tokens)]
    return run_json_child(command, timeout=900)


def _key(prediction: Prediction) -> str:
    plan = prediction.plan
    return f"k{plan.prefetch}-r{len(plan.resident)}"


def run_case(store: Path, profile: Profile, name: str, label: str, budget: int, workload: Workload,
             folder: Path, confirm: int) -> dict[str, Any]:
    chosen = choose_plan(profile, budget, workload)
    candidates = {_key(p): p for p in sweep(profile, budget, workload)}
    candidates[_key(chosen)] = chosen
    results = {key: [measure(store, p, workload, folder, f"{name}-{label}-{key}")] for key, p in candidates.items()}
    latency = {key: runs[0].get("latency_s", float("inf")) for key, runs in results.items()}
    fastest = min(latency, key=latency.get)
    for round_ in range(confirm):  # alternate the chosen plan and the sweep's fastest again
        for key in dict.fromkeys([_key(chosen), fastest]):
            results[key].append(measure(store, candidates[key], workload, folder, f"{name}-{label}-{key}-c{round_}"))
    med = {key: median(r["latency_s"] for r in runs if r.get("ok")) for key, runs in results.items()}
    peak = {key: max(r["peak_rss_bytes"] for r in runs if r.get("ok")) for key, runs in results.items()}
    best = min(med, key=lambda k: med[k] if med[k] is not None else float("inf"))
    key = _key(chosen)
    return {
        "model": name, "budget_label": label, "budget": budget, "chosen": key,
        "predicted_latency_s": chosen.latency_s, "measured_latency_s": med[key],
        "latency_error": med[key] / chosen.latency_s - 1,
        "predicted_peak_bytes": chosen.peak_bytes, "measured_peak_bytes": peak[key],
        "peak_ratio": chosen.peak_bytes / peak[key], "fastest": best, "fastest_latency_s": med[best],
        "chosen_vs_fastest": med[key] / med[best],
        "sweep": {k: {"median_s": med[k], "predicted_s": candidates[k].latency_s, "peak": peak[k],
                      "predicted_peak": candidates[k].peak_bytes, "runs": results[k]} for k in candidates},
    }


def markdown(cases: list[dict[str, Any]]) -> str:
    lines = ["| model | budget | chosen | predicted s | measured s | error | predicted peak MiB | measured peak MiB "
             "| peak pred/meas | fastest in sweep | chosen/fastest |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in cases:
        lines.append(
            f"| {c['model']} | {c['budget_label']} ({c['budget'] / MIB:,.0f} MiB) | {c['chosen']} | "
            f"{c['predicted_latency_s']:.2f} | {c['measured_latency_s']:.2f} | {c['latency_error']:+.1%} | "
            f"{c['predicted_peak_bytes'] / MIB:,.0f} | {c['measured_peak_bytes'] / MIB:,.0f} | {c['peak_ratio']:.3f} | "
            f"{c['fastest']} ({c['fastest_latency_s']:.2f} s) | {c['chosen_vs_fastest']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/benchdata"))
    parser.add_argument("--models", default="gpt2-xl,llama-1b")
    parser.add_argument("--budgets", default="minimum,25%,whole")
    parser.add_argument("--confirm", type=int, default=2, help="extra alternating runs of chosen and fastest")
    args = parser.parse_args()
    folder = Path(__file__).parent / "results" / time.strftime("planner-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    cases = []
    for name in args.models.split(","):
        workload = MODELS[name][2]
        store = ensure_store(args.data, name)
        profile = ensure_profile(store)
        for label, budget in budgets(profile, workload).items():
            if label in args.budgets.split(","):
                cases.append(run_case(store, profile, name, label, budget, workload, folder, args.confirm))
                print(markdown(cases[-1:]).splitlines()[-1], flush=True)
    (folder.with_suffix(".json")).write_text(json.dumps(cases, indent=1))
    print(markdown(cases))
    print(f"results: {folder.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
